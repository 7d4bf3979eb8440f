"""The agent's settings and their checks (targets, services, access to the bridge)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from ..config import ZEROCONF_TARGET_PREFIX, check_agent_id, check_target_url
from ..const import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    DEAD_AFTER,
    DEFAULT_TUNNEL_NAME,
    HEARTBEAT_INTERVAL,
    MAX_SERVICES,
)
from ..dial import check_bridge_access, check_credential, pinned_sha256
from ..exceptions import ConfigError
from ..headers import is_tunnel_name
from ..policy import parse_agent_policy
from ..protocol.heads import KIND_HTTP, KIND_TCP
from .tcp import TCP_SCHEME, parse_tcp_target
from .upstream import FORWARDED_HEADERS

__all__ = ["AgentConfig", "check_service", "check_target", "is_deferred_target"]


def check_target(target: str) -> URL:
    """The home app's URL (``config.check_target_url``'s rule), as a ConfigError naming --target."""
    try:
        return check_target_url(target)
    except ValueError as err:
        raise ConfigError(f"--target: {err}") from None


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
    if is_deferred_target(target):
        return KIND_HTTP
    try:
        check_target(target)
    except ConfigError:
        raise ConfigError(
            f"--service {name}: {target!r}: expected an http(s):// URL, zeroconf:NAME or tcp://HOST:PORT"
        ) from None
    return KIND_HTTP


def is_deferred_target(target: str) -> bool:
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
    #: matching is enough, and then no CA needs to vouch for it (see ``bridge_tls_context``).
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
        if self.target and not is_deferred_target(self.target):
            check_target(self.target)
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
        try:
            check_agent_id(self.agent_id)
        except ValueError as err:
            raise ConfigError(f"--agent-id: {err}") from None
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
