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
import base64
import enum
import hashlib
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
import voluptuous as vol
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI
from yarl import URL

from .. import __version__
from ..bridge.keys import sign
from ..bridge.visitor_policy import parse_agent_policy
from ..config import ZEROCONF_TARGET_PREFIX, parse_sha256_pin
from ..const import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    BACKOFF_RESET_AFTER,
    CHALLENGE_PATH,
    CONNECT_PATH,
    DEAD_AFTER,
    DEFAULT_TUNNEL_NAME,
    HANDSHAKE_TIMEOUT,
    HEADER_AGENT_ID,
    HEADER_PROTOCOL,
    HEADER_TUNNEL,
    HEARTBEAT_INTERVAL,
    MAX_SERVICES,
    TUNNEL_MESSAGE_LIMIT,
)
from ..exceptions import AuthenticationError, ConfigError, RproxyConnectionError
from ..headers import is_tunnel_name
from ..logsafe import printable
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_HTTP, KIND_TCP
from ..protocol.mux import SUPPORTED_VERSIONS, Multiplexer, Role
from ..transport import (
    AiohttpFrameSocket,
    FrameSocket,
    HandshakeError,
    TunnelConnection,
    TunnelStream,
    WebsocketsFrameSocket,
)
from .tcp import TCP_SCHEME, TcpService, parse_tcp_target
from .upstream import FORWARDED_HEADERS, RedirectRefused, Upstream, create_upstream_session, refuse_redirect

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentState",
    "AgentStats",
    "Backoff",
    "bridge_connect_url",
    "split_bridge_credential",
    "certificate_sha256",
    "check_bridge_access",
    "check_credential",
    "check_service",
    "is_cleartext_remote",
    "pinned_sha256",
]

_LOGGER = logging.getLogger("rproxy.agent")


class _NoSecretsFilter(logging.Filter):
    """Keeps the agent's token and visitors' traffic out of websockets' debug log.

    At DEBUG, websockets logs every handshake header (our Authorization among them) and a
    preview of every frame (visitors' request heads: cookies, credentials). Handshake lines
    stay, with the credential masked; frame dumps go.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in ("> %s", "< %s"):  # a frame
            return False
        if (
            record.msg == "> %s: %s"
            and isinstance(record.args, tuple)
            and str(record.args[0]).lower() == "authorization"
        ):
            record.args = (record.args[0], "[redacted]")
        return True


#: The logger handed to websockets for the tunnel connection.
_TUNNEL_LOGGER = logging.getLogger("rproxy.agent.websocket")
_TUNNEL_LOGGER.addFilter(_NoSecretsFilter())


class AgentState(enum.StrEnum):
    """What the agent is doing now."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # lost the bridge, waiting before the next attempt
    FAILED = "failed"  # refused for good (bad token, unsupported protocol)


def bridge_connect_url(bridge: str) -> str:
    """The WebSocket URL of a bridge's agent endpoint.

    Accepts ``ws://``, ``wss://``, ``http://`` and ``https://`` base URLs (the seed system's
    ``REMOTE_URL`` is an http URL).

    Raises:
        ConfigError: the URL is not one of those, or has no host.
    """
    schemes = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
    try:
        url = URL(bridge.strip())
        valid = url.scheme in schemes and bool(url.host)
    except (ValueError, TypeError):  # yarl refuses e.g. a port out of range or a broken IPv6 host
        valid = False
    if not valid:
        raise ConfigError(f"--bridge {bridge!r}: expected ws://, wss://, http:// or https:// with a host")
    if url.user is not None or url.password is not None:
        # Not echoed: the user:password part is a secret. The CLI and the integration take it
        # off first (split_bridge_credential) and send it as the agent's credential.
        raise ConfigError("--bridge: the URL must not carry user:password@ here (give it as the token, sent as Basic)")
    base = url.with_scheme(schemes[url.scheme]).with_query(None).with_fragment(None)
    path = base.path.rstrip("/")
    if not path.endswith(CONNECT_PATH):
        path += CONNECT_PATH
    return str(base.with_path(path))


