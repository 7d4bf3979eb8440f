"""What the bridge counts, for ``/_rproxy/metrics`` (Prometheus) and ``/_rproxy/status``.

Counting stays on the hot path's terms: plain integers and one histogram bucket per request,
updated where the request ends; nothing is formatted until someone scrapes. The exposition
itself is prometheus-client's (its text format and escaping), through a collector that reads
these counts and the live tunnels at scrape time.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..protocol.heads import KIND_WEBSOCKET
from ..transport import TunnelConnection
from .registry import TunnelRegistry

__all__ = ["BridgeMetrics", "LATENCY_BUCKETS", "TunnelCounts"]

#: Upper bounds (seconds) of the request latency histogram: from a LAN-fast answer to the
#: request timeout's neighbourhood.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Status classes a request is counted under (499: the visitor left before the answer).
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_ERRORS = ("502", "503", "504")


@dataclass(slots=True)
class TunnelCounts:
    """Counters of one tunnel name since the bridge started."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_CLASSES, 0))
    #: The bridge's own failure answers, by code: the agent or home app unreachable (502), no
    #: agent or busy (503), too slow (504).
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_ERRORS, 0))
    #: Latency histogram: counts per bucket of LATENCY_BUCKETS (+Inf last), and the sum.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    #: Tunnel bytes (frames) of connections that have closed; live ones are read at scrape time.
    bytes_received_closed: int = 0
    bytes_sent_closed: int = 0
    resets_received_closed: int = 0
    resets_sent_closed: int = 0
    agent_connects: int = 0


