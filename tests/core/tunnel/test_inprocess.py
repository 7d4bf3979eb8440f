"""In-process connections: the agent talks to an aiohttp server in its own process, no socket.

The server is a real ``web.Application`` behind ``web.AppRunner(app, handler_cancellation=True)``
set up without any site, as Home Assistant's HTTP server is reached; the client is the
session from ``create_inprocess_session``. The first tests drive the transport pair directly
with plain recording protocols to pin down ordering, flow control and closing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import Agent, AgentConfig
from rproxy_core.agent.inprocess import (
    VISITOR_ADDRESS,
    InProcessTransport,
    create_inprocess_session,
    transport_pair,
)
from rproxy_core.exceptions import ConfigError
from tests.conftest import TOKEN, running_bridge, start_app, wait_for_tunnel

MB = 1 << 20
BLOCK = 64 << 10
URL = "http://homeassistant.inprocess"  # resolves nowhere: proves nothing is looked up
#: Distinct 64 KiB blocks, cycled, so a dropped, doubled or reordered chunk changes the digest.
_BLOCKS = [hashlib.shake_256(i.to_bytes(2, "big")).digest(BLOCK) for i in range(7)]


def pattern(size: int) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for index in range(0, size, BLOCK):
            yield _BLOCKS[(index // BLOCK) % len(_BLOCKS)][: size - index]

    return gen()


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for index in range(0, size, BLOCK):
        digest.update(_BLOCKS[(index // BLOCK) % len(_BLOCKS)][: size - index])
    return digest.hexdigest()


def pending_callbacks(loop: asyncio.AbstractEventLoop) -> list[object]:
    """Handles the loop still holds that have not been cancelled (asyncio's default loop)."""
    ready = list(getattr(loop, "_ready", []))
    timers = list(getattr(loop, "_scheduled", []))
    return [h for h in ready + timers if not h.cancelled()]


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- the transport pair with plain protocols ---------------------------------------------------


class Recorder(asyncio.Protocol):
    """Records what a transport does to its protocol."""

    def __init__(self) -> None:
        self.transport: InProcessTransport | None = None
        self.events: list[tuple[str, Any]] = []
        self.data = bytearray()
        self.chunks: list[int] = []
        #: What eof_received() answers: True keeps the connection open after the peer's EOF.
        self.keep_open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, InProcessTransport)
        self.transport = transport
        self.events.append(("made", None))

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data
        self.chunks.append(len(data))

    def eof_received(self) -> bool | None:
        self.events.append(("eof", None))
        return self.keep_open or None

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))

    def pause_writing(self) -> None:
        self.events.append(("pause_writing", None))

    def resume_writing(self) -> None:
        self.events.append(("resume_writing", None))

    def count(self, name: str) -> int:
        return sum(1 for event, _ in self.events if event == name)


def make_pair() -> tuple[Recorder, Recorder, InProcessTransport, InProcessTransport]:
    client, server = Recorder(), Recorder()
    client_end, server_end = transport_pair(client, server, peer_address="198.51.100.4")
    return client, server, client_end, server_end


async def test_bytes_arrive_in_order_from_the_loop_not_inside_write() -> None:
    client, server, client_end, server_end = make_pair()
    assert client.events == [("made", None)] and server.events == [("made", None)]

    client_end.write(b"GET / ")
    client_end.write(bytearray(b"HTTP/1.1\r\n"))
    client_end.write(memoryview(b"\r\n"))
    client_end.write(b"")
    assert server.data == b"", "delivered re-entrantly inside write()"
    assert client_end.get_write_buffer_size() == 18
    await settle()
    assert server.data == b"GET / HTTP/1.1\r\n\r\n"
    assert client_end.get_write_buffer_size() == 0

    big = bytes(range(256)) * 4096 * 3  # 3 MiB in one write
    server_end.write(big)
    await settle(30)
    assert client.data == big
    assert max(client.chunks) <= 256 << 10, "a large write must reach the reader in socket-sized pieces"

    with pytest.raises(TypeError):
        client_end.write("text")  # type: ignore[arg-type]
    client_end.close()
    await settle()


