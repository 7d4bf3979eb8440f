"""Raw TCP channels to agents' TCP services (docs/PROTOCOL.md §8).

Two ways in, one relay:

- ``/_rproxy/tcp/<tunnel>/<service>`` on the bridge's one port: a WebSocket whose binary
  messages are the bytes (``rproxy tcp`` on the visitor's machine speaks it). It needs a
  credential the bridge accepts for that tunnel (an agent token or key), so a TCP service is
  never open to everybody by accident.
- Extra TCP ports from the config file (``tcp_ports``), each mapped to one service and open
  only to the addresses its ``allow`` list names, for clients that cannot run ``rproxy tcp``.

Either way the answer to "can I connect?" comes before any byte flows: the stream is opened
and the agent has connected to its service (REPLY 200) before the WebSocket is accepted, so a
refusal is a plain HTTP status (401/403/404/502/503/504), not a socket that closes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket

from aiohttp import WSMsgType, web

from ..const import BUSY_RETRY_AFTER, TCP_READ_SIZE
from ..exceptions import NoAgentError, StreamResetError
from ..headers import is_tunnel_name
from ..protocol.closecodes import CloseCode
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_TCP, RequestHead
from ..transport import TunnelStream
from ..transport.sockets import close_socket, relay_socket
from .config import TcpPort
from .context import BridgeContext
from .registry import NoServiceError, TunnelBusyError
from .visitor_policy import address_allowed

__all__ = ["ChannelHandler", "ChannelRefused", "TcpPort", "TcpPortServer", "open_channel"]

_LOGGER = logging.getLogger("rproxy.bridge")

#: Largest WebSocket message a channel client may send (``rproxy tcp`` sends at most 64 KiB).
_MAX_CHANNEL_MESSAGE = 1 << 20

#: What the visitor is told when the agent reset the stream instead of connecting.
_REFUSALS = {
    ErrorCode.TARGET_UNREACHABLE: (502, "the agent cannot connect to the service"),
    ErrorCode.TARGET_TIMEOUT: (504, "the service did not accept the connection in time"),
    ErrorCode.REQUEST_REJECTED: (404, "the agent does not offer that service"),
    ErrorCode.REFUSED_STREAM: (503, "the agent is too busy, try again"),
}


class ChannelRefused(Exception):
    """The channel cannot be opened; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


async def open_channel(context: BridgeContext, tunnel: str, service: str, visitor: str) -> TunnelStream:
    """Open a TCP stream to ``service`` of ``tunnel`` and wait until the agent has connected.

    Raises:
        ChannelRefused: no agent, no such service, the agent could not connect, or a timeout.
    """
    if context.draining:
        raise ChannelRefused(503, "the bridge is restarting", 5)
    head = RequestHead(
        method="CONNECT",
        target="",
        headers=[("X-Forwarded-For", visitor)],
        kind=KIND_TCP,
        request_id=secrets.token_hex(6),
        service=service,
    )
    try:
        stream = await context.registry.open_stream(tunnel, head, end_stream=False)
    except NoAgentError:
        raise ChannelRefused(503, f"no agent is connected for tunnel {tunnel!r}", 5) from None
    except NoServiceError:
        raise ChannelRefused(404, f"tunnel {tunnel!r} has no TCP service {service!r}") from None
    except TunnelBusyError:
        raise ChannelRefused(503, f"tunnel {tunnel!r} is busy, try again shortly", BUSY_RETRY_AFTER) from None
    try:
        async with asyncio.timeout(context.config.request_timeout):
            reply = await stream.reply()
    except TimeoutError:
        stream.reset(ErrorCode.CANCEL, "connect timeout")
        raise ChannelRefused(504, "the service did not accept the connection in time") from None
    except StreamResetError as err:
        status, message = _REFUSALS.get(err.code, (502, "the tunnel dropped the connection"))  # type: ignore[call-overload]
        raise ChannelRefused(status, message) from None
    except BaseException:
        stream.reset(ErrorCode.CANCEL, "visitor gone")
        raise
    if reply.status != 200:
        stream.reset(ErrorCode.PROTOCOL_ERROR, "unexpected reply to a TCP stream")
        raise ChannelRefused(502, "the agent answered the connection oddly")
    return stream


def _plain(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=message + "\n", headers=headers)


