"""Adapters giving the tunnel one small interface over aiohttp's and websockets' WebSockets.

The bridge accepts tunnels with aiohttp's server; the agent dials with websockets (or with an
aiohttp client session, e.g. Home Assistant's). The connection code sees only FrameSocket.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from aiohttp import WSMsgType

from ..exceptions import FrameError

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web
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

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close gracefully; idempotent."""

    def abort(self) -> None:
        """Drop the underlying connection at once (after close, or when the peer is dead)."""

    @property
    def remote(self) -> str:
        """The peer's address, for logs."""


_CLOSED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})


class AiohttpFrameSocket:
    """FrameSocket over aiohttp's server or client WebSocket."""

    __slots__ = ("_ws", "remote", "_transport")

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        remote: str,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        self._ws = ws
        self.remote = remote
        self._transport = transport

    async def receive(self) -> bytes | bytearray | None:
        msg = await self._ws.receive()
        if msg.type is WSMsgType.BINARY:
            return msg.data  # type: ignore[no-any-return]
        if msg.type in _CLOSED:
            return None
        raise FrameError(f"unexpected {msg.type.name} message on the tunnel")

    async def send(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code=code, message=reason.encode())

    def abort(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()  # type: ignore[attr-defined]


class WebsocketsFrameSocket:
    """FrameSocket over a websockets client connection."""

    __slots__ = ("_ws", "remote", "_closed_exc")

    def __init__(self, ws: ClientConnection, remote: str) -> None:
        from websockets.exceptions import ConnectionClosed

        self._ws = ws
        self.remote = remote
        self._closed_exc = ConnectionClosed

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

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, reason)

    def abort(self) -> None:
        self._ws.transport.abort()