async def test_extra_info_names_the_visitor_on_the_server_end() -> None:
    _, _, client_end, server_end = make_pair()
    assert server_end.get_extra_info("peername") == ("198.51.100.4", 0)
    assert server_end.get_extra_info("sockname")[0] == "127.0.0.1"
    assert client_end.get_extra_info("peername") == server_end.get_extra_info("sockname")
    assert client_end.get_extra_info("sockname") == ("198.51.100.4", 0)
    for end in (client_end, server_end):
        assert end.get_extra_info("socket") is None
        assert end.get_extra_info("sslcontext") is None
        assert end.get_extra_info("missing", "dflt") == "dflt"
        assert end.can_write_eof() is True
    client_end.close()
    await settle()


async def test_flow_control_pauses_the_writer_until_the_reader_catches_up() -> None:
    client, server, client_end, server_end = make_pair()
    assert client_end.get_write_buffer_limits() == (16 << 10, 64 << 10)
    server_end.pause_reading()
    assert not server_end.is_reading()

    client_end.write(b"x" * (60 << 10))
    assert client.count("pause_writing") == 0
    client_end.write(b"x" * (10 << 10))  # 70 KiB waiting: above the 64 KiB mark
    assert client.count("pause_writing") == 1
    client_end.write(b"x" * (10 << 10))
    assert client.count("pause_writing") == 1, "paused twice"
    await settle()
    assert server.data == b"", "data delivered to a reader that paused"
    assert client_end.get_write_buffer_size() == 80 << 10

    server_end.resume_reading()
    assert server_end.is_reading()
    await settle()
    assert len(server.data) == 80 << 10
    assert client.count("resume_writing") == 1
    assert client_end.get_write_buffer_size() == 0

    # Tighter limits apply at once, and resume only at or below the low mark.
    client_end.set_write_buffer_limits(high=1000, low=100)
    assert client_end.get_write_buffer_limits() == (100, 1000)
    server_end.pause_reading()
    client_end.write(b"y" * 1001)
    assert client.count("pause_writing") == 2
    server_end.resume_reading()
    await settle()
    assert client.count("resume_writing") == 2
    client_end.set_write_buffer_limits(high=400)
    assert client_end.get_write_buffer_limits() == (100, 400)
    client_end.set_write_buffer_limits(low=300)
    assert client_end.get_write_buffer_limits() == (300, 1200)
    with pytest.raises(ValueError):
        client_end.set_write_buffer_limits(high=10, low=20)
    client_end.close()
    await settle()


async def test_close_delivers_what_was_written_then_loses_both_ends_once() -> None:
    client, server, client_end, server_end = make_pair()
    server_end.pause_reading()
    client_end.write(b"last words")
    client_end.close()
    assert client.events == [("made", None)], "connection_lost called from inside close()"
    client_end.close()
    client_end.write(b"ignored")
    assert client_end.is_closing() and server_end.is_closing()
    await settle()
    # The closing end is done at once; the reader is still paused with bytes to read.
    assert client.events == [("made", None), ("lost", None)]
    assert server.events == [("made", None)]
    server_end.write(b"nobody reads this")
    server_end.resume_reading()
    await settle()
    assert server.data == b"last words"
    assert server.events == [("made", None), ("eof", None), ("lost", None)]
    assert client.data == b""
    server_end.close()
    server_end.abort()
    client_end.abort()
    await settle()
    assert client.count("lost") == 1 and server.count("lost") == 1
    assert not pending_callbacks(asyncio.get_running_loop())


async def test_closing_wakes_a_writer_the_closed_end_will_never_read() -> None:
    client, server, client_end, server_end = make_pair()
    server_end.write(b"z" * (100 << 10))  # nobody reads it: the client end pauses reading
    client_end.pause_reading()
    server_end.write(b"z")
    assert server.count("pause_writing") == 1
    client_end.close()
    await settle()
    assert server.count("resume_writing") == 1
    assert server.events[-2:] == [("eof", None), ("lost", None)]
    assert client.data == b""


