"""Exceptions raised by rproxy_core.

::

    RproxyError
     ├── ProtocolError               (carries ``error_code`` for RESET / GOAWAY)
     │    ├── LocalProtocolError     this side misused the protocol (a bug here)
     │    └── RemoteProtocolError    the peer sent something invalid
     │         ├── FrameError        bytes that do not parse as frames
     │         └── FlowControlError  the peer sent beyond the credit it was given
     ├── StreamResetError            a stream was reset (by either side or by tunnel loss)
     ├── TunnelClosedError           the tunnel is gone; nothing more can be sent on it
     ├── NoAgentError                no agent serves the requested tunnel name
     ├── RproxyConnectionError       the agent could not reach or talk to the bridge
     │    └── AuthenticationError    the bridge refused the agent's credentials (do not retry)
     └── ConfigError                 a setting is invalid (names the flag or key)
"""

from __future__ import annotations

__all__ = [
    "RproxyError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameError",
    "FlowControlError",
    "StreamResetError",
    "TunnelClosedError",
    "NoAgentError",
    "RproxyConnectionError",
    "AuthenticationError",
    "ConfigError",
]


class RproxyError(Exception):
    """Base class of every exception raised by rproxy_core."""


class ProtocolError(RproxyError):
    """The tunnel protocol was violated; ``error_code`` is what goes on the wire."""

    def __init__(self, message: str, error_code: int | None = None) -> None:
        super().__init__(message)
        if error_code is not None:
            self.error_code = error_code

    #: ErrorCode sent in RESET or GOAWAY (set per subclass; see protocol/frames.py).
    error_code: int = 1


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol forbids (a programming error)."""

    error_code = 2


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class FrameError(RemoteProtocolError):
    """Received bytes are not a valid frame."""

    error_code = 5


class FlowControlError(RemoteProtocolError):
    """The peer sent more data than the window it was given."""

    error_code = 3


class StreamResetError(RproxyError):
    """The stream was reset; ``code`` says why (an ErrorCode)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset (code {code})")
        self.code = code


class TunnelClosedError(StreamResetError):
    """The tunnel carrying the stream closed."""

    def __init__(self, message: str = "tunnel closed") -> None:
        super().__init__(code=0x7, message=message)


class NoAgentError(RproxyError):
    """No agent is connected for that tunnel name."""


class RproxyConnectionError(RproxyError):
    """The agent could not connect to, or lost, the bridge."""


class AuthenticationError(RproxyConnectionError):
    """The bridge refused the agent's token; retrying will not help."""


class ConfigError(RproxyError, ValueError):
    """A configuration value is invalid; the message names the flag or key."""
