"""Home apps for tunnel tests: real aiohttp applications, one built per test.

Each app records what reached it (method, raw target, headers, body digest) so a test can
check what the agent forwarded, and exposes hooks (events, counters) a test can drive to
prove streaming or cancellation. Nothing here knows about rproxy.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from rproxy_core import Agent, Bridge
from tests.conftest import running_agent, running_bridge, start_app

__all__ = [
    "CHUNK",
    "HomeApp",
    "RawResponse",
    "Seen",
    "Tunnel",
    "home_tunnel",
    "pattern_chunks",
    "pattern_sha256",
    "raw_exchange",
    "serve_home",
]

#: Size of one chunk of the deterministic download pattern.
CHUNK = 64 << 10


def _block(index: int) -> bytes:
    """64 KiB of pseudo-random bytes, a pure function of ``index`` (SHAKE-256 of the counter)."""
    return hashlib.shake_256(index.to_bytes(8, "big")).digest(CHUNK)


#: A small cycle of blocks, computed once, so a 200 MB pattern costs no hashing per chunk.
_BLOCKS = [_block(i) for i in range(61)]


def pattern_chunks(size: int) -> AsyncIterator[bytes]:
    """``size`` deterministic pseudo-random bytes as CHUNK-sized pieces (lazily generated)."""

    async def gen() -> AsyncIterator[bytes]:
        sent = 0
        index = 0
        while sent < size:
            block = _BLOCKS[index % len(_BLOCKS)]
            piece = block[: min(CHUNK, size - sent)]
            sent += len(piece)
            index += 1
            yield piece

    return gen()


def pattern_sha256(size: int) -> str:
    """SHA-256 of ``pattern_chunks(size)`` without materialising it."""
    digest = hashlib.sha256()
    sent = 0
    index = 0
    while sent < size:
        block = _BLOCKS[index % len(_BLOCKS)]
        piece = block[: min(CHUNK, size - sent)]
        digest.update(piece)
        sent += len(piece)
        index += 1
    return digest.hexdigest()


@dataclass
class Seen:
    """One request as the home app received it."""

    method: str
    raw_path: str
    host: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple[Any, ...] | None

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class HomeApp:
    """A home app with one handler per behaviour a tunnel test needs."""

    seen: list[Seen] = field(default_factory=list)
    #: SSE: the test sets ``sse_go[i]`` once it has received event i-1.
    sse_go: list[asyncio.Event] = field(default_factory=lambda: [asyncio.Event() for _ in range(8)])
    #: Set when a handler learns its visitor is gone (cancelled, or a write failed).
    handler_gone: asyncio.Event = field(default_factory=asyncio.Event)
    handler_started: asyncio.Event = field(default_factory=asyncio.Event)
    #: How the slow handler ended: "cancelled", "write failed: ...", "finished".
    handler_outcome: str = ""
    bytes_written: int = 0

    def build(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        r = app.router
        r.add_route("*", "/status/{code}", self.status)
        r.add_get("/chunked", self.chunked)
        r.add_get("/cookies/set", self.set_cookies)
        r.add_get("/gzip", self.gzipped)
        r.add_get("/redirect", self.redirect)
        r.add_get("/sse", self.sse)
        r.add_get("/longpoll", self.longpoll)
        r.add_get("/hang", self.hang)
        r.add_get("/drop", self.drop)
        r.add_get("/break/{framing}", self.break_off)
        r.add_get("/download/{size}", self.download)
        r.add_post("/upload", self.upload)
        r.add_get("/id/{n}", self.identify)
        r.add_route("*", "/{tail:.*}", self.echo)
        return app

    def _record(self, request: web.Request, body: bytes = b"") -> Seen:
        seen = Seen(
            method=request.method,
            raw_path=request.raw_path,
            host=request.host,
            headers=list(
                request.raw_headers and ((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers)
            ),
            body=body,
            peer=request.transport.get_extra_info("peername") if request.transport else None,
        )
        self.seen.append(seen)
        return seen

    async def echo(self, request: web.Request) -> web.StreamResponse:
        """Echo method, target, headers and body as JSON (Content-Length set, also for HEAD)."""
        body = await request.read()
        seen = self._record(request, body)
        payload = json.dumps(
            {
                "method": seen.method,
                "raw_path": seen.raw_path,
                "host": seen.host,
                "headers": seen.headers,
                "body": body.decode("latin-1"),
            }
        ).encode()
        return web.Response(body=payload, content_type="application/json")

    async def status(self, request: web.Request) -> web.Response:
        self._record(request)
        code = int(request.match_info["code"])
        headers = {"ETag": '"v1"'} if code == 304 else {}
        return web.Response(status=code, headers=headers)

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        """A body without Content-Length: aiohttp sends it chunked."""
        self._record(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(50):
            await response.write(f"part {i:03d};".encode() * 100)
        await response.write_eof()
        return response

    async def set_cookies(self, request: web.Request) -> web.Response:
        self._record(request)
        response = web.Response(text="cookies set")
        response.headers.add("Set-Cookie", "session=visitor-a; Path=/")
        response.headers.add("Set-Cookie", "theme=dark; Path=/")
        return response

    GZIP_PLAIN = b"compressible " * 5000

    async def gzipped(self, request: web.Request) -> web.Response:
        self._record(request)
        body = gzip.compress(self.GZIP_PLAIN, mtime=0)
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def redirect(self, request: web.Request) -> web.Response:
        self._record(request)
        raise web.HTTPFound("/redirected-here")

    async def sse(self, request: web.Request) -> web.StreamResponse:
        """Event i is sent only once the test set ``sse_go[i]``; stops if its client leaves."""
        self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i, go in enumerate(self.sse_go):
            if not await _wait_unless_gone(request, go):
                self.handler_outcome = "connection closed"
                self.handler_gone.set()
                return response
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await response.write_eof()
        return response

    async def longpoll(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.sleep(2.0)
        return web.Response(text="long poll answered")

    async def hang(self, request: web.Request) -> web.Response:
        """Never answers; notes when its client (the agent) goes away."""
        self._record(request)
        self.handler_started.set()
        try:
            await _wait_unless_gone(request, asyncio.Event())
        except asyncio.CancelledError:
            self.handler_outcome = "cancelled"
            self.handler_gone.set()
            raise
        self.handler_outcome = "connection closed"
        self.handler_gone.set()
        return web.Response(text="nobody hears this")

    async def drop(self, request: web.Request) -> web.Response:
        """Closes the connection without answering anything."""
        self._record(request)
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        if sock is not None:  # RST rather than FIN, as a crashing app would
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        request.transport.close()
        await asyncio.sleep(0.5)
        return web.Response(text="nobody hears this")

    async def break_off(self, request: web.Request) -> web.StreamResponse:
        """Starts a 1 MB body (with Content-Length, or chunked), sends 64 KB, then closes."""
        self._record(request)
        response = web.StreamResponse()
        if request.match_info["framing"] == "length":
            response.content_length = 1 << 20
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"x" * (64 << 10))
        assert request.transport is not None
        request.transport.close()  # what was written still goes out, then FIN
        return response

    async def download(self, request: web.Request) -> web.StreamResponse:
        """``size`` bytes of the deterministic pattern, streamed; notes if the visitor left."""
        self._record(request)
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        self.handler_started.set()
        try:
            async for chunk in pattern_chunks(size):
                await response.write(chunk)
                self.bytes_written += len(chunk)
            await response.write_eof()
        except asyncio.CancelledError:
            self.handler_outcome = "cancelled"
            self.handler_gone.set()
            raise
        except (ConnectionError, RuntimeError) as err:
            self.handler_outcome = f"write failed: {err!r}"
            self.handler_gone.set()
            raise
        self.handler_outcome = "finished"
        return response

    async def upload(self, request: web.Request) -> web.Response:
        """SHA-256 and size of the request body, read incrementally."""
        self._record(request)
        digest = hashlib.sha256()
        size = 0
        while chunk := await request.content.readany():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def identify(self, request: web.Request) -> web.Response:
        """Answers with its request number after a tiny random pause (so answers interleave)."""
        n = request.match_info["n"]
        await asyncio.sleep(int.from_bytes(os.urandom(1), "big") / 5000)
        return web.json_response({"n": n, "q": request.query.get("q", "")})


async def _wait_unless_gone(request: web.Request, event: asyncio.Event) -> bool:
    """Wait for ``event``; return False instead if the client's connection closes first.

    aiohttp does not cancel handlers on disconnect by default, so this watches the transport,
    as a long-polling home app would.
    """
    while not event.is_set():
        if request.transport is None or request.transport.is_closing():
            return False
        try:
            async with asyncio.timeout(0.02):
                await event.wait()
        except TimeoutError:
            pass
    return True


@asynccontextmanager
async def serve_home(home: HomeApp | None = None) -> AsyncIterator[tuple[HomeApp, str]]:
    """Run a fresh HomeApp on 127.0.0.1; yield it and its base URL."""
    home = home or HomeApp()
    runner, url = await start_app(home.build())
    try:
        yield home, url
    finally:
        await runner.cleanup()


@dataclass
class Tunnel:
    """A bridge, an agent connected to it, and the home app the agent serves."""

    bridge: Bridge
    agent: Agent
    home: HomeApp
    target: str

    @property
    def url(self) -> str:
        return self.bridge.url

    @property
    def port(self) -> int:
        assert self.bridge.port is not None
        return self.bridge.port


@asynccontextmanager
async def home_tunnel(**bridge_overrides: object) -> AsyncIterator[Tunnel]:
    """Home app ← agent ← bridge, all real, on 127.0.0.1."""
    async with serve_home() as (home, target), running_bridge(**bridge_overrides) as bridge:
        async with running_agent(bridge.url, target) as agent:
            yield Tunnel(bridge, agent, home, target)


# Raw HTTP/1.1 over a socket, for requests aiohttp's client would not send as written.


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def parse_response(data: bytes) -> RawResponse:
    """Parse one whole response read until EOF (the body is everything after the head)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return RawResponse(status, headers, body)  # type: ignore[arg-type]


async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> RawResponse:
    """Send ``data`` on a new connection and read until the server closes it."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            received = await reader.read()
        finally:
            writer.close()
    return parse_response(received)