async def test_abort_drops_everything_and_resets_the_peer() -> None:
    client, server, client_end, server_end = make_pair()
    server_end.pause_reading()
    client_end.write(b"never delivered")
    server_end.write(b"never read")
    client_end.abort()
    await settle()
    assert server.data == b"" and client.data == b""
    assert client.events == [("made", None), ("lost", None)]
    assert [event for event, _ in server.events] == ["made", "lost"]
    assert isinstance(server.events[-1][1], ConnectionResetError)
    assert not pending_callbacks(asyncio.get_running_loop())


async def test_write_eof_half_closes_and_the_reader_closes_unless_it_keeps_open() -> None:
    # The reader does not ask to stay open: after the data and the EOF its end closes, so the
    # half-closed writer gets its EOF and loses the connection too, as over TCP.
    client, server, client_end, server_end = make_pair()
    client_end.write(b"request")
    client_end.write_eof()
    client_end.write_eof()  # again: nothing more happens
    assert not client_end.is_closing()
    with pytest.raises(RuntimeError):
        client_end.write(b"after eof")
    await settle()
    assert server.data == b"request"
    assert server.events == [("made", None), ("eof", None), ("lost", None)]
    assert client.events == [("made", None), ("eof", None), ("lost", None)]

    # The reader keeps the connection open: it answers, the half-closed end still reads.
    client, server, client_end, server_end = make_pair()
    server.keep_open = True
    client_end.write(b"question")
    client_end.write_eof()
    await settle()
    assert server.events == [("made", None), ("eof", None)]
    server_end.write(b"answer")
    server_end.writelines([b" in ", bytearray(b"three "), memoryview(b"parts")])
    server_end.close()
    await settle()
    assert client.data == b"answer in three parts"
    assert client.events == [("made", None), ("eof", None), ("lost", None)]
    assert server.count("lost") == 1
    assert not pending_callbacks(asyncio.get_running_loop())


async def test_nothing_arrives_while_reading_is_paused_not_even_the_end() -> None:
    # A socket whose reader is paused does not see its peer's FIN either; asyncio's sendfile
    # fallback fails if a paused transport hands its protocol data or an EOF.
    client, server, client_end, server_end = make_pair()
    server_end.pause_reading()
    client_end.close()
    await settle()
    assert server.events == [("made", None)]
    assert server_end.is_closing() and not server_end.is_reading()

    server_end.resume_reading()
    await settle()
    assert server.events == [("made", None), ("eof", None), ("lost", None)]

    client, server, client_end, server_end = make_pair()
    server_end.pause_reading()
    client_end.write_eof()
    await settle()
    assert server.events == [("made", None)]
    server_end.resume_reading()
    await settle()
    assert server.count("eof") == 1
    assert client.events[-1] == ("lost", None)


async def test_writelines_copies_each_piece_and_counts_towards_flow_control() -> None:
    client, server, client_end, _ = make_pair()
    buffer = bytearray(b"a" * (40 << 10))
    client_end.writelines([buffer, memoryview(buffer)])  # 80 KiB waiting: above the mark
    buffer[:] = b"b" * len(buffer)  # reusing the buffer at once must not change what was sent
    assert client.count("pause_writing") == 1
    assert client_end.get_write_buffer_size() == 80 << 10
    with pytest.raises(TypeError):
        client_end.writelines([b"ok", "text"])  # type: ignore[list-item]
    await settle()
    assert server.data[: 80 << 10] == b"a" * (80 << 10)
    assert server.data[80 << 10 :] == b"ok"
    assert client.count("resume_writing") == 1
    client_end.close()
    await settle()


