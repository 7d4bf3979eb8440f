"""The rproxy integration running a real tunnel inside a real Home Assistant.

Every part is real: the ``bridge`` fixture (an rproxy bridge on 127.0.0.1), the agent the
integration runs in Home Assistant's event loop, the ``home_app`` it exposes, and visitors,
which are plain aiohttp clients of ``bridge.url``. Nothing of rproxy's network code is mocked;
the tests wait for what the agent pushes (``wait_for``), never for fixed times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any
from unittest.mock import patch

import aiohttp
import pytest
from aiohttp import web
from aiohttp.resolver import AsyncResolver
from homeassistant.config_entries import SOURCE_REAUTH, ConfigEntryState
from homeassistant.const import EVENT_HOMEASSISTANT_STOP, STATE_OFF, STATE_ON, STATE_UNKNOWN
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ServiceValidationError
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rproxy.const import DOMAIN
from custom_components.rproxy.coordinator import is_local_address, visitor_url
from rproxy_core import Bridge, BridgeConfig
from rproxy_core.agent import AgentState

from .common import entry_data, free_port, setup_tunnel, wait_for
from .conftest import HELLO, TOKEN, HomeApp, start_app

# Entity ids: has_entity_name with the device "rproxy home" (tunnel name "home").
TUNNEL = "binary_sensor.rproxy_home_tunnel"
PUBLIC_URL = "sensor.rproxy_home_public_url"
ACTIVE = "sensor.rproxy_home_active_connections"
REQUESTS = "sensor.rproxy_home_requests_served"
DATA_IN = "sensor.rproxy_home_data_in"
DATA_OUT = "sensor.rproxy_home_data_out"
RTT = "sensor.rproxy_home_round_trip_time"
CONNECTED_SINCE = "sensor.rproxy_home_connected_since"
RECONNECTS = "sensor.rproxy_home_reconnects"
EXPOSE = "switch.rproxy_home_expose"
RECONNECT = "button.rproxy_home_reconnect"

#: A token the bridge fixture does not accept.
OTHER_TOKEN = "ha-test-other-token-" + "y" * 16

MIB = 1 << 20


def state(hass: HomeAssistant, entity_id: str) -> str | None:
    """The entity's state string, or None when it has no state."""
    current = hass.states.get(entity_id)
    return None if current is None else current.state


def native(hass: HomeAssistant, entity_id: str) -> Any:
    """The sensor's native value (before Home Assistant converts units)."""
    entity = hass.data["entity_components"]["sensor"].get_entity(entity_id)
    assert entity is not None, entity_id
    return entity.native_value


def reauth_flows(hass: HomeAssistant, entry: MockConfigEntry) -> list[Any]:
    """Reauth flows in progress for ``entry``."""
    return [
        flow
        for flow in hass.config_entries.flow.async_progress()
        if flow["handler"] == DOMAIN
        and flow["context"].get("source") == SOURCE_REAUTH
        and flow["context"].get("entry_id") == entry.entry_id
    ]


def rproxy_tasks(*, agent_side_only: bool = False) -> list[asyncio.Task[Any]]:
    """Running tasks of rproxy: the agent's loop, its tunnel's helpers, its request tasks.

    With ``agent_side_only``, the bridge's own tunnel tasks (named "... from 127.0.0.1") are
    left out: they end when the bridge notices the agent left, a moment later.
    """
    found = []
    for task in asyncio.all_tasks():
        if task.done():
            continue
        name = task.get_name()
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        ours = name.startswith("rproxy") or "custom_components/rproxy" in filename or "rproxy_core/agent" in filename
        if not ours:
            continue
        if agent_side_only and name.startswith("rproxy-") and " from " in name:
            continue
        found.append(task)
    return found


async def visit(bridge_url: str, path: str = "/", **kwargs: Any) -> tuple[int, str, dict[str, str]]:
    """One visitor request to the bridge: status, body, headers."""
    async with aiohttp.ClientSession() as session, session.get(bridge_url + path, **kwargs) as response:
        return response.status, await response.text(), dict(response.headers)


