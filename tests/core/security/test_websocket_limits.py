"""Visitor WebSockets cannot hold the bridge's memory, loop or stream slots (issue 15, findings 4, 5, 10).

Real visitors (aiohttp's client) through a real bridge and agent to a real home app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.conftest import running_agent, running_bridge, start_app


class _Home:
    """A home app WebSocket that counts what it gets and echoes text."""

    def __init__(self) -> None:
        self.received = 0
        self.sizes: list[int] = []

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            self.received += 1
            if msg.type is WSMsgType.TEXT:
                self.sizes.append(len(msg.data))
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self.sizes.append(len(msg.data))
        return ws


@pytest.fixture
async def home() -> AsyncIterator[tuple[_Home, str]]:
    home = _Home()
    app = web.Application()
    app.router.add_get("/ws", home.ws)
    runner, target = await start_app(app)
    try:
        yield home, target
    finally:
        await runner.cleanup()


async def test_a_visitor_message_over_the_limit_is_refused_with_1009(
    home: tuple[_Home, str], http: aiohttp.ClientSession
) -> None:
    """2 MiB from a visitor with the default 1 MiB limit: closed with 1009, nothing reaches the home app."""
    app, target = home
    async with asyncio.timeout(30), running_bridge() as bridge, running_agent(bridge.url, target):
        url = bridge.url.replace("http", "ws", 1) + "/ws"
        async with http.ws_connect(url) as ws:
            await ws.send_str("small")
            assert (await ws.receive()).data == "small"
            await ws.send_bytes(b"\0" * (2 << 20))
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and msg.data == 1009, msg
        assert app.sizes == [5]


async def test_visitor_sockets_get_no_permessage_deflate(home: tuple[_Home, str], http: aiohttp.ClientSession) -> None:
    """A visitor offering permessage-deflate gets a plain socket: no inflating of what it sends (1,300x)."""
    _, target = home
    async with asyncio.timeout(30), running_bridge() as bridge, running_agent(bridge.url, target):
        url = bridge.url.replace("http", "ws", 1) + "/ws"
        async with http.ws_connect(url, compress=15) as ws:
            assert ws.compress == 0
            assert "Sec-WebSocket-Extensions" not in ws._response.headers
            await ws.send_str("plain")
            assert (await ws.receive()).data == "plain"


async def test_a_visitor_that_does_not_answer_pings_is_closed_and_one_that_answers_stays(
    home: tuple[_Home, str], http: aiohttp.ClientSession
) -> None:
    """With websocket_idle_timeout 0.4 s: the bridge pings a silent visitor; no PONG → closed."""
    _, target = home
    async with (
        asyncio.timeout(30),
        running_bridge(websocket_idle_timeout=0.4) as bridge,
        running_agent(bridge.url, target),
    ):
        url = bridge.url.replace("http", "ws", 1) + "/ws"
        # Answers: three pings answered by hand, and the socket still works.
        async with http.ws_connect(url, autoping=False) as ws:
            for _ in range(3):
                msg = await ws.receive()
                assert msg.type is WSMsgType.PING, msg
                await ws.pong(msg.data)
            await ws.send_str("still here")
            while (msg := await ws.receive()).type is WSMsgType.PING:
                await ws.pong(msg.data)
            assert msg.data == "still here"
        # Silent and deaf: reads (so it sees the end) but never answers the ping.
        async with http.ws_connect(url, autoping=False) as ws:
            types = []
            while True:
                msg = await ws.receive()
                types.append(msg.type)
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
            assert types[0] is WSMsgType.PING and types[-1] is not WSMsgType.PING, types


async def test_a_flood_of_tiny_visitor_messages_is_closed_with_1008_and_the_bridge_keeps_answering(
    home: tuple[_Home, str], http: aiohttp.ClientSession
) -> None:
    """Empty messages as fast as a visitor can send them: closed with 1008; /_rproxy/health answers meanwhile."""
    app, target = home
    async with (
        asyncio.timeout(60),
        running_bridge(websocket_message_rate=1000) as bridge,
        running_agent(bridge.url, target),
    ):
        url = bridge.url.replace("http", "ws", 1) + "/ws"
        async with http.ws_connect(url) as ws:
            reader = asyncio.create_task(ws.receive())
            health = None
            for i in range(20_000):  # bounded: 20,000 empty frames
                if reader.done():
                    break
                await ws.send_bytes(b"")
                if i == 2000:
                    async with http.get(bridge.url + "/_rproxy/health") as response:
                        health = response.status
            msg = await asyncio.wait_for(reader, 10)
            while msg.type is WSMsgType.TEXT:
                msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and msg.data == 1008, msg
        assert health == 200
        assert app.received < 20_000
