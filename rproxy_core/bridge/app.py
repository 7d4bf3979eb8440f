"""The Bridge: the public side, one aiohttp server for agents and visitors on one port."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from importlib import resources
from typing import Any, Self

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .._version import __version__
from ..const import (
    CHALLENGE_PATH,
    CONNECT_PATH,
    HEALTH_PATH,
    MAX_HEADER_FIELD,
    MAX_HEADERS,
    MAX_REQUEST_HEAD,
    MAX_REQUEST_LINE,
    METRICS_PATH,
    RESERVED_PREFIX,
    STATUS_JSON_PATH,
    STATUS_PAGE_PATH,
    TCP_PATH,
)
from ..exceptions import ConfigError
from ..headers import non_ascii_field
from ..logsafe import printable
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_WEBSOCKET
from ..transport.budget import MemoryBudget
from .agents import AgentHandler
from .auth import TokenAuth, TokenGrant
from .channels import ChannelHandler, TcpPortServer
from .config import BridgeConfig, TcpPort
from .context import BridgeContext, Credential
from .gateway import bridge_gateway
from .keys import ChallengeStore, KeyAuth, KeyGrant
from .limits import BridgeRunner, HeadLimits, answer_expect
from .metrics import BridgeMetrics
from .pages import error_response
from .registry import MemoryRegistry, TunnelRegistry
from .visitor_policy import VisitorGuard
from .visitors import VisitorHandler

__all__ = ["Bridge", "BridgeConfig", "TcpPort"]

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
        if config.domain is not None:
            config.domain = config.domain.strip(".").lower()
        auth = TokenAuth(config.tokens)
        keys = KeyAuth(config.authorized_keys, open_registration=config.open_registration)
        if not auth and not keys:
            raise ConfigError(_NO_CREDENTIALS)
        if config.open_registration and config.domain is None:
            raise ConfigError("--open-registration: needs --domain (each key's tunnel gets its own host name)")
        registry = registry if registry is not None else MemoryRegistry(config.max_streams_per_tunnel)
        #: All that the handlers see of the bridge.
        self.context = context = BridgeContext(config, registry, auth, keys)
        context.metrics.visitor_connections = self.visitor_connections
        self._admin = TokenAuth([config.admin_token]) if config.admin_token else None
        self._hurry = asyncio.Event()
        self._agents = AgentHandler(context)
        self.gateway = bridge_gateway(context)
        if self.gateway is not None:
            context.metrics.gateway = self.gateway.snapshot
        self.app = self._make_app()
        self.tcp_ports = [TcpPortServer(context, port) for port in config.tcp_ports]
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
        get(TCP_PATH + "/{tunnel}/{service}", ChannelHandler(self.context).__call__)
        get(METRICS_PATH, self._metrics)
        get(STATUS_JSON_PATH, self._status_json)
        get(STATUS_PAGE_PATH, self._status_page)
        route("*", RESERVED_PREFIX + "{tail:.*}", self._reserved)
        visitors = VisitorHandler(self.context).__call__
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
        self.context.draining = True
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
        self.context.auth = auth
        return await self._agents.revoke()

    async def set_keys(self, grants: list[KeyGrant]) -> int:
        """Replace the authorized keys; tunnels of keys no longer allowed are closed. Returns how many."""
        keys = KeyAuth(grants, open_registration=self.config.open_registration)
        if not self.auth and not keys:
            raise ConfigError(_NO_CREDENTIALS)
        self.config.authorized_keys = list(grants)
        self.context.keys = keys
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

    # What embedders and tests read of the shared state; the handlers hold the context itself.
    @property
    def config(self) -> BridgeConfig:
        return self.context.config

    @property
    def registry(self) -> TunnelRegistry:
        return self.context.registry

    @property
    def metrics(self) -> BridgeMetrics:
        return self.context.metrics

    @property
    def auth(self) -> TokenAuth:
        return self.context.auth

    @property
    def keys(self) -> KeyAuth:
        return self.context.keys

    @property
    def challenges(self) -> ChallengeStore:
        return self.context.challenges

    @property
    def memory(self) -> MemoryBudget:
        return self.context.memory

    @property
    def visitor_guard(self) -> VisitorGuard:
        return self.context.visitor_guard

    @property
    def draining(self) -> bool:
        return self.context.draining

    @property
    def stopping(self) -> bool:
        return self.context.stopping

    def credential(self, request: web.Request, name: str) -> Credential | str:
        """What the request's agent token or key proves for tunnel ``name`` (a str: why nothing)."""
        return self.context.credential(request, name)

    async def _close_tunnels(self, app: web.Application) -> None:
        self.context.stopping = True
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
        nonce = self.challenges.issue(self.context.agent_address(request))
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
