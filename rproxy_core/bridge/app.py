"""The Bridge: the public side, one aiohttp server for agents and visitors on one port."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import ssl
from dataclasses import dataclass, field
from importlib import resources
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Self

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .._version import __version__
from ..const import (
    CHALLENGE_PATH,
    CONNECT_PATH,
    DEAD_AFTER,
    DEFAULT_BRIDGE_HOST,
    DEFAULT_BRIDGE_PORT,
    HEADER_TIMEOUT,
    HEALTH_PATH,
    HEARTBEAT_INTERVAL,
    IDLE_TIMEOUT,
    MAX_HEADER_FIELD,
    MAX_HEADERS,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_CREDENTIAL,
    MAX_PENDING_HANDSHAKES_PER_SOURCE,
    MAX_REQUEST_HEAD,
    MAX_REQUEST_LINE,
    MAX_REQUESTS_PER_VISITOR,
    MAX_WEBSOCKETS_PER_VISITOR,
    METRICS_PATH,
    REQUEST_TIMEOUT,
    RESERVED_PREFIX,
    SHUTDOWN_GRACE,
    STATUS_JSON_PATH,
    STATUS_PAGE_PATH,
    TCP_PATH,
    VISITOR_WEBSOCKET_MESSAGE,
    WEBSOCKET_IDLE_TIMEOUT,
    WEBSOCKET_MESSAGE_RATE,
)
from ..exceptions import ConfigError
from ..gateway import GatewayConfig
from ..headers import non_ascii_field
from ..logsafe import printable
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_WEBSOCKET
from ..transport.budget import DEFAULT_PROCESS_BUDGET, DEFAULT_TUNNEL_BUDGET, MemoryBudget
from .agents import AgentHandler, Credential
from .auth import TokenAuth, TokenGrant
from .channels import ChannelHandler, TcpPort, TcpPortServer
from .gateway import bridge_gateway
from .keys import ChallengeStore, KeyAuth, KeyGrant
from .limits import BridgeRunner, HeadLimits, answer_expect
from .metrics import BridgeMetrics
from .pages import error_response
from .registry import MemoryRegistry, TunnelRegistry
from .routing import host_name, is_loopback_host
from .visitor_policy import DEFAULT_MAX_TRACKED_VISITORS, VisitorGuard, VisitorPolicy
from .visitors import VisitorHandler, behind_proxies

__all__ = ["Bridge", "BridgeConfig"]

_LOGGER = logging.getLogger("rproxy.bridge")


class _MalformedRequestFilter(logging.Filter):
    """One INFO line, not an ERROR with a traceback, for requests aiohttp could not parse.

    Anyone on the internet can send a bad request line or oversized headers; the visitor
    already got its 400/431, and the operator needs to know it happened, not where in aiohttp.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "malformed request from %s: %s"
            record.args = (
                record.args[0] if isinstance(record.args, tuple) and record.args else "?",
                str(exc).splitlines()[0],
            )
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


#: The aiohttp server's own log (protocol errors), kept apart from aiohttp's global logger.
_SERVER_LOGGER = logging.getLogger("rproxy.bridge.http")
_SERVER_LOGGER.addFilter(_MalformedRequestFilter())


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


@functools.cache
def _status_page_template() -> str:
    return resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")


_NO_CREDENTIALS = "no agent credential configured: pass --token, --token-file, --authorized-keys or --open-registration"


