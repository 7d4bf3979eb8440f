"""What a tunnel asks of its visitors, as data: the policy model and its parsers.

The bridge enforces a policy (``bridge/visitor_policy.py``: its guard, login checks, rate
buckets); the agent only builds one, from its settings, to send in its HELLO and to refuse a
malformed one before it dials. Both read the same model and the same parsers from here, so the
agent never has to load the bridge to check its own config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import voluptuous as vol

from .exceptions import RemoteProtocolError
from .headers import is_tunnel_name
from .protocol.hello import AgentHello

__all__ = [
    "LoginDelay",
    "PasswordHash",
    "VisitorPolicy",
    "address_allowed",
    "hash_password",
    "parse_agent_policy",
    "parse_password_hash",
    "parse_tunnel_policies",
]

#: scrypt cost of new hashes: about 16 MiB and a few tens of milliseconds per check.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 14, 8, 1
#: Highest costs accepted in a stored hash: an agent sends its hashes, and a hash it chose
#: with a huge N would make the bridge spend gigabytes on every login.
_MAX_N, _MAX_R, _MAX_P = 1 << 17, 16, 4


@dataclass(frozen=True, slots=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def matches(self, password: bytes) -> bool:
        candidate = hashlib.scrypt(
            password,
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=256 * self.n * self.r + (1 << 20),
            dklen=len(self.digest),
        )
        return hmac.compare_digest(candidate, self.digest)


def hash_password(password: str, *, n: int = _SCRYPT_N) -> str:
    """``scrypt$N$r$p$SALT$HASH`` (base64) for a visitor password: what the config stores."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(
        (
            "scrypt",
            str(n),
            str(_SCRYPT_R),
            str(_SCRYPT_P),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        )
    )


def parse_password_hash(text: Any) -> PasswordHash:
    """A stored hash, or ValueError saying what is wrong (never echoing the value: it is a secret's hash)."""
    parts = text.split("$") if isinstance(text, str) else []
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected a password hash scrypt$N$r$p$SALT$HASH (see docs/BRIDGE.md, Visitor protection)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("malformed scrypt password hash") from None
    if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        raise ValueError(
            f"scrypt cost out of range (N a power of two up to {_MAX_N}, r up to {_MAX_R}, p up to {_MAX_P})"
        )
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("scrypt password hash with too short a salt or a bad hash length")
    return PasswordHash(n, r, p, salt, digest)


@dataclass(frozen=True, slots=True)
class LoginDelay:
    """How failed logins slow down: ``free`` failures pass, then waits double from ``first`` up to ``longest``.

    The count is forgotten after a correct login, or after ``2 * longest`` seconds without a
    failure: the owner is slowed, never locked out for good.
    """

    free: int = 5
    first: float = 1.0
    longest: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.longest, self.first * 2.0 ** min(failures - self.free - 1, 30))


@dataclass(frozen=True, slots=True)
class VisitorPolicy:
    """What one tunnel asks of its visitors; empty parts ask nothing."""

    allow: tuple[IPv4Network | IPv6Network, ...] = ()
    #: User name → scrypt hash of the password.
    basic: Mapping[str, PasswordHash] = field(default_factory=dict)
    #: SHA-256 digests (raw bytes) of accepted bearer tokens.
    bearer: tuple[bytes, ...] = ()
    #: Requests per second per visitor address, and the burst above it; None: no limit.
    rate: float | None = None
    burst: int = 1
    login_delay: LoginDelay = LoginDelay()

    @property
    def asks_login(self) -> bool:
        return bool(self.basic or self.bearer)

    @property
    def is_empty(self) -> bool:
        return not (self.allow or self.asks_login or self.rate)

    def over(self, agent: VisitorPolicy | None) -> VisitorPolicy:
        """This (the bridge's) policy with the agent's filling only the parts this one leaves unset."""
        if agent is None:
            return self
        policy = self
        if not policy.allow:
            policy = replace(policy, allow=agent.allow)
        if not policy.asks_login:
            policy = replace(policy, basic=agent.basic, bearer=agent.bearer)
        if policy.rate is None:
            policy = replace(policy, rate=agent.rate, burst=agent.burst)
        return policy


