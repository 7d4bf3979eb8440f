"""WebSockets relayed end to end: visitor → bridge → tunnel → agent → home app, and back."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from rproxy_core import Bridge
from rproxy_core.demo import create_home_app
from tests.conftest import running_agent, running_bridge, sha256, start_app


@dataclass
class EchoState:
    """What the echo home app observed, for assertions from the visitor's side."""

    pings: list[bytes] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    login_hits: int = 0


ECHO = web.AppKey("echo", EchoState)


async def _echo(request: web.Request) -> web.WebSocketResponse:
    """Echo every message; answer pings by hand; on text "close-me" close with 4001/"bye"."""
    state = request.app[ECHO]
    ws = web.WebSocketResponse(autoping=False, protocols=("b",), max_msg_size=16 << 20)
    await ws.prepare(request)
    while True:  # not ``async for``: it hides the CLOSE message this app records
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            if msg.data == "close-me":
                await ws.close(code=4001, message=b"bye")
                break
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            state.pings.append(msg.data)
            await ws.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            state.closes.append((msg.data, msg.extra or ""))
            await ws.close()
            break
        else:  # CLOSING, CLOSED, ERROR
            state.closes.append((ws.close_code, msg.type.name))
            break
    state.closed.set()
    return ws


async def _refuse(request: web.Request) -> web.Response:
    return web.Response(status=403, text="no websockets for you")


async def _redirect_to_login(request: web.Request) -> web.Response:
    raise web.HTTPFound("/login")


async def _login(request: web.Request) -> web.Response:
    request.app[ECHO].login_hits += 1
    return web.Response(text="login page")


async def _need_auth(request: web.Request) -> web.Response:
    return web.Response(status=401, text="who are you", headers={"WWW-Authenticate": 'Bearer realm="home"'})


def echo_app() -> tuple[web.Application, EchoState]:
    app = web.Application()
    state = EchoState()
    app[ECHO] = state
    app.router.add_get("/ws", _echo)
    app.router.add_get("/refuse", _refuse)
    app.router.add_get("/redirect", _redirect_to_login)
    app.router.add_get("/login", _login)
    app.router.add_get("/need-auth", _need_auth)
    return app, state


@dataclass
class Tunnel:
    bridge: Bridge
    state: EchoState

    def ws_url(self, path: str) -> str:
        return self.bridge.url.replace("http", "ws", 1) + path


@pytest.fixture
async def tunnel() -> AsyncIterator[Tunnel]:
    app, state = echo_app()
    runner, target = await start_app(app)
    try:
        async with running_bridge() as bridge, running_agent(bridge.url, target):
            yield Tunnel(bridge, state)
    finally:
        await runner.cleanup()


async def test_text_and_binary_messages_echo_through_the_tunnel(tunnel: Tunnel, http: aiohttp.ClientSession) -> None:
    """A text and a binary message each come back unchanged and with their type."""
    async with asyncio.timeout(20), http.ws_connect(tunnel.ws_url("/ws")) as ws:
        await ws.send_str("héllo wörld")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "héllo wörld")
        await ws.send_bytes(b"\x00\x01\xffbinary")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\x01\xffbinary")


async def test_a_five_megabyte_binary_message_arrives_intact(tunnel: Tunnel, http: aiohttp.ClientSession) -> None:
    """A 5 MB message, fragmented over several tunnel frames, is reassembled byte for byte.

    Visitors may send at most max_websocket_message (1 MiB by default); raised here so the
    same message crosses both ways.
    """
    tunnel.bridge.config.max_websocket_message = 16 << 20
    payload = os.urandom(5 << 20)
    async with asyncio.timeout(60), http.ws_connect(tunnel.ws_url("/ws"), max_msg_size=16 << 20) as ws:
        await ws.send_bytes(payload)
        msg = await ws.receive()
        assert msg.type is WSMsgType.BINARY
        assert len(msg.data) == len(payload)
        assert sha256(msg.data) == sha256(payload)


async def test_an_empty_text_message_is_relayed(tunnel: Tunnel, http: aiohttp.ClientSession) -> None:
    """An empty text message is a message, not the end of the stream."""
    async with asyncio.timeout(20), http.ws_connect(tunnel.ws_url("/ws")) as ws:
        await ws.send_str("")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "")
        await ws.send_str("after")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "after")


async def test_a_visitor_ping_reaches_the_home_app_and_its_pong_comes_back(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """With autoping off at both ends, the ping payload crosses the tunnel and the pong returns."""
    async with asyncio.timeout(20), http.ws_connect(tunnel.ws_url("/ws"), autoping=False) as ws:
        await ws.ping(b"are-you-there")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"are-you-there")
        assert tunnel.state.pings == [b"are-you-there"]


