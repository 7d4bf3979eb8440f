"""Sans-I/O tunnel protocol: frames, heads, windows, stream states and the Multiplexer.

Nothing in this package performs I/O or imports asyncio; see docs/PROTOCOL.md.
"""

from __future__ import annotations

from .events import *  # noqa: F403
from .events import __all__ as _events_all
from .frames import ErrorCode, Flags, FrameType, MessageKind
from .heads import KIND_HTTP, KIND_TCP, KIND_WEBSOCKET, SERVICE_KINDS, RequestHead, ResponseHead
from .mux import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_WINDOW,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Multiplexer,
    Role,
)

__all__ = [
    *_events_all,
    "ErrorCode",
    "Flags",
    "FrameType",
    "MessageKind",
    "KIND_HTTP",
    "KIND_TCP",
    "KIND_WEBSOCKET",
    "SERVICE_KINDS",
    "RequestHead",
    "ResponseHead",
    "Multiplexer",
    "Role",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "DEFAULT_STREAM_WINDOW",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_STREAMS",
]
