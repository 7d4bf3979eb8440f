"""The agent's own HTTP/1.1 client for the home app (agent/homehttp.py), against scripted home apps.

Each home app here is a raw asyncio server that writes exactly the bytes a test wants, so the
tests reach what aiohttp's server never sends: answers nobody asked for, heads over every
limit, bodies that run to the close, interim answers, early answers to an upload. Visitors
come through a real bridge and agent; after each attack the tunnel still serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest

from rproxy_core.agent import homehttp
from rproxy_core.agent.homehttp import HomeClient, HomeProtocolError
from tests.conftest import running_agent, running_bridge, wait_for_tunnel

pytestmark = pytest.mark.skipif(not homehttp.available(), reason="httptools is in requirements/test.txt")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawHome:
    url: str = ""
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)


async def read_head(reader: asyncio.StreamReader, home: RawHome) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    home.heads.append(head)
    return head


def ok(body: bytes = b"fine", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@asynccontextmanager
async def raw_home(script: Callable[[RawHome], Handler]) -> AsyncIterator[RawHome]:
    home = RawHome()
    handle = script(home)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        home.connections += 1
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    home.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield home
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def tunnel_to(home: RawHome) -> AsyncIterator[str]:
    async with running_bridge() as bridge, running_agent(bridge.url, home.url) as agent:
        await wait_for_tunnel(bridge)
        yield bridge.url
        # What these tests are about: the agent asked the home app with its own client.
        lean = agent._handlers[""]._home
        assert lean is not None and lean.connections_opened == home.connections


async def get(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, bytes]:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, await response.read()


def keep_alive(answers: Callable[[bytes], bytes]) -> Callable[[RawHome], Handler]:
    """A home app answering each request on a connection with ``answers(head)``, kept alive."""

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await read_head(reader, home)
                writer.write(answers(head))
                await writer.drain()

        return handle

    return script


async def test_requests_reuse_one_kept_alive_connection(http: aiohttp.ClientSession) -> None:
    async with raw_home(keep_alive(lambda head: ok(head.split(b" ")[1]))) as home, tunnel_to(home) as base:
        for index in range(20):
            assert await get(http, f"{base}/n/{index}?q=1") == (200, f"/n/{index}?q=1".encode())
    assert home.connections == 1
    assert all(b"\r\nHost: " in head for head in home.heads)


async def test_a_stale_kept_alive_connection_is_retried_for_a_get_only(http: aiohttp.ClientSession) -> None:
    """The home app closes a kept-alive connection just as it is reused: a GET is retried once."""

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(reader, home)
            writer.write(ok(b"first"))
            await writer.drain()
            # Wait for the next request, then close without answering (an idle timeout racing it).
            await reader.readuntil(b"\r\n\r\n")

        return handle

    async with raw_home(script) as home, tunnel_to(home) as base:
        assert await get(http, base + "/a") == (200, b"first")
        assert await get(http, base + "/b") == (200, b"first")  # retried on a new connection
        assert home.connections == 2
        # A POST is never retried: the home app may have acted on it before closing.
        async with http.post(base + "/c") as response:
            assert response.status == 502
        assert await get(http, base + "/d") == (200, b"first")


async def test_an_answer_nobody_asked_for_closes_the_connection(http: aiohttp.ClientSession) -> None:
    """Two answers to one request: the second never reaches the next visitor."""
    smuggled = ok(b"fine") + ok(b"SMUGGLED")
    async with raw_home(keep_alive(lambda head: smuggled)) as home, tunnel_to(home) as base:
        for _ in range(5):
            assert await get(http, base + "/") == (200, b"fine")
    assert home.connections == 5


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (ok(extra=b"X-Big: " + b"a" * 9000 + b"\r\n"), "one header line over 8190 bytes"),
        (ok(extra=b"".join(b"X-%d: v\r\n" % i for i in range(200))), "200 header fields"),
        (ok(extra=b"".join(b"X-%d: %s\r\n" % (i, b"b" * 8000) for i in range(12))), "96 KB of head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nfine", "two lengths"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "a bad chunk size"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", "an upgrade"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "a body cut short"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not HTTP at all"),
    ],
)
async def test_a_broken_answer_is_502_and_the_tunnel_goes_on(
    http: aiohttp.ClientSession, answer: bytes, why: str
) -> None:
    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await read_head(reader, home)
            writer.write(ok(b"healthy") if b" /health " in head else answer)
            await writer.drain()
            if b" /health " not in head:
                await asyncio.sleep(0.2)  # the cut-short body ends with the close

        return handle

    async with raw_home(script) as home, tunnel_to(home) as base:
        async with http.get(base + "/broken") as response:
            if response.status == 200:  # the head was fine; the body breaks off
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            else:
                assert response.status == 502, why
        assert await get(http, base + "/health") == (200, b"healthy")


async def test_bodies_by_length_by_chunks_and_until_the_close(http: aiohttp.ClientSession) -> None:
    answers = {
        b"/length": ok(b"x" * 300_000),
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * 200_000,
        b"/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + ok(b"after hints"),
    }

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await read_head(reader, home)
                path = head.split(b" ")[1]
                writer.write(answers[path])
                await writer.drain()
                if path == b"/close":
                    return

        return handle

    async with raw_home(script) as home, tunnel_to(home) as base:
        assert await get(http, base + "/length") == (200, b"x" * 300_000)
        assert await get(http, base + "/chunked") == (200, b"hello world")
        assert await get(http, base + "/close") == (200, b"y" * 200_000)
        assert await get(http, base + "/empty") == (204, b"")
        assert await get(http, base + "/interim") == (200, b"after hints")


async def test_an_early_answer_to_an_upload_is_relayed_and_its_connection_not_reused(
    http: aiohttp.ClientSession,
) -> None:
    """The home app answers 413 before reading a big body: the visitor gets the 413."""

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await read_head(reader, home)
            if head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
                await writer.drain()
                await asyncio.sleep(0.5)
                return
            writer.write(ok())
            await writer.drain()

        return handle

    async with raw_home(script) as home, tunnel_to(home) as base:
        async with http.post(base + "/upload", data=b"u" * (8 << 20)) as response:
            assert (response.status, await response.read()) == (413, b"big")
        assert await get(http, base + "/after") == (200, b"fine")
    assert home.connections == 2


async def test_a_request_body_is_framed_as_the_visitor_sent_it(http: aiohttp.ClientSession) -> None:
    bodies: list[bytes] = []

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await read_head(reader, home)
                if b"Content-Length: " in head:
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    bodies.append(await reader.readexactly(length))
                elif b"Transfer-Encoding: chunked" in head:
                    body = b""
                    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readuntil(b"\r\n")
                    bodies.append(body)
                writer.write(ok())
                await writer.drain()

        return handle

    async def streamed() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    async with raw_home(script) as home, tunnel_to(home) as base:
        async with http.post(base + "/sized", data=b"s" * 70_000) as response:
            assert response.status == 200
        async with http.post(base + "/streamed", data=streamed()) as response:
            assert response.status == 200
        async with http.post(base + "/none") as response:
            assert response.status == 200
    assert bodies == [b"s" * 70_000, b"part one, part two", b""]
    assert b"Content-Length: 0\r\n" in home.heads[2]
    assert home.connections == 1


async def test_a_body_longer_than_its_length_never_reaches_the_home_app_as_a_request() -> None:
    """A lying bridge's body runs past its Content-Length: nothing past it is written."""
    received: list[bytes] = []

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(reader, home)
            received.append(await reader.read())

        return handle

    async def lying() -> AsyncIterator[bytes]:
        yield b"abcd"
        yield b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

    async with raw_home(script) as home:
        client = HomeClient("127.0.0.1", int(home.url.rsplit(":", 1)[1]), host_header="h", connect_timeout=5)
        with pytest.raises((ValueError, HomeProtocolError)):
            await client.request("POST", "/", [("Content-Length", "4")], lying())
        client.close()
        await asyncio.sleep(0.2)
    assert received == [b"abcd"]


