"""An in-memory pair of frame sockets: two TunnelConnections talking without a network.

``MemoryFrameSocket`` implements the ``FrameSocket`` interface that ``TunnelConnection``
drives (receive, send, send_nowait, close, abort, remote): a message one end sends is the
next message the other end receives, in order, and a close reaches the other end after the
messages sent before it, as over a WebSocket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from rproxy_core.exceptions import FrameError
from rproxy_core.protocol import Multiplexer, Role
from rproxy_core.transport import TunnelConnection, TunnelStream

#: A received text message: the receiving end's ``receive`` raises FrameError for it, as
#: ``AiohttpFrameSocket`` does.
_TEXT = object()
#: End of input: the peer closed (or this end did).
_CLOSED = object()


class MemoryFrameSocket:
    """One end of an in-memory WebSocket carrying binary tunnel messages."""

    def __init__(self, remote: str) -> None:
        self.remote = remote
        self.peer: MemoryFrameSocket | None = None
        self.closed = False
        #: The close code this end sent (None: still open, or aborted without one).
        self.close_code: int | None = None
        #: Messages this end has sent, in order (for tests that look at the wire).
        self.sent: list[bytes] = []
        self._inbox: asyncio.Queue[object] = asyncio.Queue()

    async def receive(self) -> bytes | bytearray | None:
        """The peer's next message; None once either end closed and the messages before are read."""
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)  # every later receive sees the end too
            return None
        if item is _TEXT:
            raise FrameError("unexpected TEXT message on the tunnel")
        assert isinstance(item, bytes)
        return item

    async def send(self, data: bytes) -> None:
        """Deliver one message to the peer; raises like a closed WebSocket once closed."""
        if not self._deliver(bytes(data)):
            raise ConnectionResetError("the in-memory socket is closed")

    def send_nowait(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Deliver the joined buffers at once (never above a write limit: the peer's queue is the buffer)."""
        return self._deliver(b"".join(buffers))

    def send_text(self, text: str) -> None:
        """Send a text message, which a tunnel never carries (for tests of a misbehaving peer)."""
        assert self.peer is not None
        self.peer._inbox.put_nowait(_TEXT)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close both directions: the peer's receive ends after what was already sent."""
        if self.closed:
            return
        self.close_code = code
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._inbox.put_nowait(_CLOSED)
        if self.peer is not None and not self.peer.closed:
            self.peer.closed = True
            self.peer._inbox.put_nowait(_CLOSED)

    def _deliver(self, message: bytes) -> bool:
        if self.closed or self.peer is None:
            return False
        self.sent.append(message)
        self.peer._inbox.put_nowait(message)
        return True


def socket_pair() -> tuple[MemoryFrameSocket, MemoryFrameSocket]:
    """Two connected ends: (bridge side, agent side)."""
    bridge, agent = MemoryFrameSocket("agent.test"), MemoryFrameSocket("bridge.test")
    bridge.peer, agent.peer = agent, bridge
    return bridge, agent


@dataclass
class Tunnel:
    """Both ends of one running tunnel."""

    bridge: TunnelConnection
    agent: TunnelConnection
    bridge_socket: MemoryFrameSocket
    agent_socket: MemoryFrameSocket
    #: Streams the agent side was given, in the order the bridge opened them.
    served: list[TunnelStream]


@asynccontextmanager
async def running_tunnel(
    serve: Callable[[TunnelStream], Any] | None = None,
    *,
    agent_mux: Multiplexer | None = None,
    bridge_mux: Multiplexer | None = None,
    heartbeat_interval: float = 10.0,
    dead_after: float = 30.0,
) -> AsyncIterator[Tunnel]:
    """A bridge-side and an agent-side TunnelConnection over an in-memory pair, handshaken and running.

    Each stream the bridge opens is recorded in ``served`` and, with ``serve``, handed to
    ``serve`` in a task of its own (as the agent serves each stream). Leaving closes both
    ends and waits for every task: nothing is left running.
    """
    bridge_socket, agent_socket = socket_pair()
    served: list[TunnelStream] = []
    tasks: set[asyncio.Task[Any]] = set()

    def on_stream(stream: TunnelStream) -> None:
        served.append(stream)
        if serve is not None:
            task = asyncio.ensure_future(serve(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    bridge = TunnelConnection(
        bridge_socket,
        bridge_mux or Multiplexer(Role.BRIDGE),
        label="bridge end",
        heartbeat_interval=heartbeat_interval,
        dead_after=dead_after,
    )
    agent = TunnelConnection(
        agent_socket,
        agent_mux or Multiplexer(Role.AGENT),
        label="agent end",
        on_stream=on_stream,
        heartbeat_interval=heartbeat_interval,
        dead_after=dead_after,
    )
    async with asyncio.timeout(5):
        await asyncio.gather(bridge.handshake(timeout=2), agent.handshake(timeout=2))
    runs = [asyncio.create_task(bridge.run()), asyncio.create_task(agent.run())]
    try:
        yield Tunnel(bridge, agent, bridge_socket, agent_socket, served)
    finally:
        async with asyncio.timeout(10):
            await bridge.close()
            await agent.close()
            await asyncio.gather(*runs)
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
