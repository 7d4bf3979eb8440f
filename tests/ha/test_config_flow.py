"""The config flow, reauth, reconfigure and options of the rproxy integration, against a real
Home Assistant (``hass``) and a real rproxy bridge on 127.0.0.1.

Nothing of rproxy's network code is mocked: the flow's bridge check connects to the ``bridge``
fixture, its URL check asks the real ``home_app`` (or a port where nothing listens), and the
LAN discovery reads a real python-zeroconf cache filled over loopback mDNS.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import pytest_socket
from homeassistant.components.zeroconf.models import HaAsyncZeroconf, HaZeroconf
from homeassistant.config_entries import SOURCE_USER, SOURCE_ZEROCONF, ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType, InvalidData
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from custom_components.rproxy.const import (
    CONF_EXPOSED,
    CONF_FORWARD_HEADERS,
    CONF_PUBLIC_URL,
    CONF_REQUEST_TIMEOUT,
    CONF_SERVICES,
    CONF_VISITOR_AUTH,
    CONF_VISITOR_PASSWORD,
    CONF_VISITOR_USERNAME,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TUNNEL_NAME,
    DOMAIN,
    ZEROCONF_HTTP_TYPE,
    ZEROCONF_TYPE,
)
from rproxy_core import Bridge, BridgeConfig
from rproxy_core.agent import FORWARDED_HEADERS

from .common import entry_data, free_port, setup_tunnel, start_homeassistant_http, wait_for
from .conftest import TOKEN, HomeApp

INTEGRATION = Path(__file__).resolve().parents[2] / "custom_components" / "rproxy"


# Fixtures.


@pytest.fixture
async def bridge(bridge: Bridge, hass: HomeAssistant) -> AsyncIterator[Bridge]:
    """The conftest ``bridge``, but every rproxy entry is unloaded before the bridge stops.

    Entries made by a flow set up at once (their agent connects to this bridge); unloading them
    here stops their agents while the bridge still runs, so no test ends with an agent
    reconnecting in the background (the plugin fails tests that leave tasks behind).
    """
    yield bridge
    await _unload_all(hass)


async def _unload_all(hass: HomeAssistant) -> None:
    for entry in hass.config_entries.async_entries(DOMAIN):
        if entry.state is ConfigEntryState.LOADED:
            assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()


@pytest.fixture
async def lan_zeroconf(hass: HomeAssistant, socket_enabled: None) -> AsyncIterator[HaAsyncZeroconf]:
    """Home Assistant's shared zeroconf instance, made real and bound to loopback only.

    ``homeassistant.components.zeroconf.async_get_async_instance`` returns whatever is in
    ``hass.data["zeroconf"]`` (only when nothing is there does it create an instance, on the
    host's default interface: the real LAN, whatever it holds), so putting a real loopback
    ``HaAsyncZeroconf`` there makes the integration's ``discovered_apps`` read a real cache the
    test controls. No patching is needed.
    HaAsyncZeroconf ignores ``async_close`` (integrations must not close it): ``ha_async_close``
    is the real one.
    """
    aiozc = HaAsyncZeroconf(zc=HaZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"]))
    hass.data["zeroconf"] = aiozc
    try:
        yield aiozc
    finally:
        hass.data.pop("zeroconf", None)
        await aiozc.ha_async_close()


# Helpers.


def _defaults(result: dict[str, Any]) -> dict[str, Any]:
    """The default (or suggested) value of each field of a form."""
    values: dict[str, Any] = {}
    for marker in result["data_schema"].schema:
        default = marker.default() if callable(marker.default) else None
        suggested = (marker.description or {}).get("suggested_value")
        values[str(marker)] = default if default is not None else suggested
    return values


async def _start_user(hass: HomeAssistant) -> dict[str, Any]:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {}
    return result


async def _bridge_step(
    hass: HomeAssistant, flow_id: str, bridge_url: str, *, token: str = TOKEN, name: str = "home"
) -> dict[str, Any]:
    return await hass.config_entries.flow.async_configure(
        flow_id, {"bridge_url": bridge_url, "token": token, "tunnel_name": name}
    )


async def _to_target(hass: HomeAssistant, bridge: Bridge, name: str = "home") -> dict[str, Any]:
    """A user flow past its bridge step, at the target step."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge.url, name=name)
    assert result["type"] is FlowResultType.FORM, result
    assert result["step_id"] == "target"
    return result


def _target_options(result: dict[str, Any]) -> list[dict[str, str]]:
    selector = result["data_schema"].schema["target"]
    return list(selector.config["options"])


async def _wait_loaded(hass: HomeAssistant, entry_id: str) -> None:
    await hass.async_block_till_done()
    entry = hass.config_entries.async_get_entry(entry_id)
    assert entry is not None
    assert entry.state is ConfigEntryState.LOADED, entry.reason


# The user step.


async def test_user_form(hass: HomeAssistant) -> None:
    """A first tunnel: an empty form, the tunnel name defaulting to "home"."""
    result = await _start_user(hass)
    defaults = _defaults(result)
    assert defaults == {"bridge_url": None, "token": None, "tunnel_name": DEFAULT_TUNNEL_NAME}


@pytest.mark.parametrize("bridge_url", ["ftp://x", "not a url", "ws://", "https:///path"])
async def test_user_invalid_url(hass: HomeAssistant, bridge_url: str) -> None:
    """Not a bridge URL: an error on the field, the form again with what was typed."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge_url)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {"bridge_url": "invalid_url"}
    assert _defaults(result)["bridge_url"] == bridge_url


@pytest.mark.parametrize("name", ["Bad_Name", "", "-home", "a" * 64])
async def test_user_invalid_name(hass: HomeAssistant, bridge: Bridge, name: str) -> None:
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge.url, name=name)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"tunnel_name": "invalid_name"}
    assert bridge.registry.tunnels() == {}


# yarl raises ValueError for these (port out of range, unclosed IPv6 bracket, non-numeric
# port); bridge_connect_url used to let it out of the form.
@pytest.mark.parametrize("bridge_url", ["http://127.0.0.1:99999", "http://[::1", "https://bridge:port"])
async def test_user_unparsable_url(hass: HomeAssistant, bridge_url: str) -> None:
    """URLs yarl cannot even parse are invalid_url too, not an exception."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge_url)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"bridge_url": "invalid_url"}


# A token the agent cannot send in a header is an error on its field, not a crash. The frontend
# refuses an empty required field, but the flow's API (and the reauth form, which shares
# probe_bridge) does not.
@pytest.mark.parametrize("token", ["", "abc\ndef"])
async def test_user_unusable_token(hass: HomeAssistant, bridge: Bridge, token: str) -> None:
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge.url, token=token)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {"token": "invalid_token"}