async def test_a_reader_that_stops_leaves_the_body_in_the_home_apps_socket() -> None:
    """A 64 MB answer nobody reads: the client holds about READ_HIGH_WATER, not the body."""
    sent = 0

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            await read_head(reader, home)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
            block = b"z" * (1 << 20)
            for _ in range(64):
                writer.write(block)
                await writer.drain()
                sent += len(block)

        return handle

    async with raw_home(script) as home:
        client = HomeClient("127.0.0.1", int(home.url.rsplit(":", 1)[1]), host_header="h", connect_timeout=5)
        response = await client.request("GET", "/big", [], None)
        await asyncio.sleep(1.0)
        assert response.buffered <= homehttp.READ_HIGH_WATER + (256 << 10)
        assert sent < 64 << 20
        assert len(await response.read(1 << 20)) > 0
        response.close()
        client.close()


async def test_a_visitor_who_hangs_up_closes_the_request_to_the_home_app(http: aiohttp.ClientSession) -> None:
    """The home app thinks; the visitor leaves: its connection to the home app closes, and is never reused."""
    hung_up = asyncio.Event()

    def script(home: RawHome) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await read_head(reader, home)
            if b" /slow " in head:
                if not await reader.read(1):  # nothing more comes: the agent closed it
                    hung_up.set()
                return
            writer.write(ok())
            await writer.drain()

        return handle

    async with raw_home(script) as home, tunnel_to(home) as base:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5), http.get(base + "/slow"):
                pass
        await asyncio.wait_for(hung_up.wait(), 10)
        assert await get(http, base + "/next") == (200, b"fine")
    assert home.connections == 2
