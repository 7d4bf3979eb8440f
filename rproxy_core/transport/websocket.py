"""Adapters giving the tunnel one small interface over aiohttp's and websockets' WebSockets.

The bridge accepts tunnels with aiohttp's server; the agent dials with websockets (or with an
aiohttp client session, e.g. Home Assistant's). The connection code sees only FrameSocket.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from aiohttp import WSMsgType, web

from ..exceptions import FrameError

if TYPE_CHECKING:
    import aiohttp
    from websockets.asyncio.client import ClientConnection

__all__ = ["FrameSocket", "AiohttpFrameSocket", "WebsocketsFrameSocket"]


class FrameSocket(Protocol):
    """A WebSocket carrying binary tunnel messages."""

    async def receive(self) -> bytes | bytearray | None:
        """Return the next binary message, or None once the socket is closed.

        Raises:
            FrameError: the peer sent a text message.
        """

    async def send(self, data: bytes) -> None:
        """Send one binary message (raises on a closed socket)."""

    def send_nowait(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Write one binary message, the concatenation of ``buffers``, at once if the socket can take it.

        Returns False, having written nothing, when the socket is closing or its buffer is
        above the write limit; the caller then uses :meth:`send`, which waits.
        """

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close gracefully; idempotent."""

    def abort(self) -> None:
        """Drop the underlying connection at once (after close, or when the peer is dead)."""

    @property
    def remote(self) -> str:
        """The peer's address, for logs."""


_CLOSED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})

#: Above this many bytes buffered in the socket, writes wait for it to drain (backpressure).
NOWAIT_WRITE_LIMIT = 256 << 10

_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


def server_binary_frame_header(length: int) -> bytes:
    """Header of an unfragmented, unmasked binary frame from a server (RFC 6455 §5.2)."""
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return _LEN16.pack(0x82, 126, length)
    return _LEN64.pack(0x82, 127, length)


class AiohttpFrameSocket:
    """FrameSocket over aiohttp's server or client WebSocket."""

    __slots__ = ("_server_transport", "_transport", "_ws", "remote")

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        remote: str,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        self._ws = ws
        self.remote = remote
        self._transport = transport
        # Server frames are not masked, so the bridge can write them itself, synchronously;
        # aiohttp's own send is a coroutine (see TunnelConnection.schedule_flush for why that
        # matters). A client's frames must be masked: those always go through aiohttp.
        self._server_transport = (
            transport
            if isinstance(ws, web.WebSocketResponse) and isinstance(transport, asyncio.WriteTransport)
            else None
        )

    async def receive(self) -> bytes | bytearray | None:
        msg = await self._ws.receive()
        if msg.type is WSMsgType.BINARY:
            return msg.data  # type: ignore[no-any-return]
        if msg.type in _CLOSED:
            return None
        raise FrameError(f"unexpected {msg.type.name} message on the tunnel")

    async def send(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    def send_nowait(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bool:
        transport = self._server_transport
        if (
            transport is None
            or self._ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size() > NOWAIT_WRITE_LIMIT
        ):
            return False
        # The WebSocket header joins the payload in the one copy the message costs.
        size = sum(map(len, buffers))
        transport.write(b"".join([server_binary_frame_header(size), *buffers]))
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code=code, message=reason.encode())

    def abort(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()  # type: ignore[attr-defined]


class WebsocketsFrameSocket:
    """FrameSocket over a websockets client connection."""

    __slots__ = ("_closed_exc", "_open", "_ws", "remote")

    def __init__(self, ws: ClientConnection, remote: str) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.protocol import State

        self._ws = ws
        self.remote = remote
        self._closed_exc = ConnectionClosed
        self._open = State.OPEN

    async def receive(self) -> bytes | bytearray | None:
        try:
            msg = await self._ws.recv()
        except self._closed_exc:
            return None
        if isinstance(msg, str):
            raise FrameError("unexpected TEXT message on the tunnel")
        return msg

    async def send(self, data: bytes) -> None:
        await self._ws.send(data)

    def send_nowait(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bool:
        # websockets' sans-I/O protocol frames (and masks) the message; writing its output to
        # the transport is what the connection's own send does before it waits to drain.
        ws = self._ws
        transport = ws.transport
        if (
            ws.protocol.state is not self._open
            or transport.is_closing()
            or transport.get_write_buffer_size() > NOWAIT_WRITE_LIMIT
        ):
            return False
        ws.protocol.send_binary(b"".join(buffers))
        for chunk in ws.protocol.data_to_send():
            transport.write(chunk)
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, reason)

    def abort(self) -> None:
        self._ws.transport.abort()