async def test_user_invalid_auth(hass: HomeAssistant, bridge: Bridge) -> None:
    """The real bridge refuses the token."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge.url, token="not-the-token")
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {"base": "invalid_auth"}
    # What was typed stays in the form, but for the secret, which is never sent back.
    assert _defaults(result) == {"bridge_url": bridge.url, "token": None, "tunnel_name": "home"}


async def test_user_cannot_connect(hass: HomeAssistant, socket_enabled: None) -> None:
    """Nothing listens there: cannot_connect, with the reason in the description."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], f"http://127.0.0.1:{free_port()}")
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}
    assert result["description_placeholders"]["error"]


async def test_user_plain_bridge_on_the_lan_is_probed(hass: HomeAssistant, socket_enabled: None) -> None:
    """A ws:// bridge on another address (rproxy's command-line agent wants --insecure for one) is
    still accepted here, as before; the entry then raises the insecure_bridge repair."""
    output = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    lan = next((a for a in output.split() if "." in a and not a.startswith("127.")), None)
    if lan is None:
        pytest.skip("this machine has no non-loopback IPv4 address to put a bridge on")
    # The plugin lets tests connect to 127.0.0.1 only; this machine's own LAN address is no
    # farther away (its next test's setup restores the plugin's list).
    pytest_socket.socket_allow_hosts(["127.0.0.1", lan])
    bridge = Bridge(BridgeConfig(host=lan, port=0, tokens=[TOKEN], access_log=False))
    await bridge.start()
    try:
        result = await _start_user(hass)
        result = await _bridge_step(hass, result["flow_id"], f"ws://{lan}:{bridge.port}")
        assert result["type"] is FlowResultType.FORM
        assert result["step_id"] == "target", result["errors"]
        await wait_for(lambda: bridge.registry.tunnels() == {}, what="the probe to leave the bridge")
    finally:
        await bridge.stop()


async def test_user_retry_after_error(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    """An error leaves the flow usable: the corrected details go on to the target step."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge.url, token="wrong")
    assert result["errors"] == {"base": "invalid_auth"}
    result = await _bridge_step(hass, result["flow_id"], f"  {bridge.url}  ")
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "target"
    assert result["description_placeholders"] == {"found": str(len(_target_options(result)) - 2)}
    # The probe left: the bridge holds no tunnel for it.
    await wait_for(lambda: bridge.registry.tunnels() == {}, what="the probe to leave the bridge")


async def test_user_prefills_known_bridge(hass: HomeAssistant) -> None:
    """A second tunnel: the bridge URL of the first is offered; its token is not sent to the
    browser, the field may stay empty to use it."""
    MockConfigEntry(
        domain=DOMAIN, data=entry_data("https://bridge.example.com", token="secret-token"), unique_id="homeassistant"
    ).add_to_hass(hass)
    result = await _start_user(hass)
    assert _defaults(result) == {
        "bridge_url": "https://bridge.example.com",
        "token": None,
        "tunnel_name": DEFAULT_TUNNEL_NAME,
    }
    assert "secret-token" not in repr(result)


async def test_user_empty_token_uses_known_bridge_token(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, lan_zeroconf: HaAsyncZeroconf
) -> None:
    """Leaving the token empty for the bridge of an existing tunnel uses that tunnel's token."""
    await setup_tunnel(hass, bridge.url, home_app.url)
    result = await _start_user(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"bridge_url": bridge.url, "tunnel_name": "second"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "target"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "homeassistant"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"]["token"] == TOKEN
    await _wait_loaded(hass, result["result"].entry_id)


async def test_user_password_in_the_bridge_url_is_stored_as_the_token(
    hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf
) -> None:
    """node-rproxy's form, ``ws://user:password@host``, against a bridge started as ``rproxy
    bridge PORT agent:pw-123``: the flow connects with ``agent:pw-123``, stores it as the token
    and keeps the URL without it."""
    await bridge.set_tokens([TOKEN, "agent:pw-123"])
    url = bridge.url.replace("http://", "ws://agent:pw-123@")
    result = await _start_user(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"bridge_url": url, "tunnel_name": "home"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "target", result["errors"]
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "homeassistant"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"]["token"] == "agent:pw-123"
    assert "pw-123" not in result["data"]["bridge_url"]
    assert result["data"]["bridge_url"] == bridge.url.replace("http://", "ws://")
    await _wait_loaded(hass, result["result"].entry_id)


async def test_user_password_in_the_url_and_a_token_is_token_twice(hass: HomeAssistant, bridge: Bridge) -> None:
    """Two credentials, one in the URL and one typed: an error on the token, and the URL shown
    again without its password."""
    result = await _start_user(hass)
    result = await _bridge_step(hass, result["flow_id"], bridge.url.replace("http://", "http://agent:pw-123@"))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"token": "token_twice"}
    assert _defaults(result)["bridge_url"] == bridge.url
    assert "pw-123" not in repr(result)
    assert not bridge.registry.names()


# Two tunnels of this Home Assistant must not share a name on one bridge: the bridge takes
# agents of one name for copies of one app and would deal visitors out between two targets.
async def test_user_refuses_tunnel_name_in_use(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, lan_zeroconf: HaAsyncZeroconf
) -> None:
    result = await _to_target(hass, bridge)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "homeassistant"})
    await _wait_loaded(hass, result["result"].entry_id)

    result = await _start_user(hass)
    defaults = _defaults(result)
    assert defaults["bridge_url"] == bridge.url
    result = await _bridge_step(hass, result["flow_id"], bridge.url, name="home")
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user", "a second tunnel named 'home' on the same bridge was accepted"
    assert set(result["errors"]) == {"tunnel_name"}
    # Another name on the same bridge is fine.
    result = await _bridge_step(hass, result["flow_id"], bridge.url, name="wiki")
    assert result["step_id"] == "target"
    hass.config_entries.flow.async_abort(result["flow_id"])


# The target step: Home Assistant, or a URL.


