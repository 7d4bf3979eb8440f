"""Events the Multiplexer reports upward (docs/PROTOCOL.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .heads import RequestHead, ResponseHead

__all__ = [
    "Event",
    "HelloReceived",
    "StreamOpened",
    "ReplyReceived",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
    "PingReceived",
    "PongReceived",
    "ConnectionTerminated",
]


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer's HELLO: protocol version and its settings."""

    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream with this request head."""

    stream_id: int
    head: RequestHead
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The peer answered a stream we opened."""

    stream_id: int
    head: ResponseHead
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes for a stream; ``flags`` keeps MORE and the message kind."""

    stream_id: int
    data: memoryview
    flags: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer ended its half of the stream (FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was abandoned, by the peer (``remote``) or by this side's mux."""

    stream_id: int
    code: int
    reason: str
    remote: bool = True


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more credit on a stream."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the PONG is already queued."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Answer to one of our pings."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over: GOAWAY from the peer, or a protocol error it committed."""

    code: int
    reason: str
    remote: bool


Event = (
    HelloReceived
    | StreamOpened
    | ReplyReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingReceived
    | PongReceived
    | ConnectionTerminated
)
