"""aiohttp's server features through an in-process connection, on asyncio's loop and uvloop's.

The server is a real ``web.Application`` behind ``web.AppRunner`` without any site (as Home
Assistant's HTTP server is reached by the integration); the client is the session of
``create_inprocess_session``, or for keep-alive and pipelining a raw HTTP/1.1 client written
straight onto the transport pair. Files are real files in ``tmp_path``.

Every test runs on both event loops: file responses take different paths on them (asyncio's
``loop.sendfile()`` copies under the transport's flow control; uvloop has no
``loop.sendfile()``, so aiohttp copies the file itself).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rproxy_core.agent.inprocess import VISITOR_ADDRESS, InProcessTransport, create_inprocess_session, transport_pair

MB = 1 << 20
URL = "http://homeassistant.inprocess"
VISITOR = "203.0.113.50"
#: Bytes a file response may have read from disk beyond what the visitor received: the
#: transport's high-water mark, a copy's read block and the client's read buffer, with room.
READ_AHEAD_BOUND = 2 * MB
#: aiohttp's client asks for gzip by default, and app.js has a precompressed app.js.gz beside it.
IDENTITY = {"Accept-Encoding": "identity"}
BIG_SIZE = 100 * MB + 17


def write_pattern(path: Path, size: int) -> str:
    """Write ``size`` bytes that differ block by block; return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for index in range(0, size, MB):
            block = hashlib.shake_256(index.to_bytes(8, "big")).digest(min(MB, size - index))
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