async def test_target_homeassistant(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    result = await _to_target(hass, bridge)
    options = _target_options(result)
    # (Apps other test runs announce on the host's loopback mDNS may be listed in between.)
    assert (options[0]["value"], options[-1]["value"]) == ("homeassistant", "url")
    assert _defaults(result) == {"target": "homeassistant"}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "homeassistant"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "home: Home Assistant"
    assert result["data"] == entry_data(bridge.url)
    entry = result["result"]
    assert entry.unique_id == "homeassistant"
    await _wait_loaded(hass, entry.entry_id)
    await wait_for(lambda: bridge.registry.tunnels() == {"home": 1}, what="the tunnel to be up")

    # A second tunnel to Home Assistant: refused.
    result = await _to_target(hass, bridge, name="other")
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "homeassistant"})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert len(hass.config_entries.async_entries(DOMAIN)) == 1


async def test_target_url_errors(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    result = await _to_target(hass, bridge)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "url"
    assert result["errors"] == {}
    flow_id = result["flow_id"]

    for typed in ("not a url", "ftp://x", "http://", "http://host/?q=1", "http://host/#frag"):
        result = await hass.config_entries.flow.async_configure(flow_id, {"target_url": typed})
        assert result["type"] is FlowResultType.FORM, typed
        assert result["errors"] == {"target_url": "invalid_url"}, typed
        assert _defaults(result)["target_url"] == typed

    result = await hass.config_entries.flow.async_configure(flow_id, {"target_url": f"http://127.0.0.1:{free_port()}"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect_target"}
    assert result["description_placeholders"]["error"]


# yarl raises ValueError for these; the URL step used to let it out of the form.
@pytest.mark.parametrize("typed", ["http://127.0.0.1:99999", "http://[::1", "http://host:port/"])
async def test_target_url_unparsable(
    hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf, typed: str
) -> None:
    """URLs yarl cannot even parse are invalid_url too, not an exception."""
    result = await _to_target(hass, bridge)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target_url": typed})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"target_url": "invalid_url"}


async def test_target_url_is_homeassistant(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    """The address of this Home Assistant's own server: choose Home Assistant instead."""
    port = await start_homeassistant_http(hass)
    try:
        result = await _to_target(hass, bridge)
        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
        for typed in (
            f"http://127.0.0.1:{port}",
            f"http://localhost:{port}/",
            f"http://homeassistant.local:{port}",
            f"https://HomeAssistant:{port}/lovelace",
            f"http://0.0.0.0:{port}",
            f"http://127.1.2.3:{port}",
            f"http://[::1]:{port}",
        ):
            result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target_url": typed})
            assert result["type"] is FlowResultType.FORM, typed
            assert result["errors"] == {"target_url": "is_homeassistant"}, typed
        # Another port here: an app like any other (checked by asking it; nothing answers there).
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"target_url": f"http://127.0.0.1:{free_port()}"}
        )
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {"base": "cannot_connect_target"}
    finally:
        await hass.http.stop()


# Home Assistant's own LAN address (the one people type) counts as this Home Assistant: proxied
# over HTTP, every visitor would arrive from Home Assistant's own local address and the Home
# Assistant target's protections would not hold. (The test plugin fakes the LAN adapter as
# 10.10.10.10; no connection is made to it.)
async def test_target_url_is_homeassistant_lan_address(
    hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf
) -> None:
    port = await start_homeassistant_http(hass)
    try:
        assert hass.config.api is not None
        assert hass.config.api.local_ip == "10.10.10.10"
        result = await _to_target(hass, bridge)
        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"target_url": f"http://10.10.10.10:{port}"}
        )
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {"target_url": "is_homeassistant"}
    finally:
        await hass.http.stop()


async def _raw_server(handle: Any) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_target_url_not_http(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    """Something answers, but not HTTP: cannot_connect_target with aiohttp's reason."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    server, port = await _raw_server(garbage)
    try:
        result = await _to_target(hass, bridge)
        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"target_url": f"http://127.0.0.1:{port}"}
        )
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {"base": "cannot_connect_target"}
        assert result["description_placeholders"]["error"]
    finally:
        server.close()
        await server.wait_closed()


async def test_target_url_no_answer(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    """A server that accepts and never answers: cannot_connect_target after the check's time limit
    (config_flow._URL_CHECK_TIMEOUT, 10 s: this test takes that long)."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server, port = await _raw_server(silent)
    try:
        result = await _to_target(hass, bridge)
        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"target_url": f"http://127.0.0.1:{port}"}
        )
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {"base": "cannot_connect_target"}
        assert result["description_placeholders"] == {"error": "no answer in time"}
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_target_url_creates_entry(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, lan_zeroconf: HaAsyncZeroconf
) -> None:
    result = await _to_target(hass, bridge, name="garage")
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target_url": f" {home_app.url} "})
    assert result["type"] is FlowResultType.CREATE_ENTRY, result
    assert "garage" in result["title"]
    assert result["data"] == {
        "bridge_url": bridge.url,
        "token": TOKEN,
        "tunnel_name": "garage",
        "target": "url",
        "target_url": home_app.url,
        "target_name": home_app.url,
    }
    entry = result["result"]
    assert entry.unique_id == f"url:{home_app.url}/"
    await _wait_loaded(hass, entry.entry_id)
    # The flow's check asked the app once; the tunnel is up at the bridge.
    assert home_app.requests == ["/"]
    await wait_for(lambda: bridge.registry.tunnels() == {"garage": 1}, what="the tunnel to be up")

    # The same app again (written slightly differently): already exposed.
    result = await _to_target(hass, bridge, name="again")
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": "url"})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target_url": home_app.url + "/"})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert len(hass.config_entries.async_entries(DOMAIN)) == 1


# The target step: web apps found on the LAN.


async def _announce(aiozc: AsyncZeroconf, service_type: str, port: int, properties: dict[str, str]) -> AsyncServiceInfo:
    """Register a uniquely named service on 127.0.0.1 (mDNS is shared by the whole host)."""
    name = f"rproxy-test-{uuid.uuid4().hex[:12]}.{service_type}"
    info = AsyncServiceInfo(
        service_type,
        name,
        addresses=[socket.inet_aton("127.0.0.1")],
        port=port,
        properties=properties,
        server=f"rproxy-test-{uuid.uuid4().hex[:8]}.local.",
    )
    await (await aiozc.async_register_service(info))
    return info


