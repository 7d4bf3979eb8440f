"""A hostile agent and a hostile bridge for the response and request hygiene tests.

Both speak the tunnel protocol as docs/PROTOCOL.md describes it, written here from that
document with ``struct`` and ``json`` (not with rproxy's own protocol code), over a real
WebSocket: the bridge or agent on the other end is the real one. They do exactly what a test
tells them, including what an honest peer never would.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import TOKEN, start_app

HELLO, OPEN, REPLY, DATA, WINDOW, RESET, PING, PONG, GOAWAY = range(9)
FIN = 0x01
_HEADER = struct.Struct(">BBII")


def frame(kind: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame: type, flags, stream id, payload length, payload (§2)."""
    return _HEADER.pack(kind, flags, stream, len(payload)) + payload


def parse(message: bytes) -> list[tuple[int, int, int, bytes]]:
    """A WebSocket message's frames as (type, flags, stream id, payload)."""
    frames = []
    offset = 0
    while offset < len(message):
        kind, flags, stream, size = _HEADER.unpack_from(message, offset)
        offset += _HEADER.size
        frames.append((kind, flags, stream, message[offset : offset + size]))
        offset += size
    return frames


def reply(
    stream: int, status: int, headers: list[list[str]] | None = None, reason: str = "", fin: bool = False
) -> bytes:
    """A REPLY frame with a response head as the agent would write it (§4)."""
    head = json.dumps({"s": status, "r": reason, "h": headers or []}).encode()
    return frame(REPLY, stream, head, FIN if fin else 0)


def data(stream: int, payload: bytes, fin: bool = False) -> bytes:
    return frame(DATA, stream, payload, FIN if fin else 0)


def code_and_reason(code: int, reason: str) -> bytes:
    return struct.pack(">H", code) + reason.encode()


#: What the hostile agent does with each OPEN: the head (as JSON) in, the frames to send out.
Answer = Callable[[int, dict[str, Any]], bytes]


@dataclass
class HostileAgent:
    """An agent connected to a real bridge that answers each OPEN with ``answer``'s bytes."""

    answer: Answer
    opened: dict[int, dict[str, Any]] = field(default_factory=dict)
    resets: dict[int, tuple[int, str]] = field(default_factory=dict)
    ws: aiohttp.ClientWebSocketResponse | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, raw: bytes) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(raw)

    def stream_for(self, target: str) -> int:
        """The id of the stream the bridge opened for request target ``target``."""
        return next(stream for stream, head in self.opened.items() if head["t"] == target)

    async def wait_reset(self, stream: int, timeout: float = 10) -> tuple[int, str]:
        """The (code, reason) of the bridge's RESET for ``stream``, once it arrives."""
        async with asyncio.timeout(timeout):
            while stream not in self.resets:
                self._changed.clear()
                await self._changed.wait()
        return self.resets[stream]

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                return
            out = b""
            for kind, _flags, stream, payload in parse(message.data):
                if kind == OPEN:
                    head = json.loads(payload)
                    self.opened[stream] = head
                    out += self.answer(stream, head)
                elif kind == RESET:
                    self.resets[stream] = (struct.unpack(">H", payload[:2])[0], payload[2:].decode("utf-8", "replace"))
                elif kind == PING:
                    out += frame(PONG, 0, payload)
            self._changed.set()
            if out:
                await ws.send_bytes(out)


@asynccontextmanager
async def hostile_agent(bridge_url: str, answer: Answer, tunnel: str = "home") -> AsyncIterator[HostileAgent]:
    """Connect a HostileAgent for ``tunnel`` to the bridge at ``bridge_url`` (HELLO done)."""
    agent = HostileAgent(answer)
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Rproxy-Protocol": "1",
        "Rproxy-Tunnel": tunnel,
        "Rproxy-Agent-Id": "hostile",
    }
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(bridge_url.replace("http", "ws", 1) + "/_rproxy/connect", headers=headers) as ws:
            agent.ws = ws
            hello = {
                "version": 1,
                "window": 1 << 20,
                "max_frame": 256 << 10,
                "max_streams": 100,
                "agent_id": "hostile",
                "software": "hostile-test",
                "services": {"": "http"},
            }
            await ws.send_bytes(frame(HELLO, 0, json.dumps(hello).encode()))
            first = await ws.receive(timeout=10)
            assert first.type is aiohttp.WSMsgType.BINARY and parse(first.data)[0][0] == HELLO, first
            runner = asyncio.create_task(agent._run(ws))
            try:
                yield agent
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)


@dataclass
class HostileBridge:
    """A bridge on 127.0.0.1 that sends a real agent what a test tells it to.

    ``hello`` is merged into the bridge's HELLO settings; ``send_open`` opens a stream with any
    head bytes, and the agent's answers (REPLY, DATA, RESET) are collected per stream.
    """

    hello: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    frames: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    ws: web.WebSocketResponse | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _next_stream: int = 1

    async def _connect(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        settings = {
            "version": 1,
            "window": 1 << 20,
            "max_frame": 256 << 10,
            "max_streams": 100,
            "tunnel": "home",
            "public_url": "https://home.example.test/",
            "heartbeat": 10,
            **self.hello,
        }
        await ws.send_bytes(frame(HELLO, 0, json.dumps(settings).encode()))
        self.ws = ws
        first = True
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                break
            out = b""
            for kind, flags, stream, payload in parse(message.data):
                if first and kind == HELLO:
                    first = False
                    self.connected.set()
                    continue
                if kind == PING:
                    out += frame(PONG, 0, payload)
                elif stream:
                    self.frames.setdefault(stream, []).append((kind, flags, payload))
            self._changed.set()
            if out:
                await ws.send_bytes(out)
        return ws

    async def send_open(self, head: bytes, fin: bool = True) -> int:
        """Open the next stream with ``head`` as the OPEN payload; return its id."""
        assert self.ws is not None
        stream = self._next_stream
        self._next_stream += 2
        await self.ws.send_bytes(frame(OPEN, stream, head, FIN if fin else 0))
        return stream

    async def wait_answer(self, stream: int, timeout: float = 10) -> tuple[int, int, bytes]:
        """The first frame the agent sent on ``stream`` (a REPLY or a RESET)."""
        async with asyncio.timeout(timeout):
            while not self.frames.get(stream):
                self._changed.clear()
                await self._changed.wait()
        return self.frames[stream][0]


@asynccontextmanager
async def hostile_bridge(**hello: Any) -> AsyncIterator[HostileBridge]:
    """Serve a HostileBridge's /_rproxy/connect on 127.0.0.1."""
    bridge = HostileBridge(hello=dict(hello))
    app = web.Application()
    app.router.add_get("/_rproxy/connect", bridge._connect)
    runner, bridge.url = await start_app(app)
    try:
        yield bridge
    finally:
        if bridge.ws is not None:
            await bridge.ws.close()
        await runner.cleanup()


async def until(predicate: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if result if isinstance(result, bool) else await result:  # type: ignore[misc]
                return
            await asyncio.sleep(0.01)
