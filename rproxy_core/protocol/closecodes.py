"""WebSocket close codes and reasons (RFC 6455 §7.4), as the relays pass them on.

A relay is transparent: the code and reason one end closes with are the ones the other end
sees. The tunnel carries them in a CLOSE message (docs/PROTOCOL.md §3); these helpers decide
what may be sent on a real WebSocket, since a peer's text and numbers are not to be trusted.
Nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CloseCode",
    "MAX_CLOSE_REASON",
    "is_valid_close_code",
    "sendable_close_code",
    "sendable_close_reason",
    "encode_close",
    "decode_close",
]

_U16 = struct.Struct("!H")

#: A close frame's payload is at most 125 bytes, two of them the code (RFC 6455 §5.5).
MAX_CLOSE_REASON = 123


class CloseCode(enum.IntEnum):
    """The registered close codes (IANA "WebSocket Close Code Number Registry")."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    #: Reserved, never sent.
    RESERVED = 1004
    #: Observed, never sent: the close frame had no code.
    NO_STATUS = 1005
    #: Observed, never sent: the connection ended without a close frame.
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    #: Observed, never sent: the TLS handshake failed.
    TLS_HANDSHAKE = 1015


#: Codes below 3000 a peer may put in a close frame; 3000-4999 are for libraries and apps.
_SENDABLE_REGISTERED = frozenset(
    {
        CloseCode.NORMAL,
        CloseCode.GOING_AWAY,
        CloseCode.PROTOCOL_ERROR,
        CloseCode.UNSUPPORTED_DATA,
        CloseCode.INVALID_DATA,
        CloseCode.POLICY_VIOLATION,
        CloseCode.MESSAGE_TOO_BIG,
        CloseCode.MANDATORY_EXTENSION,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.BAD_GATEWAY,
    }
)


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame (RFC 6455 §7.4): a receiver fails the
    connection (1002) on any other, such as 1005, 1006, 1015, 0-999 or 1016-2999."""
    return code in _SENDABLE_REGISTERED or 3000 <= code <= 4999


def sendable_close_code(code: int | None) -> int:
    """A close code that may go on the wire for one a peer reported.

    None (a close frame without a code) becomes 1000; 1006 and 1015 only describe what a
    receiver observed (the connection broke), so they become 1001, going away; any other
    code no close frame may carry becomes 1002.
    """
    if code is None or code == CloseCode.NO_STATUS:
        return CloseCode.NORMAL
    if is_valid_close_code(code):
        return code
    if code == CloseCode.ABNORMAL or code == CloseCode.TLS_HANDSHAKE:
        return CloseCode.GOING_AWAY
    return CloseCode.PROTOCOL_ERROR


def sendable_close_reason(reason: str) -> bytes:
    """A peer's close reason as it may go on the wire: UTF-8, cut to 123 bytes on a character
    boundary (a longer one would make the close itself fail). The text is otherwise the
    peer's, byte for byte; whoever logs it escapes it (``logsafe``)."""
    data = reason.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON:
        return data
    return data[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode()


def encode_close(code: int | None, reason: str = "") -> bytes:
    """Payload of a CLOSE message on a WebSocket stream: empty for "no code", else uint16
    code + the reason as it may be sent (see :func:`sendable_close_reason`)."""
    if code is None:
        return b""
    return _U16.pack(code & 0xFFFF) + sendable_close_reason(reason)


def decode_close(payload: bytes | bytearray | memoryview) -> tuple[int | None, str]:
    """Inverse of :func:`encode_close`; a payload shorter than a code means no code.

    The reason is the peer's text: invalid UTF-8 is replaced, and it is bounded as
    :func:`sendable_close_reason` bounds it.
    """
    if len(payload) < 2:
        return None, ""
    (code,) = _U16.unpack_from(payload)
    reason = bytes(payload[2 : 2 + MAX_CLOSE_REASON]).decode("utf-8", "replace")
    return code, reason