class Buffered(asyncio.BufferedProtocol):
    """A buffered protocol that offers a small buffer, so data arrives in many pieces."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.data = bytearray()
        self.pieces = 0
        self.lost: list[Exception | None] = []

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]
        self.pieces += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def test_a_buffered_protocol_gets_the_stream_through_its_buffers() -> None:
    client = Recorder()
    buffered = Buffered(1000)
    client_end, server_end = transport_pair(client, Recorder(), peer_address="198.51.100.4")
    server_end.set_protocol(buffered)
    payload = bytes(range(256)) * 40
    client_end.write(payload)
    client_end.close()
    await settle()
    assert buffered.data == payload
    assert buffered.pieces == 11
    assert buffered.lost == [None]
    with pytest.raises(TypeError):
        server_end.set_protocol(asyncio.DatagramProtocol())


async def test_set_protocol_sends_the_next_bytes_to_the_new_protocol() -> None:
    _, server, client_end, server_end = make_pair()
    client_end.write(b"first")
    await settle()
    other = Recorder()
    server_end.set_protocol(other)
    assert server_end.get_protocol() is other
    client_end.write(b"second")
    client_end.close()
    await settle()
    assert (server.data, other.data) == (b"first", b"second")
    assert other.events == [("eof", None), ("lost", None)]
    assert server.count("lost") == 0


async def test_a_protocol_that_fails_on_data_ends_the_connection_and_is_reported() -> None:
    class Failing(Recorder):
        def data_received(self, data: bytes) -> None:
            raise ValueError("cannot take this")

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        client, failing = Recorder(), Failing()
        client_end, _ = transport_pair(client, failing, peer_address="198.51.100.4")
        client_end.write(b"poison")
        await settle()
    finally:
        loop.set_exception_handler(None)
    assert [type(context["exception"]) for context in reported] == [ValueError]
    assert "data_received" in reported[0]["message"]
    assert isinstance(client.events[-1][1], ConnectionResetError)
    assert failing.events[-1] == ("lost", None)


async def test_a_server_may_write_in_connection_made() -> None:
    class Greeter(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"220 hello\r\n")

    client = Recorder()
    client_end, _ = transport_pair(client, Greeter(), peer_address="198.51.100.4")
    await settle()
    assert client.data == b"220 hello\r\n"
    client_end.close()
    await settle()


async def test_loop_sendfile_copies_a_file_under_flow_control(tmp_path: Any) -> None:
    # What aiohttp's FileResponse does: loop.sendfile(transport, file, offset, count). asyncio
    # copies in pieces, waiting whenever the reader is behind: the reader stops, so does the copy.
    client, server, client_end, server_end = make_pair()
    path = tmp_path / "file.bin"
    size = 3 * MB + 123
    with path.open("wb") as out:
        async for block in pattern(size):
            out.write(block)
    client_end.pause_reading()
    loop = asyncio.get_running_loop()
    with path.open("rb") as file:
        copy = asyncio.create_task(loop.sendfile(server_end, file, 1000, size - 2000))
        await asyncio.sleep(0.2)
        assert not copy.done()
        _low, high = server_end.get_write_buffer_limits()
        assert high < server_end.get_write_buffer_size() <= high + (16 << 10)
        assert server.count("pause_writing") == 0, "the copy's own pausing reached the protocol"
        client_end.resume_reading()
        assert await asyncio.wait_for(copy, 10) == size - 2000
        assert file.tell() == size - 1000
    await settle()
    expected = b"".join([block async for block in pattern(size)])[1000:-1000]
    assert client.data == expected
    # The transport is the server protocol's again, reading as before.
    assert server_end.get_protocol() is server and server_end.is_reading()
    client_end.write(b"still there")
    await settle()
    assert server.data == b"still there"
    client_end.close()
    await settle()


async def test_loop_sendfile_to_a_reader_that_leaves_fails_and_restores_the_protocol(tmp_path: Any) -> None:
    _client, server, client_end, server_end = make_pair()
    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * (2 * MB))
    client_end.pause_reading()
    with path.open("rb") as file:
        copy = asyncio.create_task(asyncio.get_running_loop().sendfile(server_end, file))
        await asyncio.sleep(0.1)
        client_end.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(copy, 5)
    await settle()
    assert server_end.get_protocol() is server
    assert server.events[-2:] == [("eof", None), ("lost", None)]
    with pytest.raises(RuntimeError, match="closing"), path.open("rb") as file:
        await asyncio.get_running_loop().sendfile(server_end, file)


# -- a real aiohttp application behind the in-process session ----------------------------------


@dataclass
class Home:
    """The home app's handlers and what they observed."""

    remotes: list[tuple[str | None, Any]] = field(default_factory=list)
    transports: list[object] = field(default_factory=list)
    both_in: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: int = 0
    download: dict[str, Any] = field(default_factory=dict)
    events_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    events_transport_after: Any = "unset"
    ws_close_code: int | None = None
    ws_remote: str | None = None
    start_reading: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/whoami", self.whoami)
        app.router.add_get("/rendezvous", self.rendezvous)
        app.router.add_post("/upload", self.upload)
        app.router.add_post("/upload-later", self.upload_later)
        app.router.add_get("/download/{size}", self.download_handler)
        app.router.add_get("/events", self.events)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/boom", self.boom)
        return app

    async def whoami(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.remotes.append((request.remote, peer))
        self.transports.append(request.transport)
        return web.json_response(
            {
                "remote": request.remote,
                "host": request.host,
                "secure": request.secure,
                # The caller's context stays on its side, as it would across a socket.
                "leaked": VISITOR_ADDRESS.get(),
            }
        )

    async def rendezvous(self, request: web.Request) -> web.Response:
        # Both requests are in flight at once, on two connections, before either answers.
        self.arrivals += 1
        if self.arrivals == 2:
            self.both_in.set()
        await asyncio.wait_for(self.both_in.wait(), 1)
        return web.json_response({"remote": request.remote})

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        while chunk := await request.content.readany():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size, "remote": request.remote})

    async def upload_later(self, request: web.Request) -> web.Response:
        await asyncio.wait_for(self.start_reading.wait(), 1)
        return await self.upload(request)

    async def download_handler(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        state = self.download
        state.update(written=0, request=request)
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        async for chunk in pattern(size):
            await response.write(chunk)
            state["written"] += len(chunk)
        await response.write_eof()
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        n = 0
        try:
            while True:
                await response.write(f"data: {n}\n\n".encode())
                n += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.events_transport_after = request.transport
            self.events_cancelled.set()
            raise

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws_remote = request.remote
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4001, message=b"server says bye")
                    break
                await ws.send_str(msg.data.upper())
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.ws_close_code = ws.close_code
        return ws

    async def boom(self, request: web.Request) -> web.Response:
        raise RuntimeError("the home app broke")