@asynccontextmanager
async def another_bridge(port: int, tokens: list[str], domain: str | None = None) -> AsyncIterator[Bridge]:
    """A bridge on a given port (to stand in for a restarted one); stopped afterwards."""
    bridge = Bridge(BridgeConfig(host="127.0.0.1", port=port, tokens=tokens, access_log=False, domain=domain))
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@asynccontextmanager
async def small_app(routes: Callable[[web.Application], object]) -> AsyncIterator[str]:
    """A home app of the test's own on 127.0.0.1; yields its base URL."""
    app = web.Application()
    routes(app)
    runner, url = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


# Setup and entities.


async def test_setup_creates_device_and_entities(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """A connected entry has one service device and its entities, named from the translations."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    assert entry.state is ConfigEntryState.LOADED
    await wait_for(lambda: list(bridge.registry.names()) == ["home"], what="the tunnel at the bridge")

    devices = dr.async_entries_for_config_entry(dr.async_get(hass), entry.entry_id)
    assert len(devices) == 1
    device = devices[0]
    assert device.name == "rproxy home"
    assert device.entry_type is dr.DeviceEntryType.SERVICE
    assert device.identifiers == {(DOMAIN, entry.entry_id)}
    assert device.manufacturer == "rproxy"

    entities = er.async_entries_for_config_entry(er.async_get(hass), entry.entry_id)
    assert {e.entity_id for e in entities} == {
        TUNNEL,
        PUBLIC_URL,
        ACTIVE,
        REQUESTS,
        DATA_IN,
        DATA_OUT,
        RTT,
        CONNECTED_SINCE,
        RECONNECTS,
        EXPOSE,
        RECONNECT,
    }
    assert all(e.device_id == device.id for e in entities)
    assert {e.unique_id for e in entities} == {f"{entry.entry_id}_{e.translation_key}" for e in entities}

    names = {
        TUNNEL: "rproxy home Tunnel",
        PUBLIC_URL: "rproxy home Public URL",
        EXPOSE: "rproxy home Expose",
        RECONNECT: "rproxy home Reconnect",
        REQUESTS: "rproxy home Requests served",
        DATA_IN: "rproxy home Data in",
        DATA_OUT: "rproxy home Data out",
        ACTIVE: "rproxy home Active connections",
        RTT: "rproxy home Round-trip time",
        CONNECTED_SINCE: "rproxy home Connected since",
    }
    for entity_id, name in names.items():
        current = hass.states.get(entity_id)
        assert current is not None, entity_id
        assert current.attributes["friendly_name"] == name

    tunnel = hass.states.get(TUNNEL)
    assert tunnel is not None
    assert tunnel.state == STATE_ON
    assert tunnel.attributes["device_class"] == "connectivity"
    assert tunnel.attributes["state"] == "connected"
    assert tunnel.attributes["last_error"] is None
    # The bridge (no domain) names the address the agent dialled, 127.0.0.1: the sensor does
    # not pass that off as the address visitors use, and says why.
    public_url = hass.states.get(PUBLIC_URL)
    assert public_url is not None
    assert public_url.state == STATE_UNKNOWN
    assert public_url.attributes["source"] == "local_bridge"
    assert public_url.attributes["services"] == {}
    assert state(hass, EXPOSE) == STATE_ON
    assert state(hass, RECONNECT) == STATE_UNKNOWN  # never pressed
    assert state(hass, REQUESTS) == "0"
    assert state(hass, ACTIVE) == "0"
    assert state(hass, CONNECTED_SINCE) not in (None, STATE_UNKNOWN)
    # Off by default: a diagnostic figure few people want.
    reconnects = er.async_get(hass).async_get(RECONNECTS)
    assert reconnects is not None
    assert reconnects.disabled_by is er.RegistryEntryDisabler.INTEGRATION
    assert hass.states.get(RECONNECTS) is None


async def test_public_url_names_what_visitors_open(hass: HomeAssistant, home_app: HomeApp) -> None:
    """With a domain the bridge names <tunnel>.<domain>, which visitors use; the extra web
    services are one label further down, TCP services are reached with rproxy tcp."""
    async with another_bridge(free_port(), [TOKEN], domain="example.test") as bridge:
        await setup_tunnel(
            hass,
            bridge.url,
            home_app.url,
            options={"services": [f"garden={home_app.url}", "ssh=tcp://127.0.0.1:22"]},
        )
        port = bridge.url.rsplit(":", 1)[1]
        public_url = hass.states.get(PUBLIC_URL)
        assert public_url is not None
        assert public_url.state == f"http://home.example.test:{port}/"
        assert public_url.attributes["source"] == "bridge"
        assert public_url.attributes["services"] == {"garden": f"http://garden.home.example.test:{port}/", "ssh": "tcp"}
        # The address works: a visitor there reaches the app, and its service.
        assert (await visit(bridge.url, headers={"Host": f"home.example.test:{port}"}))[1] == HELLO
        assert (await visit(bridge.url, headers={"Host": f"garden.home.example.test:{port}"}))[1] == HELLO
        await hass.config_entries.async_unload(hass.config_entries.async_entries(DOMAIN)[0].entry_id)


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("10.1.2.3", True),
        ("192.168.1.5", True),
        ("fe80::1", True),
        ("localhost", True),
        ("bridge", True),
        ("homeassistant.local", True),
        ("bridge.example.com", False),
        ("203.0.113.1", False),
        ("2001:db8::1", False),
    ],
)
def test_which_bridge_addresses_visitors_cannot_use(host: str, local: bool) -> None:
    """A loopback, private or link-local address, localhost, .local and dotless names are local."""
    assert is_local_address(host) is local


@pytest.mark.parametrize(
    ("named", "configured", "shown"),
    [
        (None, None, (None, None)),
        ("https://home.example.com/", None, ("https://home.example.com/", "bridge")),
        ("http://127.0.0.1:8080/", None, (None, "local_bridge")),
        ("http://127.0.0.1:8080/", "https://home.example.com/", ("https://home.example.com/", "options")),
        # What a lying bridge may send never becomes the state as it is.
        ("javascript:alert(1)", None, (None, "invalid")),
        ("https://" + "a" * 300 + ".example.com/", None, (None, "invalid")),
        ("https://home.example.com/\x1b[2J", None, (None, "invalid")),
        ("https://[::1/", None, (None, "invalid")),
        ("not a url", None, (None, "invalid")),
    ],
)
def test_the_public_url_shown_for_what_the_bridge_named(
    named: str | None, configured: str | None, shown: tuple[str | None, str | None]
) -> None:
    """The bridge's address when visitors can use it, the option's when set; else why not."""
    assert visitor_url(named, configured) == shown


async def test_traffic_counters(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """Requests, bytes and open connections through the tunnel reach the sensors (pushed)."""
    await setup_tunnel(hass, bridge.url, home_app.url)
    bytes_in, bytes_out = native(hass, DATA_IN), native(hass, DATA_OUT)
    for entity_id in (DATA_IN, DATA_OUT):
        current = hass.states.get(entity_id)
        assert current is not None
        assert current.attributes["unit_of_measurement"] == "MiB"  # the suggested unit
        assert current.attributes["device_class"] == "data_size"
        # Shown with two decimals (the frontend rounds by the registry's display precision).
        registered = er.async_get(hass).async_get(entity_id)
        assert registered is not None
        assert registered.options["sensor"]["suggested_display_precision"] == 2

    visits = 5
    async with aiohttp.ClientSession() as visitor:
        for _ in range(visits):
            async with visitor.get(bridge.url + "/") as response:
                assert response.status == 200
                assert await response.text() == HELLO
    await wait_for(lambda: state(hass, REQUESTS) == str(visits), timeout=3, what=f"{visits} requests served")
    assert native(hass, DATA_IN) > bytes_in
    assert native(hass, DATA_OUT) > bytes_out + visits * len(HELLO)
    for entity_id in (DATA_IN, DATA_OUT):
        shown = float(state(hass, entity_id) or "nan")
        assert shown == pytest.approx(native(hass, entity_id) / MIB, rel=1e-2)

    async with aiohttp.ClientSession() as visitor, visitor.ws_connect(bridge.url + "/ws") as ws:
        await ws.send_str("through the tunnel")
        message = await ws.receive(timeout=5)
        assert message.data == "through the tunnel"
        await wait_for(lambda: state(hass, ACTIVE) == "1", timeout=3, what="one active connection")
    await wait_for(lambda: state(hass, ACTIVE) == "0", timeout=3, what="no active connection")
    await wait_for(lambda: state(hass, REQUESTS) == str(visits + 1), timeout=3, what="the WebSocket counted")


async def test_round_trip_time_after_heartbeat(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """The round-trip time is unknown until the agent's first heartbeat, then a number (ms).

    The integration's agent uses the default heartbeat interval (10 s) and measures the
    round trip only from its own PINGs, so this is the one test that waits for it.
    """
    await setup_tunnel(hass, bridge.url, home_app.url)
    assert state(hass, RTT) == STATE_UNKNOWN
    await wait_for(lambda: state(hass, RTT) not in (None, STATE_UNKNOWN), timeout=13, what="a round-trip time")
    current = hass.states.get(RTT)
    assert current is not None
    assert current.attributes["unit_of_measurement"] == "ms"
    assert 0 <= float(current.state) < 1000


# Connectivity.


async def test_bridge_down_and_back(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """The sensor follows the tunnel: off when the bridge stops, on again once it is back."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    coordinator = entry.runtime_data
    port = bridge.port
    assert port is not None
    await bridge.stop()
    await wait_for(lambda: state(hass, TUNNEL) == STATE_OFF, timeout=2, what="the tunnel sensor off")
    tunnel = hass.states.get(TUNNEL)
    assert tunnel is not None
    assert tunnel.attributes["state"] in ("waiting", "connecting")
    assert state(hass, CONNECTED_SINCE) == STATE_UNKNOWN

    async with another_bridge(port, [TOKEN]) as again:
        # The agent's first retry comes after 0.5-1 s (backoff with jitter).
        await wait_for(lambda: state(hass, TUNNEL) == STATE_ON, timeout=5, what="the tunnel sensor on again")
        await wait_for(lambda: list(again.registry.names()) == ["home"], what="the tunnel at the new bridge")
        status, body, _ = await visit(again.url)
        assert (status, body) == (200, HELLO)
        assert entry.state is ConfigEntryState.LOADED
        assert entry.runtime_data is coordinator  # no reload needed
        assert coordinator.data.stats.reconnects >= 1


async def test_expose_switch(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """Off closes the tunnel and is remembered in the options, without reloading; on reopens it."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    coordinator = entry.runtime_data
    agent = coordinator.agent
    assert agent is not None

    # On while on: the same agent goes on (no second tunnel).
    await hass.services.async_call("switch", "turn_on", {"entity_id": EXPOSE}, blocking=True)
    await hass.async_block_till_done()
    assert coordinator.agent is agent
    assert len(bridge.registry.connections()) <= 1

    await hass.services.async_call("switch", "turn_off", {"entity_id": EXPOSE}, blocking=True)
    await hass.async_block_till_done()
    await wait_for(lambda: not bridge.registry.names(), timeout=2, what="the bridge to lose the tunnel")
    status, _, headers = await visit(bridge.url)
    assert status == 503
    assert "Retry-After" in headers
    assert entry.options == {"exposed": False}
    assert entry.runtime_data is coordinator
    assert entry.state is ConfigEntryState.LOADED
    assert coordinator.agent is None
    assert state(hass, EXPOSE) == STATE_OFF
    assert state(hass, TUNNEL) == STATE_OFF
    assert home_app.requests == []

    await hass.services.async_call("switch", "turn_on", {"entity_id": EXPOSE}, blocking=True)
    await hass.async_block_till_done()
    await wait_for(lambda: state(hass, TUNNEL) == STATE_ON, timeout=3, what="the tunnel up again")
    await wait_for(lambda: list(bridge.registry.names()) == ["home"], what="the tunnel at the bridge again")
    assert entry.options == {"exposed": True}
    assert entry.runtime_data is coordinator
    assert state(hass, EXPOSE) == STATE_ON
    status, body, _ = await visit(bridge.url)
    assert (status, body) == (200, HELLO)
    await wait_for(lambda: state(hass, REQUESTS) == "1", timeout=3, what="the request counted after switching on")


async def test_setup_not_exposed_does_not_connect(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """An entry whose switch was left off sets up without dialling the bridge."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url, options={"exposed": False})
    assert entry.runtime_data.agent is None
    assert not bridge.registry.names()
    assert state(hass, EXPOSE) == STATE_OFF
    assert state(hass, TUNNEL) == STATE_OFF
    tunnel = hass.states.get(TUNNEL)
    assert tunnel is not None
    assert tunnel.attributes["state"] == "stopped"
    assert not rproxy_tasks()
    status, _, _ = await visit(bridge.url)
    assert status == 503


async def test_reconnect_button(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """Pressing Reconnect drops the tunnel and dials again: the bridge sees a new connection."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    coordinator = entry.runtime_data
    assert coordinator.agent is not None
    old_agent_side = coordinator.agent.connection
    await wait_for(lambda: len(bridge.registry.connections()) == 1, what="the tunnel at the bridge")
    (old_bridge_side,) = bridge.registry.connections()

    await hass.services.async_call("button", "press", {"entity_id": RECONNECT}, blocking=True)

    def reconnected() -> bool:
        connections = bridge.registry.connections()
        return len(connections) == 1 and connections[0] is not old_bridge_side and not connections[0].closed

    await wait_for(reconnected, timeout=3, what="a new tunnel connection at the bridge")
    await wait_for(lambda: state(hass, TUNNEL) == STATE_ON, timeout=3, what="the tunnel sensor on")
    assert old_bridge_side.closed
    assert coordinator.agent is not None
    assert coordinator.agent.connection is not None
    assert coordinator.agent.connection is not old_agent_side
    assert entry.runtime_data is coordinator
    assert state(hass, RECONNECT) not in (None, STATE_UNKNOWN)  # the time of the press

    # The counters keep being pushed after the reconnection.
    status, body, _ = await visit(bridge.url)
    assert (status, body) == (200, HELLO)
    # Agent.reconnect() stops and starts the agent; stop() cancels the stats timer, so start()
    # must arm it again or no counter is pushed until the next state change.
    await wait_for(lambda: state(hass, REQUESTS) == "1", timeout=3, what="the request counted after reconnecting")


async def test_reconnect_button_while_not_exposed(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """With Expose off, Reconnect must not put the target on the internet behind the switch's back:
    the press is refused with a translated error and nothing connects."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url, options={"exposed": False})
    with pytest.raises(ServiceValidationError) as refused:
        await hass.services.async_call("button", "press", {"entity_id": RECONNECT}, blocking=True)
    assert refused.value.translation_key == "not_exposed"
    await hass.async_block_till_done()
    assert entry.runtime_data.agent is None
    assert not bridge.registry.names()
    assert state(hass, TUNNEL) == STATE_OFF
    assert state(hass, EXPOSE) == STATE_OFF
    assert entry.options == {"exposed": False}


# Setup failures and reauthentication.


async def test_setup_bridge_unreachable(hass: HomeAssistant, home_app: HomeApp, socket_enabled: None) -> None:
    """Nothing listens at the bridge URL: setup is retried later (ConfigEntryNotReady)."""
    started = time.monotonic()
    entry = await setup_tunnel(
        hass, f"http://127.0.0.1:{free_port()}", home_app.url, expect=ConfigEntryState.SETUP_RETRY
    )
    assert time.monotonic() - started < 5
    assert entry.reason is not None
    assert "Cannot connect to the bridge" in entry.reason
    assert not reauth_flows(hass, entry)
    assert not rproxy_tasks()  # the agent of the failed attempt is stopped
    assert await hass.config_entries.async_unload(entry.entry_id)  # cancels the retry


async def test_setup_token_refused_starts_reauth(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """The bridge refuses the token: setup fails for good and asks for a new token."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url, expect=ConfigEntryState.SETUP_ERROR, token=OTHER_TOKEN)
    assert entry.reason is not None
    assert "refused the token" in entry.reason
    flows = reauth_flows(hass, entry)
    assert len(flows) == 1
    assert flows[0]["step_id"] == "reauth_confirm"
    assert not bridge.registry.names()
    assert not rproxy_tasks(agent_side_only=True)


async def test_token_revoked_while_connected(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """The bridge restarts without the tunnel's token: the agent gives up and reauth starts."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    port = bridge.port
    assert port is not None
    assert not reauth_flows(hass, entry)
    await bridge.stop()
    async with another_bridge(port, [OTHER_TOKEN]) as again:
        await wait_for(lambda: bool(reauth_flows(hass, entry)), timeout=5, what="a reauth flow")
        assert len(reauth_flows(hass, entry)) == 1
        assert state(hass, TUNNEL) == STATE_OFF
        tunnel = hass.states.get(TUNNEL)
        assert tunnel is not None
        assert tunnel.attributes["state"] == "failed"
        assert "401" in (tunnel.attributes["last_error"] or "")
        assert not again.registry.names()
        agent = entry.runtime_data.agent
        assert agent is not None
        assert agent.state is AgentState.FAILED
        # For good: no more attempts at the bridge.
        assert not [t for t in rproxy_tasks(agent_side_only=True) if t.get_name().startswith("rproxy-agent")]


# Unload, reload, options.


@pytest.mark.parametrize("target", ["url", "homeassistant"])
async def test_unload_and_reload(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, target: str) -> None:
    """Unloading closes the tunnel and leaves nothing running; reloading brings it back."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url if target == "url" else None)
    coordinator = entry.runtime_data
    target_session = coordinator._target_session
    assert target_session is not None
    assert rproxy_tasks(agent_side_only=True)

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert not rproxy_tasks(agent_side_only=True)
    assert coordinator.agent is None
    assert target_session.closed  # closed (in-process) or detached from Home Assistant's pool
    await wait_for(lambda: not bridge.registry.names(), timeout=2, what="the bridge to lose the tunnel")
    await wait_for(lambda: not rproxy_tasks(), timeout=3, what="the bridge's side of the tunnel to end")
    assert state(hass, TUNNEL) == "unavailable"

    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data is not coordinator
    await wait_for(lambda: list(bridge.registry.names()) == ["home"], what="the tunnel at the bridge again")
    assert state(hass, TUNNEL) == STATE_ON
    if target == "url":
        status, body, _ = await visit(bridge.url)
        assert (status, body) == (200, HELLO)


async def test_unload_cancels_requests_in_flight(hass: HomeAssistant, bridge: Bridge) -> None:
    """Unloading while a visitor waits for a slow home app answers the visitor at once
    instead of waiting for the app, and leaves no request task behind."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        with suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 5)
        return web.Response(text="late")

    def routes(app: web.Application) -> None:
        app.router.add_get("/slow", slow)

    async with small_app(routes) as app_url:
        entry = await setup_tunnel(hass, bridge.url, app_url)
        visitor = asyncio.create_task(visit(bridge.url, "/slow"))
        try:
            await asyncio.wait_for(arrived.wait(), 3)
            started = time.monotonic()
            assert await hass.config_entries.async_unload(entry.entry_id)
            status, _, _ = await asyncio.wait_for(visitor, 3)
            elapsed = time.monotonic() - started
        finally:
            release.set()
            if not visitor.done():
                visitor.cancel()
        assert status in (502, 503, 504)
        assert elapsed < 2, elapsed
        assert not rproxy_tasks(agent_side_only=True)


async def test_options_change_reloads_agent(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """A new request timeout restarts the agent; the switch's own option does not."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url, options={"request_timeout": 30})
    first = entry.runtime_data
    assert first.agent is not None
    assert first.agent.config.request_timeout == 30

    hass.config_entries.async_update_entry(entry, options={**entry.options, "exposed": True})
    await hass.async_block_till_done()
    assert entry.runtime_data is first
    assert entry.state is ConfigEntryState.LOADED

    hass.config_entries.async_update_entry(entry, options={**entry.options, "request_timeout": 5})
    await hass.async_block_till_done()
    second = entry.runtime_data
    assert entry.state is ConfigEntryState.LOADED
    assert second is not first
    assert second.agent is not None
    assert second.agent.config.request_timeout == 5
    assert first.agent is None  # the old agent was stopped
    await wait_for(
        lambda: list(bridge.registry.names()) == ["home"] and len(bridge.registry.connections()) == 1,
        timeout=3,
        what="one tunnel at the bridge",
    )
    assert state(hass, TUNNEL) == STATE_ON


async def test_request_timeout_option(hass: HomeAssistant, bridge: Bridge) -> None:
    """With a request timeout of 1 s, a home app that takes 3 s gets the visitor a 504 after ~1 s."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        with suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 3)
        return web.Response(text="late")

    async with small_app(lambda app: app.router.add_get("/slow", slow)) as app_url:
        await setup_tunnel(hass, bridge.url, app_url, options={"request_timeout": 1})
        started = time.monotonic()
        status, _, _ = await visit(bridge.url, "/slow")
        elapsed = time.monotonic() - started
        release.set()
    assert status == 504
    assert 0.8 <= elapsed < 2.5, elapsed


async def test_visitor_basic_auth_option(hass: HomeAssistant, bridge: Bridge) -> None:
    """Visitor credentials: 401 without them, the page with them; the app never sees them."""
    seen: list[str | None] = []

    async def page(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(text=HELLO)

    options = {"visitor_auth": "basic", "visitor_username": "alice", "visitor_password": "visitor-s3cret"}
    async with small_app(lambda app: app.router.add_get("/", page)) as app_url:
        await setup_tunnel(hass, bridge.url, app_url, options=options)
        status, _, headers = await visit(bridge.url)
        assert status == 401
        assert headers.get("WWW-Authenticate", "").startswith("Basic ")
        status, _, _ = await visit(bridge.url, auth=aiohttp.BasicAuth("alice", "wrong"))
        assert status == 401
        status, body, _ = await visit(bridge.url, auth=aiohttp.BasicAuth("alice", "visitor-s3cret"))
        assert (status, body) == (200, HELLO)
    assert seen == [None]  # one request reached the app, without the visitor's credentials


# Repairs.


@pytest.fixture
def resolver_on_test_loop() -> Iterator[None]:
    """Let Home Assistant's client session look names up in this test.

    The plugin's session-wide ``mock_zeroconf_resolver`` hands every test one aiohttp
    ``AsyncResolver`` made on the session's event loop, not the test's: any name that is not in
    /etc/hosts then fails with RuntimeError ("Future attached to a different loop") instead of
    a DNS answer, which kills the agent's connect loop. A resolver per connector, made on the
    running loop, answers as in production (``bridge.invalid``: "Domain name not found").
    """
    with patch("homeassistant.helpers.aiohttp_client._async_make_resolver", side_effect=lambda hass: AsyncResolver()):
        yield


async def test_insecure_bridge_issue(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, resolver_on_test_loop: None
) -> None:
    """A plain ws:// bridge beyond this machine raises a repair issue, gone once it is local or
    encrypted, and removed with the entry.

    ``bridge.invalid`` (a reserved name that never resolves) fails at once, so the entry retries
    but the issue is raised first.
    """
    issues = ir.async_get(hass)
    started = time.monotonic()
    entry = await setup_tunnel(hass, "ws://bridge.invalid:9", home_app.url, expect=ConfigEntryState.SETUP_RETRY)
    assert time.monotonic() - started < 5
    assert "Domain name not found" in (entry.reason or "")
    issue_id = f"insecure_bridge_{entry.entry_id}"
    issue = issues.async_get_issue(DOMAIN, issue_id)
    assert issue is not None
    assert issue.severity is ir.IssueSeverity.WARNING
    assert issue.translation_key == "insecure_bridge"
    assert issue.translation_placeholders == {"tunnel": "home", "bridge": "ws://bridge.invalid:9"}
    assert not issue.is_fixable

    # Encrypted: no issue (still unreachable).
    hass.config_entries.async_update_entry(entry, data={**entry.data, "bridge_url": "wss://bridge.invalid:9"})
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert issues.async_get_issue(DOMAIN, issue_id) is None

    # Plain again, then the local bridge: raised, then cleared on a working setup.
    hass.config_entries.async_update_entry(entry, data={**entry.data, "bridge_url": "ws://bridge.invalid:9"})
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert issues.async_get_issue(DOMAIN, issue_id) is not None
    hass.config_entries.async_update_entry(entry, data={**entry.data, "bridge_url": bridge.url})
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert issues.async_get_issue(DOMAIN, issue_id) is None

    # Removing the entry takes its issues along.
    hass.config_entries.async_update_entry(entry, data={**entry.data, "bridge_url": "ws://bridge.invalid:9"})
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert issues.async_get_issue(DOMAIN, issue_id) is not None
    await hass.config_entries.async_remove(entry.entry_id)
    await hass.async_block_till_done()
    assert issues.async_get_issue(DOMAIN, issue_id) is None
    assert issues.async_get_issue(DOMAIN, f"visitor_local_address_{entry.entry_id}") is None


@pytest.mark.parametrize("bridge_host", ["localhost", "127.0.0.1"])
async def test_loopback_bridge_raises_no_issue(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp, bridge_host: str
) -> None:
    """A plain bridge on this machine is not an internet hop: no repair issue."""
    url = f"ws://{bridge_host}:{bridge.port}"
    entry = await setup_tunnel(hass, url, home_app.url)
    assert ir.async_get(hass).async_get_issue(DOMAIN, f"insecure_bridge_{entry.entry_id}") is None


async def test_bridge_url_with_userinfo(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """A bridge URL carrying ``user:password@`` (the agent proves itself with its token) ends
    setup at once with a translated error, not a hang, and leaks no client session."""
    url = bridge.url.replace("http://", "http://someone:secret@")
    entry = MockConfigEntry(
        domain=DOMAIN, title="home: Home app", data=entry_data(url, home_app.url), unique_id=f"url:{home_app.url}"
    )
    entry.add_to_hass(hass)
    started = time.monotonic()
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert time.monotonic() - started < 5
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.reason is not None and "secret" not in entry.reason
    assert not bridge.registry.names()


async def test_services_stored_by_hand_that_the_agent_refuses(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp
) -> None:
    """Options edited by hand (or by a later version) with a service the agent cannot serve end
    setup with the translated "invalid settings" error naming it."""
    entry = await setup_tunnel(
        hass,
        bridge.url,
        home_app.url,
        options={"services": ["garden=ftp://192.0.2.1"]},
        expect=ConfigEntryState.SETUP_ERROR,
    )
    assert entry.reason is not None and "'garden'" in entry.reason
    assert not bridge.registry.names()


async def test_home_assistant_stopping_closes_the_tunnel(
    hass: HomeAssistant, bridge: Bridge, home_app: HomeApp
) -> None:
    """Home Assistant going down closes the tunnel with a goodbye, before its sessions go."""
    entry = await setup_tunnel(hass, bridge.url, home_app.url)
    assert bridge.registry.names()
    hass.bus.async_fire(EVENT_HOMEASSISTANT_STOP)
    await hass.async_block_till_done()
    await wait_for(lambda: not bridge.registry.names(), what="the bridge to drop the tunnel")
    assert entry.runtime_data.agent is None
