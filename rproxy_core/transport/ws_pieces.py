"""Relaying a WebSocket message to an aiohttp WebSocket piece by piece, as its fragments arrive.

aiohttp sends a message only whole, in one frame. A message from the tunnel arrives in pieces
(DATA frames with MORE), and assembling it first would hold up to 16 MiB per stream on the bridge
(issue 15, finding 4). RFC 6455 section 5.4 lets a message go out as fragments: the first frame
carries the opcode without FIN, continuation frames follow, the last has FIN. Each piece is
written as it is read, so a stream holds no more than its window; control frames aiohttp sends
meanwhile (heartbeat pings, a close) are whole frames of their own, which RFC 6455 allows between
fragments.

Only for sockets without permessage-deflate (the bridge offers none to visitors) and only through
aiohttp's writer internals (``_writer.transport``, ``protocol._paused``), checked once per socket:
where they are missing, ``PieceWriter.of`` returns None and the caller assembles, as before.
"""

from __future__ import annotations

import codecs
import struct
from typing import Any

from aiohttp import web

from ..protocol.frames import MessageKind

__all__ = ["PieceWriter"]

_OPCODES = {MessageKind.TEXT: 0x1, MessageKind.BINARY: 0x2}
_CONTINUATION = 0x0
_FIN = 0x80


def _frame_head(first_byte: int, length: int) -> bytes:
    """A server's frame head (server frames are not masked)."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 1 << 16:
        return struct.pack("!BBH", first_byte, 126, length)
    return struct.pack("!BBQ", first_byte, 127, length)


class PieceWriter:
    """Writes one fragmented message at a time onto a prepared server-side WebSocket."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self._started = False
        self._text: codecs.IncrementalDecoder | None = None

    @classmethod
    def of(cls, ws: web.WebSocketResponse) -> PieceWriter | None:
        """A writer for ``ws``, or None if this aiohttp does not expose what fragments need."""
        writer = getattr(ws, "_writer", None)
        protocol = getattr(writer, "protocol", None)
        if (
            writer is None
            or getattr(writer, "compress", True)  # a deflating socket: frames would need compressing
            or getattr(writer, "use_mask", True)  # only the server side is written here
            or not hasattr(writer, "transport")
            or not hasattr(protocol, "_paused")
            or not hasattr(protocol, "_drain_helper")
        ):
            return None
        return cls(writer)

    async def send(self, kind: MessageKind, piece: memoryview | bytes, *, last: bool) -> None:
        """Write the next piece of a TEXT or BINARY message; ``last`` ends the message.

        A text message's bytes are decoded across pieces and invalid UTF-8 replaced, as a whole
        message's would be (a visitor's browser fails the socket on invalid UTF-8).

        Raises:
            ConnectionResetError: the socket is closing or closed.
        """
        writer = self._writer
        transport = writer.transport
        if getattr(writer, "_closing", False) or transport is None or transport.is_closing():
            raise ConnectionResetError("the visitor's WebSocket is closing")
        if not self._started:
            self._started = True
            if kind is MessageKind.TEXT:
                self._text = codecs.getincrementaldecoder("utf-8")("replace")
            opcode = _OPCODES[kind]
        else:
            opcode = _CONTINUATION
        if self._text is not None:
            piece = self._text.decode(piece, final=last).encode()
        transport.write(_frame_head((_FIN if last else 0) | opcode, len(piece)))
        if piece:
            transport.write(piece)
        if last:
            self._started = False
            self._text = None
        protocol = writer.protocol
        if protocol._paused:
            await protocol._drain_helper()