@dataclass
class Served:
    home: Home
    runner: web.AppRunner
    session: aiohttp.ClientSession


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    home = Home()
    runner = web.AppRunner(home.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2)
    await runner.setup()  # no site: nothing listens anywhere
    assert runner.server is not None
    session = create_inprocess_session(runner.server)
    yield Served(home, runner, session)
    await session.close()
    if runner.server is not None:
        await runner.cleanup()
    await settle()
    # Nothing the connections started outlives them: no task, no callback, no timer.
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not pending_callbacks(asyncio.get_running_loop())


async def get_json(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(URL + path) as response:
        assert response.status == 200
        return await response.json()


@pytest.mark.parametrize("visitor", ["203.0.113.7", "2001:db8::7"])
async def test_the_home_app_sees_the_visitor_as_the_peer(served: Served, visitor: str) -> None:
    token = VISITOR_ADDRESS.set(visitor)
    try:
        answer = await get_json(served.session, "/whoami")
    finally:
        VISITOR_ADDRESS.reset(token)
    assert answer == {"remote": visitor, "host": "homeassistant.inprocess", "secure": False, "leaked": None}
    assert served.home.remotes == [(visitor, (visitor, 0))]


async def test_without_a_visitor_address_the_peer_is_the_default(served: Served) -> None:
    assert (await get_json(served.session, "/whoami"))["remote"] == "127.0.0.1"
    async with create_inprocess_session(served.runner, default_peer="::1") as other:
        assert (await get_json(other, "/whoami"))["remote"] == "::1"
        # Addresses are written the way the home app would see them from a socket.
        for given, seen in [("2001:DB8:0:0::7", "2001:db8::7"), ("::ffff:203.0.113.8", "203.0.113.8")]:
            token = VISITOR_ADDRESS.set(given)
            try:
                assert (await get_json(other, "/whoami"))["remote"] == seen
            finally:
                VISITOR_ADDRESS.reset(token)


async def test_an_address_that_is_not_one_is_refused(served: Served) -> None:
    token = VISITOR_ADDRESS.set("not-an-address")
    try:
        with pytest.raises(ValueError):
            await served.session.get(URL + "/whoami")
    finally:
        VISITOR_ADDRESS.reset(token)
    assert served.home.remotes == []
    with pytest.raises(ValueError):
        create_inprocess_session(served.runner, default_peer="")


async def test_concurrent_visitors_each_keep_their_own_address(served: Served) -> None:
    async def visit(address: str) -> str:
        VISITOR_ADDRESS.set(address)  # this task's own context
        return str((await get_json(served.session, "/rendezvous"))["remote"])

    first, second = await asyncio.gather(visit("192.0.2.1"), visit("2001:db8::2"))
    assert (first, second) == ("192.0.2.1", "2001:db8::2")
    assert VISITOR_ADDRESS.get() is None


async def test_a_20_mb_upload_arrives_intact(served: Served) -> None:
    size = 20 * MB
    VISITOR_ADDRESS.set("203.0.113.9")
    async with served.session.post(URL + "/upload", data=pattern(size)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer == {"sha256": pattern_sha256(size), "size": size, "remote": "203.0.113.9"}


async def test_an_upload_the_server_does_not_read_holds_the_client_back(served: Served) -> None:
    size = 20 * MB
    produced = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        async for chunk in pattern(size):
            produced += len(chunk)
            yield chunk

    request = asyncio.create_task(served.session.post(URL + "/upload-later", data=body()))
    await asyncio.sleep(0.2)
    stalled_at = produced
    await asyncio.sleep(0.1)
    assert produced == stalled_at, "the client kept sending to a server that does not read"
    assert 0 < stalled_at < 4 * MB, f"{stalled_at} bytes sent before the server read any"
    served.home.start_reading.set()
    async with await request as response:
        answer = await response.json()
    assert (answer["size"], answer["sha256"]) == (size, pattern_sha256(size))


async def test_a_50_mb_download_read_slowly_holds_the_server_back(served: Served) -> None:
    size = 50 * MB
    state = served.home.download
    digest = hashlib.sha256()
    received = 0
    async with served.session.get(f"{URL}/download/{size}") as response:
        assert response.status == 200
        chunk = await response.content.readany()
        digest.update(chunk)
        received += len(chunk)

        # The client stops reading: the server must stop writing, paused by the transport.
        await asyncio.sleep(0.2)
        stalled_at = state["written"]
        await asyncio.sleep(0.1)
        assert state["written"] == stalled_at, "the server kept writing to a reader that stopped"
        assert stalled_at - received < 4 * MB, f"{stalled_at - received} bytes in flight"
        server_request: web.BaseRequest = state["request"]
        assert server_request.protocol.writing_paused
        assert server_request.transport is not None
        assert server_request.transport.get_write_buffer_size() > 64 << 10

        while chunk := await response.content.readany():
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


async def test_cancelling_an_endless_event_stream_cancels_the_handler(served: Served) -> None:
    lines: list[bytes] = []
    three = asyncio.Event()

    async def listen() -> None:
        async with served.session.get(URL + "/events") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            while True:
                line = await response.content.readline()
                if line.startswith(b"data:"):
                    lines.append(line)
                    if len(lines) == 3:
                        three.set()

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(three.wait(), 1)
    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    await asyncio.wait_for(served.home.events_cancelled.wait(), 1)
    # The handler was cancelled because its connection was lost, not for any other reason.
    assert served.home.events_transport_after is None
    assert lines[:3] == [b"data: 0\n", b"data: 1\n", b"data: 2\n"]


async def test_a_websocket_carries_text_binary_and_close_codes(served: Served) -> None:
    VISITOR_ADDRESS.set("198.51.100.23")
    async with served.session.ws_connect(URL + "/ws") as ws:
        await ws.send_str("hello")
        assert await ws.receive_str() == "HELLO"
        payload = bytes(range(256)) * 4096  # 1 MiB
        await ws.send_bytes(payload)
        assert await ws.receive_bytes() == payload[::-1]
        await ws.close(code=4000, message=b"visitor leaves")
    for _ in range(100):
        if served.home.ws_close_code is not None:
            break
        await asyncio.sleep(0.01)
    assert served.home.ws_close_code == 4000
    assert served.home.ws_remote == "198.51.100.23"

    async with served.session.ws_connect(URL + "/ws") as ws:
        await ws.send_str("close-me")
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "server says bye")
    assert ws.close_code == 4001


async def test_a_failing_handler_gives_the_client_a_500(served: Served) -> None:
    async with served.session.get(URL + "/boom") as response:
        assert response.status == 500
        await response.read()
    assert (await get_json(served.session, "/whoami"))["remote"] == "127.0.0.1"


async def test_after_cleanup_a_request_is_refused_not_hung(served: Served) -> None:
    session = create_inprocess_session(served.runner)
    try:
        assert (await get_json(session, "/whoami"))["remote"] == "127.0.0.1"
        await served.runner.cleanup()
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            async with asyncio.timeout(1):
                await session.get(URL + "/whoami")
        assert time.monotonic() - started < 0.5
        assert isinstance(caught.value, aiohttp.ClientConnectionError)
        assert isinstance(caught.value.os_error, ConnectionRefusedError)
    finally:
        await session.close()


async def test_a_factory_that_refuses_fails_the_connect(served: Served) -> None:
    def refuse() -> asyncio.Protocol:
        raise ConnectionRefusedError(111, "not serving")

    async with create_inprocess_session(refuse) as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(URL + "/whoami")


async def test_shutting_the_server_down_ends_an_open_response(served: Served) -> None:
    async with served.session.get(URL + "/events") as response:
        assert (await response.content.readline()).startswith(b"data: 0")
        cleanup = asyncio.create_task(served.runner.cleanup())
        async with asyncio.timeout(1.5):
            with pytest.raises(aiohttp.ClientPayloadError):  # chunked body cut short
                while await response.content.readany():
                    pass
        await cleanup
    assert served.home.events_cancelled.is_set()


async def test_connections_are_never_reused(served: Served) -> None:
    connector = served.session.connector
    assert connector is not None and connector.force_close
    for address in ("192.0.2.10", "192.0.2.11", "192.0.2.12"):
        VISITOR_ADDRESS.set(address)
        async with served.session.get(URL + "/whoami") as response:
            assert response.headers["Connection"] == "close"
            await response.read()
    assert len({id(t) for t in served.home.transports}) == 3
    await settle()
    assert served.runner.server is not None and served.runner.server.connections == []
    assert [remote for remote, _ in served.home.remotes] == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]


