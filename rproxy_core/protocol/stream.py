"""Stream lifecycle (docs/PROTOCOL.md §3).

Theory of operation
-------------------
A stream is one visitor request (or visitor WebSocket) carried through the tunnel. The side
that opens it sends OPEN (the request head) and then its body as DATA frames; the other side
answers with exactly one REPLY (the response head) and its own DATA. Each side ends its half
with the FIN flag, on the last frame it sends or on an empty DATA frame. When both halves
have ended, or either side sent RESET, the stream is closed and forgotten.

The lifecycle is the table ``_TRANSITIONS``: a (state, input) pair missing from it is a
violation. Violations by the peer become a stream reset with STREAM_CLOSED; violations by
this side raise LocalProtocolError because they are bugs here.
"""

from __future__ import annotations

import enum

from ..exceptions import LocalProtocolError, RemoteProtocolError

__all__ = ["StreamState", "StreamInput", "StreamStateMachine"]


class StreamState(enum.IntEnum):
    """Where a stream is in its life."""

    IDLE = 0
    OPEN = 1
    HALF_CLOSED_LOCAL = 2  # we sent FIN; the peer may still send
    HALF_CLOSED_REMOTE = 3  # the peer sent FIN; we may still send
    CLOSED = 4


class StreamInput(enum.IntEnum):
    """Things that happen to a stream."""

    SEND_OPEN = 0
    RECV_OPEN = 1
    SEND_REPLY = 2
    RECV_REPLY = 3
    SEND_DATA = 4
    RECV_DATA = 5
    SEND_FIN = 6
    RECV_FIN = 7
    SEND_RESET = 8
    RECV_RESET = 9


IDLE = StreamState.IDLE
OPEN = StreamState.OPEN
HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
CLOSED = StreamState.CLOSED
IN = StreamInput

_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (IDLE, IN.SEND_OPEN): OPEN,
    (IDLE, IN.RECV_OPEN): OPEN,
    (OPEN, IN.SEND_REPLY): OPEN,
    (OPEN, IN.RECV_REPLY): OPEN,
    (OPEN, IN.SEND_DATA): OPEN,
    (OPEN, IN.RECV_DATA): OPEN,
    (OPEN, IN.SEND_FIN): HALF_CLOSED_LOCAL,
    (OPEN, IN.RECV_FIN): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_LOCAL, IN.RECV_REPLY): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, IN.RECV_DATA): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, IN.RECV_FIN): CLOSED,
    (HALF_CLOSED_REMOTE, IN.SEND_REPLY): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, IN.SEND_DATA): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, IN.SEND_FIN): CLOSED,
}

_LOCAL_INPUTS = frozenset({IN.SEND_OPEN, IN.SEND_REPLY, IN.SEND_DATA, IN.SEND_FIN, IN.SEND_RESET})


class StreamStateMachine:
    """The state of one stream, plus the "one REPLY, before any DATA" rule for the responder."""

    __slots__ = ("state", "opened_locally", "reply_sent", "reply_received")

    def __init__(self) -> None:
        self.state = IDLE
        self.opened_locally = False
        self.reply_sent = False
        self.reply_received = False

    def process(self, event: StreamInput) -> StreamState:
        """Apply ``event`` and return the new state.

        Raises:
            LocalProtocolError: if this side's action is not allowed now.
            RemoteProtocolError: if the peer's frame is not allowed now.
        """
        if event is IN.SEND_RESET or event is IN.RECV_RESET:
            self.state = CLOSED
            return CLOSED
        next_state = _TRANSITIONS.get((self.state, event))
        if next_state is None:
            self._fail(event, f"{event.name} not allowed in state {self.state.name}")
        if event is IN.SEND_OPEN:
            self.opened_locally = True
        elif event is IN.SEND_REPLY or event is IN.RECV_REPLY:
            self._check_reply(event)
        elif event is IN.SEND_DATA or event is IN.RECV_DATA:
            self._check_data(event)
        self.state = next_state  # type: ignore[assignment]
        return self.state

    def _check_reply(self, event: StreamInput) -> None:
        sending = event is IN.SEND_REPLY
        # Only the side that did not open the stream replies, and only once.
        if self.opened_locally == sending or (self.reply_sent if sending else self.reply_received):
            self._fail(event, "REPLY from the opener or sent twice")
        if sending:
            self.reply_sent = True
        else:
            self.reply_received = True

    def _check_data(self, event: StreamInput) -> None:
        # The responder's body follows its REPLY.
        if event is IN.SEND_DATA and not self.opened_locally and not self.reply_sent:
            self._fail(event, "DATA before REPLY")
        if event is IN.RECV_DATA and self.opened_locally and not self.reply_received:
            self._fail(event, "DATA before REPLY")

    @staticmethod
    def _fail(event: StreamInput, message: str) -> None:
        if event in _LOCAL_INPUTS:
            raise LocalProtocolError(message)
        raise RemoteProtocolError(message, error_code=0x04)
