"""What the rproxy integration lets out: the diagnostics download and the logs.

A real tunnel (``bridge``, the agent in Home Assistant, ``home_app``) carries real traffic;
the diagnostics are downloaded through Home Assistant's HTTP API, and the secrets (agent
token, visitor credentials, passwords in URLs) must appear in neither that file nor the log.
"""

from __future__ import annotations

import base64
import json
import logging

import aiohttp
import pytest
from homeassistant.config_entries import SOURCE_REAUTH, ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from pytest_homeassistant_custom_component.components.diagnostics import get_diagnostics_for_config_entry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rproxy.const import DOMAIN
from rproxy_core import Bridge, BridgeConfig

from .common import setup_tunnel, wait_for
from .conftest import HELLO, TOKEN, HomeApp

REDACTED = "**REDACTED**"
VISITOR_USER = "visitor-alice"
VISITOR_PASSWORD = "visitor-pw-" + "z" * 16
#: Credentials in a URL: not secret to aiohttp, but secret to whoever reads a diagnostics file.
URL_USER = "urluser-" + "u" * 8
URL_PASSWORD = "urlpass-" + "p" * 16
#: The token a restarted bridge accepts instead of ``TOKEN``.
NEW_TOKEN = "ha-test-new-token-" + "n" * 16
#: A token nobody accepts, typed into the reauth form.
TYPO_TOKEN = "ha-test-typo-token-" + "t" * 16

VISITOR_OPTIONS = {
    "request_timeout": 30,
    "visitor_auth": "basic",
    "visitor_username": VISITOR_USER,
    "visitor_password": VISITOR_PASSWORD,
}


def _secrets() -> list[str]:
    basic = base64.b64encode(f"{VISITOR_USER}:{VISITOR_PASSWORD}".encode()).decode()
    return [TOKEN, VISITOR_PASSWORD, basic, URL_PASSWORD]


async def test_diagnostics_redacted(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, bridge: Bridge, home_app: HomeApp
) -> None:
    """The download has the settings and the tunnel's state and counters, no secret."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url, options=VISITOR_OPTIONS)
    auth = aiohttp.BasicAuth(VISITOR_USER, VISITOR_PASSWORD)
    async with aiohttp.ClientSession() as visitor:
        for _ in range(2):
            async with visitor.get(bridge.url + "/", auth=auth) as response:
                assert response.status == 200
                assert await response.text() == HELLO
    coordinator = entry.runtime_data
    await wait_for(lambda: coordinator.data.stats.requests_served == 2, timeout=3, what="two requests counted")
    # URLs with credentials in them (changing data alone reloads nothing).
    url_with_credentials = bridge.url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")
    target_with_credentials = home_app.url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "bridge_url": url_with_credentials, "target_url": target_with_credentials}
    )
    await hass.async_block_till_done()
    assert entry.runtime_data is coordinator

    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, entry)

    dump = json.dumps(diagnostics)
    for secret in _secrets():
        assert secret not in dump
    assert URL_USER not in dump
    assert VISITOR_USER not in dump

    data = diagnostics["entry"]["data"]
    assert data["token"] == REDACTED
    assert data["bridge_url"] == bridge.url
    assert data["target_url"] == home_app.url
    assert data["tunnel_name"] == "home"
    assert data["target"] == "url"
    options = diagnostics["entry"]["options"]
    assert options["visitor_password"] == REDACTED
    assert options["visitor_username"] == REDACTED
    assert options["visitor_auth"] == "basic"
    assert options["request_timeout"] == 30

    tunnel = diagnostics["tunnel"]
    assert tunnel["state"] == "connected"
    assert tunnel["exposed"] is True
    # The bridge names the address the agent dialled, 127.0.0.1: no use to visitors.
    assert tunnel["bridge_public_url"] == bridge.url + "/"
    assert (tunnel["public_url"], tunnel["public_url_source"]) == (None, "local_bridge")
    assert tunnel["requests_served"] == 2
    assert tunnel["bytes_received"] > 0
    assert tunnel["bytes_sent"] > 2 * len(HELLO)
    assert tunnel["active_streams"] == 0
    assert tunnel["last_error"] is None
    assert tunnel["connected_since"] is not None

    agent = diagnostics["agent"]
    assert agent["connect_url"] == bridge.url.replace("http://", "ws://") + "/_rproxy/connect"
    assert agent["agent_id"].startswith("home-assistant:")


async def test_diagnostics_not_exposed(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, bridge: Bridge
) -> None:
    """With the switch off there is no agent: the download says so instead of failing (here for
    a tunnel to Home Assistant itself, which has no target URL)."""
    entry = await setup_tunnel(hass, bridge.url, None, options={"exposed": False})
    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert diagnostics["agent"] is None
    assert diagnostics["entry"]["data"]["target"] == "homeassistant"
    assert diagnostics["entry"]["data"]["target_url"] is None
    assert diagnostics["tunnel"]["state"] == "stopped"
    assert diagnostics["tunnel"]["exposed"] is False
    assert diagnostics["entry"]["data"]["token"] == REDACTED
    assert TOKEN not in json.dumps(diagnostics)


async def test_no_secret_in_logs(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, a tunnel's life (traffic, refused visitors, a revoked token, reauth with a wrong
    then a right token) logs no token and no visitor credential."""
    for logger in ("rproxy", "custom_components.rproxy"):
        caplog.set_level(logging.DEBUG, logger=logger)

    entry = await setup_tunnel(hass, bridge.url, home_app.url, options=VISITOR_OPTIONS)
    auth = aiohttp.BasicAuth(VISITOR_USER, VISITOR_PASSWORD)
    async with aiohttp.ClientSession() as visitor:
        async with visitor.get(bridge.url + "/", auth=auth) as response:
            assert response.status == 200
        async with visitor.get(bridge.url + "/", auth=aiohttp.BasicAuth(VISITOR_USER, "wrong")) as response:
            assert response.status == 401
        async with visitor.ws_connect(bridge.url + "/ws", auth=auth) as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
    await wait_for(lambda: entry.runtime_data.data.stats.requests_served == 3, timeout=3, what="three requests counted")

    # The bridge comes back accepting another token only: the agent is refused, reauth starts.
    port = bridge.port
    assert port is not None
    await bridge.stop()
    again = Bridge(BridgeConfig(host="127.0.0.1", port=port, tokens=[NEW_TOKEN], access_log=False))
    await again.start()
    try:

        def reauth_flows() -> list[str]:
            return [
                flow["flow_id"]
                for flow in hass.config_entries.flow.async_progress()
                if flow["handler"] == DOMAIN and flow["context"].get("source") == SOURCE_REAUTH
            ]

        await wait_for(lambda: bool(reauth_flows()), timeout=5, what="a reauth flow")
        (flow_id,) = reauth_flows()
        result = await hass.config_entries.flow.async_configure(flow_id, {"token": TYPO_TOKEN})
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {"base": "invalid_auth"}
        result = await hass.config_entries.flow.async_configure(flow_id, {"token": NEW_TOKEN})
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "reauth_successful"
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.LOADED
        await wait_for(lambda: list(again.registry.names()) == ["home"], timeout=3, what="the tunnel back")
    finally:
        await again.stop()

    # The log did record what happened (so the check below looks at a real log)...
    assert "refused agent" in caplog.text
    assert "Tunnel home is up" in caplog.text
    # ...and no secret.
    for secret in [*_secrets(), NEW_TOKEN, TYPO_TOKEN]:
        assert secret not in caplog.text
