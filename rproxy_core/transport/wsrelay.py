"""The one WebSocket ↔ stream relay, used by the bridge (visitor side) and the agent (home app side).

Each end of a tunneled WebSocket is an aiohttp WebSocket: the visitor's at the bridge, the
home app's at the agent. Between them the stream carries messages (docs/PROTOCOL.md §3). The
relay is meant to be transparent: what one end says, the other hears, message for message,
and close code for close code.

The close handshake crosses the tunnel. When the WebSocket next to this side (the *peer*)
closes, its CLOSE goes through the stream and the peer gets no answer yet; the far end closes
its own socket with that code, and the code it answers with comes back as a CLOSE and becomes
the peer's answer. So an echo server's answer reaches the visitor (code and reason), and a
visitor's close code reaches the home app. A peer that breaks the protocol (a bad frame, an
invalid close code, a message over the limit) is failed the same way: the failure goes through
the stream first, so that what the far end had already answered still reaches the peer in
order, and then the peer is closed with the failure's code. An answer that does not come
within ``CLOSE_ANSWER_TIMEOUT`` is given by the relay itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http import WebSocketError

from ..exceptions import StreamResetError
from ..logsafe import printable
from ..protocol.closecodes import (
    CloseCode,
    decode_close,
    encode_close,
    is_valid_close_code,
    sendable_close_code,
    sendable_close_reason,
)
from ..protocol.frames import ErrorCode, MessageKind
from .streams import TunnelStream
from .ws_pieces import PieceWriter

__all__ = ["CLOSE_ANSWER_TIMEOUT", "MESSAGES_PER_TURN", "WebSocketRelay", "aiohttp_message_limit"]

_LOGGER = logging.getLogger("rproxy.tunnel")

#: Seconds one end's close waits for the other end's answer before the relay answers itself.
CLOSE_ANSWER_TIMEOUT = 5.0

#: Messages relayed in a row before the loop gets a turn: queued messages come without
#: waiting, and one busy socket must not keep the loop to itself.
MESSAGES_PER_TURN = 64

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def aiohttp_message_limit(limit: int) -> int:
    """aiohttp's ``max_msg_size`` for a relay that accepts messages of up to ``limit`` bytes.

    aiohttp refuses a message of exactly its ``max_msg_size``; the tunnel refuses only what
    is over its limit (docs/PROTOCOL.md §7), so aiohttp is given one byte more.
    """
    return limit + 1 if limit > 0 else 0


class _DeferredErrors:
    """An aiohttp WebSocket's message queue that hands out a protocol error as an ERROR message.

    aiohttp's ``receive`` fails the connection the moment its parser meets a bad frame, even
    though the messages before it are still being answered by the far end; those answers would
    be lost (Autobahn cases 3.2-3.4, 4.1.3-4.1.5, 4.2.3-4.2.5, 5.15). Read through this queue,
    the error comes out as ``WSMsgType.ERROR`` without aiohttp closing anything, and the relay
    fails the connection once the answers are out. Only the first read after the error gets
    it as a message; later ones raise it as aiohttp expects (its close() reads on until a
    close frame or an exception).
    """

    __slots__ = ("_queue", "_handed_out")

    def __init__(self, queue: Any) -> None:
        self._queue = queue
        self._handed_out = False

    async def read(self) -> Any:
        try:
            return await self._queue.read()
        except WebSocketError as err:
            if self._handed_out:
                raise
            self._handed_out = True
            return aiohttp.WSMessage(WSMsgType.ERROR, err, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def _defer_errors(ws: AnyWebSocket) -> None:
    queue = getattr(ws, "_reader", None)
    if queue is not None and not isinstance(queue, _DeferredErrors) and hasattr(queue, "read"):
        ws._reader = _DeferredErrors(queue)  # type: ignore[assignment]


class WebSocketRelay:
    """Relays one WebSocket (the *peer*) and one stream both ways until both are closed.

    Args:
        ws: the peer, prepared (bridge) or connected (agent), with ``autoclose=False`` and
            ``autoping=False`` so that closes and pings are the far end's to answer.
        stream: the WebSocket stream.
        max_message: largest message taken from the stream (bigger: the peer gets 1009).
        message_rate: most messages a second taken from the peer (more: 1008); None for no limit.
        pieces: writes a message from the stream to the peer piece by piece as it arrives
            (see ``ws_pieces``); without it, messages are assembled up to ``max_message``.
        what: how logs name the peer ("visitor", "home app").
    """

    __slots__ = (
        "ws",
        "stream",
        "max_message",
        "message_rate",
        "what",
        "note",
        "bytes_to_peer",
        "_peer_closed",
        "_peer_failed",
        "_closing_peer",
        "_answer_timer",
        "_send_text",
        "_pieces",
    )

    def __init__(
        self,
        ws: AnyWebSocket,
        stream: TunnelStream,
        *,
        max_message: int,
        message_rate: int | None = None,
        pieces: PieceWriter | None = None,
        what: str = "peer",
    ) -> None:
        self.ws = ws
        self.stream = stream
        self.max_message = max_message
        self.message_rate = message_rate
        self.what = what
        #: How the exchange ended, for an access log line ("closed with 1000").
        self.note = ""
        #: Payload bytes relayed to the peer.
        self.bytes_to_peer = 0
        #: The peer's close (code, reason), once it sent one: the far end's answer is awaited.
        self._peer_closed: tuple[int | None, str] | None = None
        #: The peer broke the protocol: (code, reason) it is closed with once answers are out.
        self._peer_failed: tuple[int, str] | None = None
        #: This side sent the peer a close (the far end closed first).
        self._closing_peer = False
        self._answer_timer: asyncio.TimerHandle | None = None
        self._pieces = pieces
        send_frame = getattr(ws, "send_frame", None)
        # Text goes out as the far end's UTF-8 bytes, without a decode and encode, where this
        # aiohttp can send a frame of a given type.
        self._send_text: Callable[[bytes], Awaitable[None]] = (
            (lambda data: send_frame(data, WSMsgType.TEXT))
            if send_frame is not None
            else (lambda data: ws.send_str(data.decode("utf-8", "replace")))
        )

    async def run(self) -> str:
        """Relay until the exchange is over; return how it ended. Never raises for peer or tunnel faults."""
        _defer_errors(self.ws)
        from_peer = asyncio.create_task(self._from_peer())
        try:
            await self._to_peer()
            if self._closing_peer and not from_peer.done():
                # Our close went out: what the peer still sends, and then its answer, goes on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_ANSWER_TIMEOUT):
                        await asyncio.shield(from_peer)
        finally:
            if self._answer_timer is not None:
                self._answer_timer.cancel()
            if not from_peer.done():
                # The peer is closed (or gone) by now: what it would still send has no taker.
                from_peer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await from_peer
            if self._closing_peer:
                _drop(self.ws)
        return self.note

    # Peer → stream.

    async def _from_peer(self) -> None:
        ws, stream = self.ws, self.stream
        send = stream.send_message
        rate = self.message_rate
        loop = asyncio.get_running_loop()
        window_start = loop.time()
        count = 0
        try:
            while True:
                msg = await ws.receive()
                count += 1
                if count % MESSAGES_PER_TURN == 0:
                    await asyncio.sleep(0)
                if rate is not None and count > rate:
                    now = loop.time()
                    if now - window_start >= 1.0:
                        window_start, count = now, 1
                    else:
                        _LOGGER.warning(
                            "%s websocket %s: more than %d messages a second, closed",
                            self.what,
                            stream.head.request_id,
                            rate,
                        )
                        await self._fail_peer(CloseCode.POLICY_VIOLATION, "too many messages")
                        return
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    await send(MessageKind.TEXT, msg.data.encode())
                elif kind is WSMsgType.BINARY:
                    await send(MessageKind.BINARY, msg.data)
                elif kind is WSMsgType.PING:
                    await send(MessageKind.PING, msg.data)
                elif kind is WSMsgType.PONG:
                    await send(MessageKind.PONG, msg.data)
                elif kind is WSMsgType.CLOSE:
                    code = msg.data or None  # aiohttp says 0 for a close frame without a code
                    if self._closing_peer:
                        # The answer to our close: it is the far end's answer, and then the
                        # exchange is over.
                        await self._relay_answer(code, msg.extra or "")
                    elif code is not None and not is_valid_close_code(code):
                        await self._fail_peer(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
                    else:
                        await self._relay_peer_close(code, msg.extra or "")
                    return
                elif kind is WSMsgType.ERROR and isinstance(msg.data, WebSocketError):
                    if not self._closing_peer:
                        await self._fail_peer(msg.data.code, str(msg.data))
                    return
                else:  # CLOSING (our close is under way), CLOSED, ERROR (the connection broke)
                    if not self._closing_peer and self._peer_closed is None:
                        # Gone without a close frame: the far end hears "abnormal closure"
                        # (sent on as 1001, as 1006 may not be).
                        self.note = self.note or f"{self.what} gone"
                        await self._relay_peer_close(CloseCode.ABNORMAL, "")
                    return
        except StreamResetError:
            pass  # the tunnel side ended; _to_peer closes the peer
        except Exception as err:  # the peer's connection broke mid-send
            _LOGGER.debug("%s websocket %s failed: %r", self.what, stream.head.request_id, err)
            stream.reset(ErrorCode.CANCEL, f"{self.what} gone")

    async def _relay_peer_close(self, code: int | None, reason: str) -> None:
        """The peer closed: tell the far end, and wait (bounded) for its answer."""
        self._peer_closed = (code, reason)
        if not self.note:
            self.note = f"closed with {code or CloseCode.NO_STATUS}"
        stream = self.stream
        await stream.send_message(MessageKind.CLOSE, encode_close(code, reason))
        await stream.end()
        self._await_answer()

    async def _fail_peer(self, code: int, reason: str) -> None:
        """The peer broke the protocol: the far end is told, and once what it still sends is
        out, the peer is closed with ``code``."""
        self._peer_failed = (code, reason)
        self.note = f"closed with {code}: {printable(reason, 100)}"
        self._peer_closed = (code, reason)
        stream = self.stream
        await stream.send_message(MessageKind.CLOSE, encode_close(code, reason))
        await stream.end()
        self._await_answer()

    def _await_answer(self) -> None:
        stream = self.stream

        def overdue() -> None:
            if not stream.closed:
                stream.reset(ErrorCode.CANCEL, "no answer to a WebSocket close")

        self._answer_timer = asyncio.get_running_loop().call_later(CLOSE_ANSWER_TIMEOUT, overdue)

    # Stream → peer.

    async def _to_peer(self) -> None:
        ws, stream = self.ws, self.stream
        send_text = self._send_text
        read = stream.read_fragment
        pieces = self._pieces
        limit = self.max_message
        relayed = 0
        try:
            while True:
                fragment = await read()
                if fragment is None:
                    break
                relayed += 1
                if relayed % MESSAGES_PER_TURN == 0:
                    await asyncio.sleep(0)
                kind, piece, more = fragment
                if more:
                    if pieces is not None and (kind is MessageKind.TEXT or kind is MessageKind.BINARY):
                        self.bytes_to_peer += await self._relay_pieces(pieces, kind, piece)
                        continue
                    data = await stream.read_rest(piece, limit)
                else:
                    data = bytes(piece)
                self.bytes_to_peer += len(data)
                if kind is MessageKind.TEXT:
                    await send_text(data)
                elif kind is MessageKind.BINARY:
                    await ws.send_bytes(data)
                elif kind is MessageKind.PING:
                    await ws.ping(data)
                elif kind is MessageKind.PONG:
                    await ws.pong(data)
                elif kind is MessageKind.CLOSE:
                    code, reason = decode_close(data)
                    if self._peer_closed is not None:
                        await self._answer_peer(code, reason)
                    else:
                        await self._close_peer_first(code, reason)
                    return
            # The far end ended without a close (an older agent or bridge may): the peer gets
            # the answer it waits for, or a normal close.
            await self._answer_peer(None, "")
        except StreamResetError as err:
            if self._peer_closed is not None:
                await self._answer_peer(None, "")
                return
            self.note = f"tunnel side ended: {printable(err, 100)}"
            code = CloseCode.MESSAGE_TOO_BIG if err.code == ErrorCode.MESSAGE_TOO_BIG else CloseCode.INTERNAL_ERROR
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await ws.close(code=code, message=b"tunnel closed")
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as err:
            self.note = self.note or f"{self.what} gone: {err.__class__.__name__}"

    async def _relay_pieces(self, pieces: PieceWriter, kind: MessageKind, first: memoryview) -> int:
        """Write a message to the peer as its pieces arrive; return its size."""
        stream, limit = self.stream, self.max_message
        await pieces.send(kind, first, last=False)
        size, more = len(first), True
        while more:
            piece, more = await stream.read_continuation(size, limit)
            size += len(piece)
            await pieces.send(kind, piece, last=not more)
        return size

    async def _answer_peer(self, code: int | None, reason: str) -> None:
        """Close the peer, whose close (or failure) came first, with the far end's answer."""
        if self._peer_failed is not None:
            code, reason = self._peer_failed
        elif code is None and self._peer_closed is not None:
            code, reason = self._peer_closed  # no answer: echo the peer's own close
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await self.ws.close(code=sendable_close_code(code), message=sendable_close_reason(reason))

    async def _close_peer_first(self, code: int | None, reason: str) -> None:
        """The far end closed first: close the peer with its code; the peer's answer (and what it
        sent before it) goes back through the stream."""
        self._closing_peer = True
        self.note = self.note or f"closed with {code or CloseCode.NO_STATUS}"
        ws = self.ws
        writer = getattr(ws, "_writer", None)
        if writer is not None and hasattr(writer, "send_frame") and _can_drop(ws):
            # Only the close frame: aiohttp's close() would read the peer's last messages away
            # while it waits for the answer, and they are the far end's to have (an echo server's
            # answer to what the visitor sent just before it closed). A close without a code
            # goes on without one.
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await writer.send_frame(
                    encode_close(sendable_close_code(code) if code else None, reason), WSMsgType.CLOSE
                )
            return
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await ws.close(code=sendable_close_code(code), message=sendable_close_reason(reason))
        await self._relay_answer(ws.close_code or None, "")

    async def _relay_answer(self, code: int | None, reason: str) -> None:
        with contextlib.suppress(StreamResetError):
            await self.stream.send_message(MessageKind.CLOSE, encode_close(code, reason))
            await self.stream.end()


def _can_drop(ws: AnyWebSocket) -> bool:
    return hasattr(ws, "_set_closed") and (hasattr(ws, "_close_transport") or hasattr(ws, "_response"))


def _drop(ws: AnyWebSocket) -> None:
    """End the connection of a socket whose close handshake is over (or overdue): no second
    close frame, as ``close()`` would send."""
    if ws.closed:
        return
    ws._set_closed()
    if isinstance(ws, web.WebSocketResponse):
        ws._close_transport()
    else:
        ws._response.close()
