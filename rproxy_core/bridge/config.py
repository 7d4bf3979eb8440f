"""The bridge's settings: what an embedder passes to ``Bridge`` and the CLI fills in."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from ..const import (
    DEAD_AFTER,
    DEFAULT_BRIDGE_HOST,
    DEFAULT_BRIDGE_PORT,
    HEADER_TIMEOUT,
    HEARTBEAT_INTERVAL,
    IDLE_TIMEOUT,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_CREDENTIAL,
    MAX_PENDING_HANDSHAKES_PER_SOURCE,
    MAX_REQUESTS_PER_VISITOR,
    MAX_WEBSOCKETS_PER_VISITOR,
    REQUEST_TIMEOUT,
    SHUTDOWN_GRACE,
    VISITOR_WEBSOCKET_MESSAGE,
    WEBSOCKET_IDLE_TIMEOUT,
    WEBSOCKET_MESSAGE_RATE,
)
from ..gateway import GatewayConfig
from ..transport.budget import DEFAULT_PROCESS_BUDGET, DEFAULT_TUNNEL_BUDGET
from .auth import TokenGrant
from .keys import KeyGrant
from .visitor_policy import DEFAULT_MAX_TRACKED_VISITORS, VisitorPolicy, address_allowed

__all__ = ["BridgeConfig", "TcpPort"]


@dataclass(frozen=True, slots=True)
class TcpPort:
    """An extra public port of the bridge, carrying its connections to one TCP service."""

    host: str
    port: int
    tunnel: str
    service: str
    #: Client addresses allowed to connect (required: ``0.0.0.0/0`` says "anyone" out loud).
    allow: tuple[IPv4Network | IPv6Network, ...] = field(default_factory=tuple)

    def admits(self, address: str) -> bool:
        return address_allowed(address.split("%", 1)[0], self.allow)


@dataclass(slots=True)
class BridgeConfig:
    """Settings of a bridge; the CLI fills it from flags, environment and config file."""

    host: str = DEFAULT_BRIDGE_HOST
    port: int = DEFAULT_BRIDGE_PORT
    #: Accepted agent tokens: plain strings serve any tunnel name, TokenGrants only theirs.
    tokens: list[str | TokenGrant] = field(default_factory=list)
    domain: str | None = None
    request_timeout: float = REQUEST_TIMEOUT
    ssl_context: ssl.SSLContext | None = None
    access_log: bool = True
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    dead_after: float = DEAD_AFTER
    #: Seconds a stopping bridge lets visitor requests in flight finish before it closes the
    #: tunnels (new requests meanwhile get 503 with Retry-After).
    shutdown_grace: float = SHUTDOWN_GRACE
    #: Proxies in front of the bridge (a load balancer, nginx, Cloudflare) whose
    #: X-Forwarded-For and X-Forwarded-Proto are believed; from anyone else they are replaced.
    trusted_proxies: list[IPv4Network | IPv6Network] = field(default_factory=list)
    #: Largest visitor request body in bytes (413 beyond it); None: no limit.
    max_body_size: int | None = None
    #: Visitor protection per tunnel name (allowlist, login, rate limit); agents may ask for
    #: more in their HELLO, but where this sets a part, this wins.
    visitor_policies: dict[str, VisitorPolicy] = field(default_factory=dict)
    #: Visitor addresses remembered per protected tunnel (bounded: this faces the internet).
    max_tracked_visitors: int = DEFAULT_MAX_TRACKED_VISITORS
    #: Seconds a visitor has to send a request head (408 and hang up after); None: no limit.
    header_timeout: float | None = HEADER_TIMEOUT
    #: Seconds a kept-alive visitor connection may sit without a request.
    idle_timeout: float = IDLE_TIMEOUT
    #: Streams (requests in flight, WebSockets) at once over all agents of one tunnel; more
    #: get 503 with Retry-After. None: only each agent's own limit applies.
    max_streams_per_tunnel: int | None = None
    #: Agents upgraded but not through HELLO at once; more get 503 before the upgrade.
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    #: Of those, most from one source address (IPv6: one /64), and most with one token or key.
    max_pending_handshakes_per_source: int = MAX_PENDING_HANDSHAKES_PER_SOURCE
    max_pending_handshakes_per_credential: int = MAX_PENDING_HANDSHAKES_PER_CREDENTIAL
    #: Requests in flight and WebSockets open at once from one visitor address (IPv6: one
    #: /64) to one tunnel; more get 429. None: no per-visitor cap.
    max_requests_per_visitor: int | None = MAX_REQUESTS_PER_VISITOR
    max_websockets_per_visitor: int | None = MAX_WEBSOCKETS_PER_VISITOR
    #: Largest WebSocket message a visitor may send (closed with 1009 beyond it).
    max_websocket_message: int = VISITOR_WEBSOCKET_MESSAGE
    #: Seconds of silence after which a visitor WebSocket is pinged; one that does not answer
    #: within half that again is closed.
    websocket_idle_timeout: float = WEBSOCKET_IDLE_TIMEOUT
    #: WebSocket messages a visitor may send per second (closed with 1008 beyond it).
    websocket_message_rate: int = WEBSOCKET_MESSAGE_RATE
    #: Bytes all tunnels together, and each tunnel connection, may hold received from agents
    #: and not yet taken by visitors; when spent, new requests get 503 (transport/budget.py).
    memory_budget: int = DEFAULT_PROCESS_BUDGET
    tunnel_memory_budget: int = DEFAULT_TUNNEL_BUDGET
    #: Agent keys accepted (each with the names it may claim), beside or instead of tokens.
    authorized_keys: list[KeyGrant] = field(default_factory=list)
    #: Any key may connect, under the name derived from it (``keys.derived_name``).
    open_registration: bool = False
    #: Host names the operator maps to a tunnel's service (``garden.example.com`` → service
    #: ``garden`` of tunnel ``home``: ``("home", "garden")``), beside ``<service>.<tunnel>.<domain>``.
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Extra public TCP ports, each carrying its connections to one TCP service.
    tcp_ports: list[TcpPort] = field(default_factory=list)
    #: Opens /_rproxy/metrics and /_rproxy/status.json to ``Authorization: Bearer`` with this
    #: token (or its ``sha256:`` hash); without one they do not exist (404).
    admin_token: str | None = field(default=None, repr=False)
    #: A WebSocket-to-POST gateway on one host name of the bridge's port (docs/GATEWAY.md).
    gateway: GatewayConfig | None = None
