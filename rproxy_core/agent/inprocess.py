"""Hand visitor requests to an aiohttp server in the same process, with the visitor as the peer.

An agent that runs inside the home app (Home Assistant, say) could reach that app's HTTP
server over 127.0.0.1 like any other target, but then every request arrives from 127.0.0.1.
The home app would see one local client instead of many visitors: its IP bans would ban
itself, its trusted-networks login would trust everyone on the internet as a local user, and
its logs would name nobody. Telling it to believe X-Forwarded-For instead asks the user to
set up reverse-proxy trust correctly, and a mistake there lets any visitor choose the address
the app believes.

This module skips the socket. Each request gets a fresh in-memory connection whose server
end is a protocol made by the app's own protocol factory (``web.AppRunner(...).server``
after ``setup()``, no site needed) and whose ``peername`` is the visitor's address, taken
from :data:`VISITOR_ADDRESS`. To the home app the visitor simply connected to it: the
address in ``request.remote`` is the visitor's, with nothing to configure and no header to
trust. Home Assistant Cloud's remote UI feeds its tunnelled connections to the same
factory for the same reason.

Usage::

    session = create_inprocess_session(hass.http.runner)
    token = VISITOR_ADDRESS.set("203.0.113.7")
    try:
        async with session.get("http://homeassistant.inprocess/api/") as response:
            ...
    finally:
        VISITOR_ADDRESS.reset(token)

The host and port of the URL mean nothing: every connection goes to the one server.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import ipaddress
from asyncio.constants import _SendfileMode
from asyncio.transports import _FlowControlMixin
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.tracing import Trace

from ..protocol.mux import DEFAULT_MAX_STREAMS

__all__ = ["VISITOR_ADDRESS", "InProcessConnector", "InProcessTransport", "create_inprocess_session", "transport_pair"]

#: The address of the visitor whose request the current task is about to send. The connector
#: reads it when it opens the connection for that request, so it must be set in the task (or a
#: task started from it) that calls the session.
VISITOR_ADDRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("rproxy_visitor_address", default=None)

#: Most bytes handed to a protocol in one ``data_received`` call, as a socket read would: a
#: receiver gets the chance to pause between pieces of a large write.
_MAX_READ = 256 << 10

#: asyncio's defaults for socket transports.
_DEFAULT_HIGH_WATER = 64 << 10

#: A server end's own address; nothing listens there, it only has to look like an address.
_SERVER_SOCKNAME = ("127.0.0.1", 0)

ServerFactory = Callable[[], asyncio.Protocol]


class InProcessTransport(_FlowControlMixin):
    """One end of an in-memory connection; see :func:`transport_pair`.

    It behaves as asyncio's socket transport does towards its protocol, so an aiohttp server
    or client (or any streaming or buffered protocol) cannot tell it from a TCP connection:

    - Bytes written at one end reach the other end's protocol in order, from a loop callback,
      at most ``_MAX_READ`` at a time (a copy: the writer may reuse its buffer at once). The
      receiver's ``pause_reading()`` holds them back, and the writer's protocol is paused
      while more than the high-water mark waits unread, like a socket whose peer stopped
      reading; ``get_write_buffer_size()`` is what waits.
    - ``write_eof()`` half-closes, as ``shutdown(SHUT_WR)`` does: the other end reads what was
      written, then gets ``eof_received()``; if that returns a false value its transport
      closes itself, else it may go on writing to this end, which still reads.
    - ``close()`` behaves like closing a TCP socket whose kernel buffer takes everything: the
      closing end's protocol loses the connection at once (its writes are done), while the
      other end still reads what was written before the close, then gets ``eof_received()``
      and ``connection_lost(None)``; what it writes after the close goes nowhere, and
      ``is_closing()`` tells it so. ``abort()`` drops everything unread in both directions
      and gives the other end a ``ConnectionResetError``.
    - While reading is paused nothing arrives, the end of the stream included (asyncio's
      sendfile fallback relies on it): a socket does not see its peer's FIN unread either.
    - ``loop.sendfile()`` works: asyncio reads the file in pieces and writes them under this
      transport's flow control (its fallback mode, as for TLS transports), so a file response
      holds at most about the high-water mark in memory. uvloop has no ``loop.sendfile()``;
      aiohttp then falls back to its own chunked copy.
    """

    # asyncio's sendfile fallback takes only transports derived from its flow-control mix-in
    # (it reads ``_protocol_paused``); the flow control itself is this class's own.
    _sendfile_compatible = _SendfileMode.FALLBACK
    # Set by the mix-in (slots its stubs do not declare).
    _loop: asyncio.AbstractEventLoop
    _protocol_paused: bool
    _high_water: int
    _low_water: int

    def __init__(self, loop: asyncio.AbstractEventLoop, context: contextvars.Context, extra: dict[str, Any]) -> None:
        super().__init__(extra, loop)
        # Every callback into a protocol runs in the connection's own context, as it would
        # under a socket, not in whichever task happened to write last.
        self._context = context
        self._protocol: asyncio.BaseProtocol | None = None
        self._peer: InProcessTransport | None = None
        # Bytes the peer wrote that this end's protocol has not received yet.
        self._inbox: deque[bytes] = deque()
        self._inbox_offset = 0
        self._inbox_size = 0
        self._reading_paused = False
        self._closed = False  # this end called close() or abort()
        self._eof_written = False  # this end called write_eof()
        self._peer_closed = False  # the other end called close() or abort()
        self._peer_eof = False  # the other end called write_eof()
        self._eof_delivered = False  # this end's protocol had its eof_received()
        self._lost = False  # connection_lost is on its way to (or reached) this end's protocol
        self._pump_handle: asyncio.Handle | None = None

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closing" if self.is_closing() else "open"
        return f"<{type(self).__name__} {state} peer={self.get_extra_info('peername')!r}>"

    # -- asyncio.BaseTransport ------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        if not isinstance(protocol, (asyncio.Protocol, asyncio.BufferedProtocol)):
            raise TypeError("an in-process transport needs a streaming or buffered protocol")
        self._protocol = protocol

    def is_closing(self) -> bool:
        # True once either end closed: nothing written from now on would be read.
        return self._closed or self._peer_closed or self._lost

    def close(self) -> None:
        if self._closed or self._lost:
            return
        self._closed = True
        # What this end wrote stays with the peer to be read; what it did not read is dropped
        # (by _lose) as a socket's unread bytes are.
        if (peer := self._peer) is not None:
            peer._peer_closed = True
            peer._schedule()
        self._lose(None)

    # -- asyncio.ReadTransport ------------------------------------------------------------

    def is_reading(self) -> bool:
        return not (self._reading_paused or self._closed or self._lost)

    def pause_reading(self) -> None:
        if self._closed or self._lost:
            return
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._closed or self._lost or not self._reading_paused:
            return
        self._reading_paused = False
        self._schedule()

    # -- asyncio.WriteTransport -----------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low
        self._check_writer()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def get_write_buffer_size(self) -> int:
        peer = self._peer
        return 0 if peer is None else peer._inbox_size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._append(data)
        self._check_writer()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # Each piece as it is, without joining them first: the peer reads them as one stream.
        for data in list_of_data:
            self._append(data)
        self._check_writer()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_written or self.is_closing():
            return
        self._eof_written = True
        if (peer := self._peer) is not None:
            peer._peer_eof = True
            peer._schedule()

    def abort(self) -> None:
        if self._lost:
            return
        self._closed = True
        peer = self._peer
        if peer is not None and not peer._lost:
            peer._peer_closed = True
            peer._lose(ConnectionResetError(errno.ECONNRESET, "connection reset by peer"))
        self._lose(None)

    # -- the plumbing ---------------------------------------------------------------------

    def _attach(self, protocol: asyncio.Protocol, peer: InProcessTransport) -> None:
        self._protocol = protocol
        self._peer = peer

    def _append(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        peer = self._peer
        if not data or peer is None or self.is_closing():
            return
        # A copy: the caller may reuse its buffer once write() returns, as with a socket
        # (asyncio's sendfile fallback reads every piece of the file into one buffer).
        chunk = bytes(data)
        peer._inbox.append(chunk)
        peer._inbox_size += len(chunk)
        peer._schedule()

    def _schedule(self) -> None:
        if self._pump_handle is None and not self._lost:
            self._pump_handle = self._loop.call_soon(self._pump, context=self._context)

    def _pump(self) -> None:
        """Move waiting bytes (and, after the last of them, the peer's EOF or close) to the protocol."""
        self._pump_handle = None
        if self._lost:
            return
        if self._peer_closed and self._protocol_paused:
            # Nobody will read what this end writes any more; a protocol waiting to write
            # must wake up and find the transport closing rather than wait forever.
            self._protocol_paused = False
            self._call_protocol("resume_writing")
            if self._lost:
                return
        if self._reading_paused:
            return  # resume_reading() schedules the rest
        if self._inbox:
            self._deliver(self._take(_MAX_READ))
            if (peer := self._peer) is not None:
                peer._check_writer()
            if not self._lost and (self._inbox or self._peer_closed or self._peer_eof):
                self._schedule()  # the rest on a later turn, after other callbacks had theirs
            return
        if self._peer_closed:
            # Everything the peer wrote has been read: now its close arrives.
            if not self._eof_delivered:
                self._eof_delivered = True
                self._call_protocol("eof_received")
            self._lose(None)
        elif self._peer_eof and not self._eof_delivered:
            self._eof_delivered = True
            # As asyncio's socket transports do: a protocol that does not ask to keep the
            # connection open after the peer's EOF gets it closed.
            if not self._call_protocol("eof_received"):
                self.close()

    def _take(self, limit: int) -> bytes:
        parts: list[bytes] = []
        wanted = limit
        while self._inbox and wanted:
            head = self._inbox[0]
            start = self._inbox_offset
            end = min(len(head), start + wanted)
            parts.append(head if start == 0 and end == len(head) else head[start:end])
            wanted -= end - start
            if end == len(head):
                self._inbox.popleft()
                self._inbox_offset = 0
            else:
                self._inbox_offset = end
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._inbox_size -= len(data)
        return data

    def _drop_inbox(self) -> None:
        self._inbox.clear()
        self._inbox_offset = 0
        self._inbox_size = 0

    def _deliver(self, data: bytes) -> None:
        protocol = self._protocol
        if isinstance(protocol, asyncio.BufferedProtocol):
            self._guarded("protocol.get_buffer()/buffer_updated()", _feed_buffered, protocol, data)
        elif isinstance(protocol, asyncio.Protocol):
            self._guarded("protocol.data_received()", protocol.data_received, data)

    def _check_writer(self) -> None:
        """Pause or resume this end's protocol's writing by how much of it waits unread."""
        if self._lost:
            return
        waiting = self.get_write_buffer_size()
        if not self._protocol_paused and waiting > self._high_water and not self._peer_closed:
            self._protocol_paused = True
            self._call_protocol("pause_writing")
        elif self._protocol_paused and waiting <= self._low_water:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, method: str) -> Any:
        protocol = self._protocol
        return None if protocol is None else self._guarded(f"protocol.{method}()", getattr(protocol, method))

    def _guarded(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # As asyncio's transports do: a protocol that fails to take its data leaves the
            # connection in an unknown state, so report it and end the connection.
            self._loop.call_exception_handler(
                {
                    "message": f"in-process connection: {what} failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
            self.abort()
            return None

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        self._drop_inbox()
        self._loop.call_soon(self._connection_lost, exc, context=self._context)

    def _connection_lost(self, exc: Exception | None) -> None:
        protocol = self._protocol
        try:
            if protocol is not None:
                protocol.connection_lost(exc)
        finally:
            # Break the cycle between the two ends once this one is finished.
            peer, self._peer = self._peer, None
            if peer is not None and peer._lost:
                peer._peer = None


def _feed_buffered(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Hand ``data`` to a buffered protocol through the buffers it offers, as asyncio does."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view))).cast("B")
        size = min(len(buffer), len(view))
        if not size:
            raise RuntimeError("get_buffer() returned an empty buffer")
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def transport_pair(
    client: asyncio.Protocol,
    server: asyncio.Protocol,
    *,
    peer_address: str,
    loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[InProcessTransport, InProcessTransport]:
    """Connect two protocols in memory; the server end reports ``peer_address`` as its peer.

    Both protocols get ``connection_made`` before this returns, each in a new, empty
    context: the server's request handling must not inherit the caller's context variables
    (the visitor's address among them) any more than it would across a socket.
    """
    loop = loop or asyncio.get_running_loop()
    context = contextvars.Context()
    client_end = InProcessTransport(
        loop,
        context,
        {"peername": _SERVER_SOCKNAME, "sockname": (peer_address, 0), "socket": None, "sslcontext": None},
    )
    server_end = InProcessTransport(
        loop,
        context,
        {"peername": (peer_address, 0), "sockname": _SERVER_SOCKNAME, "socket": None, "sslcontext": None},
    )
    client_end._attach(client, server_end)
    server_end._attach(server, client_end)
    context.run(server.connection_made, server_end)
    context.run(client.connection_made, client_end)
    return client_end, server_end


def _canonical_address(address: str) -> str:
    """``address`` as the home app will see it, or ValueError if it is not an IP address.

    A wrong value must not pass: the home app trusts this address the way it trusts a
    socket's, and e.g. an empty string falling back to a default could make a visitor local.
    An IPv4 visitor seen through a dual-stack socket (``::ffff:a.b.c.d``) is given as the IPv4
    address, or the home app's IPv4 network rules (bans, trusted networks) would miss it.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class InProcessConnector(aiohttp.BaseConnector):
    """Opens every connection to the in-process server ``server``, as the current visitor.

    ``server`` is the server's protocol factory (``runner.server`` of a set-up
    ``web.AppRunner``) or the runner itself. Given the runner, the connector looks the
    factory up for each connection and refuses to connect once the runner is cleaned up; a
    bare factory cannot tell it has stopped and keeps serving through the app it was made
    for (a callable may raise ``OSError`` to refuse). Refusals raise
    ``aiohttp.ClientConnectorError``, as a refused TCP connection would.

    Connections are never reused: each one carries one visitor's address, so it carries one
    request.
    """

    def __init__(
        self,
        server: ServerFactory | web.BaseRunner,
        *,
        default_peer: str = "127.0.0.1",
        limit: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        super().__init__(force_close=True, limit=limit)
        self._server = server
        self._default_peer = _canonical_address(default_peer)

    def _server_factory(self) -> ServerFactory:
        server = self._server
        if isinstance(server, web.BaseRunner):
            factory = server.server
            if factory is None:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "the in-process server is not running")
            return factory
        return server

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        visitor = VISITOR_ADDRESS.get()
        peer_address = self._default_peer if visitor is None else _canonical_address(visitor)
        try:
            server_protocol = self._server_factory()()
        except OSError as err:
            raise aiohttp.ClientConnectorError(req.connection_key, err) from err
        client_protocol = ResponseHandler(asyncio.get_running_loop())
        transport_pair(client_protocol, server_protocol, peer_address=peer_address)
        return client_protocol


def create_inprocess_session(
    server_factory: ServerFactory | web.BaseRunner,
    *,
    default_peer: str = "127.0.0.1",
    limit: int = DEFAULT_MAX_STREAMS,
) -> aiohttp.ClientSession:
    """A client session like :func:`~rproxy_core.agent.upstream.create_upstream_session`
    whose requests go to the in-process server ``server_factory`` (see
    :class:`InProcessConnector`) as the visitor named by :data:`VISITOR_ADDRESS`.

    ``default_peer`` is the address the server sees for a request sent with no visitor
    address set.
    """
    return aiohttp.ClientSession(
        connector=InProcessConnector(server_factory, default_peer=default_peer, limit=limit),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        read_bufsize=256 << 10,
    )
