"""Hostile tunnel peers for the memory and event-loop attacks: small, our own, over real sockets.

``RawAgent`` speaks the wire protocol of docs/PROTOCOL.md to a real bridge over a real
WebSocket (websockets' client, as the real agent uses), frame by frame, with nothing of
rproxy's own transport in between. ``FakeBridge`` is an aiohttp server that accepts a real
agent's upgrade, exchanges HELLOs and then lets a test send whatever frames it likes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from rproxy_core.bridge import Bridge
from rproxy_core.protocol.frames import Frame, FrameType, decode_code, encode_header, iter_frames
from rproxy_core.protocol.heads import RequestHead, ResponseHead
from tests.conftest import TOKEN, start_app, wait_for_tunnel

CONNECT = "/_rproxy/connect"


def frame(frame_type: int, stream_id: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """One encoded frame."""
    return encode_header(frame_type, flags, stream_id, len(payload)) + payload


def hello(**settings: object) -> bytes:
    body = json.dumps({"version": 1, **settings}).encode()
    return frame(FrameType.HELLO, 0, body)


def reply(stream_id: int, status: int = 200, headers: list[tuple[str, str]] | None = None) -> bytes:
    return frame(FrameType.REPLY, stream_id, ResponseHead(status, "", headers or []).encode())


def frames_of(message: bytes | str) -> list[Frame]:
    assert isinstance(message, bytes), message
    return list(iter_frames(message, 16 << 20))


@dataclass
class RawAgent:
    """An agent of our own on a real bridge: sends raw frames, reads them back when asked."""

    ws: ClientConnection
    bridge_hello: dict[str, object]

    async def send(self, *frames: bytes) -> None:
        await self.ws.send(b"".join(frames))

    async def next_open(self, timeout: float = 10) -> tuple[int, RequestHead]:
        """Read until the bridge opens a stream; return its id and head."""
        async with asyncio.timeout(timeout):
            while True:
                for f in frames_of(await self.ws.recv()):
                    if f.type is FrameType.OPEN:
                        return f.stream_id, RequestHead.decode(f.payload)

    async def goaway(self, timeout: float = 15) -> tuple[int, str] | None:
        """Read until the bridge closes; return its GOAWAY's code and reason, if one came."""
        found = None
        with suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    for f in frames_of(await self.ws.recv()):
                        if f.type is FrameType.GOAWAY:
                            found = decode_code(f.payload)
        return found


@asynccontextmanager
async def raw_agent(
    bridge: Bridge, name: str, *, max_queue: int | None = 16, **connect: object
) -> AsyncIterator[RawAgent]:
    """Connect a RawAgent as tunnel ``name``, through the HELLO exchange and into the registry.

    ``max_queue``: messages websockets buffers before it stops reading the socket (1 makes
    an agent that never reads push back on the bridge within a few hundred kilobytes).
    """
    url = bridge.url.replace("http", "ws", 1) + CONNECT
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Rproxy-Protocol": "1",
        "Rproxy-Tunnel": name,
        "Rproxy-Agent-Id": f"raw-{name}",
    }
    async with ws_connect(
        url,
        additional_headers=headers,
        max_size=None,
        max_queue=max_queue,
        compression=None,
        ping_interval=None,
        close_timeout=2,
        **connect,
    ) as ws:  # type: ignore[arg-type]
        first = frames_of(await ws.recv())
        assert first[0].type is FrameType.HELLO
        await ws.send(hello(agent_id=f"raw-{name}"))
        await wait_for_tunnel(bridge, name, 1)
        yield RawAgent(ws, json.loads(bytes(first[0].payload)))


@dataclass
class FakeBridge:
    """A bridge of our own: accepts one real agent at a time and hands its socket to ``serve``."""

    serve: Callable[[web.WebSocketResponse], object]
    url: str = ""
    agent_hello: dict[str, object] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, compress=False, autoping=True)
        await ws.prepare(request)
        try:
            msg = await ws.receive()
            assert msg.type is WSMsgType.BINARY, msg
            self.agent_hello = json.loads(bytes(frames_of(msg.data)[0].payload))
            await ws.send_bytes(hello(public_url="http://fake.test/"))
            await self.serve(ws)  # type: ignore[misc]
        finally:
            self.closed.set()
        return ws


@asynccontextmanager
async def fake_bridge(serve: Callable[[web.WebSocketResponse], object]) -> AsyncIterator[FakeBridge]:
    fake = FakeBridge(serve)
    app = web.Application()
    app.router.add_get(CONNECT, fake.handle)
    runner, url = await start_app(app)
    fake.url = url
    try:
        yield fake
    finally:
        await runner.cleanup()


async def read_until_goaway(ws: web.WebSocketResponse, timeout: float = 15) -> tuple[int, str] | None:
    """On the fake bridge: read the agent's messages until it closes; its GOAWAY, if one came."""
    found = None
    with suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    for f in frames_of(msg.data):
                        if f.type is FrameType.GOAWAY:
                            found = decode_code(f.payload)
    return found