async def settled_position(path: Path, timeout: float = 15) -> int:
    """Where the reading of ``path`` stopped: its position once unchanged for half a second."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = read_position(path)
    while True:
        await asyncio.sleep(0.5)
        now = read_position(path)
        if now is not None and now == last:
            return now
        assert asyncio.get_running_loop().time() < deadline, f"the file was still being read after {timeout} s ({now})"
        last = now


def read_position(path: Path) -> int | None:
    """How far this process has read ``path`` through an open descriptor (Linux's fdinfo)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            continue  # closed meanwhile
    return None


@dataclass
class Files:
    root: Path
    big: Path
    big_sha256: str
    script: bytes  # static/app.js, served precompressed as app.js.gz too
    script_gz: bytes


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A file of just over 100 MB and its sha256, written once for the module."""
    big = tmp_path_factory.mktemp("big") / "big.bin"
    return big, write_pattern(big, BIG_SIZE)


@pytest.fixture
def files(tmp_path: Path, big_file: tuple[Path, str]) -> Files:
    root = tmp_path / "static"
    root.mkdir()
    big = root / "big.bin"
    os.link(big_file[0], big)
    digest = big_file[1]
    script = b"".join(b"console.log(%d);\n" % i for i in range(20_000))
    (root / "app.js").write_bytes(script)
    script_gz = gzip.compress(script, mtime=0)
    (root / "app.js.gz").write_bytes(script_gz)
    return Files(root, big, digest, script, script_gz)


def home_app(files: Files) -> web.Application:
    async def file(request: web.Request) -> web.FileResponse:
        # As Home Assistant serves its frontend, /local/ and backups: a FileResponse per request.
        return web.FileResponse(files.root / request.match_info["name"])

    async def info(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        extra = {
            key: repr(transport.get_extra_info(key))
            for key in ("peername", "sockname", "socket", "sslcontext", "ssl_object", "cipher", "peercert")
        }
        return web.json_response(
            {
                "remote": request.remote,
                "secure": request.secure,
                "scheme": request.scheme,
                "host": request.host,
                "url": str(request.url),
                "extra": extra,
                "keep_alive": request.keep_alive,
                "is_inprocess": isinstance(transport, InProcessTransport),
            }
        )

    async def echo(request: web.Request) -> web.StreamResponse:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        response = web.StreamResponse()  # no length: chunked
        await response.prepare(request)
        for part in (b"size=%d " % size, b"sha256=", digest.hexdigest().encode()):
            await response.write(part)
        await response.write_eof()
        return response

    async def compressed(request: web.Request) -> web.Response:
        response = web.Response(body=files.script, content_type="application/javascript")
        response.enable_compression()
        return response

    async def refuse_expectation(request: web.Request) -> web.Response | None:
        if request.headers.get("Expect", "").lower() == "100-continue":
            return web.Response(status=417, text="not that")
        return None

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=True)
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/file/{name}", file)
    app.router.add_static("/local", files.root)  # aiohttp's own static route, Range and all
    app.router.add_get("/info", info)
    app.router.add_post("/echo", echo)
    app.router.add_post("/refuse", echo, expect_handler=refuse_expectation)
    app.router.add_get("/compressed", compressed)
    app.router.add_get("/ws", websocket)
    return app


@dataclass
class Served:
    runner: web.AppRunner
    session: aiohttp.ClientSession
    files: Files


Scenario = Callable[[Served], Awaitable[None]]
Run = Callable[[Scenario], None]


@asynccontextmanager
async def serving(files: Files) -> AsyncIterator[Served]:
    runner = web.AppRunner(home_app(files), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    session = create_inprocess_session(runner)
    token = VISITOR_ADDRESS.set(VISITOR)
    try:
        yield Served(runner, session, files)
    finally:
        VISITOR_ADDRESS.reset(token)
        await session.close()
        await runner.cleanup()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest, files: Files) -> Run:
    """Runs a scenario against the served app on a fresh loop of each kind.

    Anything that reaches the loop's exception handler fails the test (aiohttp's server logs
    an unhandled error in a handler there, as the failed ``loop.sendfile()`` was).
    """
    if request.param == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    def run_scenario(scenario: Scenario) -> None:
        reported: list[dict[str, Any]] = []

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
            async with serving(files) as served:
                await scenario(served)

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(main(), 120))
        assert not reported, reported

    return run_scenario


def test_a_100_mb_file_arrives_whole_and_is_read_only_as_fast_as_the_visitor_reads(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        digest = hashlib.sha256()
        received = 0
        async with served.session.get(f"{URL}/file/big.bin") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(BIG_SIZE)
            chunk = await response.content.readany()
            digest.update(chunk)
            received += len(chunk)
            # The visitor stops reading: the server stops reading the file soon after.
            position = await settled_position(files.big)
            assert position - received < READ_AHEAD_BOUND, f"{position - received} bytes read ahead"
            async for chunk in response.content.iter_any():
                digest.update(chunk)
                received += len(chunk)
        assert received == BIG_SIZE
        assert digest.hexdigest() == files.big_sha256
        await asyncio.sleep(0.05)
        assert read_position(files.big) is None, "the file was left open"

    run(scenario)


def test_a_visitor_leaving_in_the_middle_of_a_file_ends_the_response(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        async with served.session.get(f"{URL}/file/big.bin") as response:
            await response.content.readexactly(MB)
        # Closing the response closed the connection: the server closes the file.
        for _ in range(100):
            if read_position(files.big) is None and not served.runner.server.connections:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        assert read_position(files.big) is None
        assert served.runner.server is not None and served.runner.server.connections == []
        # The next visitor is served as usual.
        async with served.session.get(f"{URL}/file/app.js", headers=IDENTITY) as response:
            assert await response.read() == files.script

    run(scenario)


@pytest.mark.parametrize("path", ["/file/big.bin", "/local/big.bin"])
def test_range_requests(run: Run, files: Files, path: str) -> None:
    async def scenario(served: Served) -> None:
        size = BIG_SIZE

        def data_at(start: int, end: int) -> bytes:
            with files.big.open("rb") as file:
                file.seek(start)
                return file.read(end - start)

        for header, start, end in [
            ("bytes=0-99", 0, 100),
            ("bytes=-100", size - 100, size),
            (f"bytes={size - 5000}-", size - 5000, size),
            ("bytes=1000000-3999999", 1_000_000, 4_000_000),
        ]:
            async with served.session.get(URL + path, headers={"Range": header}) as response:
                assert response.status == 206, header
                assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
                assert await response.read() == data_at(start, end), header
        async with served.session.get(URL + path, headers={"Range": f"bytes={size}-"}) as response:
            assert response.status == 416
            assert response.headers["Content-Range"] == f"bytes */{size}"
            await response.read()
        # If-Range with the file's date: the range; with an older date: the whole file.
        async with served.session.head(URL + path) as response:
            modified = response.headers["Last-Modified"]
        async with served.session.get(URL + path, headers={"Range": "bytes=0-9", "If-Range": modified}) as response:
            assert (response.status, await response.read()) == (206, data_at(0, 10))
        older = format_datetime(datetime(2001, 1, 1, tzinfo=UTC), usegmt=True)
        async with served.session.get(URL + path, headers={"Range": "bytes=0-9", "If-Range": older}) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            response.close()

    run(scenario)


@pytest.mark.parametrize("path", ["/file/app.js", "/local/app.js"])
def test_head_and_conditional_get(run: Run, files: Files, path: str) -> None:
    async def scenario(served: Served) -> None:
        async with served.session.head(URL + path, headers=IDENTITY) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(files.script))
            assert await response.read() == b""
            etag, modified = response.headers["ETag"], response.headers["Last-Modified"]

        async with served.session.get(URL + path, headers={**IDENTITY, "If-None-Match": etag}) as response:
            assert response.status == 304
            assert await response.read() == b""
        async with served.session.get(URL + path, headers={**IDENTITY, "If-Modified-Since": modified}) as response:
            assert response.status == 304
        # The file changes: the old validators no longer match.
        later = datetime.now(UTC) + timedelta(seconds=10)
        (files.root / "app.js").write_bytes(files.script + b"//changed\n")
        os.utime(files.root / "app.js", (later.timestamp(), later.timestamp()))
        async with served.session.get(URL + path, headers={**IDENTITY, "If-None-Match": etag}) as response:
            assert response.status == 200
            assert await response.read() == files.script + b"//changed\n"
        async with served.session.get(
            URL + path,
            headers={**IDENTITY, "If-Modified-Since": format_datetime(later - timedelta(hours=1), usegmt=True)},
        ) as response:
            assert response.status == 200
            await response.read()

    run(scenario)


def test_precompressed_files_and_compressed_responses(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        # The session passes bodies through as they are (the visitor's browser decodes them).
        async with served.session.get(f"{URL}/file/app.js", headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == files.script_gz
        async with served.session.get(f"{URL}/file/app.js", headers=IDENTITY) as response:
            assert "Content-Encoding" not in response.headers
            assert await response.read() == files.script
        async with served.session.get(f"{URL}/compressed", headers={"Accept-Encoding": "deflate"}) as response:
            assert response.headers["Content-Encoding"] == "deflate"
            assert zlib.decompress(await response.read()) == files.script

    run(scenario)


def test_expect_100_continue(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        body = b"q" * (3 * MB)
        async with served.session.post(f"{URL}/echo", data=body, expect100=True) as response:
            assert response.status == 200
            assert await response.text() == f"size={len(body)} sha256={hashlib.sha256(body).hexdigest()}"
        # Refused before the body is sent: the client gets the refusal and sends nothing more.
        async with served.session.post(f"{URL}/refuse", data=body, expect100=True) as response:
            assert (response.status, await response.text()) == (417, "not that")

    run(scenario)


def test_chunked_upload_and_chunked_response(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        parts = [os.urandom(n) for n in (1, 70_000, 3, 300_000, 65_536)]

        async def body() -> AsyncIterator[bytes]:
            for part in parts:
                yield part
                await asyncio.sleep(0)

        whole = b"".join(parts)
        async with served.session.post(f"{URL}/echo", data=body()) as response:
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert await response.text() == f"size={len(whole)} sha256={hashlib.sha256(whole).hexdigest()}"

    run(scenario)


def test_what_the_app_learns_about_the_connection(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        async with served.session.get(f"{URL}/info", headers={"Host": "home.example.com"}) as response:
            info = await response.json()
        assert info["is_inprocess"] is True
        assert info["remote"] == VISITOR
        # As behind any proxy that terminates TLS and sends no forwarded headers: plain http.
        assert (info["secure"], info["scheme"], info["host"]) == (False, "http", "home.example.com")
        assert info["url"] == "http://home.example.com/info"
        assert info["extra"] == {
            "peername": repr((VISITOR, 0)),
            "sockname": repr(("127.0.0.1", 0)),
            "socket": "None",
            "sslcontext": "None",
            "ssl_object": "None",
            "cipher": "None",
            "peercert": "None",
        }

    run(scenario)


def test_a_compressed_websocket(run: Run, files: Files) -> None:
    async def scenario(served: Served) -> None:
        async with served.session.ws_connect(f"{URL}/ws", compress=15) as ws:
            assert ws.compress == 15
            text = "abc" * 50_000
            await ws.send_str(text)
            assert await ws.receive_str() == text[::-1]

    run(scenario)


class RawClient(asyncio.Protocol):
    """An HTTP/1.1 client as raw bytes: what arrives, and when the connection ends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.changed.set()

    async def wait_for(self, what: bytes, count: int = 1) -> None:
        async with asyncio.timeout(5):
            while self.data.count(what) < count and not self.lost:
                self.changed.clear()
                await self.changed.wait()


