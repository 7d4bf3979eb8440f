"""What the bridge's handlers share, and all they see of the bridge.

``Bridge`` (app.py) owns the server and its life cycle; the handlers (agents, visitors, TCP
channels, the gateway's delivery, the metrics) take a ``BridgeContext`` instead, so none of
them reaches into another or into the server, and each can be built on its own in a test or
a second front end (a faster visitor parser, a node link) without a whole ``Bridge``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import hdrs, web

from ..transport.budget import MemoryBudget
from .auth import TokenAuth, basic_credential
from .config import BridgeConfig
from .forwarded import behind_proxies
from .keys import AUTH_SCHEME, ChallengeStore, KeyAuth, decode_public_key, fingerprint, signed_message, verify_signature
from .metrics import BridgeMetrics
from .registry import TunnelRegistry
from .routing import host_name, is_loopback_host
from .visitor_policy import VisitorGuard

__all__ = ["BridgeContext", "Credential"]

#: Whether the credential an agent presented still lets it serve a name (asked again on reload).
Allows = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Credential:
    allows: Allows
    #: How logs name it: ``token``, or ``key SHA256:...`` (a public fingerprint, never a secret).
    what: str
    #: What its share of pending handshakes is counted under (a digest or fingerprint, never
    #: the secret, and never logged).
    key: str = ""


class BridgeContext:
    """The shared state of one bridge: its settings, tunnels, guards, credentials and counts."""

    def __init__(self, config: BridgeConfig, registry: TunnelRegistry, auth: TokenAuth, keys: KeyAuth) -> None:
        self.config = config
        self.registry = registry
        #: Replaced as a whole when the operator reloads tokens or keys (Bridge.set_tokens).
        self.auth = auth
        self.keys = keys
        self.challenges = ChallengeStore()
        #: What all tunnels together may hold for visitors (each tunnel's budget is inside it).
        self.memory = MemoryBudget(config.memory_budget)
        self.visitor_guard = VisitorGuard(config.visitor_policies, config.max_tracked_visitors)
        self.metrics = BridgeMetrics(registry)
        #: Set once stopping begins: visitors get 503, new agents are refused.
        self.draining = False
        #: Set once the tunnels close: one finishing its handshake is closed too.
        self.stopping = False

    def credential(self, request: web.Request, name: str) -> Credential | str:
        """What the request's Authorization proves (a token, or a key signed for tunnel ``name``),
        or why it proves nothing (the caller answers 401)."""
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme = auth.split(None, 1)[0].lower() if auth.strip() else ""
        if scheme == AUTH_SCHEME.lower():
            return self._key_credential(request, auth, name)
        if scheme == "basic":  # user:password, as node-rproxy's agent sends its credential
            token = basic_credential(auth[6:])
            if token is None:
                return "malformed basic credential"
        else:
            token = auth[7:].strip() if scheme == "bearer" else None
        if not token or self.auth.match(token) is None:
            return "invalid token" if token else "no token"
        # Asks the tokens of the moment: a reload that drops this one revokes the tunnel.
        return Credential(
            lambda tunnel: self.auth.allows(token, tunnel),
            "token",
            "token " + hashlib.sha256(token.encode()).hexdigest(),
        )

    def _key_credential(self, request: web.Request, value: str, name: str) -> Credential | str:
        fields = value.split()
        if len(fields) != 4:
            return "malformed key authorization"
        _, public, nonce, signature = fields
        try:
            raw_key = decode_public_key(public)
        except ValueError:
            return "malformed key authorization"
        # Consumed before the signature is checked: a nonce is spent by any attempt at all, so
        # an observed one can never be tried again.
        if not self.challenges.consume(nonce):
            return f"key {fingerprint(raw_key)}: unknown, expired or reused challenge"
        if not verify_signature(raw_key, signature, signed_message(nonce, name, _request_host(request))):
            return f"key {fingerprint(raw_key)}: bad signature"
        what = f"key {fingerprint(raw_key)}"
        return Credential(lambda tunnel: self.keys.allows(raw_key, tunnel), what, what)

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


def _request_host(request: web.Request) -> str:
    """The host name the agent dialled, without port, as the agent signs it."""
    host = request.host
    if host.startswith("["):
        return host[1 : host.find("]")].lower() if "]" in host else host.lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()
