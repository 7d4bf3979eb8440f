"""Per-stream flow-control windows (docs/PROTOCOL.md §5).

Credit works as in HTTP/2: a sender may have at most ``window`` unacknowledged payload bytes
in flight on a stream. The receiver returns credit with WINDOW frames once the application
has *consumed* data (not merely received it), so a slow visitor stops its own stream and
nothing else, and the receiver's buffer for that stream never exceeds the window.

A receive window may also tune its size to the link (:meth:`ReceiveWindow.tune`): a stream's
rate is at most window / round-trip time, so across a long link a fixed window, not the link,
would set the pace. The sender needs nothing for it: more credit is just a bigger WINDOW
increment, and less is credit returned later.
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
    """Credit the peer still has on a stream, and consumed bytes not yet returned.

    ``size`` is what the peer may have unacknowledged: ``available`` to send, plus bytes
    received and not yet returned. After a shrink, ``debt`` bytes more are outstanding until
    the returns they would have made are kept back.
    """

    __slots__ = ("size", "available", "debt", "_consumed", "_epoch_start", "_epoch_read")

    def __init__(self, size: int) -> None:
        self.size = size
        self.available = size
        self.debt = 0
        self._consumed = 0
        #: Tuning: when the current measuring epoch began (negative: not yet), and bytes
        #: consumed in it.
        self._epoch_start = -1.0
        self._epoch_read = 0

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
        if self._consumed + size > self.size + self.debt - self.available:
            raise LocalProtocolError("acknowledged more bytes than were received")
        self._consumed += size
        self._epoch_read += size
        if self._consumed >= self.size // 4 or self.available == 0:
            increment, self._consumed = self._consumed, 0
            if self.debt:
                # Shrinking: what the peer may have outstanding falls to the new size. It
                # never reaches zero with nothing left to read (size > 0 stays outstanding).
                kept = min(self.debt, increment)
                self.debt -= kept
                increment -= kept
            self.available += increment
            return increment
        return 0

    def tune(self, now: float, rtt: float, *, floor: int, ceiling: int, room: int | None = None) -> int:
        """Fit the window to the rate the application consumes at; call after a credit return.

        A measuring epoch ends once half the window was consumed. Its rate times the link's
        round-trip time ``rtt`` (its least, without queueing) is what the window must hold to
        keep that rate. Needing half the window or more while little waits unread, the window
        may be what holds the stream back: it doubles, up to ``ceiling`` (at most
        :data:`MAX_WINDOW`) and by at most ``room`` bytes (None: no limit but the ceiling).
        An epoch shorter than a quarter round trip is no such sign: a window-limited stream
        receives at most a window per round trip, so that half window had arrived before the
        reader took it (a burst into the kernel's buffers looks the same). Needing less than
        an eighth, the application reads slowly: the window halves (never below ``floor``).
        ``rtt`` must be positive.

        Returns:
            Extra credit to grant at once (in the same WINDOW frame), or 0.
        """
        if self._epoch_start < 0:
            self._epoch_start, self._epoch_read = now, 0
            return 0
        read = self._epoch_read
        if read < self.size // 2:
            return 0
        elapsed = now - self._epoch_start
        self._epoch_start, self._epoch_read = now, 0
        needed = read * rtt  # compared with size * elapsed below: rate * rtt without a division
        # Bytes waiting to be read: a reader that lets them pile up sets the pace, not the window.
        waiting = self.size + self.debt - self.available - self._consumed
        grown = min(self.size * 2, ceiling, self.size + (room if room is not None else ceiling))
        if needed * 2 >= self.size * elapsed and elapsed * 4 >= rtt and waiting <= self.size // 2 and grown > self.size:
            extra = grown - self.size
            self.size = grown
            forgiven = min(self.debt, extra)
            self.debt -= forgiven
            extra -= forgiven
            self.available += extra
            return extra
        if needed * 8 < self.size * elapsed and self.size > floor:
            shrunk = max(self.size // 2, floor)
            self.debt += self.size - shrunk
            self.size = shrunk
        return 0
