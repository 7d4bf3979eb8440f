"""Frames of the tunnel protocol and their binary encoding (docs/PROTOCOL.md §2).

A tunnel is one WebSocket. Each binary WebSocket message carries one or more frames back
to back, so that everything queued during one event-loop turn leaves in one message (one
write, one WebSocket header, one mask) instead of one per frame. Every frame is::

     0        1        2                                   6                                   10
    +--------+--------+-----------------------------------+-----------------------------------+------------
    |  type  | flags  |       stream id (uint32, BE)      |    payload length (uint32, BE)    | payload ...
    +--------+--------+-----------------------------------+-----------------------------------+------------

Stream 0 is the connection itself (HELLO, PING, PONG, GOAWAY); every other frame names a
stream. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..exceptions import FrameError

__all__ = [
    "FrameType",
    "Flags",
    "MessageKind",
    "ErrorCode",
    "Frame",
    "HEADER",
    "HEADER_SIZE",
    "iter_frames",
    "encode_header",
    "encode_code",
    "decode_code",
]

HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")


class FrameType(enum.IntEnum):
    """What a frame is; see docs/PROTOCOL.md §3 for each."""

    HELLO = 0x0  # stream 0, JSON: version and settings, first frame each way
    OPEN = 0x1  # JSON request head; opens a stream
    REPLY = 0x2  # JSON response head; sent once by the side that did not open the stream
    DATA = 0x3  # payload bytes (a body chunk, or a WebSocket message or fragment)
    WINDOW = 0x4  # uint32 credit increment for the stream
    RESET = 0x5  # uint16 ErrorCode + UTF-8 reason; abandons the stream
    PING = 0x6  # stream 0, opaque payload echoed in PONG
    PONG = 0x7
    GOAWAY = 0x8  # stream 0, uint16 ErrorCode + UTF-8 reason; the connection ends


class Flags(enum.IntFlag):
    """Flag bits. FIN ends the sender's half of a stream (OPEN, REPLY, DATA)."""

    FIN = 0x01
    #: DATA only: the WebSocket message continues in the next DATA frame.
    MORE = 0x02


class MessageKind(enum.IntEnum):
    """What a DATA frame carries on a WebSocket stream: bits 4-6 of flags."""

    BINARY = 0  # also: plain body bytes of an HTTP stream
    TEXT = 1
    PING = 2
    PONG = 3
    CLOSE = 4  # payload: uint16 close code + UTF-8 reason

    @property
    def flag_bits(self) -> int:
        """The bits to OR into a DATA frame's flags."""
        return self.value << 4

    @classmethod
    def from_flags(cls, flags: int) -> MessageKind:
        """Read the kind out of DATA frame flags.

        Raises:
            FrameError: if the bits name no kind.
        """
        try:
            return cls((flags >> 4) & 0x7)
        except ValueError:
            raise FrameError(f"unknown message kind in flags {flags:#04x}") from None


class ErrorCode(enum.IntEnum):
    """Why a stream was reset or a connection closed."""

    NO_ERROR = 0x00
    PROTOCOL_ERROR = 0x01
    INTERNAL_ERROR = 0x02
    FLOW_CONTROL_ERROR = 0x03
    STREAM_CLOSED = 0x04
    FRAME_SIZE_ERROR = 0x05
    REFUSED_STREAM = 0x06
    CANCEL = 0x07
    #: The peer made this side do more work or queue more than its budget allows: PINGs whose
    #: PONGs it never reads, floods of empty or tiny frames (the connection ends with GOAWAY).
    EXCESSIVE_LOAD = 0x08
    #: Agent side: the home app refused the connection or could not be resolved (visitor sees 502).
    TARGET_UNREACHABLE = 0x10
    #: Agent side: the home app did not answer in time (visitor sees 504).
    TARGET_TIMEOUT = 0x11
    #: Agent side: the home app broke the exchange, e.g. closed mid-response (502).
    TARGET_ERROR = 0x12
    #: A WebSocket message exceeded the receiver's limit.
    MESSAGE_TOO_BIG = 0x13
    #: The request was malformed or not allowed by the agent (visitor sees 400).
    REQUEST_REJECTED = 0x14

    @classmethod
    def coerce(cls, value: int) -> int:
        """Return the enum member for known codes, the plain int otherwise."""
        try:
            return cls(value)
        except ValueError:
            return value


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is a view into the received message (no copy)."""

    type: FrameType
    flags: int
    stream_id: int
    payload: memoryview


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Return the 10-byte header of a frame."""
    return HEADER.pack(frame_type, flags, stream_id, length)


def iter_frames(message: bytes | bytearray | memoryview, max_payload: int) -> Iterator[Frame]:
    """Yield the frames packed in one WebSocket message.

    Args:
        message: the binary WebSocket message.
        max_payload: the largest payload this side accepts.

    Raises:
        FrameError: on a truncated frame, an unknown type or an oversized payload. Frames
            before the bad one have already been yielded.
    """
    view = memoryview(message)
    end = len(view)
    offset = 0
    if end == 0:
        raise FrameError("empty message")
    while offset < end:
        if end - offset < HEADER_SIZE:
            raise FrameError("truncated frame header")
        raw_type, flags, stream_id, length = HEADER.unpack_from(view, offset)
        offset += HEADER_SIZE
        if length > max_payload:
            raise FrameError(f"frame payload of {length} bytes exceeds {max_payload}", 5)
        if end - offset < length:
            raise FrameError("truncated frame payload")
        try:
            frame_type = FrameType(raw_type)
        except ValueError:
            raise FrameError(f"unknown frame type {raw_type:#04x}") from None
        yield Frame(frame_type, flags, stream_id, view[offset : offset + length])
        offset += length


def encode_code(code: int, reason: str = "") -> bytes:
    """Payload of RESET, GOAWAY and a WebSocket CLOSE message: uint16 code + UTF-8 reason."""
    return _U16.pack(code) + reason.encode("utf-8", "replace")[:123]


def decode_code(payload: memoryview | bytes) -> tuple[int, str]:
    """Inverse of :func:`encode_code`.

    Raises:
        FrameError: if the payload is shorter than the code.
    """
    if len(payload) < 2:
        raise FrameError("missing error code")
    (code,) = _U16.unpack_from(payload)
    return code, bytes(payload[2:]).decode("utf-8", "replace")


def encode_u32(value: int) -> bytes:
    """Payload of a WINDOW frame."""
    return _U32.pack(value)


def decode_u32(payload: memoryview | bytes) -> int:
    """Inverse of :func:`encode_u32`.

    Raises:
        FrameError: if the payload is not exactly four bytes.
    """
    if len(payload) != 4:
        raise FrameError("WINDOW payload must be 4 bytes")
    return int(_U32.unpack_from(payload)[0])
