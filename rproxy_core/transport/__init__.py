"""asyncio transport: drives the sans-I/O Multiplexer over a real WebSocket."""

from __future__ import annotations

from .connection import HandshakeError, TunnelConnection
from .streams import TunnelStream
from .websocket import AiohttpFrameSocket, FrameSocket, WebsocketsFrameSocket

__all__ = [
    "TunnelConnection",
    "TunnelStream",
    "HandshakeError",
    "FrameSocket",
    "AiohttpFrameSocket",
    "WebsocketsFrameSocket",
]