class BridgeMetrics:
    """The bridge's counts, and their exposition."""

    def __init__(self, registry: TunnelRegistry) -> None:
        self._tunnels = registry
        #: Read at scrape time; the bridge sets them once its server and gateway exist.
        self.visitor_connections: Callable[[], int] = lambda: 0
        self.gateway: Callable[[], dict[str, Any]] | None = None
        self.started = time.time()
        self.tunnels: defaultdict[str, TunnelCounts] = defaultdict(TunnelCounts)
        self.handshake_failures: defaultdict[str, int] = defaultdict(int)
        #: Requests answered by the bridge before any tunnel was chosen (404 unknown host, 503 draining).
        self.unrouted: dict[str, int] = dict.fromkeys(_CLASSES, 0)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Exposition(self))

    def request_done(self, tunnel: str | None, status: int, seconds: float) -> None:
        """One visitor request (or WebSocket) ended with ``status`` after ``seconds``."""
        status_class = f"{min(max(status // 100, 1), 5)}xx"
        if tunnel is None:
            self.unrouted[status_class] += 1
            return
        counts = self.tunnels[tunnel]
        counts.requests[status_class] += 1
        if 502 <= status <= 504:
            counts.errors[str(status)] += 1
        if status != 101:  # a WebSocket's time is its lifetime, not an answer's latency
            counts.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            counts.latency_sum += seconds

    def agent_connected(self, tunnel: str, connection: TunnelConnection) -> None:
        """An agent joined ``tunnel``; its traffic is kept when it goes."""
        counts = self.tunnels[tunnel]
        counts.agent_connects += 1
        connection.on_close(lambda closed: self._agent_gone(counts, closed))

    def handshake_failed(self, reason: str) -> None:
        """An agent was refused (``reason``: a short fixed word, never anything it sent)."""
        self.handshake_failures[reason] += 1

    @staticmethod
    def _agent_gone(counts: TunnelCounts, connection: TunnelConnection) -> None:
        mux = connection.mux
        counts.bytes_received_closed += mux.bytes_received
        counts.bytes_sent_closed += mux.bytes_sent
        counts.resets_received_closed += mux.resets_received
        counts.resets_sent_closed += mux.resets_sent

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain data (the status JSON), read now."""
        live: defaultdict[str, list[TunnelConnection]] = defaultdict(list)
        for name, connections in self._tunnels.connections_by_tunnel().items():
            live[name].extend(connections)
        names = sorted(set(self.tunnels) | set(live))
        tunnels = []
        now = time.time()
        for name in names:
            counts = self.tunnels.get(name) or TunnelCounts()
            connections = live.get(name, [])
            received = counts.bytes_received_closed + sum(c.mux.bytes_received for c in connections)
            sent = counts.bytes_sent_closed + sum(c.mux.bytes_sent for c in connections)
            tunnels.append(
                {
                    "name": name,
                    "agents": [
                        {
                            "id": c.peer_id,
                            "address": c.socket.remote,
                            "connected_since": c.connected_at,
                            "connected_seconds": round(now - c.connected_at, 3),
                            "protocol": c.peer_settings.get("version"),
                            "software": str(c.peer_settings.get("software", ""))[:64],
                            "rtt_ms": round(c.rtt * 1000, 3) if c.rtt is not None else None,
                            # The least lately (what windows tune by) and the credit granted beyond the
                            # fixed windows: docs/PROTOCOL.md §5.
                            "link_rtt_ms": round(c.mux.link_rtt * 1000, 3) if c.mux.link_rtt is not None else None,
                            "tuned_window_bytes": c.mux.tuned_bytes,
                            "streams": len(c.streams),
                            "websockets": sum(1 for s in c.streams.values() if s.head.kind == KIND_WEBSOCKET),
                        }
                        for c in connections
                    ],
                    "requests": dict(counts.requests),
                    "errors": dict(counts.errors),
                    "bytes_from_agents": received,
                    "bytes_to_agents": sent,
                    "stream_resets": counts.resets_received_closed
                    + counts.resets_sent_closed
                    + sum(c.mux.resets_received + c.mux.resets_sent for c in connections),
                    "agent_connects": counts.agent_connects,
                }
            )
        return {
            "started": self.started,
            "uptime_seconds": round(now - self.started, 3),
            "visitor_connections": self.visitor_connections(),
            "tunnels": tunnels,
            "unrouted_requests": dict(self.unrouted),
            "handshake_failures": dict(self.handshake_failures),
            **({"gateway": self.gateway()} if self.gateway is not None else {}),
        }


class _Exposition(Collector):
    """Reads the counts and live tunnels into Prometheus metric families at scrape time."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        status = metrics.snapshot()
        tunnels = status["tunnels"]
        connected = [t for t in tunnels if t["agents"]]
        yield GaugeMetricFamily("rproxy_tunnels", "Tunnels with at least one agent connected.", value=len(connected))
        agents = GaugeMetricFamily("rproxy_agents", "Agents connected, per tunnel.", labels=["tunnel"])
        streams = GaugeMetricFamily(
            "rproxy_streams",
            "Streams in flight (requests, WebSockets, TCP connections), per tunnel.",
            labels=["tunnel"],
        )
        websockets = GaugeMetricFamily(
            "rproxy_visitor_websockets", "Visitor WebSockets open, per tunnel.", labels=["tunnel"]
        )
        for tunnel in connected:
            agents.add_metric([tunnel["name"]], len(tunnel["agents"]))
            streams.add_metric([tunnel["name"]], sum(a["streams"] for a in tunnel["agents"]))
            websockets.add_metric([tunnel["name"]], sum(a["websockets"] for a in tunnel["agents"]))
        yield agents
        yield streams
        yield websockets
        yield GaugeMetricFamily(
            "rproxy_visitor_connections",
            "Visitor HTTP connections open to the bridge.",
            value=status["visitor_connections"],
        )
        requests = CounterMetricFamily(
            "rproxy_requests", "Visitor requests answered, by tunnel and status class.", labels=["tunnel", "code"]
        )
        for tunnel in tunnels:
            for status_class, count in tunnel["requests"].items():
                requests.add_metric([tunnel["name"], status_class], count)
        yield requests
        unrouted = CounterMetricFamily(
            "rproxy_unrouted_requests",
            "Requests the bridge answered itself before any tunnel (unknown host, restarting).",
            labels=["code"],
        )
        for status_class, count in status["unrouted_requests"].items():
            unrouted.add_metric([status_class], count)
        yield unrouted
        received = CounterMetricFamily(
            "rproxy_tunnel_received_bytes", "Bytes received from agents over tunnels.", labels=["tunnel"]
        )
        sent = CounterMetricFamily("rproxy_tunnel_sent_bytes", "Bytes sent to agents over tunnels.", labels=["tunnel"])
        resets = CounterMetricFamily(
            "rproxy_stream_resets", "Streams reset (either side), per tunnel.", labels=["tunnel"]
        )
        connects = CounterMetricFamily(
            "rproxy_agent_connects", "Agent connections accepted (reconnects included).", labels=["tunnel"]
        )
        for tunnel in tunnels:
            received.add_metric([tunnel["name"]], tunnel["bytes_from_agents"])
            sent.add_metric([tunnel["name"]], tunnel["bytes_to_agents"])
            resets.add_metric([tunnel["name"]], tunnel["stream_resets"])
            connects.add_metric([tunnel["name"]], tunnel["agent_connects"])
        yield received
        yield sent
        yield resets
        yield connects
        failures = CounterMetricFamily(
            "rproxy_agent_handshake_failures", "Agents refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(status["handshake_failures"].items()):
            failures.add_metric([reason], count)
        yield failures
        latency = HistogramMetricFamily(
            "rproxy_request_duration_seconds",
            "Visitor request time at the bridge, to the end of the answer.",
            labels=["tunnel"],
        )
        for name, counts in sorted(metrics.tunnels.items()):
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts.buckets, strict=True):
                running += count
                cumulative.append((_bucket_label(bound), running))
            latency.add_metric([name], cumulative, sum_value=counts.latency_sum)
        yield latency
        yield GaugeMetricFamily(
            "rproxy_start_time_seconds", "When the bridge started (Unix time).", value=metrics.started
        )
        gateway = status.get("gateway")
        if gateway is not None:  # docs/GATEWAY.md, "Limits and failures"
            yield GaugeMetricFamily(
                "rproxy_gateway_connections", "Gateway WebSocket clients connected.", value=gateway["open"]
            )
            for key, text in _GATEWAY_COUNTERS.items():
                yield CounterMetricFamily(f"rproxy_gateway_{key}", text, value=gateway[key])


_GATEWAY_COUNTERS = {
    "accepted": "Gateway WebSocket clients accepted.",
    "refused": "Gateway connections refused before the upgrade (allowlist, limits, connect URL).",
    "frames_in": "Frames from gateway clients (each one POST).",
    "frames_out": "Frames sent to gateway clients by callbacks.",
    "bytes_in": "Bytes of frames from gateway clients.",
    "bytes_out": "Bytes of frames sent to gateway clients.",
    "delivery_failures": "Gateway clients closed because their frames could not be delivered.",
    "callbacks_refused": "Callback requests refused (unknown id, rate, pending sends).",
}


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
