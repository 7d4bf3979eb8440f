"""The client WebSocket pieces for dialling a bridge: no redirects followed, a session owned by its socket."""

from __future__ import annotations

import aiohttp
from websockets.asyncio.client import connect as ws_connect

from ..transport import AiohttpFrameSocket

__all__ = ["NoRedirects", "OwnedSessionFrameSocket"]


class NoRedirects(ws_connect):
    """The agent connects where it was configured to: a redirect is an error, not a hint."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class OwnedSessionFrameSocket(AiohttpFrameSocket):
    """An aiohttp client FrameSocket that closes the session it was dialled with."""

    __slots__ = ("_session",)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, remote: str, session: aiohttp.ClientSession) -> None:
        super().__init__(ws, remote)
        self._session = session

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await super().close(code, reason)
        finally:
            await self._session.close()

    def abort(self) -> None:
        super().abort()
        if not self._session.closed:
            # Only drops our reference: the connector (and its pool) belongs to the application.
            self._session.detach()