async def test_the_subprotocol_chosen_by_the_home_app_reaches_the_visitor(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """The visitor offers a and b, the home app picks b, and the visitor's handshake says b."""
    async with asyncio.timeout(20), http.ws_connect(tunnel.ws_url("/ws"), protocols=("a", "b")) as ws:
        assert ws.protocol == "b"
        await ws.send_str("x")
        assert (await ws.receive()).data == "x"


async def test_the_home_apps_close_code_and_reason_reach_the_visitor(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """The home app closes with 4001 "bye" and the visitor sees exactly that."""
    async with asyncio.timeout(20), http.ws_connect(tunnel.ws_url("/ws")) as ws:
        await ws.send_str("close-me")
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye")
        assert ws.close_code == 4001


async def test_the_visitors_close_code_and_reason_reach_the_home_app(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """The visitor closes with 4002 "later" and the home app sees exactly that."""
    async with asyncio.timeout(20):
        ws = await http.ws_connect(tunnel.ws_url("/ws"))
        await ws.send_str("x")
        assert (await ws.receive()).data == "x"
        await ws.close(code=4002, message=b"later")
        await tunnel.state.closed.wait()
        assert tunnel.state.closes == [(4002, "later")]


async def test_a_home_app_refusing_the_upgrade_with_403_fails_the_visitors_handshake(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """The home app's 403 answer to the upgrade becomes the visitor's handshake failure status."""
    async with asyncio.timeout(20):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(tunnel.ws_url("/refuse"))
        assert info.value.status == 403
        # The tunnel is unharmed by the refusal.
        async with http.ws_connect(tunnel.ws_url("/ws")) as ws:
            await ws.send_str("still fine")
            assert (await ws.receive()).data == "still fine"


UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


async def test_a_redirected_upgrade_reaches_the_visitor_and_the_agent_does_not_follow_it(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """The agent relays the home app's 302 to an upgrade instead of fetching the new location itself."""
    async with asyncio.timeout(20):
        async with http.get(
            tunnel.bridge.url + "/redirect", headers=UPGRADE_HEADERS, allow_redirects=False
        ) as response:
            assert response.status == 302
            assert response.headers["Location"] == "/login"
    assert tunnel.state.login_hits == 0


async def test_a_refused_upgrade_keeps_the_home_apps_headers(tunnel: Tunnel, http: aiohttp.ClientSession) -> None:
    """A 401 answer to an upgrade reaches the visitor with its WWW-Authenticate challenge."""
    async with asyncio.timeout(20):
        async with http.get(tunnel.bridge.url + "/need-auth", headers=UPGRADE_HEADERS) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="home"'


async def test_fifty_concurrent_websockets_each_echo_twenty_messages(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """Fifty sockets share one tunnel; every message returns on its own socket, in order."""

    async def chat(n: int) -> list[str]:
        received = []
        async with http.ws_connect(tunnel.ws_url("/ws")) as ws:
            for i in range(20):
                await ws.send_str(f"{n}:{i}")
                msg = await ws.receive()
                assert msg.type is WSMsgType.TEXT
                received.append(msg.data)
        return received

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(chat(n) for n in range(50)))
    for n, received in enumerate(results):
        assert received == [f"{n}:{i}" for i in range(20)]


async def test_the_demo_apps_websocket_push_arrives_through_the_tunnel(http: aiohttp.ClientSession) -> None:
    """Toggling a device over REST through the tunnel is pushed to a WebSocket opened through it."""
    runner, target = await start_app(create_home_app())
    try:
        async with asyncio.timeout(30), running_bridge() as bridge, running_agent(bridge.url, target):
            async with http.ws_connect(bridge.url.replace("http", "ws", 1) + "/api/ws") as ws:
                first = json.loads((await ws.receive()).data)
                assert first["type"] == "state"
                assert {d["id"]: d["on"] for d in first["devices"]}["porch"] is False
                async with http.post(bridge.url + "/api/devices/porch/toggle") as response:
                    assert response.status == 200
                    assert (await response.json())["on"] is True
                pushed = json.loads((await ws.receive()).data)
                assert pushed["type"] == "state"
                assert {d["id"]: d["on"] for d in pushed["devices"]}["porch"] is True
    finally:
        await runner.cleanup()


async def test_a_visitors_websocket_is_closed_with_1011_when_its_agent_goes_away(http: aiohttp.ClientSession) -> None:
    """Stopping the agent ends the visitor's WebSocket with 1011 instead of leaving it open and dead."""
    app, state = echo_app()
    runner, target = await start_app(app)
    try:
        async with asyncio.timeout(30), running_bridge() as bridge:
            async with running_agent(bridge.url, target) as agent:
                ws = await http.ws_connect(bridge.url.replace("http", "ws", 1) + "/ws")
                await ws.send_str("x")
                assert (await ws.receive()).data == "x"
                await agent.stop()
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 1011
                await ws.close()
            await state.closed.wait()  # the agent closed its side to the home app too
    finally:
        await runner.cleanup()


async def test_three_hundred_websockets_stay_open_at_once_through_one_agent(
    tunnel: Tunnel, http: aiohttp.ClientSession
) -> None:
    """Long-lived sockets do not exhaust the agent's connections to the home app (it once allowed 256).

    From two visitor addresses, 150 each: the bridge caps one address at 256 WebSockets per tunnel.
    """
    count = 300
    second = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=("127.0.0.2", 0)))
    async with second, asyncio.timeout(90):
        sockets = [await (http if i % 2 else second).ws_connect(tunnel.ws_url("/ws")) for i in range(count)]
        try:
            for i, ws in enumerate(sockets):
                await ws.send_str(f"still here {i}")
            for i, ws in enumerate(sockets):
                assert (await ws.receive()).data == f"still here {i}"
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