class ChannelHandler:
    """aiohttp handler for ``/_rproxy/tcp/{tunnel}/{service}``."""

    def __init__(self, context: BridgeContext) -> None:
        self._context = context

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        context = self._context
        tunnel, service = request.match_info["tunnel"], request.match_info["service"]
        remote = request.remote or "?"
        if not is_tunnel_name(tunnel) or not is_tunnel_name(service):
            return _plain(404, "no such tunnel or service (names are lower-case DNS labels)")
        credential = context.credential(request, tunnel)
        if isinstance(credential, str):
            _LOGGER.warning("refused TCP channel from %s to %s/%s: %s", remote, tunnel, service, credential)
            return _plain(401, "a TCP channel needs an agent token or key the bridge accepts")
        if not credential.allows(tunnel):
            _LOGGER.warning(
                "refused TCP channel from %s: its %s may not reach tunnel %r", remote, credential.what, tunnel
            )
            return _plain(403, f"this {credential.what.split()[0]} may not reach tunnel {tunnel!r}")
        # Pings find a client that vanished without closing (a laptop gone to sleep, a dropped
        # mobile link), so its stream and the agent's socket to the service do not stay open forever.
        ws = web.WebSocketResponse(
            max_msg_size=_MAX_CHANNEL_MESSAGE,
            compress=False,
            autoping=True,
            heartbeat=context.config.heartbeat_interval * 3,
        )
        if not ws.can_prepare(request).ok:
            return _plain(400, "this endpoint is for rproxy tcp (WebSocket upgrade required)")
        visitor, _ = context.visitor_address(request)
        policy = context.visitor_guard.policy(tunnel)
        if policy is not None and policy.allow and not address_allowed(visitor, policy.allow):
            # The tunnel's visitor allowlist holds for its TCP services too (the rest of its
            # policy, logins and rate limits, is about web visitors).
            _LOGGER.warning(
                "refused TCP channel from %s to %s/%s: not in the tunnel's allow list", visitor, tunnel, service
            )
            return _plain(403, "this address may not reach this tunnel")
        try:
            stream = await open_channel(context, tunnel, service, visitor)
        except ChannelRefused as refused:
            _LOGGER.info("TCP channel from %s to %s/%s refused: %s", visitor, tunnel, service, refused)
            return _plain(refused.status, str(refused), refused.retry_after)
        try:
            await ws.prepare(request)
        except BaseException:
            stream.reset(ErrorCode.CANCEL, "visitor gone")
            raise
        _LOGGER.info("TCP channel %s from %s to %s/%s opened", stream.head.request_id, visitor, tunnel, service)
        note = await _relay_websocket(ws, stream)
        _LOGGER.info(
            "TCP channel %s closed (%s; %d bytes in, %d out)",
            stream.head.request_id,
            note,
            stream.bytes_sent,
            stream.bytes_received,
        )
        return ws


async def _relay_websocket(ws: web.WebSocketResponse, stream: TunnelStream) -> str:
    """Relay until both directions ended or either side gave up; return how it ended."""
    to_agent = asyncio.create_task(_websocket_to_stream(ws, stream))
    note = "done"
    try:
        while chunk := await stream.read():
            # aiohttp sends any bytes-like object; its annotation says bytes, and a copy to
            # satisfy it would cost every chunk.
            await ws.send_bytes(chunk)  # type: ignore[arg-type]
        await ws.send_bytes(b"")  # the service's end of data: the client half-closes its side
        if not await to_agent:
            return "client left"
        await ws.close(code=CloseCode.NORMAL)
    except StreamResetError as err:
        note = f"tunnel side ended: {err}"
        if not ws.closed:
            await ws.close(code=CloseCode.INTERNAL_ERROR, message=str(err)[:120].encode())
    except (ConnectionError, RuntimeError) as err:
        note = f"client gone: {err.__class__.__name__}"
    finally:
        if not to_agent.done():
            to_agent.cancel()
        with contextlib.suppress(asyncio.CancelledError, StreamResetError, ConnectionError, RuntimeError):
            await to_agent
        if not stream.closed:
            stream.reset(ErrorCode.CANCEL, "client gone")
    return note


async def _websocket_to_stream(ws: web.WebSocketResponse, stream: TunnelStream) -> bool:
    """Client → stream. True when the client ended its side cleanly (an empty message)."""
    while True:
        message = await ws.receive()
        if message.type is WSMsgType.BINARY:
            if not message.data:
                await stream.end()
                return True
            await stream.write(message.data)
            continue
        if message.type is WSMsgType.TEXT:
            await ws.close(code=CloseCode.UNSUPPORTED_DATA, message=b"binary messages only")
        # The client closed (or broke) the WebSocket: it abandons the connection both ways.
        stream.reset(ErrorCode.CANCEL, "client left")
        return False


class TcpPortServer:
    """Listens on one extra TCP port and carries each connection to its service."""

    def __init__(self, context: BridgeContext, port: TcpPort) -> None:
        self._context = context
        self.config = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        #: The port actually bound (differs from ``config.port`` when that is 0).
        self.port = port.port

    async def start(self) -> None:
        """Listen; raises OSError (address in use) with nothing left running."""
        self._server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, limit=TCP_READ_SIZE, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        _LOGGER.info(
            "TCP port %s:%d carries service %r of tunnel %r",
            self.config.host,
            self.port,
            self.config.service,
            self.config.tunnel,
        )

    async def stop(self) -> None:
        """Stop listening and cut the connections still open."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # the bridge is stopping (on Python 3.11 start_server would log a cancelled handler as an error)
        finally:
            if task is not None:
                self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _keep_alive(writer)
        peer = writer.get_extra_info("peername")
        visitor = str(peer[0]) if peer else "?"
        port = self.config
        finished = False
        stream: TunnelStream | None = None
        try:
            if not port.admits(visitor):
                _LOGGER.warning("TCP port %d: refused %s (not in its allow list)", self.port, visitor)
                return
            try:
                stream = await open_channel(self._context, port.tunnel, port.service, visitor)
            except ChannelRefused as refused:
                _LOGGER.info("TCP port %d: connection from %s refused: %s", self.port, visitor, refused)
                return
            await relay_socket(stream, reader, writer)
            finished = True
        except (StreamResetError, ConnectionError) as err:
            _LOGGER.info("TCP port %d: connection from %s ended: %s", self.port, visitor, err)
        finally:
            if stream is not None and not stream.closed:
                stream.reset(ErrorCode.CANCEL, "client gone")
            await close_socket(writer, orderly=finished)


def _keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive after a minute of silence, so a client that vanished is noticed in about
    two minutes rather than the system default of two hours."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
