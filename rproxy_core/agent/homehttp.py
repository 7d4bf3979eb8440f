"""A lean HTTP/1.1 client for the home app: pooled keep-alive connections, llhttp's C parser.

A request through aiohttp's ``ClientSession`` builds a request and a response object, a
connection key, timers and a payload stream, and resumes several tasks before the first byte
of the answer reaches the tunnel; on a small request that is most of the agent's CPU. Here a
request is one ``write`` of a head joined once, the answer is parsed in the connection's data
callback by ``httptools`` (llhttp, the parser uvicorn uses), and its body is handed to the relay
as it arrives.

It serves plain ``http://`` targets when ``httptools`` is installed (``rproxy-core[speed]``).
WebSocket upgrades, HEAD requests (the parser cannot be told that their answer has no body),
``https://`` and in-process targets keep aiohttp.

What the home app sends is bounded like any peer's: header lines, header count and header
bytes are capped, a connection whose answer arrives unasked (or more than one answer) is
closed, and a reader that stops pauses the home app's socket once ``READ_HIGH_WATER`` bytes
wait, so the body stays in the home app's socket, not in the agent's memory.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

try:
    import httptools
except ImportError:  # the [speed] extra is not installed: aiohttp serves every request
    httptools = None  # type: ignore[assignment]

__all__ = [
    "HomeClient",
    "HomeError",
    "HomeProtocolError",
    "HomeResponse",
    "HomeUnreachable",
    "available",
]

#: Bytes of a response body the agent holds before it pauses the home app's socket.
READ_HIGH_WATER = 128 << 10
#: ... and resumes it below this.
READ_LOW_WATER = 32 << 10
#: Limits on the home app's response head (aiohttp's client defaults, and a sum for all).
MAX_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 64 << 10
#: Idle keep-alive connections kept per target; more are closed as they come back.
MAX_IDLE = 64
#: Seconds an idle connection is reused within (aiohttp's client keeps them as long): servers
#: close idle ones on their own timers, and a request sent just as one does is lost.
IDLE_REUSE = 15.0
#: Methods a stale pooled connection may be retried for (RFC 9110 §9.2.2), when they carry no body.
_IDEMPOTENT = frozenset({"GET", "OPTIONS", "DELETE", "PUT", "TRACE"})
#: Methods whose empty body is still announced (as aiohttp does), so the home app need not guess.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def available() -> bool:
    """Whether the lean client can run here (``httptools`` is installed)."""
    return httptools is not None


class HomeError(Exception):
    """The home app could not be asked, or did not answer properly."""


class HomeUnreachable(HomeError):
    """No connection to the home app (refused, unreachable, timed out connecting)."""

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


class HomeProtocolError(HomeError):
    """The home app's answer broke HTTP/1.1, or its limits here."""


class _Disconnected(HomeError):
    """The connection closed before any byte of the answer (a stale keep-alive connection)."""