def test_keep_alive_and_pipelining_on_one_connection(run: Run, files: Files) -> None:
    """The session opens a connection per request (each carries one visitor); the server end
    still keeps a connection alive and answers pipelined requests in order, HEAD included."""

    async def scenario(served: Served) -> None:
        assert served.runner.server is not None
        client = RawClient()
        client_end, _ = transport_pair(client, served.runner.server(), peer_address=VISITOR)
        client_end.write(b"HEAD /file/app.js HTTP/1.1\r\nHost: h\r\n\r\nGET /file/app.js HTTP/1.1\r\nHost: h\r\n\r\n")
        await client.wait_for(b"HTTP/1.1 200 OK", 2)
        head_end = client.data.index(b"\r\n\r\n") + 4
        assert b"Content-Length: %d" % len(files.script) in client.data[:head_end]
        # No body after the HEAD's head: the next bytes are the GET's answer.
        assert client.data[head_end:].startswith(b"HTTP/1.1 200 OK")
        async with asyncio.timeout(5):
            while not client.data.endswith(files.script):
                client.changed.clear()
                await client.changed.wait()
        assert not client.lost, "the server closed a keep-alive connection"

        client_end.write(b"GET /info HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        await client.wait_for(b"HTTP/1.1 200 OK", 3)
        async with asyncio.timeout(5):
            while not client.lost:
                client.changed.clear()
                await client.changed.wait()
        assert b'"remote": "203.0.113.50"' in client.data

    run(scenario)
