"""Memory budgets: what bounds the sum of every stream's buffers (issue 15, finding 4).

Flow control bounds what one stream may make this side hold to its window (1 MiB), but not
the sum: 400 stalled downloads are 400 windows. A budget counts the bytes received from the
peer and not yet consumed (queued chunks, a chunk in the application's hands, a WebSocket
message being assembled) per tunnel connection and per process. While a budget is spent, the
tunnel refuses new streams (the bridge answers 503, the agent REFUSED_STREAM) and streams
holding a quarter window or more get no credit back until their own backlog is read, so the
biggest holders stop growing first while small, moving streams keep going.
"""

from __future__ import annotations

__all__ = ["MemoryBudget", "PROCESS_BUDGET", "DEFAULT_TUNNEL_BUDGET", "DEFAULT_PROCESS_BUDGET"]

#: Per tunnel connection: 512 streams stalled with a full 1 MiB window each, twice what the
#: bridge lets one visitor address have in flight, so one address alone cannot spend it.
DEFAULT_TUNNEL_BUDGET = 512 << 20
#: Per process (every tunnel of a bridge, or an agent's tunnel).
DEFAULT_PROCESS_BUDGET = 1 << 30


class MemoryBudget:
    """Bytes held against a limit, optionally inside a parent budget (tunnel → process)."""

    __slots__ = ("limit", "used", "reserved", "parent")

    def __init__(self, limit: int, parent: MemoryBudget | None = None) -> None:
        self.limit = limit
        self.used = 0
        #: Credit granted beyond the fixed stream windows (tuned windows): not held yet, but
        #: peers may send that much more (see growth_room).
        self.reserved = 0
        self.parent = parent

    def charge(self, size: int) -> None:
        self.used += size
        if self.parent is not None:
            self.parent.charge(size)

    def release(self, size: int) -> None:
        self.used -= size
        if self.parent is not None:
            self.parent.release(size)

    def reserve(self, size: int) -> None:
        """Count ``size`` more (or, negative, fewer) bytes of tuned credit granted."""
        self.reserved += size
        if self.parent is not None:
            self.parent.reserve(size)

    def growth_room(self) -> int:
        """How much more tuned credit windows may be granted now, here and in the parent.

        Tuned credit stays within an eighth of the budget, and grows only while what is held
        and reserved fills less than half of it: a stalled visitor or a lying peer can make
        this side hold at most that much beyond the fixed windows.
        """
        room = max(0, min(self.limit // 8 - self.reserved, self.limit // 2 - self.used - self.reserved))
        return room if self.parent is None else min(room, self.parent.growth_room())

    @property
    def exhausted(self) -> bool:
        """Whether this budget or its parent is spent."""
        return self.used >= self.limit or (self.parent is not None and self.parent.exhausted)


#: The process's budget, parent of every tunnel's; the CLI sets its limit from the config.
PROCESS_BUDGET = MemoryBudget(DEFAULT_PROCESS_BUDGET)