async def _learn(listener: HaAsyncZeroconf, infos: list[AsyncServiceInfo]) -> None:
    """Make Home Assistant's (loopback) zeroconf learn these services: browse until each is added
    and fully resolvable from its cache, the way Home Assistant's own browser keeps it filled."""
    wanted = {info.name for info in infos}
    added: set[str] = set()

    def on_change(zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            added.add(name)

    types = sorted({info.type for info in infos})
    browser = AsyncServiceBrowser(listener.zeroconf, types, handlers=[on_change])
    try:
        await wait_for(lambda: wanted <= added, timeout=10, what="the services to be browsed")
        for info in infos:
            # The browser saw the pointer; ask for the rest (SRV, TXT, A) into the same cache.
            resolved = AsyncServiceInfo(info.type, info.name)
            assert await resolved.async_request(listener.zeroconf, 3000), info.name
    finally:
        await browser.async_cancel()


async def test_target_lists_discovered_apps(
    hass: HomeAssistant,
    bridge: Bridge,
    home_app: HomeApp,
    lan_zeroconf: HaAsyncZeroconf,
    loopback_zeroconf: AsyncZeroconf,
) -> None:
    """Apps announced over mDNS (our own type, and _http._tcp with the rproxy marker) are offered;
    a plain _http._tcp service is not. Choosing one exposes it at the URL its TXT properties say."""
    # Unique names: loopback mDNS is shared by the whole host, other test runs may announce too.
    tag = uuid.uuid4().hex[:8]
    app_id = f"app-{tag}"
    port = int(home_app.url.rsplit(":", 1)[1])
    own = await _announce(
        loopback_zeroconf,
        ZEROCONF_TYPE,
        port,
        {"name": f"Zeta Wiki {tag}", "id": app_id, "path": "wiki", "scheme": "http"},
    )
    marked = await _announce(
        loopback_zeroconf, ZEROCONF_HTTP_TYPE, 8443, {"rproxy": "1", "name": f"Alpha Cams {tag}", "scheme": "HTTPS"}
    )
    plain = await _announce(loopback_zeroconf, ZEROCONF_HTTP_TYPE, 8081, {"path": "/", "name": f"Printer {tag}"})
    try:
        await _learn(lan_zeroconf, [own, marked, plain])

        result = await _to_target(hass, bridge)
        options = _target_options(result)
        # Home Assistant first, the typed URL last, the apps in between (and counted).
        assert options[0] == {"value": "homeassistant", "label": "Home Assistant"}
        assert options[-1] == {"value": "url", "label": "URL"}
        assert result["description_placeholders"] == {"found": str(len(options) - 2)}
        # Ours, by name; no plain _http service.
        ours = [o for o in options if tag in o["label"]]
        assert ours == [
            {"value": f"app:{marked.name}", "label": f"Alpha Cams {tag} (127.0.0.1:8443)"},  # no id: instance name
            {"value": f"app:{app_id}", "label": f"Zeta Wiki {tag} (127.0.0.1:{port})"},
        ]

        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": f"app:{app_id}"})
        assert result["type"] is FlowResultType.CREATE_ENTRY, result
        assert result["title"] == f"home: Zeta Wiki {tag}"
        assert result["data"]["target"] == "url"
        assert result["data"]["target_url"] == f"http://127.0.0.1:{port}/wiki"
        assert result["data"]["target_name"] == f"Zeta Wiki {tag}"
        entry = result["result"]
        assert entry.unique_id == f"zeroconf:{app_id}"
        await _wait_loaded(hass, entry.entry_id)

        # The other app: https, path "/" by default, keyed by its instance name.
        result = await _to_target(hass, bridge, name="cams")
        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": f"app:{marked.name}"})
        assert result["type"] is FlowResultType.CREATE_ENTRY, result
        assert result["data"]["target_url"] == "https://127.0.0.1:8443/"
        assert result["result"].unique_id == f"zeroconf:{marked.name}"
        await _wait_loaded(hass, result["result"].entry_id)

        # The first app once more: already exposed.
        result = await _to_target(hass, bridge, name="again")
        result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": f"app:{app_id}"})
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "already_configured"
    finally:
        for info in (own, marked, plain):
            await (await loopback_zeroconf.async_unregister_service(info))


def _cached_service(
    zc: HaZeroconf,
    instance: str,
    addresses: list[str],
    port: int,
    properties: dict[str, str | None],
    *,
    resolved: bool = True,
) -> None:
    """Put a service's mDNS records into a (real) zeroconf cache, as answers on the LAN would.

    For cases loopback mDNS cannot produce on an IPv4-only socket: IPv6 addresses, and a
    pointer whose service records never came (or expired).
    """
    info = AsyncServiceInfo(
        ZEROCONF_TYPE,
        f"{instance}.{ZEROCONF_TYPE}",
        parsed_addresses=addresses,
        port=port,
        properties=properties,
        server=f"{instance}.local.",
    )
    records = [info.dns_pointer()]
    if resolved:
        records += [info.dns_service(), info.dns_text(), *info.dns_addresses()]
    zc.cache.async_add_records(records)


async def test_target_discovered_addresses(hass: HomeAssistant, bridge: Bridge, lan_zeroconf: HaAsyncZeroconf) -> None:
    """IPv4 is preferred when a service has both; an IPv6-only one gets a bracketed URL; a
    pointer without its service records is left out."""
    zc = lan_zeroconf.zeroconf
    suffix = uuid.uuid4().hex[:8]
    _cached_service(
        zc,
        f"both-{suffix}",
        ["fd00::5", "192.168.1.5"],
        8080,
        {"name": f"Both {suffix}", "id": f"both-{suffix}", "beta": None},  # a bare TXT key: no value
    )
    _cached_service(
        zc, f"six-{suffix}", ["fd00::6"], 8086, {"name": f"Six {suffix}", "id": f"six-{suffix}", "path": "/app/"}
    )
    _cached_service(
        zc, f"gone-{suffix}", ["192.168.1.7"], 8087, {"name": f"Gone {suffix}", "id": f"gone-{suffix}"}, resolved=False
    )

    result = await _to_target(hass, bridge)
    options = _target_options(result)
    assert result["description_placeholders"] == {"found": str(len(options) - 2)}
    ours = [o["label"] for o in options if suffix in o["value"]]
    assert ours == [f"Both {suffix} (192.168.1.5:8080)", f"Six {suffix} (fd00::6:8086)"]
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": f"app:six-{suffix}"})
    assert result["type"] is FlowResultType.CREATE_ENTRY, result
    assert result["data"]["target_url"] == "http://[fd00::6]:8086/app/"
    await _wait_loaded(hass, result["result"].entry_id)


# Picking in the target list an app whose discovery flow is still waiting creates the entry
# (Home Assistant then drops the pending discovery), rather than aborting "already_in_progress".
async def test_target_app_also_pending_as_discovery(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, lan_zeroconf: HaAsyncZeroconf
) -> None:
    port = int(home_app.url.rsplit(":", 1)[1])
    app_id = f"wiki-{uuid.uuid4().hex[:8]}"
    discovery = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_service_info(port, app_id=app_id)
    )
    assert discovery["step_id"] == "zeroconf_confirm"
    _cached_service(lan_zeroconf.zeroconf, app_id, ["127.0.0.1"], port, {"name": "Wiki", "id": app_id})

    result = await _to_target(hass, bridge)
    assert f"app:{app_id}" in [o["value"] for o in _target_options(result)]
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"target": f"app:{app_id}"})
    assert result["type"] is FlowResultType.CREATE_ENTRY, result
    await _wait_loaded(hass, result["result"].entry_id)
    # The discovery of the app just exposed is no longer offered.
    assert not hass.config_entries.flow.async_progress_by_handler(DOMAIN)


