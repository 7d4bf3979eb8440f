"""Where the bridge finds tunnels: the registry seam (DESIGN.md, "Registry seam").

Handlers ask a registry two things: which tunnels exist, and to open a stream to the tunnel
named N. The in-memory registry answers from the agent connections held by this process. A
Redis-backed registry can answer the same questions across several bridge nodes, so that a
visitor on node A reaches an agent held by node B, without handlers changing.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Collection, Mapping

from ..exceptions import NoAgentError, RproxyError, TunnelClosedError
from ..protocol.heads import KIND_HTTP, KIND_TCP, RequestHead
from ..transport import TunnelConnection, TunnelStream

__all__ = ["TunnelRegistry", "MemoryRegistry", "TunnelBusyError", "NoServiceError", "MAIN_SERVICE"]

#: What an agent that announced no services offers: its main web app.
MAIN_SERVICE: Mapping[str, str] = {"": KIND_HTTP}


class TunnelBusyError(RproxyError):
    """The tunnel has agents, but they (or the tunnel's limit) take no more streams now."""


class NoServiceError(RproxyError):
    """The tunnel has agents, but none offers the service the stream is for (as that kind)."""


def _service_kind(head: RequestHead) -> str:
    return KIND_TCP if head.kind == KIND_TCP else KIND_HTTP


class TunnelRegistry(abc.ABC):
    """The bridge's view of connected agents."""

    @abc.abstractmethod
    async def add(self, name: str, connection: TunnelConnection, services: Mapping[str, str] = MAIN_SERVICE) -> None:
        """An agent finished its handshake for tunnel ``name``, offering ``services`` (name → kind)."""

    @abc.abstractmethod
    async def remove(self, name: str, connection: TunnelConnection) -> None:
        """That agent is gone; no new stream may go to it."""

    @abc.abstractmethod
    async def open_stream(self, name: str, head: RequestHead, *, end_stream: bool) -> TunnelStream:
        """Open a stream on one agent of tunnel ``name`` offering ``head.service`` (spreading
        load over the pool).

        Raises:
            NoAgentError: no live agent serves ``name``.
            NoServiceError: agents serve ``name``, but none offers that service as that kind.
            TunnelBusyError: agents serve ``name`` but none takes another stream now.
        """

    @abc.abstractmethod
    def service_kind(self, name: str, service: str) -> str | None:
        """The kind (``http``, ``tcp``) of a service of tunnel ``name``; None if no agent offers it."""

    @abc.abstractmethod
    def names(self) -> Collection[str]:
        """Names of the tunnels that have at least one agent (cheap: asked per request)."""

    @abc.abstractmethod
    def tunnels(self) -> Mapping[str, int]:
        """Tunnel names with the number of agents serving each."""

    @abc.abstractmethod
    def connections(self) -> list[TunnelConnection]:
        """Agent connections held by this bridge process."""

    @abc.abstractmethod
    def connections_by_tunnel(self) -> Mapping[str, list[TunnelConnection]]:
        """Agent connections held by this bridge process, by tunnel name."""


class MemoryRegistry(TunnelRegistry):
    """Tunnels held by this process (the embedded default)."""

    def __init__(self, max_streams_per_tunnel: int | None = None) -> None:
        #: Streams at once over all agents of one tunnel; None: each agent's own limit only.
        self.max_streams_per_tunnel = max_streams_per_tunnel
        self._pools: dict[str, list[TunnelConnection]] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        self._services: dict[TunnelConnection, Mapping[str, str]] = {}

    async def add(self, name: str, connection: TunnelConnection, services: Mapping[str, str] = MAIN_SERVICE) -> None:
        self._pools.setdefault(name, []).append(connection)
        self._services[connection] = services
        self._turns.setdefault(name, itertools.count())
        # Leave the pool the moment the tunnel starts closing, not when its handler returns.
        connection.on_close(lambda closed: self._discard(name, closed))

    async def remove(self, name: str, connection: TunnelConnection) -> None:
        self._discard(name, connection)

    def _discard(self, name: str, connection: TunnelConnection) -> None:
        pool = self._pools.get(name)
        if pool is None or connection not in pool:
            return
        pool.remove(connection)
        self._services.pop(connection, None)
        if not pool:
            del self._pools[name]
            del self._turns[name]

    async def open_stream(self, name: str, head: RequestHead, *, end_stream: bool) -> TunnelStream:
        pool = self._pools.get(name)
        if not pool:
            raise NoAgentError(name)
        limit = self.max_streams_per_tunnel
        if limit is not None and sum(len(c.streams) for c in pool) >= limit:
            raise TunnelBusyError(f"tunnel {name!r} is at its limit of {limit} streams")
        start = next(self._turns[name])
        full = offered = False
        service, kind = head.service, _service_kind(head)
        # Round robin, skipping agents that are closing, full or without the service; each is
        # tried at most once.
        for offset in range(len(pool)):
            connection = pool[(start + offset) % len(pool)]
            if connection.closed:
                continue
            if self._services[connection].get(service) != kind:
                continue
            offered = True
            try:
                return connection.open_stream(head, end_stream=end_stream)
            except TunnelClosedError:
                # Refused while open: it is at the stream limit it announced in its HELLO.
                full = full or not connection.closed
        if full:
            raise TunnelBusyError(f"every agent of tunnel {name!r} is at its stream limit")
        if not offered and any(not c.closed for c in pool):
            raise NoServiceError(f"tunnel {name!r} has no {kind} service {service!r}")
        raise NoAgentError(name)

    def service_kind(self, name: str, service: str) -> str | None:
        for connection in self._pools.get(name, ()):
            kind = self._services[connection].get(service)
            if kind is not None:
                return kind
        return None

    def names(self) -> Collection[str]:
        return self._pools.keys()

    def tunnels(self) -> Mapping[str, int]:
        return {name: sum(1 for c in pool if not c.closed) for name, pool in self._pools.items()}

    def connections(self) -> list[TunnelConnection]:
        return [c for pool in self._pools.values() for c in pool]

    def connections_by_tunnel(self) -> Mapping[str, list[TunnelConnection]]:
        return {name: list(pool) for name, pool in self._pools.items()}