def split_bridge_credential(bridge: str) -> tuple[str, str | None]:
    """``ws://user:pass@host:8080`` → (``ws://host:8080``, ``"user:pass"``); without userinfo
    the URL as given and None.

    The credential is what a bridge started as ``rproxy bridge PORT USER:PASS`` accepts; the
    agent sends it as ``Authorization: Basic`` (``AgentConfig.basic_auth``).

    Raises:
        ConfigError: userinfo without both a user and a password, or a ``:`` in the user
            (HTTP Basic could not carry it). The message never repeats the URL.
    """
    try:
        url = URL(bridge.strip())
        user, password = url.user, url.password
    except (ValueError, TypeError):
        if "@" in bridge:  # not echoed: what comes before the @ may be a password
            raise ConfigError("--bridge: not a valid URL (not shown: it may hold a password)") from None
        return bridge, None
    if user is None and password is None:
        return bridge, None
    if not user or password is None or ":" in user:
        raise ConfigError("--bridge: user:password@ in the URL needs a user (without ':') and a password")
    return str(url.with_user(None)), f"{user}:{password}"


def _is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) or ``localhost``.

    Other names are not resolved: what a name points at can change after this check, so only
    the one name every resolver keeps on the machine counts.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_cleartext_remote(bridge: str) -> bool:
    """Whether the tunnel to ``bridge`` would leave this machine unencrypted (``ws://``/``http://``
    to a host that is not loopback; a LAN address counts as remote: the LAN is a network too).

    Raises:
        ConfigError: ``bridge`` is not a bridge URL.
    """
    url = URL(bridge_connect_url(bridge))
    return url.scheme == "ws" and not _is_loopback_host(url.host or "")


