"""Shared helpers for the sans-I/O protocol tests: raw frames and an in-memory ConnectionPair.

Imported relatively (``from .helpers import ...``); this directory is a package so that the
helper module name cannot collide with other test directories.
"""

from __future__ import annotations

import json
from typing import Any

from rproxy_core.protocol import Multiplexer, Role
from rproxy_core.protocol import events as ev
from rproxy_core.protocol.frames import Frame, FrameType, encode_header, iter_frames

#: Generous enough to parse anything a Multiplexer can emit in these tests.
PARSE_LIMIT = 16 << 20


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode one frame by hand (header + payload), independent of the Multiplexer."""
    return encode_header(frame_type, flags, stream_id, len(payload)) + payload


def raw_hello(**settings: Any) -> bytes:
    """A peer HELLO frame with protocol version 1 and ``settings``."""
    body = {"version": 1, **settings}
    return raw_frame(FrameType.HELLO, 0, 0, json.dumps(body).encode())


def parse(message: bytes) -> list[Frame]:
    """Decode every frame of one message (the message must be well formed)."""
    return list(iter_frames(message, PARSE_LIMIT)) if message else []


def take(mux: Multiplexer, max_bytes: int | None = None) -> bytes:
    """Join what ``mux`` wants to send next into one message."""
    return b"".join(mux.data_to_send(max_bytes))


def take_frames(mux: Multiplexer) -> list[Frame]:
    """Everything ``mux`` has queued, decoded."""
    return parse(take(mux))


def ready_mux(role: Role = Role.AGENT, peer_settings: dict[str, Any] | None = None, **kwargs: Any) -> Multiplexer:
    """A Multiplexer that has sent its HELLO and received the peer's, with output and events drained.

    The peer is simulated by raw frames, so tests can then feed arbitrary (mis)behaviour.
    """
    mux = Multiplexer(role, **kwargs)
    mux.send_hello()
    mux.receive_data(raw_hello(**(peer_settings or {})))
    events = mux.events_received()
    assert [type(e) for e in events] == [ev.HelloReceived]
    take(mux)
    return mux


class ConnectionPair:
    """Two Multiplexers wired back to back in memory, in the style of h11's ConnectionPair.

    ``send(sender)`` moves ONE message (what ``sender.data_to_send()`` returns) into the other
    end and returns the events that produced there.
    """

    def __init__(self, bridge: dict[str, Any] | None = None, agent: dict[str, Any] | None = None) -> None:
        self.bridge = Multiplexer(Role.BRIDGE, **(bridge or {}))
        self.agent = Multiplexer(Role.AGENT, **(agent or {}))

    def other(self, mux: Multiplexer) -> Multiplexer:
        """The far end of ``mux``."""
        return self.agent if mux is self.bridge else self.bridge

    def send(self, sender: Multiplexer, max_bytes: int | None = None) -> list[ev.Event]:
        """Deliver one message from ``sender``; return the receiver's new events."""
        receiver = self.other(sender)
        pending = sender.pending_bytes
        message = take(sender, max_bytes)
        assert len(message) == pending - sender.pending_bytes
        assert bool(message) == bool(pending), "data_to_send returned nothing although output is pending"
        if message:
            receiver.receive_data(message)
        return receiver.events_received()

    def flush(self, max_bytes: int | None = None) -> tuple[list[ev.Event], list[ev.Event]]:
        """Shuttle messages both ways until neither side has output.

        Returns:
            (events seen by the bridge, events seen by the agent)
        """
        at_bridge: list[ev.Event] = []
        at_agent: list[ev.Event] = []
        for _ in range(1_000):
            if not self.bridge.pending_bytes and not self.agent.pending_bytes:
                return at_bridge, at_agent
            at_agent += self.send(self.bridge, max_bytes)
            at_bridge += self.send(self.agent, max_bytes)
        raise AssertionError("the two ends never went quiet")

    def handshake(
        self, bridge_settings: dict[str, Any] | None = None, agent_settings: dict[str, Any] | None = None
    ) -> ConnectionPair:
        """Exchange HELLOs; afterwards both ends are ready and have no pending events."""
        self.bridge.send_hello(**(bridge_settings or {}))
        self.agent.send_hello(**(agent_settings or {}))
        at_bridge, at_agent = self.flush()
        assert [type(e) for e in at_bridge] == [ev.HelloReceived]
        assert [type(e) for e in at_agent] == [ev.HelloReceived]
        return self


def ready_pair(bridge: dict[str, Any] | None = None, agent: dict[str, Any] | None = None) -> ConnectionPair:
    """A ConnectionPair with the HELLO exchange already done."""
    return ConnectionPair(bridge, agent).handshake()