async def test_an_in_process_agent_serves_web_services_on_the_network_through_their_own_session(
    served: Served,
) -> None:
    """The main app in-process (the visitor as its peer, no forwarded headers, the visitor check
    applied); a web service on the network through ``service_session`` (the bridge's forwarded
    headers, no visitor check); without that session an in-process agent refuses web services."""
    seen: list[tuple[str | None, str | None]] = []

    async def garden(request: web.Request) -> web.Response:
        seen.append((request.remote, request.headers.get("X-Forwarded-For")))
        return web.Response(text="garden app")

    app = web.Application()
    app.router.add_get("/", garden)
    garden_runner, garden_url = await start_app(app)
    admitted: list[str] = []

    def admit(address: str) -> str | None:
        admitted.append(address)
        return None

    config = AgentConfig(
        bridge="",
        token=TOKEN,
        target="http://homeassistant.inprocess",
        agent_id="in-process",
        services={"garden": garden_url, "ssh": "tcp://127.0.0.1:22"},
    )
    try:
        async with running_bridge(domain="example.com") as bridge:
            config.bridge = bridge.url
            with pytest.raises(ConfigError, match="web services"):
                Agent(config, session=served.session, in_process=True)
            async with aiohttp.ClientSession() as service_session, aiohttp.ClientSession() as visitor:
                agent = Agent(
                    config, session=served.session, in_process=True, admit=admit, service_session=service_session
                )
                await agent.start()
                try:
                    await wait_for_tunnel(bridge)
                    async with visitor.get(bridge.url + "/whoami", headers={"Host": "home.example.com"}) as response:
                        assert (await response.json())["remote"] == "127.0.0.1"
                    async with visitor.get(bridge.url + "/", headers={"Host": "garden.home.example.com"}) as response:
                        assert await response.text() == "garden app"
                finally:
                    await agent.stop()
    finally:
        await garden_runner.cleanup()
    assert admitted == ["127.0.0.1"], "the visitor check is the main app's, not the services'"
    assert seen == [("127.0.0.1", "127.0.0.1")]