class HomeResponse:
    """The home app's answer: status, reason and headers, then the body as it arrives."""

    __slots__ = ("status", "reason", "headers", "_chunks", "_size", "_done", "_error", "_waiter", "_conn")

    def __init__(self, conn: _HomeConnection) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn

    @property
    def at_eof(self) -> bool:
        """Whether the whole body has been read (or there is none)."""
        return self._done and not self._chunks

    @property
    def complete(self) -> bool:
        """Whether the home app has sent the whole body (some may not be read yet)."""
        return self._done

    @property
    def buffered(self) -> int:
        return self._size

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body, waiting for some; b"" at its end.

        Raises:
            HomeProtocolError: the body broke off or broke HTTP/1.1.
        """
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        first = chunks[0]
        if len(first) <= limit and (len(chunks) == 1 or len(first) + len(chunks[1]) > limit):
            data = chunks.popleft()  # the usual case: one chunk as it came, no copy
        else:
            parts: list[bytes] = []
            taken = 0
            while chunks and taken < limit:
                chunk = chunks.popleft()
                room = limit - taken
                if len(chunk) > room:
                    chunks.appendleft(chunk[room:])
                    chunk = chunk[:room]
                parts.append(chunk)
                taken += len(chunk)
            data = b"".join(parts)
        self._size -= len(data)
        if self._size <= READ_LOW_WATER:
            self._conn.resume_reading()
        return data

    def close(self) -> None:
        """Stop reading; a connection whose body was not all read is not reused."""
        if not self._done:
            self._conn.discard()
        self._chunks.clear()
        self._size = 0

    # Called by the connection.

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        if self._size >= READ_HIGH_WATER:
            self._conn.pause_reading()

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done or self._error is not None:
            return
        if error is None:
            self._done = True
        else:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _HomeConnection(asyncio.Protocol):
    """One keep-alive connection to the home app; the parser's callbacks are its methods."""

    def __init__(self, client: HomeClient) -> None:
        self._client = client
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self._parser: Any = httptools.HttpResponseParser(self) if httptools is not None else None
        #: The answer being parsed, from the request until its last byte.
        self._response: HomeResponse | None = None
        #: Set once the answer's head is complete; the requester waits for it.
        self._head: asyncio.Future[HomeResponse] | None = None
        self._awaiting = False  # a request was sent and its answer has not begun
        self._received_any = False
        self._reusable = True
        self._paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        #: Bytes fed to the parser since the answer began, while its head is incomplete:
        #: llhttp has no limit of its own, and httptools gathers a field's pieces unbounded.
        self._head_bytes = 0
        self._in_head = False
        self._fields_size = 0
        self._reason = b""
        self._closed = False
        self._interim = False
        self.idle_since = 0.0
        #: Set while a request body is still being sent: the connection is not reused before.
        self._sending_body = False
        #: Whether the body ends when the connection does (no length, not chunked).
        self._until_close = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self._awaiting and self._response is None:
            self._fail(HomeProtocolError("the home app sent bytes nobody asked for"))
            return
        self._received_any = True
        if self._response is None or self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            self._fail(cause if isinstance(cause, HomeError) else HomeProtocolError(str(error)))
            return
        except httptools.HttpParserUpgrade:
            self._fail(HomeProtocolError("the home app switched protocols on a plain request"))
            return
        except httptools.HttpParserError as error:
            self._fail(HomeProtocolError(f"the home app's answer is not HTTP/1.1: {error}"))
            return
        if ((self._response is None and self._awaiting) or self._in_head) and self._head_bytes > MAX_HEAD_BYTES:
            self._fail(HomeProtocolError(f"the home app's answer head is over {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._reusable = False
        self._client.forget(self)
        response = self._response
        if response is not None and self._until_close and exc is None and self._head is None:
            response._finish()  # the body ran to the close, as its head announced
            self._response = None
        elif self._awaiting and not self._received_any:
            self._fail(_Disconnected("the home app closed the connection"))
        else:
            self._fail(HomeProtocolError("the home app closed the connection mid-answer"))
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(ConnectionResetError("the home app closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # The parser's callbacks.

    def on_message_begin(self) -> None:
        if not self._awaiting:
            raise HomeProtocolError("the home app sent a second answer to one request")
        self._awaiting = False
        self._in_head = True
        self._reason = b""
        self._fields_size = 0
        self._response = HomeResponse(self)

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self._response
        assert response is not None
        if len(name) + len(value) > MAX_LINE:
            raise HomeProtocolError(f"a header line of the home app's answer is over {MAX_LINE} bytes")
        if len(response.headers) >= MAX_HEADERS:
            raise HomeProtocolError(f"the home app's answer has over {MAX_HEADERS} header fields")
        self._fields_size += len(name) + len(value)
        if self._fields_size > MAX_HEAD_BYTES:
            raise HomeProtocolError(f"the home app's answer head is over {MAX_HEAD_BYTES} bytes")
        response.headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        self._in_head = False
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._awaiting = True
            self._interim = True
            return
        response.status = status
        response.reason = self._reason.decode("latin-1")
        self._reusable = self._reusable and self._parser.should_keep_alive()
        length = chunked = False
        for name, value in response.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = True
            elif lowered == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        self._until_close = not (length or chunked) and status not in (204, 304)
        if self._until_close:
            self._reusable = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        if self._interim:
            self._interim = False
            return  # an interim answer ended; the request still waits for its own
        self._until_close = False
        response._finish()
        if self._reusable and not self._sending_body:
            self._client.release(self)
        else:
            self.close()

    # Used by the client and the response.

    def start(self, head: bytes, *, with_body: bool) -> asyncio.Future[HomeResponse]:
        """Send a request head; the future gets the answer once its head is in."""
        assert self.transport is not None
        self._awaiting = True
        self._received_any = False
        self._head_bytes = 0
        self._sending_body = with_body
        self._head = future = self.loop.create_future()
        self.transport.write(head)
        return future

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("the home app closed the connection")
        if not self._write_paused:
            return
        self._drained = self.loop.create_future()
        try:
            await self._drained
        finally:
            self._drained = None

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self._closed:
            self._paused = False
            self.transport.resume_reading()

    def body_sent(self) -> None:
        self._sending_body = False

    def discard(self) -> None:
        """Never reuse this connection (its answer or request was cut short)."""
        self._reusable = False
        if self._response is not None or self._awaiting or self._head is not None:
            self.close()

    def close(self) -> None:
        self._reusable = False
        if self.transport is not None and not self._closed:
            self.transport.close()

    def _fail(self, error: HomeError) -> None:
        self._reusable = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self._response = self._response, None
        if response is not None:
            response._finish(error)
        self._awaiting = False
        self.close()


class HomeClient:
    """Keep-alive HTTP/1.1 connections to one home app (``host:port``), reused LIFO.

    Args:
        host, port: where the home app listens.
        host_header: the ``Host`` a request gets when the visitor's did not come along.
        connect_timeout: seconds a new connection may take.
    """

    def __init__(self, host: str, port: int, *, host_header: str, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self._host_header = host_header
        self.loop = asyncio.get_running_loop()
        self._connect_timeout = connect_timeout
        self._idle: list[_HomeConnection] = []
        self._all: set[_HomeConnection] = set()
        self._retired = False
        self.connections_opened = 0

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterator[bytes | memoryview] | None,
    ) -> HomeResponse:
        """Send a request and return the answer once its head is in.

        ``headers`` are sent as given (the caller dropped hop-by-hop fields), with ``Host``
        added when missing. A body of unknown length goes chunked; one with a
        ``Content-Length`` is sent as is, and a body longer or shorter than it is refused
        (the home app would read the difference as another request).

        Raises:
            HomeUnreachable: no connection could be made.
            HomeProtocolError: the answer broke HTTP/1.1 or the limits here.
            ValueError: the body does not match its Content-Length.
        """
        lines = [method, " ", target, " HTTP/1.1\r\n"]
        length: int | None = None
        host = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                if length is not None or not value.isdigit():
                    raise ValueError("the request has a bad or repeated Content-Length")
                length = int(value)
            elif lowered == "host":
                host = True
            lines += (name, ": ", value, "\r\n")
        if not host:
            lines += ("Host: ", self._host_header, "\r\n")
        if body is not None and length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif body is None and length is None and method in _BODY_METHODS:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        retry = body is None and method in _IDEMPOTENT
        while True:
            conn, reused = await self._acquire()
            answer = conn.start(head, with_body=body is not None)
            sender = None if body is None else self.loop.create_task(_send_body(conn, body, length))
            try:
                response = await answer
            except BaseException as error:
                conn.close()
                if sender is not None:
                    sender.cancel()
                    (sent,) = await asyncio.gather(sender, return_exceptions=True)
                    if isinstance(sent, ValueError):
                        raise sent from None
                if isinstance(error, _Disconnected):
                    if reused and retry:
                        retry = False
                        continue  # the home app closed an idle connection just as it was used
                    raise HomeProtocolError("the home app closed the connection without answering") from None
                raise
            if sender is not None:
                if sender.done():
                    sender.result()
                else:
                    # The home app answered before taking the whole body (413, an early error):
                    # the rest is not sent, and the connection ends with this answer.
                    sender.cancel()
            return response

    async def _acquire(self) -> tuple[_HomeConnection, bool]:
        idle = self._idle
        if idle:
            fresh_since = self.loop.time() - IDLE_REUSE
            while idle:
                conn = idle.pop()
                if conn.idle_since >= fresh_since and not conn._closed:
                    return conn, True
                conn.close()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await self.loop.create_connection(lambda: _HomeConnection(self), self.host, self.port)
        except TimeoutError:
            raise HomeUnreachable(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as error:
            raise HomeUnreachable(f"cannot connect to {self.host}:{self.port}", error) from None
        conn = protocol
        assert isinstance(conn, _HomeConnection)
        self._all.add(conn)
        self.connections_opened += 1
        return conn, False

    def release(self, conn: _HomeConnection) -> None:
        if conn._closed:
            return
        if self._retired:
            conn.close()
            return
        if len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def forget(self, conn: _HomeConnection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close_idle(self) -> None:
        """Close the idle connections; those in use finish their answers, then close."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        self._retired = True

    def close(self) -> None:
        """Close every connection (answers under way fail)."""
        for conn in list(self._all):
            conn.close()
        self._idle.clear()


async def _send_body(conn: _HomeConnection, body: AsyncIterator[bytes | memoryview], length: int | None) -> None:
    sent = 0
    async for chunk in body:
        if not chunk:
            continue
        sent += len(chunk)
        if length is None:
            conn.write(b"%x\r\n" % len(chunk))
            conn.write(chunk)
            conn.write(b"\r\n")
        elif sent > length:
            conn.discard()
            raise ValueError("the request body is longer than its Content-Length")
        else:
            conn.write(chunk)
        await conn.drain()
    if length is None:
        conn.write(b"0\r\n\r\n")
    elif sent < length:
        conn.discard()
        raise ValueError("the request body is shorter than its Content-Length")
    conn.body_sent()
