"""Per-stream flow-control windows (docs/PROTOCOL.md §5).

Credit works as in HTTP/2: a sender may have at most ``window`` unacknowledged payload bytes
in flight on a stream. The receiver returns credit with WINDOW frames once the application
has *consumed* data (not merely received it), so a slow visitor stops its own stream and
nothing else, and the receiver's buffer for that stream never exceeds the window.
"""

from __future__ import annotations

from ..exceptions import FlowControlError, LocalProtocolError

__all__ = ["SendWindow", "ReceiveWindow", "MAX_WINDOW"]

#: Largest credit a window may hold, as in HTTP/2 (RFC 9113 §6.9.1).
MAX_WINDOW = 2**31 - 1


class SendWindow:
    """Credit this side may still spend on a stream."""

    __slots__ = ("available",)

    def __init__(self, initial: int) -> None:
        self.available = initial

    def consume(self, size: int) -> None:
        """Spend credit for ``size`` payload bytes about to be sent.

        Raises:
            LocalProtocolError: if that is more than the credit left.
        """
        if size > self.available:
            raise LocalProtocolError(f"cannot send {size} bytes with {self.available} credit")
        self.available -= size

    def expand(self, increment: int) -> None:
        """Add credit granted by the peer.

        Raises:
            FlowControlError: if the increment is not positive or overflows the window.
        """
        if increment <= 0:
            raise FlowControlError(f"window increment must be positive, got {increment}")
        if self.available + increment > MAX_WINDOW:
            raise FlowControlError("window overflow")
        self.available += increment


class ReceiveWindow:
    """Credit the peer still has on a stream, and consumed bytes not yet returned."""

    __slots__ = ("size", "available", "_consumed")

    def __init__(self, size: int) -> None:
        self.size = size
        self.available = size
        self._consumed = 0

    def receive(self, size: int) -> None:
        """Account for ``size`` payload bytes that arrived.

        Raises:
            FlowControlError: if the peer sent beyond its credit.
        """
        if size > self.available:
            raise FlowControlError(f"peer sent {size} bytes with only {self.available} credit")
        self.available -= size

    def acknowledge(self, size: int) -> int:
        """Record that the application consumed ``size`` bytes.

        Returns:
            The increment to send in a WINDOW frame now, or 0 to wait. Credit is returned in
            batches of a quarter window so that bulk transfers do not send a WINDOW frame per
            DATA frame, yet the sender never stalls waiting for it.
        """
        if self._consumed + size > self.size - self.available:
            raise LocalProtocolError("acknowledged more bytes than were received")
        self._consumed += size
        if self._consumed >= self.size // 4 or self.available == 0:
            increment, self._consumed = self._consumed, 0
            self.available += increment
            return increment
        return 0
