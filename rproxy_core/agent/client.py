"""The Agent: dials the bridge, keeps the tunnel alive, serves streams from the home app.

It reconnects forever after network loss or a bridge restart (exponential backoff with
jitter, capped near a minute) and stops for good only when the bridge refuses its
credentials or protocol, or shows a certificate other than the pinned one: retrying those
cannot help.

The token goes only where it cannot be read on the way: a wss:// bridge whose certificate
the system's CAs, a ``ca_file`` or a pin vouch for (checked within the TLS handshake, before
the upgrade request is written), or a plain ws:// bridge on this machine's loopback. Plain
ws:// across a network needs ``insecure``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, Self

import aiohttp
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from yarl import URL

from .._version import __version__
from ..const import (
    BACKOFF_RESET_AFTER,
    CONNECT_PATH,
    HANDSHAKE_TIMEOUT,
    HEADER_AGENT_ID,
    HEADER_PROTOCOL,
    HEADER_TUNNEL,
    TUNNEL_MESSAGE_LIMIT,
)
from ..dial import (
    ChallengeError,
    FatalRefusal,
    NoRedirects,
    NoSecretsFilter,
    OwnedSessionFrameSocket,
    PinMismatch,
    authorization,
    bridge_connect_url,
    bridge_tls_context,
    describe_error,
    fetch_nonce,
    is_cleartext_remote,
    refusal_error,
    untrusted_message,
)
from ..exceptions import AuthenticationError, ConfigError, RproxyConnectionError
from ..logsafe import printable
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_HTTP, KIND_TCP
from ..protocol.hello import BridgeHello
from ..protocol.mux import SUPPORTED_VERSIONS, Multiplexer, Role
from ..transport import FrameSocket, HandshakeError, TunnelConnection, TunnelStream, WebsocketsFrameSocket
from .backoff import Backoff
from .config import AgentConfig, check_service, check_target, is_deferred_target
from .state import AgentState, AgentStats
from .tcp import TcpService, parse_tcp_target
from .upstream import RedirectRefused, Upstream, create_upstream_session, refuse_redirect

__all__ = ["Agent"]

_LOGGER = logging.getLogger("rproxy.agent")

#: The logger handed to websockets for the tunnel connection.
_TUNNEL_LOGGER = logging.getLogger("rproxy.agent.websocket")
_TUNNEL_LOGGER.addFilter(NoSecretsFilter())


class Agent:
    """The home side of a tunnel.

    Usage::

        agent = Agent(AgentConfig(bridge="wss://bridge.example.com", token="...", target="http://127.0.0.1:8123"))
        await agent.start()
        ...
        await agent.stop()

    Args:
        config: the settings.
        session: an aiohttp session for requests to the home app. It must not decompress
            bodies nor keep cookies (see ``create_upstream_session``); by default the agent
            makes and closes its own.
        tunnel_session: an aiohttp session whose connection pool carries the tunnel (an
            application's shared session, e.g. Home Assistant's). Without it the agent dials
            with the websockets library.
        in_process: ``session`` reaches a server in this process (``create_inprocess_session``).
        admit: a visitor check, see :class:`Upstream`.
        service_session: with ``in_process``, the session for the web ``services``, which are
            reached over the network (the ``admit`` check is the main app's only). Without it an
            in-process agent offers no web services.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        tunnel_session: aiohttp.ClientSession | None = None,
        in_process: bool = False,
        admit: Callable[[str], str | None] | None = None,
        service_session: aiohttp.ClientSession | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.connect_url = bridge_connect_url(config.bridge)
        self._tls = bridge_tls_context(config.ca_file.strip() if config.ca_file else None, config.pinned_sha256())
        self.state = AgentState.STOPPED
        self.public_url: str | None = None
        self.last_error: str | None = None
        #: Why the agent gave up for good (AuthenticationError: the token was refused).
        self.failure: RproxyConnectionError | None = None
        self.connection: TunnelConnection | None = None
        self.connected_since: float | None = None
        self.reconnects = 0
        self._session = session
        self._owns_session = session is None
        self._tunnel_session = tunnel_session
        self._in_process = in_process
        self._admit = admit
        self._service_session = service_session
        #: Each service's kind and current target ("" is the main web app); None: a
        #: ``zeroconf:NAME`` app not found yet.
        self._kinds: dict[str, str] = {}
        self._targets: dict[str, str | None] = {}
        for service, target in ([("", config.target)] if config.target else []) + list(config.services.items()):
            self._kinds[service] = check_service(service or "main", target) if service else KIND_HTTP
            self._targets[service] = None if is_deferred_target(target) else target.strip()
        if (
            in_process
            and service_session is None
            and any(kind == KIND_HTTP for service, kind in self._kinds.items() if service)
        ):
            raise ConfigError("an in-process agent serves its own app only: web services need their own agent")
        #: What serves each service's streams, while the agent runs.
        self._handlers: dict[str, Upstream | TcpService] = {}
        self._task: asyncio.Task[None] | None = None
        self._stream_tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[Callable[[Agent], None]] = []
        self._stats_listeners: list[Callable[[AgentStats], None]] = []
        self._stats_timer: asyncio.TimerHandle | None = None
        self._stats_interval = 1.0
        self._served_before = 0  # requests of the Upstreams of earlier runs (start/stop)
        self._last_stats: AgentStats | None = None
        self._traffic_before = (0, 0)  # bytes in and out of tunnels that have closed
        self._connected = asyncio.Event()

    # Public API.

    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self._task is not None:
            return
        if self._session is None:
            self._session = create_upstream_session()
            self._owns_session = True
        config = self.config
        for service, target in self._targets.items():
            if self._kinds[service] == KIND_TCP and target is not None:
                host, port = parse_tcp_target(target)
                self._handlers[service] = TcpService(service, host, port)
                continue
            # An in-process agent's web services are apps on the network: their own session.
            networked = self._in_process and bool(service)
            session = self._service_session if networked else self._session
            assert session is not None  # __init__ refused web services without one
            self._handlers[service] = Upstream(
                target,
                session,
                request_timeout=config.request_timeout,
                forward_headers=config.forward_headers,
                visitor_credentials=config.visitor_credentials,
                in_process=self._in_process and not networked,
                admit=None if networked else self._admit,
            )
        self.failure = None
        if is_cleartext_remote(config.bridge):
            _LOGGER.warning(
                "tunnel %r: plain ws:// to %s (insecure is on): the token and all traffic cross the "
                "network unencrypted",
                config.name,
                URL(self.connect_url).origin(),
            )
        self._task = asyncio.create_task(self._run(), name=f"rproxy-agent {config.name}")
        if self._stats_listeners and self._stats_timer is None:
            self._stats_timer = asyncio.get_running_loop().call_later(
                self._stats_interval, self._emit_stats, self._stats_interval
            )

    async def stop(self) -> None:
        """Close the tunnel, cancel every request in flight, release the session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait, not ``await task`` under suppress(CancelledError): that also swallowed
            # a cancellation of stop()'s own caller (e.g. a timeout around it).
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # a refusal was already reported through wait(): mark it retrieved
        handlers, self._handlers = self._handlers, {}
        for handler in handlers.values():
            await handler.close()
            self._served_before += handler.requests_served
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        self._set_state(AgentState.STOPPED)

    @property
    def target(self) -> str | None:
        """Where requests go now (None: a ``zeroconf:NAME`` app not found yet)."""
        return self._targets.get("")

    def service_target(self, service: str) -> str | None:
        """Where a service's streams go now ("" is the main web app; None: not found yet)."""
        return self._targets.get(service)

    def set_target(self, target: str, service: str = "") -> None:
        """Send the next requests of a web ``service`` ("": the main app) to ``target``, an
        http(s) URL, without touching the tunnel.

        Requests under way finish where they started. The target lasts across reconnections
        and restarts of this agent; ``config`` keeps what was configured.

        Raises:
            ConfigError: ``target`` is not a URL ``--target`` accepts, or the agent has no such
                web service.
        """
        check_target(target)
        if self._kinds.get(service) != KIND_HTTP:
            raise ConfigError(f"no web service {service!r} to point at {target!r}")
        self._targets[service] = target.strip()
        handler = self._handlers.get(service)
        if isinstance(handler, Upstream):
            handler.set_target(target.strip())

    async def wait(self) -> None:
        """Run until stopped; raises AuthenticationError/RproxyConnectionError if refused for good."""
        if self._task is None:
            await self.start()
        assert self._task is not None
        await asyncio.shield(self._task)

    async def wait_connected(self, timeout: float | None = None) -> str:
        """Wait until the tunnel is up; return the public URL."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()
        return self.public_url or ""

    async def reconnect(self) -> None:
        """Drop the tunnel now and dial again at once (e.g. after the network changed)."""
        running = self._task is not None
        await self.stop()
        if running:
            self.reconnects += 1
            await self.start()

    async def probe(self, timeout: float = HANDSHAKE_TIMEOUT) -> str:
        """Connect once, complete the handshake, leave; return the public URL the bridge gave.

        For checking settings before keeping them (a setup form): the bridge's answer says
        whether the URL, token and name work, without serving a single visitor.

        Raises:
            AuthenticationError: the bridge refused the token.
            RproxyConnectionError: the bridge cannot be reached or refused the agent.
        """
        async with asyncio.timeout(timeout):
            connection, settings = await self._open_tunnel()
        await connection.close(ErrorCode.NO_ERROR, "probe done")
        return BridgeHello.decode(settings).public_url or ""

    def add_listener(self, callback: Callable[[Agent], None]) -> Callable[[], None]:
        """Call ``callback(agent)`` on every state change; returns a function that removes it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def add_stats_listener(self, callback: Callable[[AgentStats], None], interval: float = 1.0) -> Callable[[], None]:
        """Call ``callback(stats)`` whenever traffic counters change, at most once per ``interval``.

        Returns a function that removes the listener.
        """
        self._stats_listeners.append(callback)
        self._stats_interval = interval
        if self._stats_timer is None and self._task is not None:
            self._stats_timer = asyncio.get_running_loop().call_later(interval, self._emit_stats, interval)

        def remove() -> None:
            self._stats_listeners.remove(callback)
            if not self._stats_listeners and self._stats_timer is not None:
                self._stats_timer.cancel()
                self._stats_timer = None

        return remove

    @property
    def active_streams(self) -> int:
        """Visitor requests and WebSockets being served now."""
        return len(self._stream_tasks)

    @property
    def requests_served(self) -> int:
        """Streams served since the agent was made."""
        return self._served_before + sum(handler.requests_served for handler in self._handlers.values())

    @property
    def services(self) -> dict[str, str]:
        """The kind (``http`` or ``tcp``) of each service offered; "" is the main web app."""
        return dict(self._kinds)

    @property
    def stats(self) -> AgentStats:
        """Traffic counters now."""
        received, sent = self._traffic_before
        connection = self.connection
        if connection is not None:
            received += connection.mux.bytes_received
            sent += connection.mux.bytes_sent
        return AgentStats(
            active_streams=len(self._stream_tasks),
            requests_served=self.requests_served,
            bytes_received=received,
            bytes_sent=sent,
            rtt=connection.rtt if connection is not None else None,
            reconnects=self.reconnects,
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # The connect loop.

    async def _run(self) -> None:
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        while True:
            self._set_state(AgentState.CONNECTING)
            started = time.monotonic()
            try:
                await self._connect_once()
            except (AuthenticationError, FatalRefusal) as err:
                self.last_error = str(err)
                self.failure = err
                # Not logged at ERROR: the refusal is raised from wait() and kept in last_error,
                # so whoever reports it (the CLI prints one line) would otherwise show it twice.
                _LOGGER.debug("refused for good: %s", err)
                self._set_state(AgentState.FAILED)
                raise
            except RproxyConnectionError as err:
                self.last_error = str(err)
            except Exception as err:  # a bug or an embedding's surprise: retry, never die silently
                _LOGGER.exception("tunnel %r: unexpected failure", self.config.name)
                self.last_error = f"unexpected failure: {err!r}"
            if time.monotonic() - started > BACKOFF_RESET_AFTER:
                backoff.reset()
            delay = backoff.next()
            self._set_state(AgentState.WAITING)
            _LOGGER.warning("bridge unavailable (%s); retrying in %.1fs", self.last_error, delay)
            self.reconnects += 1
            await asyncio.sleep(delay)

    def _upgrade_headers(self, nonce: str | None) -> dict[str, str]:
        config = self.config
        return {
            "Authorization": authorization(
                key=config.key,
                nonce=nonce,
                token=config.token,
                name=config.name,
                host=URL(self.connect_url).host or "",
                basic=config.basic_auth,
            ),
            HEADER_PROTOCOL: ",".join(map(str, sorted(SUPPORTED_VERSIONS))),
            HEADER_TUNNEL: config.name,
            HEADER_AGENT_ID: config.agent_id,
        }

    async def _fetch_nonce(self, session: aiohttp.ClientSession) -> str:
        """A fresh challenge from the bridge, for a key-holding agent to sign."""
        try:
            return await fetch_nonce(session, self.connect_url, CONNECT_PATH, self._tls)
        except ssl.SSLCertVerificationError as err:
            raise self._untrusted(err) from None
        except ChallengeError as err:
            # No challenge endpoint: a bridge that takes no keys; retrying will not add one.
            raise (FatalRefusal if err.status == 404 else RproxyConnectionError)(str(err)) from None

    async def _dial(self) -> FrameSocket:
        """Open the tunnel WebSocket (no handshake yet); with a key, sign a fresh challenge first."""
        if self._tunnel_session is not None:
            return await self._dial_aiohttp(self._tunnel_session)
        nonce = None
        if self.config.key is not None:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False) as session:
                nonce = await self._fetch_nonce(session)
        # Only with a context of our own: for wss:// websockets then makes the system's.
        tls: dict[str, Any] = {"ssl": self._tls} if self._tls is not None else {}
        try:
            ws = await NoRedirects(
                self.connect_url,
                **tls,
                additional_headers=self._upgrade_headers(nonce),
                user_agent_header=f"rproxy-agent/{__version__}",
                max_size=TUNNEL_MESSAGE_LIMIT,
                ping_interval=None,
                compression=None,
                open_timeout=HANDSHAKE_TIMEOUT,
                close_timeout=2,
                proxy=None,
                logger=_TUNNEL_LOGGER,
            )
        except InvalidStatus as err:
            raise refusal_error(
                err.response.status_code, bytes(err.response.body or b""), key=self.config.key is not None
            ) from None
        except ssl.SSLCertVerificationError as err:
            raise self._untrusted(err) from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as err:
            raise RproxyConnectionError(describe_error(err)) from None
        return WebsocketsFrameSocket(ws, str(URL(self.connect_url).origin()))

    async def _dial_aiohttp(self, shared: aiohttp.ClientSession) -> FrameSocket:
        # A session of our own over the shared connection pool: aiohttp's ws_connect follows
        # redirects, and only a trace hook on the session can refuse them; the agent must
        # not carry its token to wherever a redirect points.
        no_redirects = aiohttp.TraceConfig()
        no_redirects.on_request_redirect.append(refuse_redirect)
        session = aiohttp.ClientSession(
            connector=shared.connector,
            connector_owner=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            trace_configs=[no_redirects],
        )
        try:
            nonce = await self._fetch_nonce(session) if self.config.key is not None else None
            ws = await session.ws_connect(
                self.connect_url,
                headers={**self._upgrade_headers(nonce), "User-Agent": f"rproxy-agent/{__version__}"},
                max_msg_size=TUNNEL_MESSAGE_LIMIT,
                autoping=True,
                heartbeat=None,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                proxy=None,
                ssl=self._tls if self._tls is not None else True,
            )
        except aiohttp.WSServerHandshakeError as err:
            await session.close()
            raise refusal_error(err.status, b"", key=self.config.key is not None) from None
        except aiohttp.ClientConnectorCertificateError as err:
            await session.close()
            cause = err.certificate_error
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise self._untrusted(cause) from None
            raise RproxyConnectionError(describe_error(err)) from None
        except RproxyConnectionError:
            await session.close()
            raise
        except RedirectRefused as err:
            await session.close()
            raise RproxyConnectionError(
                f"the bridge redirected the agent (HTTP {err.response.status}); not followed"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            await session.close()
            raise RproxyConnectionError(describe_error(err)) from None
        except BaseException:
            await session.close()
            raise
        return OwnedSessionFrameSocket(ws, str(URL(self.connect_url).origin()), session)

    def _untrusted(self, err: ssl.SSLCertVerificationError) -> RproxyConnectionError:
        """A pin mismatch is fatal, as ssh's changed host key is: a misconfiguration or an attack,
        which retrying fixes neither. A CA's refusal is retried: an expired or renewing certificate
        is mended on the bridge."""
        message = untrusted_message(err, self.config.ca_file)
        return FatalRefusal(message) if isinstance(err, PinMismatch) else RproxyConnectionError(message)

    async def _open_tunnel(self) -> tuple[TunnelConnection, dict[str, Any]]:
        config = self.config
        socket = await self._dial()
        connection = TunnelConnection(
            socket,
            Multiplexer(Role.AGENT),
            label=f"{config.name} via {socket.remote}",
            on_stream=self._serve_stream,
            heartbeat_interval=config.heartbeat_interval,
            dead_after=config.dead_after,
        )
        try:
            settings = await connection.handshake(
                agent_id=config.agent_id,
                software=f"rproxy/{__version__}",
                services=self._kinds,
                **config.visitor_policy_hello(),
            )
        except HandshakeError as err:
            await connection.close(err.error_code, str(err))
            raise RproxyConnectionError(f"handshake failed: {err}") from None
        except BaseException:
            await connection.close()
            raise
        return connection, settings

    async def _connect_once(self) -> None:
        config = self.config
        connection, settings = await self._open_tunnel()
        self.connection = connection
        hello = BridgeHello.decode(settings)
        self.public_url = hello.public_url
        self.connected_since = time.time()
        self.last_error = None
        self._connected.set()
        self._set_state(AgentState.CONNECTED)
        if config.target:
            _LOGGER.info(
                "tunnel %r is up: %s → %s",
                config.name,
                printable(self.public_url or "(no public URL given)"),
                config.target,
            )
        else:
            _LOGGER.info("tunnel %r is up (no main web app; services only)", config.name)
        service_url = hello.service_url
        for service, kind in self._kinds.items():
            if not service:
                continue
            target = config.services[service]
            if kind == KIND_TCP:
                _LOGGER.info(
                    "service %r → %s: reach it with rproxy tcp --bridge %s --tunnel %s --service %s",
                    service,
                    target,
                    config.bridge,
                    config.name,
                    service,
                )
            elif service_url is not None:
                _LOGGER.info(
                    "service %r is up: %s → %s", service, printable(service_url.replace("{service}", service)), target
                )
            else:
                _LOGGER.info("service %r is up: %s.%s.<domain> → %s", service, service, config.name, target)
        try:
            await connection.run()
        finally:
            received, sent = self._traffic_before
            self._traffic_before = (received + connection.mux.bytes_received, sent + connection.mux.bytes_sent)
            self.connection = None
            self.connected_since = None
            self._connected.clear()
            await self._cancel_streams()
        raise RproxyConnectionError(f"tunnel lost: {connection.close_reason or 'closed'}")

    def _serve_stream(self, stream: TunnelStream) -> None:
        if not self._handlers:  # a probe: its tunnel serves nobody
            stream.reset(ErrorCode.REFUSED_STREAM, "agent not serving")
            return
        head = stream.head
        handler = self._handlers.get(head.service)
        if handler is None or (head.kind == KIND_TCP) != isinstance(handler, TcpService):
            # Whatever the bridge asks: only configured services, each only as its own kind.
            _LOGGER.warning(
                "refused a %s stream for service %r: %s",
                head.kind,
                head.service[:64],
                "not offered by this agent" if handler is None else "it is not that kind of service",
            )
            stream.reset(ErrorCode.REQUEST_REJECTED, "no such service")
            return
        task = asyncio.create_task(handler.serve(stream))
        self._stream_tasks.add(task)
        task.add_done_callback(self._stream_tasks.discard)

    async def _cancel_streams(self) -> None:
        tasks = list(self._stream_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _emit_stats(self, interval: float) -> None:
        self._stats_timer = asyncio.get_running_loop().call_later(interval, self._emit_stats, interval)
        stats = self.stats
        if stats == self._last_stats:
            return
        self._last_stats = stats
        for listener in list(self._stats_listeners):
            try:
                listener(stats)
            except Exception:
                _LOGGER.exception("agent stats listener failed")

    def _set_state(self, state: AgentState) -> None:
        if state is self.state:
            return
        self.state = state
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:
                _LOGGER.exception("agent state listener failed")