def parse_agent_policy(hello: AgentHello | Mapping[str, Any]) -> VisitorPolicy | None:
    """The policy an agent asked for in its HELLO (or in HELLO settings), None if none; ValueError if malformed."""
    if not isinstance(hello, AgentHello):
        try:
            hello = AgentHello.decode(hello)
        except RemoteProtocolError as err:
            raise ValueError(str(err)) from None
    allow_items, basic_items = hello.visitor_allow, hello.visitor_basic
    if not allow_items and not basic_items:
        return None
    try:
        allow = tuple(ip_network(str(item), strict=False) for item in allow_items)
    except ValueError:
        raise ValueError("visitor_allow: expected IP addresses or CIDR networks") from None
    basic: dict[str, PasswordHash] = {}
    for item in basic_items:
        if not isinstance(item, dict) or not isinstance(item.get("user"), str) or not item["user"]:
            raise ValueError("visitor_basic: expected entries with a user and a password_hash")
        basic[item["user"]] = parse_password_hash(item.get("password_hash"))
    return VisitorPolicy(allow=allow, basic=basic)


def _password_hash(value: Any) -> PasswordHash:
    try:
        return parse_password_hash(value)
    except ValueError as err:
        raise vol.Invalid(str(err)) from None


def _user(value: Any) -> str:
    if not isinstance(value, str) or not value or ":" in value or not value.isprintable():
        raise vol.Invalid("expected a user name (printable, without ':')")
    return value


def _bearer_hash(value: Any) -> bytes:
    text = value.strip().lower() if isinstance(value, str) else ""
    hex_digest = text.removeprefix("sha256:")
    if not text.startswith("sha256:") or len(hex_digest) != 64 or not all(c in "0123456789abcdef" for c in hex_digest):
        # Not shown: it might be a clear token pasted where its hash belongs.
        raise vol.Invalid("expected sha256:HEX, the hash of a bearer token (rproxy hash-token prints it)")
    return bytes.fromhex(hex_digest)


def _cidrs(value: Any) -> tuple[IPv4Network | IPv6Network, ...]:
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(ip_network(str(item).strip(), strict=False) for item in items)
    except ValueError as err:
        raise vol.Invalid(f"expected IP addresses or CIDR networks ({err})") from None


_NUMBER = vol.All(vol.Coerce(float), vol.Range(min=0.001, max=1e6))
_TUNNEL_POLICY = vol.Schema(
    {
        vol.Optional("allow"): _cidrs,
        vol.Optional("auth"): vol.All(
            {
                vol.Optional("basic"): vol.All(
                    [{vol.Required("user"): _user, vol.Required("password_hash"): _password_hash}], vol.Length(min=1)
                ),
                vol.Optional("bearer"): vol.All([_bearer_hash], vol.Length(min=1)),
            },
            vol.Length(min=1, msg="expected basic or bearer"),
        ),
        vol.Optional("rate_limit"): {
            vol.Required("per_second"): _NUMBER,
            vol.Optional("burst"): vol.All(vol.Coerce(int), vol.Range(min=1, max=1_000_000)),
        },
        vol.Optional("failed_logins"): {
            vol.Optional("free"): vol.All(vol.Coerce(int), vol.Range(min=0, max=1000)),
            vol.Optional("first_delay"): _NUMBER,
            vol.Optional("longest_delay"): _NUMBER,
        },
    }
)


def parse_tunnel_policies(value: Any) -> dict[str, VisitorPolicy]:
    """The bridge config's ``tunnels:`` mapping, tunnel name → policy (vol.Invalid naming the bad part)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise vol.Invalid("expected a mapping of tunnel names to visitor policies")
    policies: dict[str, VisitorPolicy] = {}
    for name, settings in value.items():
        if not isinstance(name, str) or not is_tunnel_name(name):
            raise vol.Invalid(f"expected a tunnel name (a DNS label: a-z, 0-9, -), got {name!r}")
        try:
            entry = _TUNNEL_POLICY(settings if settings is not None else {})
        except vol.MultipleInvalid as err:
            first = err.errors[0]
            raise vol.Invalid(first.msg, path=[name, *first.path]) from None
        auth = entry.get("auth", {})
        rate = entry.get("rate_limit")
        delays = entry.get("failed_logins", {})
        defaults = LoginDelay()
        policies[name] = VisitorPolicy(
            allow=entry.get("allow", ()),
            basic={item["user"]: item["password_hash"] for item in auth.get("basic", [])},
            bearer=tuple(auth.get("bearer", [])),
            rate=rate["per_second"] if rate else None,
            burst=rate.get("burst", max(1, math.ceil(rate["per_second"]))) if rate else 1,
            login_delay=LoginDelay(
                delays.get("free", defaults.free),
                delays.get("first_delay", defaults.first),
                delays.get("longest_delay", defaults.longest),
            ),
        )
    return policies


def address_allowed(address: str, networks: Iterable[IPv4Network | IPv6Network]) -> bool:
    """Whether ``address`` (IPv4-mapped IPv6 counts as IPv4) is in one of ``networks``."""
    try:
        ip: IPv4Address | IPv6Address = ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)