def certificate_sha256(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class _PinMismatch(ssl.SSLCertVerificationError):
    """The bridge's certificate is none of the pinned ones; ``seen`` is its fingerprint."""

    def __init__(self, seen: str) -> None:
        super().__init__(1, f"certificate SHA-256 {seen} is not pinned")
        self.seen = seen


class _PinCheckingSSLObject(ssl.SSLObject):
    """Checks the pins as the handshake completes, so a wrong certificate fails the TLS
    connection itself: the upgrade request, token included, is never written to it."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is done
        pins: frozenset[str] = getattr(self.context, "pins", frozenset())
        der = self.getpeercert(binary_form=True) or b""
        if hashlib.sha256(der).hexdigest() not in pins:
            raise _PinMismatch(certificate_sha256(der))


class _PinnedContext(ssl.SSLContext):
    """A client context whose connections also check the peer's certificate against ``pins``
    (SHA-256 of the DER certificate, lower-case hex). The event loops of asyncio and uvloop
    both wrap TLS with ``context.wrap_bio``, which makes ``sslobject_class`` objects."""

    sslobject_class = _PinCheckingSSLObject
    pins: frozenset[str] = frozenset()


def _bridge_tls_context(ca_file: str | None, pins: frozenset[str]) -> ssl.SSLContext | None:
    """The context verifying the bridge; None leaves it to the system's CAs.

    A pin is enough on its own: it names the one certificate to accept (a self-signed bridge
    needs nothing else), so neither a CA nor the host name is checked. With ``ca_file`` too,
    both must hold.

    Raises:
        ConfigError: ``ca_file`` cannot be read or holds no certificate.
    """
    if ca_file is None and not pins:
        return None
    context: ssl.SSLContext
    if pins:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.pins = pins
        context = pinned
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"--ca-file {ca_file!r}: no such file") from None
    except OSError as err:  # ssl.SSLError too: a file without one PEM certificate
        reason = err.strerror if not isinstance(err, ssl.SSLError) else "no PEM certificate in it"
        raise ConfigError(f"--ca-file {ca_file!r}: {reason or err}") from None
    return context


def _check_target(target: str) -> URL:
    try:
        url = URL(target.strip())
        valid = url.scheme in ("http", "https") and bool(url.host)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise ConfigError(f"--target {target!r}: expected an http:// or https:// URL with a host")
    if url.query_string or url.fragment:
        raise ConfigError(f"--target {target!r}: must not have a query or fragment")
    return url


def check_service(name: str, target: str) -> str:
    """Check one ``--service NAME=URL``; return its kind (``http`` or ``tcp``).

    Raises:
        ConfigError: a bad name or target, named in the message.
    """
    if not is_tunnel_name(name):
        raise ConfigError(f"--service {name!r}: a service name is a lower-case DNS label (a-z, 0-9, -)")
    if target.strip().lower().startswith(TCP_SCHEME):
        try:
            parse_tcp_target(target)
        except ValueError as err:
            raise ConfigError(f"--service {name}: {err}") from None
        return KIND_TCP
    if _is_deferred_target(target):
        return KIND_HTTP
    try:
        _check_target(target)
    except ConfigError:
        raise ConfigError(
            f"--service {name}: {target!r}: expected an http(s):// URL, zeroconf:NAME or tcp://HOST:PORT"
        ) from None
    return KIND_HTTP


def _is_deferred_target(target: str) -> bool:
    """A ``zeroconf:NAME`` target: an app found on the LAN at run time, not a URL."""
    return target.startswith(ZEROCONF_TARGET_PREFIX) and bool(target[len(ZEROCONF_TARGET_PREFIX) :].strip())


@dataclass(slots=True)
class AgentConfig:
    """Settings of an agent; the CLI fills it from flags and environment."""

    bridge: str
    token: str = field(repr=False)  # never in a log line or a traceback's locals
    #: The home app's URL, or ``zeroconf:NAME``: an app announced on the LAN, which whoever runs
    #: the agent finds and hands over with ``Agent.set_target`` (visitors get 502 until then).
    #: Empty when the agent offers only ``services``.
    target: str
    name: str = DEFAULT_TUNNEL_NAME
    #: More services over the same connection, by name: web apps (an http(s) URL or
    #: ``zeroconf:NAME``, visited as ``<service>.<tunnel>.<domain>``) and TCP services
    #: (``tcp://host:port``, reached with ``rproxy tcp``). Nothing else is ever connected to.
    services: dict[str, str] = field(default_factory=dict)
    agent_id: str = field(default_factory=socket.gethostname)
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    dead_after: float = DEAD_AFTER
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    #: Seconds the home app has to answer (its response head); None leaves it to the bridge.
    request_timeout: float | None = None
    #: Which of the bridge's X-Forwarded-* headers reach the home app.
    forward_headers: tuple[str, ...] = FORWARDED_HEADERS
    #: ``(user, password)`` visitors must give (HTTP basic auth), checked by the agent.
    visitor_credentials: tuple[str, str] | None = None
    #: Asked of the bridge in the HELLO (it checks them before anything reaches the tunnel;
    #: its own config wins where it sets the same part): visitor addresses allowed (CIDRs) ...
    visitor_allow: tuple[str, ...] = ()
    #: ... and ``(user, scrypt password hash)`` pairs for HTTP basic auth at the bridge.
    visitor_basic: tuple[tuple[str, str], ...] = ()
    #: PEM file of the CAs that may vouch for a wss:// bridge, instead of the system's.
    ca_file: str | None = None
    #: SHA-256 fingerprints of the wss:// bridge's certificate (hex, colons allowed); any one
    #: matching is enough, and then no CA needs to vouch for it (see ``_bridge_tls_context``).
    pins: tuple[str, ...] = ()
    #: Allow plain ws:// to a bridge that is not on this machine (a LAN bridge without TLS).
    insecure: bool = False
    #: Prove the agent's identity with this key (a signed challenge) instead of ``token``,
    #: which is then empty.
    key: Ed25519PrivateKey | None = field(default=None, repr=False)
    #: Send ``token`` as HTTP Basic credentials (``user:password``, from a bridge URL's
    #: userinfo as node-rproxy's agent takes it) instead of as a Bearer token.
    basic_auth: bool = False

    def validate(self) -> None:
        """Raises ConfigError naming the first bad setting."""
        check_bridge_access(self.bridge, self.ca_file, self.pins, self.insecure, "the agent token")
        if self.target and not _is_deferred_target(self.target):
            _check_target(self.target)
        elif not self.target and not self.services:
            raise ConfigError("--target: the home app's URL is required (or at least one --service)")
        if len(self.services) > MAX_SERVICES:
            raise ConfigError(f"--service: at most {MAX_SERVICES} services, got {len(self.services)}")
        for service, target in self.services.items():
            check_service(service, target)
        check_credential(self.token, self.key, "--token: an agent token (or --key) is required")
        if self.basic_auth and (self.key is not None or ":" not in self.token):
            raise ConfigError("basic_auth: needs a token written as user:password (and no --key)")
        if not is_tunnel_name(self.name):
            raise ConfigError(f"--name {self.name!r}: use a lower-case DNS label (a-z, 0-9, -)")
        if not self.agent_id or len(self.agent_id) > 128 or not self.agent_id.isprintable():
            raise ConfigError(f"--agent-id {self.agent_id!r}: use 1-128 printable characters")
        if self.request_timeout is not None and not 0 < self.request_timeout <= 86400:
            raise ConfigError(f"request timeout {self.request_timeout!r}: expected seconds between 0 and 86400")
        if self.visitor_credentials is not None:
            user, password = self.visitor_credentials
            if not user or ":" in user or not password:
                raise ConfigError("visitor credentials: a user name without ':' and a non-empty password are required")
        try:
            parse_agent_policy(self.visitor_policy_hello())
        except ValueError as err:
            raise ConfigError(f"--visitor-allow/--visitor-auth: {err}") from None

    def visitor_policy_hello(self) -> dict[str, Any]:
        """HELLO settings asking the bridge to guard this tunnel's visitors (none when nothing is asked)."""
        hello: dict[str, Any] = {}
        if self.visitor_allow:
            hello["visitor_allow"] = list(self.visitor_allow)
        if self.visitor_basic:
            hello["visitor_basic"] = [{"user": user, "password_hash": hashed} for user, hashed in self.visitor_basic]
        return hello

    def pinned_sha256(self) -> frozenset[str]:
        """``pins`` as lower-case hex without colons (ConfigError names a malformed one)."""
        return pinned_sha256(self.pins)


def pinned_sha256(pins: tuple[str, ...]) -> frozenset[str]:
    """``--pin-sha256`` values as lower-case hex without colons (ConfigError names a malformed one)."""
    try:
        return frozenset(parse_sha256_pin(pin) for pin in pins)
    except vol.Invalid as err:
        raise ConfigError(f"--pin-sha256: {err.msg}") from None


def check_bridge_access(bridge: str, ca_file: str | None, pins: tuple[str, ...], insecure: bool, secret: str) -> None:
    """Check how a bridge is dialled: its URL, and that ``secret`` (what travels to it, for the
    message) is never sent in clear text across a network unless ``insecure`` says so.

    Raises:
        ConfigError: naming the first bad setting.
    """
    bridge_connect_url(bridge)
    if is_cleartext_remote(bridge) and not insecure:
        raise ConfigError(
            f"--bridge {bridge!r}: refusing plain ws:// (or http://) to a bridge that is not on this "
            f"machine: {secret} and all traffic would cross the network in clear text; use wss:// "
            "(or https://), or --insecure for a bridge on a network you trust"
        )
    if ca_file is not None or pins:
        if URL(bridge_connect_url(bridge)).scheme != "wss":
            what = "--ca-file" if ca_file is not None else "--pin-sha256"
            raise ConfigError(f"{what}: only means something for a wss:// or https:// bridge")
        if ca_file is not None and not ca_file.strip():
            raise ConfigError("--ca-file: expected a file name")
        pinned_sha256(pins)


def check_credential(token: str, key: Ed25519PrivateKey | None, missing: str) -> None:
    """Exactly one of a token and a key, and a token that fits in a header line.

    Raises:
        ConfigError: ``missing`` when there is neither; otherwise naming the problem (never the token).
    """
    if key is not None and token:
        raise ConfigError("--token and --key: give one of them, not both")
    if key is None and not token:
        raise ConfigError(missing)
    if token and (not token.isprintable() or token != token.strip()):
        raise ConfigError("--token: must be one line of printable characters without surrounding spaces")


class Backoff:
    """Delays between reconnection attempts: doubling, capped, with jitter."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next(self) -> float:
        """The next delay: half fixed, half random, so a fleet of agents does not stampede."""
        ceiling = min(self.maximum, self.initial * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return ceiling * (0.5 + 0.5 * random.random())

    def reset(self) -> None:
        """Start again from the initial delay."""
        self.attempt = 0


class _NoRedirects(ws_connect):
    """The agent connects where it was configured to: a redirect is an error, not a hint."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


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
        self._tls = _bridge_tls_context(config.ca_file.strip() if config.ca_file else None, config.pinned_sha256())
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
            self._targets[service] = None if _is_deferred_target(target) else target.strip()
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
        _check_target(target)
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
        return str(settings.get("public_url") or "")

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
            except (AuthenticationError, _FatalRefusal) as err:
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
        if config.key is not None and nonce is not None:
            host = URL(self.connect_url).host or ""
            authorization = sign(config.key, nonce, config.name, host)
        elif config.basic_auth:
            authorization = "Basic " + base64.b64encode(config.token.encode()).decode("ascii")
        else:
            authorization = f"Bearer {config.token}"
        return {
            "Authorization": authorization,
            HEADER_PROTOCOL: ",".join(map(str, sorted(SUPPORTED_VERSIONS))),
            HEADER_TUNNEL: config.name,
            HEADER_AGENT_ID: config.agent_id,
        }

    async def _fetch_nonce(self, session: aiohttp.ClientSession) -> str:
        """A fresh challenge from the bridge, for a key-holding agent to sign."""
        url = URL(self.connect_url)
        url = url.with_scheme("https" if url.scheme == "wss" else "http")
        url = url.with_path(url.path[: -len(CONNECT_PATH)] + CHALLENGE_PATH)
        try:
            async with session.get(
                url,
                allow_redirects=False,
                proxy=None,
                ssl=self._tls if self._tls is not None else True,
                timeout=aiohttp.ClientTimeout(total=HANDSHAKE_TIMEOUT),
            ) as response:
                if response.status == 404:
                    raise _FatalRefusal("the bridge does not accept agent keys (no challenge endpoint): use --token")
                if response.status != 200:
                    raise RproxyConnectionError(f"the bridge answered HTTP {response.status} to the key challenge")
                data = await response.json(content_type=None)
        except aiohttp.ClientConnectorCertificateError as err:
            cause = err.certificate_error
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise self._untrusted(cause) from None
            raise RproxyConnectionError(_describe(err)) from None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
            raise RproxyConnectionError(f"key challenge: {_describe(err)}") from None
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(nonce, str) or not nonce.isascii() or not nonce.isprintable() or " " in nonce:
            raise RproxyConnectionError("the bridge's key challenge is malformed")
        return nonce

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
            ws = await _NoRedirects(
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
            raise _refusal(
                err.response.status_code, bytes(err.response.body or b""), key=self.config.key is not None
            ) from None
        except ssl.SSLCertVerificationError as err:
            raise self._untrusted(err) from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as err:
            raise RproxyConnectionError(_describe(err)) from None
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
            raise _refusal(err.status, b"", key=self.config.key is not None) from None
        except aiohttp.ClientConnectorCertificateError as err:
            await session.close()
            cause = err.certificate_error
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise self._untrusted(cause) from None
            raise RproxyConnectionError(_describe(err)) from None
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
            raise RproxyConnectionError(_describe(err)) from None
        except BaseException:
            await session.close()
            raise
        return _OwnedSessionFrameSocket(ws, str(URL(self.connect_url).origin()), session)

    def _untrusted(self, err: ssl.SSLCertVerificationError) -> RproxyConnectionError:
        """Why the bridge's certificate was refused. A pin mismatch is fatal, as ssh's changed
        host key is: a misconfiguration or an attack, which retrying fixes neither. A CA's
        refusal is retried: an expired or renewing certificate is mended on the bridge."""
        if isinstance(err, _PinMismatch):
            return _FatalRefusal(
                f"the bridge's certificate does not match --pin-sha256: it has SHA-256 {err.seen}; if the "
                "bridge's certificate was replaced, pin the new one, otherwise someone may be intercepting "
                "the connection"
            )
        reason = err.verify_message or err.reason or str(err)
        if self.config.ca_file:
            hint = f"is it issued by a CA in --ca-file {self.config.ca_file!r}?"
        else:
            hint = "for a private CA give --ca-file, for a self-signed certificate --pin-sha256"
        return RproxyConnectionError(f"the bridge's certificate is not trusted: {reason} ({hint})")

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
        self.public_url = str(settings.get("public_url") or "") or None
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
        service_url = settings.get("service_url")
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
            elif isinstance(service_url, str) and "{service}" in service_url:
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


class _OwnedSessionFrameSocket(AiohttpFrameSocket):
    """An aiohttp client FrameSocket that closes the session it was dialled with."""

    __slots__ = ("_session",)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, remote: str, session: aiohttp.ClientSession) -> None:
        super().__init__(ws, remote)
        self._session = session

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await super().close(code, reason)
        finally:
            await self._session.close()

    def abort(self) -> None:
        super().abort()
        if not self._session.closed:
            # Only drops our reference: the connector (and its pool) belongs to the application.
            self._session.detach()


class _FatalRefusal(RproxyConnectionError):
    """The bridge refused in a way retrying cannot fix (protocol version, tunnel name)."""


#: Said when what answers is likely no rproxy bridge at all (a web server, an SSH server, ...).
_NOT_A_BRIDGE = "not an rproxy bridge at that address? check the URL's host and port"


def _refusal(status: int, raw_body: bytes, *, key: bool = False) -> RproxyConnectionError:
    # Peer text, shown in one log line: control characters (newlines, terminal escapes) become ?.
    body = "".join(c if c.isprintable() else "?" for c in raw_body.decode("utf-8", "replace").strip()[:200])
    if status == 401:
        if key:
            return AuthenticationError("the bridge refused the agent key (401): its signed challenge was not accepted")
        return AuthenticationError("the bridge refused the agent token (401): check the token")
    if status == 403:
        return AuthenticationError(
            f"the bridge refused the agent (403): {body or 'not allowed'}: check the token and the tunnel name"
        )
    if status == 426:
        return _FatalRefusal(f"the bridge does not speak this agent's protocol: {body or status}")
    if status == 400:
        return _FatalRefusal(f"the bridge refused the agent: {body or status}")
    # A bridge answers its connect path with 101, 4xx refusals handled above, or 503 (busy);
    # another 4xx (404 above all) comes from some other web server.
    hint = f"; {_NOT_A_BRIDGE} (nothing serves {CONNECT_PATH} there)" if status < 500 else ""
    return RproxyConnectionError(f"the bridge answered HTTP {status}" + (f": {body}" if body else "") + hint)


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out connecting to the bridge"
    if isinstance(err, aiohttp.ClientConnectorError):
        err = err.os_error
    if isinstance(err, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(err):
        # The answer to our TLS hello was not TLS: most often plain HTTP.
        return (
            "cannot connect to the bridge: its answer is not TLS (SSL: WRONG_VERSION_NUMBER): no TLS on that "
            "port? a bridge without --tls-cert takes ws:// (or put TLS in front of it)"
        )
    if isinstance(err, InvalidMessage) and isinstance(err.__cause__, EOFError):
        return "cannot connect to the bridge: it closed the connection before answering"
    if isinstance(err, InvalidMessage | aiohttp.ClientResponseError):
        return f"cannot connect to the bridge: did not receive a valid HTTP response: {_NOT_A_BRIDGE}"
    if isinstance(err, OSError) and err.strerror:
        return f"cannot connect to the bridge: {err.strerror}"
    return f"cannot connect to the bridge: {err}"


def _public_state(agent: Agent) -> dict[str, Any]:
    """A snapshot of the agent for status displays."""
    connection = agent.connection
    return {
        "state": agent.state.value,
        "public_url": agent.public_url,
        "connected_since": agent.connected_since,
        "rtt": connection.rtt if connection else None,
        "active_streams": agent.active_streams,
        "requests_served": agent.requests_served,
        "reconnects": agent.reconnects,
        "last_error": agent.last_error,
    }