class Bridge:
    """Serve agents on /_rproxy/connect and visitors everywhere else, on one port.

    Usage::

        async with Bridge(BridgeConfig(port=8080, tokens=["s3cret"])) as bridge:
            await asyncio.Event().wait()
    """

    def __init__(self, config: BridgeConfig, *, registry: TunnelRegistry | None = None) -> None:
        self.config = config
        if config.domain is not None:
            config.domain = config.domain.strip(".").lower()
        self.auth = TokenAuth(config.tokens)
        self.keys = KeyAuth(config.authorized_keys, open_registration=config.open_registration)
        if not self.auth and not self.keys:
            raise ConfigError(_NO_CREDENTIALS)
        if config.open_registration and config.domain is None:
            raise ConfigError("--open-registration: needs --domain (each key's tunnel gets its own host name)")
        self.challenges = ChallengeStore()
        #: What all tunnels together may hold for visitors (each tunnel's budget is inside it).
        self.memory = MemoryBudget(config.memory_budget)
        self.registry = registry if registry is not None else MemoryRegistry(config.max_streams_per_tunnel)
        self.visitor_guard = VisitorGuard(config.visitor_policies, config.max_tracked_visitors)
        self.metrics = BridgeMetrics(self)
        self._admin = TokenAuth([config.admin_token]) if config.admin_token else None
        #: Set once stopping begins: visitors get 503, new agents are refused.
        self.draining = False
        #: Set once the tunnels close: one finishing its handshake is closed too.
        self.stopping = False
        self._hurry = asyncio.Event()
        self._agents = AgentHandler(self)
        self.gateway = bridge_gateway(self)
        self.app = self._make_app()
        self.tcp_ports = [TcpPortServer(self, port) for port in config.tcp_ports]
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port: int | None = None

    def _make_app(self) -> web.Application:
        app = web.Application(
            handler_args={
                "max_line_size": MAX_REQUEST_LINE,
                "max_field_size": MAX_HEADER_FIELD,
                "max_headers": MAX_HEADERS,
                "keepalive_timeout": self.config.idle_timeout,
            },
            middlewares=[_refuse_non_ascii_fields],
        )
        # Bound ``__call__``s, not the handler objects: aiohttp takes a callable object for a
        # deprecated plain-function handler (DeprecationWarning now, an error in aiohttp 4).
        # Every route answers Expect our way (limits.answer_expect), not with aiohttp's default.
        get = functools.partial(app.router.add_get, expect_handler=answer_expect)
        route = functools.partial(app.router.add_route, expect_handler=answer_expect)
        get(CONNECT_PATH, self._agents.__call__)
        get(HEALTH_PATH, self._health)
        get(CHALLENGE_PATH, self._challenge)
        get(TCP_PATH + "/{tunnel}/{service}", ChannelHandler(self).__call__)
        get(METRICS_PATH, self._metrics)
        get(STATUS_JSON_PATH, self._status_json)
        get(STATUS_PAGE_PATH, self._status_page)
        route("*", RESERVED_PREFIX + "{tail:.*}", self._reserved)
        visitors = VisitorHandler(self).__call__
        route("*", "/{tail:.*}", self.gateway.front(visitors) if self.gateway else visitors)
        app.on_shutdown.append(self._close_tunnels)
        return app

    async def start(self) -> None:
        """Listen; raises OSError (e.g. address in use) before anything is left running."""
        # handler_cancellation: a visitor who hangs up cancels its handler, which resets the
        # stream, which makes the agent drop its request to the home app.
        runner = BridgeRunner(
            self.app,
            HeadLimits(MAX_REQUEST_LINE, MAX_HEADER_FIELD, MAX_REQUEST_HEAD, MAX_HEADERS, self.config.header_timeout),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            # The grace period was spent in stop(), before the tunnels closed; what is left
            # (visitor WebSockets, keep-alive connections) closes at once.
            shutdown_timeout=1.0,
            logger=_SERVER_LOGGER,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=self.config.ssl_context)
        started: list[TcpPortServer] = []
        try:
            await site.start()
            for port in self.tcp_ports:
                await port.start()
                started.append(port)
        except BaseException:
            for port in started:
                await port.stop()
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        if self.gateway is not None:
            await self.gateway.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        _LOGGER.info(
            "bridge listening on %s (agents connect to %s)", self.url, self.url.replace("http", "ws", 1) + CONNECT_PATH
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: stop listening, let streams in flight finish, then close the tunnels.

        For up to ``grace`` seconds (default: ``config.shutdown_grace``) requests already
        relayed may finish (a download in progress completes); visitors who ask for more
        meanwhile get 503 with ``Retry-After``. Then every agent gets GOAWAY, which sends it to
        reconnect (to this address again: another bridge, or this one restarted). Visitor
        WebSockets are not waited for; they close with the tunnels.
        """
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        self.draining = True
        for site in list(runner.sites):
            await site.stop()  # closes the listening socket; open connections stay
        for port in self.tcp_ports:
            await port.stop()
        grace = self.config.shutdown_grace if grace is None else grace
        if grace > 0 and self._streams_in_flight():
            _LOGGER.info("stopping: waiting up to %gs for %d request(s) in flight", grace, self._streams_in_flight())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    while self._streams_in_flight() and not self._hurry.is_set():
                        await asyncio.sleep(0.05)
            if self._streams_in_flight():
                _LOGGER.info("stopping: %d request(s) still in flight are cut off", self._streams_in_flight())
        # Say goodbye before aiohttp's cleanup: from its pre-shutdown step on, aiohttp drops
        # whatever a connection receives, so close handshakes (and the HELLO of an agent
        # still connecting) would go unread until timeouts ran out.
        if self.gateway is not None:  # its disconnect POSTs may need the tunnels: before they close
            await self.gateway.stop()
        await self._close_tunnels(self.app)
        await runner.cleanup()

    def hurry(self) -> None:
        """End the grace period of a stop in progress now (a second SIGTERM or Ctrl-C)."""
        self._hurry.set()

    def _streams_in_flight(self) -> int:
        # Visitor WebSockets are left out: a dashboard's live socket never "finishes", and its
        # page reconnects by itself.
        return sum(1 for c in self.registry.connections() for s in c.streams.values() if s.head.kind != KIND_WEBSOCKET)

    async def set_tokens(self, tokens: list[str | TokenGrant]) -> int:
        """Replace the accepted tokens; tunnels whose token is gone are closed. Returns how many.

        Raises:
            ConfigError: ``tokens`` is empty (a bridge without tokens would serve nobody).
        """
        auth = TokenAuth(tokens)
        if not auth and not self.keys:
            raise ConfigError(_NO_CREDENTIALS)
        self.config.tokens = list(tokens)
        self.auth = auth
        return await self._agents.revoke()

    async def set_keys(self, grants: list[KeyGrant]) -> int:
        """Replace the authorized keys; tunnels of keys no longer allowed are closed. Returns how many."""
        keys = KeyAuth(grants, open_registration=self.config.open_registration)
        if not self.auth and not keys:
            raise ConfigError(_NO_CREDENTIALS)
        self.config.authorized_keys = list(grants)
        self.keys = keys
        return await self._agents.revoke()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Base URL of this bridge as reachable on its listen address."""
        scheme = "https" if self.config.ssl_context else "http"
        host = self.config.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port or self.config.port}"

    def credential(self, request: web.Request, name: str) -> Credential | str:
        """What the request's agent token or key proves for tunnel ``name`` (a str: why nothing)."""
        return self._agents.credential(request, name)

    def visitor_address(self, request: web.Request) -> tuple[str, str]:
        """The visitor's address and scheme as the bridge believes them (the forwarded ones
        from trusted proxies)."""
        address, scheme = request.remote or "", "https" if request.secure else "http"
        trusted = self.config.trusted_proxies
        if trusted:
            address, scheme = behind_proxies(request, address, scheme, trusted)
        return address, scheme

    def agent_address(self, request: web.Request) -> str:
        """Where an agent (or a client asking for a challenge) connects from: behind a trusted
        proxy, the address it forwards (else every agent would share the proxy's allowance)."""
        source = request.remote or "?"
        if self.config.trusted_proxies:
            source, _ = behind_proxies(request, source, "http", self.config.trusted_proxies)
        return source

    def service_url_setting(self, name: str, request: web.BaseRequest) -> dict[str, str]:
        """For an agent's HELLO: its web services' address, ``{service}`` standing for the name.

        Only with a domain: without one, which names reach a service depends on the DNS.
        """
        if self.config.domain is None:
            return {}
        return {"service_url": self.public_url(name, request).replace("://", "://{service}.", 1)}

    def public_url(self, name: str, request: web.BaseRequest) -> str:
        """The address visitors use for tunnel ``name``, as seen from the agent's request."""
        scheme = "https" if request.secure else "http"
        host = request.host
        port = ""
        if not host.startswith("[") and host.count(":") == 1:
            port = ":" + host.rsplit(":", 1)[1]
        if self.config.domain is None:
            # With a second tunnel and no domain, the first label of the Host picks the tunnel
            # (routing.py): on this machine NAME.localhost reaches it (it resolves to loopback).
            if any(other != name for other in self.registry.names()) and is_loopback_host(host_name(host)):
                return f"{scheme}://{name}.localhost{port}/"
            return f"{scheme}://{host}/"
        return f"{scheme}://{name}.{self.config.domain}{port}/"

    async def _close_tunnels(self, app: web.Application) -> None:
        self.stopping = True
        connections = self.registry.connections() + self._agents.handshaking()
        if connections:
            _LOGGER.info("closing %d tunnel(s)", len(connections))
        with contextlib.suppress(Exception):
            await asyncio.gather(*(c.close(ErrorCode.NO_ERROR, "bridge shutting down") for c in connections))

    async def _health(self, request: web.Request) -> web.Response:
        tunnels: dict[str, Any] = {name: {"agents": count} for name, count in self.registry.tunnels().items()}
        return web.json_response({"status": "ok", "version": __version__, "tunnels": tunnels})

    async def _challenge(self, request: web.Request) -> web.Response:
        # Per client: behind a trusted proxy, the address it forwards (else every agent would
        # share the proxy's allowance).
        nonce = self.challenges.issue(self.agent_address(request))
        return web.json_response(
            {"nonce": nonce, "expires_in": self.challenges.lifetime}, headers={"Cache-Control": "no-store"}
        )

    def visitor_connections(self) -> int:
        """HTTP connections open to the bridge, less the agents' own."""
        runner = self._runner
        if runner is None or runner.server is None:
            return 0
        agents = len(self.registry.connections()) + len(self._agents.handshaking())
        return max(len(runner.server.connections) - agents, 0)

    def _admin_refusal(self, request: web.Request) -> web.Response | None:
        """None if the request carries the admin token; else the answer (404 when there is none)."""
        if self._admin is None:
            return error_response(request, 404, "no such bridge endpoint (set an admin token to enable it)")
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token or self._admin.match(token) is None:
            _LOGGER.warning(
                "refused %s %s from %s: %s admin token",
                request.method,
                request.path,
                request.remote,
                "wrong" if token else "no",
            )
            return error_response(
                request, 401, "the admin token is required", {"WWW-Authenticate": 'Bearer realm="rproxy"'}
            )
        return None

    async def _metrics(self, request: web.Request) -> web.Response:
        refused = self._admin_refusal(request)
        if refused is not None:
            return refused
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    async def _status_json(self, request: web.Request) -> web.Response:
        refused = self._admin_refusal(request)
        if refused is not None:
            return refused
        status = {"version": __version__, **self.metrics.snapshot()}
        return web.json_response(status, headers={"Cache-Control": "no-store"})

    async def _status_page(self, request: web.Request) -> web.Response:
        # The page itself holds no data (it asks for the token, then fetches status.json with
        # it), so it is served to anyone, but only where an admin token makes it usable.
        if self._admin is None:
            return error_response(request, 404, "no such bridge endpoint (set an admin token to enable it)")
        nonce = secrets.token_urlsafe(16)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return web.Response(
            text=_status_page_template().replace("__NONCE__", nonce),
            content_type="text/html",
            headers={
                "Content-Security-Policy": csp,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def _reserved(self, request: web.Request) -> web.Response:
        return error_response(request, 404, "no such bridge endpoint")


@web.middleware
async def _refuse_non_ascii_fields(request: web.Request, handler: Handler) -> web.StreamResponse:
    """400 for a request whose credentials or WebSocket handshake fields are not ASCII.

    Checked once for every endpoint (visitors, /_rproxy/connect, /_rproxy/tcp, the admin
    pages), so that no handler meets bytes its parser cannot take (docs: SECURITY.md).
    """
    bad = non_ascii_field(request.headers)
    if bad is None:
        return await handler(request)
    _LOGGER.info(
        "refused %s %s from %s: %s is not printable ASCII",
        request.method,
        printable(request.raw_path, 200),
        request.remote,
        bad,
    )
    response = error_response(request, 400, f"the {bad} header must be printable ASCII")
    response.force_close()
    return response