# Discovery: Home Assistant's zeroconf browser starts the flow.


def _service_info(
    port: int,
    *,
    name: str = "Wiki",
    app_id: str = "wiki-1",
    service_type: str = ZEROCONF_TYPE,
    properties: dict[str, str] | None = None,
) -> ZeroconfServiceInfo:
    return ZeroconfServiceInfo(
        ip_address=ip_address("127.0.0.1"),
        ip_addresses=[ip_address("127.0.0.1")],
        port=port,
        hostname="wiki-host.local.",
        type=service_type,
        name=f"{name}.{service_type}",
        properties={"name": name, "id": app_id, "path": "/"} if properties is None else properties,
    )


async def test_zeroconf_discovery(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    port = int(home_app.url.rsplit(":", 1)[1])
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_service_info(port)
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["description_placeholders"] == {"name": "Wiki", "url": f"http://127.0.0.1:{port}/"}
    flow = hass.config_entries.flow.async_get(result["flow_id"])
    assert flow["context"]["title_placeholders"] == {"name": "Wiki"}
    assert flow["context"]["unique_id"] == "zeroconf:wiki-1"

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    # A mistake on the way is shown as in a user flow.
    result = await _bridge_step(hass, result["flow_id"], bridge.url, token="wrong")
    assert result["errors"] == {"base": "invalid_auth"}
    result = await _bridge_step(hass, result["flow_id"], bridge.url, name="wiki")
    # No target step: the discovered app is the target.
    assert result["type"] is FlowResultType.CREATE_ENTRY, result
    assert result["title"] == "wiki: Wiki"
    assert result["data"] == {
        "bridge_url": bridge.url,
        "token": TOKEN,
        "tunnel_name": "wiki",
        "target": "url",
        "target_url": f"http://127.0.0.1:{port}/",
        "target_name": "Wiki",
    }
    entry = result["result"]
    assert entry.unique_id == "zeroconf:wiki-1"
    await _wait_loaded(hass, entry.entry_id)

    # The app moved: its tunnel follows it.
    new_port = free_port()
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_service_info(new_port)
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data["target_url"] == f"http://127.0.0.1:{new_port}/"
    assert entry.data["bridge_url"] == bridge.url  # the rest unchanged
    await _wait_loaded(hass, entry.entry_id)
    # Reloaded: the running agent serves the new address.
    assert entry.runtime_data.agent is not None
    assert entry.runtime_data.agent.config.target == f"http://127.0.0.1:{new_port}/"
    assert len(hass.config_entries.async_entries(DOMAIN)) == 1


async def test_zeroconf_http_without_marker(hass: HomeAssistant) -> None:
    """A plain _http._tcp service: not for rproxy."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_service_info(8080, service_type=ZEROCONF_HTTP_TYPE, properties={"path": "/"}),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_rproxy_app"


async def test_zeroconf_without_port(hass: HomeAssistant) -> None:
    """A service that names no port is no web app to expose."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=_service_info(0)
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_rproxy_app"


async def test_zeroconf_http_with_marker(hass: HomeAssistant) -> None:
    """An _http._tcp service with the rproxy property: offered like our own type."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_service_info(
            8443,
            name="Cams",
            service_type=ZEROCONF_HTTP_TYPE,
            properties={"rproxy": "", "name": "Cams", "path": "ui", "scheme": "https"},
        ),
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["description_placeholders"] == {"name": "Cams", "url": "https://127.0.0.1:8443/ui"}
    flow = hass.config_entries.flow.async_get(result["flow_id"])
    assert flow["context"]["unique_id"] == f"zeroconf:Cams.{ZEROCONF_HTTP_TYPE}"
    hass.config_entries.flow.async_abort(result["flow_id"])


# Reauth.


async def test_reauth(hass: HomeAssistant, bridge: Bridge) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="home: Home Assistant",
        unique_id="homeassistant",
        data=entry_data(bridge.url, token="revoked-token"),
    )
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    # (Home Assistant adds the entry's title as "name".)
    assert result["description_placeholders"] == {
        "tunnel": "home",
        "bridge": bridge.url,
        "error": "",
        "name": entry.title,
    }
    assert _defaults(result) == {"token": None}  # the refused token is not offered again

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"token": "still-wrong"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}
    assert entry.data["token"] == "revoked-token"

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"token": TOKEN})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert entry.data == entry_data(bridge.url)
    await _wait_loaded(hass, entry.entry_id)  # loaded with the new token
    await wait_for(lambda: bridge.registry.tunnels() == {"home": 1}, what="the tunnel to be up")


async def test_reauth_started_by_refused_token(hass: HomeAssistant, bridge: Bridge) -> None:
    """The bridge refuses the token at setup: Home Assistant starts the reauth flow by itself."""
    entry = await setup_tunnel(hass, bridge.url, token="revoked-token", expect=ConfigEntryState.SETUP_ERROR)
    flows = [
        f for f in hass.config_entries.flow.async_progress_by_handler(DOMAIN) if f["context"]["source"] == "reauth"
    ]
    assert len(flows) == 1
    assert flows[0]["context"]["entry_id"] == entry.entry_id
    result = await hass.config_entries.flow.async_configure(flows[0]["flow_id"], {"token": TOKEN})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    await _wait_loaded(hass, entry.entry_id)


async def test_reauth_cannot_connect(hass: HomeAssistant, socket_enabled: None) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN, unique_id="homeassistant", data=entry_data(f"http://127.0.0.1:{free_port()}", token="old")
    )
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"token": TOKEN})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    assert result["errors"] == {"base": "cannot_connect"}
    assert result["description_placeholders"]["error"]
    assert entry.data["token"] == "old"
    hass.config_entries.flow.async_abort(result["flow_id"])


# Reconfigure.


async def test_reconfigure_to_a_password_in_the_url(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """Reconfigure takes ``ws://user:password@host`` too: the password becomes the token; a
    typed token beside it is token_twice; a password without a user is invalid_url."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    await bridge.set_tokens([TOKEN, "agent:pw-123"])
    result = await entry.start_reconfigure_flow(hass)
    flow_id = result["flow_id"]
    with_password = bridge.url.replace("http://", "ws://agent:pw-123@")
    for typed, errors in (
        ({"bridge_url": with_password, "token": TOKEN}, {"token": "token_twice"}),
        ({"bridge_url": bridge.url.replace("http://", "ws://:pw-123@")}, {"bridge_url": "invalid_url"}),
    ):
        result = await hass.config_entries.flow.async_configure(flow_id, {"tunnel_name": "home", **typed})
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == errors
        assert "pw-123" not in repr(_defaults(result)) or errors == {"bridge_url": "invalid_url"}
    result = await hass.config_entries.flow.async_configure(
        flow_id, {"bridge_url": with_password, "tunnel_name": "home"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.data["token"] == "agent:pw-123"
    assert entry.data["bridge_url"] == bridge.url.replace("http://", "ws://")
    await _wait_loaded(hass, entry.entry_id)


async def test_reconfigure(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    await wait_for(lambda: bridge.registry.tunnels() == {"home": 1}, what="the tunnel to be up")
    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    assert _defaults(result) == {"bridge_url": bridge.url, "token": None, "tunnel_name": "home"}
    assert TOKEN not in repr(result)  # the stored token is never sent to the browser
    flow_id = result["flow_id"]

    cases = [
        ({"bridge_url": "ftp://x"}, {"bridge_url": "invalid_url"}),
        ({"tunnel_name": "Bad_Name"}, {"tunnel_name": "invalid_name"}),
        ({"token": "wrong"}, {"base": "invalid_auth"}),
        ({"bridge_url": f"http://127.0.0.1:{free_port()}"}, {"base": "cannot_connect"}),
    ]
    for change, errors in cases:
        typed = {"bridge_url": bridge.url, "token": TOKEN, "tunnel_name": "home", **change}
        result = await hass.config_entries.flow.async_configure(flow_id, typed)
        assert result["type"] is FlowResultType.FORM, change
        assert result["step_id"] == "reconfigure"
        assert result["errors"] == errors, change
        assert _defaults(result) == {**typed, "token": None}  # what was typed stays, but the secret
    assert entry.data == entry_data(bridge.url, home_app.url)

    result = await hass.config_entries.flow.async_configure(
        flow_id,
        {"bridge_url": bridge.url + "/", "tunnel_name": "garage"},  # token left empty: kept
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.data == {
        **entry_data(bridge.url, home_app.url),
        "bridge_url": bridge.url + "/",
        "tunnel_name": "garage",
    }
    # Reloaded: the tunnel is now served under its new name.
    await _wait_loaded(hass, entry.entry_id)
    await wait_for(lambda: bridge.registry.tunnels() == {"garage": 1}, what="the tunnel to move to its new name")


# Options.


async def test_options_defaults_and_timeout(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "init"
    assert _defaults(result) == {
        CONF_REQUEST_TIMEOUT: DEFAULT_REQUEST_TIMEOUT,
        CONF_VISITOR_AUTH: "none",
        CONF_VISITOR_USERNAME: None,
        CONF_VISITOR_PASSWORD: None,
        CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS),
        CONF_PUBLIC_URL: None,
        CONF_SERVICES: [],
    }
    coordinator = entry.runtime_data
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {CONF_REQUEST_TIMEOUT: 45, CONF_VISITOR_AUTH: "none", CONF_FORWARD_HEADERS: ["X-Forwarded-For"]},
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {
        CONF_REQUEST_TIMEOUT: 45,
        CONF_VISITOR_AUTH: "none",
        CONF_FORWARD_HEADERS: ["X-Forwarded-For"],
    }
    # New options restart the tunnel with them.
    await _wait_loaded(hass, entry.entry_id)
    assert entry.runtime_data is not coordinator
    agent = entry.runtime_data.agent
    assert agent is not None
    assert agent.config.request_timeout == 45
    assert agent.config.forward_headers == ("X-Forwarded-For",)

    # The form shows what is stored.
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert _defaults(result)[CONF_REQUEST_TIMEOUT] == 45
    assert _defaults(result)[CONF_FORWARD_HEADERS] == ["X-Forwarded-For"]
    hass.config_entries.options.async_abort(result["flow_id"])


async def test_options_basic_auth(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    flow_id = result["flow_id"]
    base = {CONF_REQUEST_TIMEOUT: 30, CONF_VISITOR_AUTH: "basic", CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS)}
    cases = [
        ({}, {CONF_VISITOR_USERNAME: "invalid_username"}),
        ({CONF_VISITOR_USERNAME: "", CONF_VISITOR_PASSWORD: "pw"}, {CONF_VISITOR_USERNAME: "invalid_username"}),
        ({CONF_VISITOR_USERNAME: "a:b", CONF_VISITOR_PASSWORD: "pw"}, {CONF_VISITOR_USERNAME: "invalid_username"}),
        ({CONF_VISITOR_USERNAME: "anna"}, {CONF_VISITOR_PASSWORD: "password_required"}),
        ({CONF_VISITOR_USERNAME: "anna", CONF_VISITOR_PASSWORD: ""}, {CONF_VISITOR_PASSWORD: "password_required"}),
    ]
    for extra, errors in cases:
        result = await hass.config_entries.options.async_configure(flow_id, {**base, **extra})
        assert result["type"] is FlowResultType.FORM, extra
        assert result["errors"] == errors, extra
        # What was typed stays in the form.
        assert _defaults(result)[CONF_VISITOR_AUTH] == "basic"
    assert entry.options == {}

    result = await hass.config_entries.options.async_configure(
        flow_id, {**base, CONF_VISITOR_USERNAME: "anna", CONF_VISITOR_PASSWORD: "s3cret"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {**base, CONF_VISITOR_USERNAME: "anna", CONF_VISITOR_PASSWORD: "s3cret"}
    await _wait_loaded(hass, entry.entry_id)
    agent = entry.runtime_data.agent
    assert agent is not None
    assert agent.config.visitor_credentials == ("anna", "s3cret")


# Options keep the switch's ``exposed`` and nothing else of the old options: a field the user
# emptied (the frontend leaves it out) must not survive, e.g. the visitor password.
async def test_options_basic_auth_off_forgets_credentials(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp
) -> None:
    basic = {
        CONF_REQUEST_TIMEOUT: 30,
        CONF_VISITOR_AUTH: "basic",
        CONF_VISITOR_USERNAME: "anna",
        CONF_VISITOR_PASSWORD: "s3cret",
        CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS),
    }
    entry = await setup_tunnel(hass, bridge.url, home_app.url, options={**basic, CONF_EXPOSED: True})
    result = await hass.config_entries.options.async_init(entry.entry_id)
    # What the frontend sends after the user chose "none" and emptied both fields.
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {CONF_REQUEST_TIMEOUT: 30, CONF_VISITOR_AUTH: "none", CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS)},
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await _wait_loaded(hass, entry.entry_id)
    assert entry.runtime_data.agent is not None
    assert entry.runtime_data.agent.config.visitor_credentials is None
    assert entry.options[CONF_EXPOSED] is True
    assert CONF_VISITOR_PASSWORD not in entry.options, "the old visitor password is still stored"
    assert CONF_VISITOR_USERNAME not in entry.options


async def test_options_for_homeassistant_offer_only_what_applies(hass: HomeAssistant, bridge: Bridge) -> None:
    """Home Assistant has its own login and learns the visitor's address in-process: its form
    has no visitor password and no forwarded headers, and options an older version stored for
    them are dropped on save and never reach the agent."""
    await start_homeassistant_http(hass)
    stale = {
        CONF_REQUEST_TIMEOUT: 30,
        CONF_VISITOR_AUTH: "basic",
        CONF_VISITOR_USERNAME: "anna",
        CONF_VISITOR_PASSWORD: "s3cret",
        CONF_FORWARD_HEADERS: ["X-Forwarded-For"],
    }
    try:
        entry = await setup_tunnel(hass, bridge.url, options=stale)
        agent = entry.runtime_data.agent
        assert agent is not None
        assert agent.config.visitor_credentials is None
        assert agent.config.forward_headers == FORWARDED_HEADERS  # what its extra services get

        result = await hass.config_entries.options.async_init(entry.entry_id)
        assert result["type"] is FlowResultType.FORM
        assert _defaults(result) == {CONF_REQUEST_TIMEOUT: 30, CONF_PUBLIC_URL: None, CONF_SERVICES: []}
        with pytest.raises(InvalidData):  # the frontend cannot send a field the form lacks
            await hass.config_entries.options.async_configure(result["flow_id"], stale)
        result = await hass.config_entries.options.async_configure(result["flow_id"], {CONF_REQUEST_TIMEOUT: 20})
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert entry.options == {CONF_REQUEST_TIMEOUT: 20}
        await _wait_loaded(hass, entry.entry_id)
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await hass.http.stop()


async def test_options_services_are_checked_line_by_line(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp
) -> None:
    """Each NAME=URL the agent would refuse gets its own error naming the line; good lines are
    stored tidied and reach the agent; emptied, they are gone."""
    port = await start_homeassistant_http(hass)
    try:
        entry = await setup_tunnel(hass, bridge.url, home_app.url)
        result = await hass.config_entries.options.async_init(entry.entry_id)
        flow_id = result["flow_id"]
        base = {CONF_REQUEST_TIMEOUT: 30, CONF_VISITOR_AUTH: "none", CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS)}
        cases = [
            (["nodered"], "service_format", "nodered"),
            (["=http://192.0.2.1"], "service_format", "=http://192.0.2.1"),
            (["Node_Red=http://192.0.2.1:1880"], "service_name", "Node_Red"),
            (["a=http://192.0.2.1", "a=http://192.0.2.2"], "service_twice", "a"),
            (["lights=zeroconf:Lights"], "service_zeroconf", "lights"),
            (["ssh=tcp://192.0.2.5"], "service_target", "ssh"),
            (["ftp=ftp://192.0.2.5"], "service_target", "ftp"),
            ([f"me=http://127.0.0.1:{port}/"], "service_is_homeassistant", "me"),
            ([f"s{i}=tcp://192.0.2.5:{1000 + i}" for i in range(65)], "too_many_services", "64"),
        ]
        for lines, error, named in cases:
            result = await hass.config_entries.options.async_configure(flow_id, {**base, CONF_SERVICES: lines})
            assert result["type"] is FlowResultType.FORM, lines
            assert result["errors"] == {CONF_SERVICES: error}, lines
            assert result["description_placeholders"] == {"service": named}, lines
            assert _defaults(result)[CONF_SERVICES] == lines  # what was typed stays
        assert entry.options == {}

        result = await hass.config_entries.options.async_configure(
            flow_id, {**base, CONF_SERVICES: [" nodered = http://192.0.2.1:1880/ ", "", "ssh=tcp://192.0.2.5:22"]}
        )
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert entry.options == {**base, CONF_SERVICES: ["nodered=http://192.0.2.1:1880/", "ssh=tcp://192.0.2.5:22"]}
        await _wait_loaded(hass, entry.entry_id)
        agent = entry.runtime_data.agent
        assert agent is not None
        assert agent.config.services == {"nodered": "http://192.0.2.1:1880/", "ssh": "tcp://192.0.2.5:22"}

        result = await hass.config_entries.options.async_init(entry.entry_id)
        assert _defaults(result)[CONF_SERVICES] == ["nodered=http://192.0.2.1:1880/", "ssh=tcp://192.0.2.5:22"]
        result = await hass.config_entries.options.async_configure(result["flow_id"], {**base, CONF_SERVICES: []})
        assert entry.options == base
        await _wait_loaded(hass, entry.entry_id)
        assert entry.runtime_data.agent is not None
        assert entry.runtime_data.agent.config.services == {}
    finally:
        await hass.http.stop()


async def test_options_public_url(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """The address visitors open, where the bridge cannot know it: checked, stored, shown."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    base = {CONF_REQUEST_TIMEOUT: 30, CONF_VISITOR_AUTH: "none", CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS)}
    result = await hass.config_entries.options.async_init(entry.entry_id)
    for bad in ("home.example.com", "ftp://home.example.com", "https://"):
        result = await hass.config_entries.options.async_configure(result["flow_id"], {**base, CONF_PUBLIC_URL: bad})
        assert result["errors"] == {CONF_PUBLIC_URL: "invalid_public_url"}, bad
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**base, CONF_PUBLIC_URL: " https://home.example.com/ "}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {**base, CONF_PUBLIC_URL: "https://home.example.com/"}
    await _wait_loaded(hass, entry.entry_id)
    public_url = hass.states.get("sensor.rproxy_home_public_url")
    assert public_url is not None
    assert public_url.state == "https://home.example.com/"
    assert public_url.attributes["source"] == "options"


async def test_options_keep_exposed(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """The switch's state lives in the options: changing the others keeps it."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url, options={CONF_EXPOSED: False})
    assert bridge.registry.tunnels() == {}
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {CONF_REQUEST_TIMEOUT: 12, CONF_VISITOR_AUTH: "none", CONF_FORWARD_HEADERS: list(FORWARDED_HEADERS)},
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_EXPOSED] is False
    assert entry.options[CONF_REQUEST_TIMEOUT] == 12
    await _wait_loaded(hass, entry.entry_id)
    # Still not exposed after the reload.
    assert entry.runtime_data.agent is None
    assert bridge.registry.tunnels() == {}


# Translations.


def _flow_keys() -> dict[str, set[str]]:
    """Error keys and abort reasons config_flow.py uses, by section ("config" or "options")."""
    tree = ast.parse((INTEGRATION / "config_flow.py").read_text())
    keys: dict[str, set[str]] = {"config:error": set(), "config:abort": set(), "options:error": set()}

    options_flow = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RproxyOptionsFlow")
    for top in tree.body:
        where = "options" if top is options_flow else "config"
        for node in ast.walk(top):
            # errors[...] = "key"
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Subscript)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "errors"
                    ):
                        keys[f"{where}:error"].add(node.value.value)
            # errors = {field: "key"}
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "errors" for t in node.targets)
            ):
                for value in node.value.values:
                    assert isinstance(value, ast.Constant)
                    keys[f"{where}:error"].add(value.value)
            # {field: "key"} returned as errors (probe_bridge, credential_from_url)
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                for element in node.value.elts:
                    for value in element.values if isinstance(element, ast.Dict) else []:
                        assert isinstance(value, ast.Constant)
                        keys[f"{where}:error"].add(value.value)
            # async_abort(reason="key")
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "reason" and isinstance(keyword.value, ast.Constant):
                        keys[f"{where}:abort"].add(keyword.value.value)
            # Home Assistant's own abort reasons for the helpers the flow calls.
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "async_set_unique_id"
            ):
                raise_on_progress = next((k.value for k in node.keywords if k.arg == "raise_on_progress"), None)
                if not (isinstance(raise_on_progress, ast.Constant) and raise_on_progress.value is False):
                    keys["config:abort"].add("already_in_progress")
            if isinstance(node, ast.Attribute):
                if node.attr == "_abort_if_unique_id_configured":
                    keys["config:abort"].add("already_configured")
                if node.attr == "async_update_reload_and_abort":
                    keys["config:abort"].update({"reauth_successful", "reconfigure_successful"})
    # ServiceError("key", ...): an options error (errors[CONF_SERVICES] = err.key).
    for source in ("config_flow.py", "service_list.py"):
        for node in ast.walk(ast.parse((INTEGRATION / source).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "ServiceError"
                and isinstance(node.args[0], ast.Constant)
            ):
                keys["options:error"].add(node.args[0].value)
    return keys


def test_flow_keys_found() -> None:
    """The walk of config_flow.py finds what it should (else the next test proves nothing)."""
    keys = _flow_keys()
    assert keys == {
        "config:error": {
            "invalid_url",
            "invalid_name",
            "invalid_token",
            "token_twice",
            "invalid_auth",
            "cannot_connect",
            "cannot_connect_target",
            "is_homeassistant",
            "name_in_use",
        },
        "config:abort": {
            "already_configured",
            "already_in_progress",  # async_set_unique_id without raise_on_progress=False
            "not_rproxy_app",
            "reauth_successful",
            "reconfigure_successful",
        },
        "options:error": {
            "invalid_username",
            "password_required",
            "invalid_public_url",
            # ServiceError("key", ...) in service_list.py and config_flow.py
            "service_format",
            "service_name",
            "service_twice",
            "service_zeroconf",
            "service_target",
            "service_is_homeassistant",
            "too_many_services",
        },
    }


def test_translations_cover_flow() -> None:
    strings = json.loads((INTEGRATION / "strings.json").read_text())
    english = json.loads((INTEGRATION / "translations" / "en.json").read_text())
    assert strings == english
    steps = {"user", "target", "url", "zeroconf_confirm", "reauth_confirm", "reconfigure"}
    assert steps <= set(strings["config"]["step"])
    assert set(strings["options"]["step"]) == {"init"}
    # Every placeholder a text names is one the flow passes.
    provided = {
        "user": {"error"},
        "target": {"found"},
        "url": {"error"},
        "zeroconf_confirm": {"name", "url"},
        "reauth_confirm": {"tunnel", "bridge", "error"},
        "reconfigure": {"error"},
    }
    for step, names in provided.items():
        texts = " ".join(str(v) for v in strings["config"]["step"][step].values() if isinstance(v, str))
        assert set(re.findall(r"{(\w+)}", texts)) <= names, step
    # The target selector translates its fixed options.
    assert set(strings["selector"]["target"]["options"]) == {"homeassistant", "url"}
    assert set(strings["selector"]["visitor_auth"]["options"]) == {"none", "basic"}
    # Every error key and abort reason config_flow.py uses has a text.
    missing = {}
    for where, used in _flow_keys().items():
        section, kind = where.split(":")
        if used - set(strings[section].get(kind, {})):
            missing[where] = used - set(strings[section].get(kind, {}))
    assert missing == {}, f"used in config_flow.py, missing from strings.json: {missing}"
