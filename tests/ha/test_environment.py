"""The Home Assistant test environment itself works: a real ``hass``, the real rproxy parts on
127.0.0.1 reached through Home Assistant's own aiohttp session, and real mDNS on loopback.

Nothing of the network is mocked; these fail when .venv-ha or the fixtures break, before any
integration test would fail for a less obvious reason.
"""

from __future__ import annotations

import asyncio
import socket
import uuid

import aiohttp
from homeassistant.const import __version__ as HA_VERSION
from homeassistant.core import CoreState, HomeAssistant
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from rproxy_core import Bridge

from .conftest import HELLO, HomeApp, running_agent

SERVICE_TYPE = "_http._tcp.local."


async def test_hass_starts(hass: HomeAssistant) -> None:
    """The plugin's Home Assistant is the pinned one and runs."""
    assert HA_VERSION == "2025.4.4"
    assert hass.state is CoreState.running


async def test_bridge_health_through_hass_session(hass: HomeAssistant, bridge: Bridge) -> None:
    """The real bridge answers its health endpoint to Home Assistant's own client session."""
    session = async_get_clientsession(hass)
    async with session.get(f"{bridge.url}/_rproxy/health") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ok"
    assert body["tunnels"] == {}


async def test_hass_session_resolves_host_names(hass: HomeAssistant, bridge: Bridge) -> None:
    """Home Assistant's session looks names up with aiodns: this fails if pycares is not pinned
    to a version aiodns 3.2.0 works with (see requirements/ha-test.txt)."""
    session = async_get_clientsession(hass)
    async with session.get(f"http://localhost:{bridge.port}/_rproxy/health") as response:
        assert response.status == 200


async def test_tunnel_through_hass_session(hass: HomeAssistant, bridge: Bridge, home_app: HomeApp) -> None:
    """rproxy_core runs on Home Assistant's pinned aiohttp: an agent tunnels the home app's HTTP
    and WebSocket to Home Assistant's session through the bridge."""
    session = async_get_clientsession(hass)
    async with running_agent(bridge.url, home_app.url):
        async with session.get(f"{bridge.url}/") as response:
            assert response.status == 200
            assert await response.text() == HELLO
        async with session.ws_connect(f"{bridge.url}/ws") as ws:
            await ws.send_str("ping through the tunnel")
            msg = await ws.receive(timeout=10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "ping through the tunnel")
    assert home_app.requests == ["/", "/ws"]


async def test_loopback_zeroconf_registers_and_browses(hass: HomeAssistant, loopback_zeroconf: AsyncZeroconf) -> None:
    """A service registered on loopback mDNS is found by a browser and resolved."""
    name = f"rproxy-test-{uuid.uuid4().hex[:12]}.{SERVICE_TYPE}"
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        name,
        addresses=[socket.inet_aton("127.0.0.1")],
        port=8123,
        properties={"path": "/"},
        server="rproxy-test.local.",
    )
    found = asyncio.Event()

    def on_change(zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == info.name and state_change is ServiceStateChange.Added:
            found.set()

    await (await loopback_zeroconf.async_register_service(info))
    browser = AsyncServiceBrowser(loopback_zeroconf.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.wait_for(found.wait(), timeout=10)
        resolved = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await resolved.async_request(loopback_zeroconf.zeroconf, 3000)
        assert resolved.port == 8123
        assert resolved.parsed_addresses() == ["127.0.0.1"]
        assert resolved.properties == {b"path": b"/"}
    finally:
        await browser.async_cancel()
        await (await loopback_zeroconf.async_unregister_service(info))
