"""What an agent reports about itself: its state and its traffic counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["AgentState", "AgentStats"]


class AgentState(enum.StrEnum):
    """What the agent is doing now."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # lost the bridge, waiting before the next attempt
    FAILED = "failed"  # refused for good (bad token, unsupported protocol)


@dataclass(frozen=True, slots=True)
class AgentStats:
    """Traffic counters of an agent since it started."""

    active_streams: int
    requests_served: int
    #: Tunnel bytes from the bridge (visitors' requests) and to it (the home app's answers).
    bytes_received: int
    bytes_sent: int
    #: Round-trip time to the bridge in seconds, from the last heartbeat; None when down.
    rtt: float | None
    reconnects: int
