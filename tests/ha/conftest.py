"""Fixtures of the Home Assistant suite: a real Home Assistant (``hass``, from
pytest-homeassistant-custom-component) beside real rproxy parts on 127.0.0.1.

Fixtures for integration tests (besides the plugin's ``hass``, ``hass_client``, ...):

- ``bridge``: a running ``rproxy_core.Bridge`` on 127.0.0.1 (random port) that accepts ``TOKEN``;
  its base URL is ``bridge.url``.
- ``home_app``: a running aiohttp app standing in for the web app at home (``home_app.url``):
  ``GET /`` answers ``HELLO``, ``/ws`` echoes WebSocket messages.
- ``loopback_zeroconf``: a real ``AsyncZeroconf`` bound to 127.0.0.1 only, closed afterwards.
- ``proxied_bridge``: a real bridge that takes its loopback visitors for a trusted proxy: a
  visitor sending ``X-Forwarded-For: 203.0.113.7`` (``common.claim``) is, to the bridge, the
  agent and Home Assistant, the visitor at 203.0.113.7, as behind nginx or a load balancer.
- ``visitor``: an aiohttp client session for visitors of such a bridge.

``running_agent(bridge_url, target)`` is an async context manager for a connected
``rproxy_core.Agent`` (for tests that need a tunnel without the integration).

The plugin disables sockets in every test except to 127.0.0.1 and only for tests that request
``socket_enabled``; each fixture here that opens one requests it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from unittest.mock import patch

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf

from rproxy_core import Bridge, BridgeConfig

# Shared with the core suite (its conftest is a plain module here: its fixtures stay there).
# TOKEN is the agent token the ``bridge`` fixture accepts.
from tests.conftest import TOKEN, free_port, running_agent, start_app

__all__ = ["HELLO", "TOKEN", "HomeApp", "free_port", "running_agent", "start_app"]

#: What the ``home_app`` fixture answers on ``GET /``.
HELLO = "hello from the home app"


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Let Home Assistant load ``custom_components/`` (else ``IntegrationNotFound``)."""


@pytest.fixture(autouse=True)
def no_zeroconf_catcher() -> Iterator[None]:
    """Keep our own ``Zeroconf()`` instances our own.

    Home Assistant's zeroconf component otherwise makes every later ``Zeroconf()`` in the
    process return its shared instance (closed when ``hass`` stops).
    """
    with patch("homeassistant.components.zeroconf.install_multiple_zeroconf_catcher"):
        yield


@pytest.fixture
async def bridge(socket_enabled: None) -> AsyncIterator[Bridge]:
    """A real rproxy bridge on 127.0.0.1 (random port) accepting ``TOKEN``; ``bridge.url``."""
    bridge = Bridge(BridgeConfig(host="127.0.0.1", port=0, tokens=[TOKEN], access_log=False))
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@dataclass(slots=True)
class HomeApp:
    """The running ``home_app``: its base URL and the paths it was asked for, in order."""

    url: str
    requests: list[str]


@pytest.fixture
async def home_app(socket_enabled: None) -> AsyncIterator[HomeApp]:
    """A real aiohttp app on 127.0.0.1: ``GET /`` answers ``HELLO``; ``/ws`` is a WebSocket echo."""
    requests: list[str] = []

    async def hello(request: web.Request) -> web.Response:
        requests.append(request.path_qs)
        return web.Response(text=HELLO)

    async def echo(request: web.Request) -> web.WebSocketResponse:
        requests.append(request.path_qs)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/ws", echo)
    runner, url = await start_app(app)
    try:
        yield HomeApp(url=url, requests=requests)
    finally:
        await runner.cleanup()


@pytest.fixture
async def loopback_zeroconf(socket_enabled: None) -> AsyncIterator[AsyncZeroconf]:
    """Real python-zeroconf on 127.0.0.1 only (the plugin fakes the network adapters, so the
    default "all interfaces" fails with ENODEV). Give services unique names: mDNS is host-wide."""
    aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"])
    try:
        yield aiozc
    finally:
        await aiozc.async_close()


@pytest.fixture
async def proxied_bridge(socket_enabled: None) -> AsyncIterator[Bridge]:
    """A real bridge that takes its loopback visitors for a trusted proxy (see the module docstring)."""
    bridge = Bridge(
        BridgeConfig(
            host="127.0.0.1", port=0, tokens=[TOKEN], access_log=False, trusted_proxies=[ip_network("127.0.0.0/8")]
        )
    )
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@pytest.fixture
async def visitor(socket_enabled: None) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for visitors (each request says who it is with ``common.claim``)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session
