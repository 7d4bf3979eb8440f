"""Agent identity by Ed25519 key pair, the bridge's half: authorized keys and challenges.

The key encoding, derived names and signatures are in :mod:`rproxy_core.identity`. An agent
proves it holds a key by signing a nonce the bridge just gave it. The signed message
also names the tunnel and the bridge's host, so a signature is good for one registration of
one name at one bridge, once: the bridge forgets a nonce as soon as it is presented.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ConfigError
from ..headers import is_tunnel_name

# The key pieces live in the neutral identity module (the agent needs them without the bridge);
# named here too, so ``bridge.keys`` keeps answering for them.
from ..identity import (
    AUTH_SCHEME,
    decode_public_key,
    derived_name,
    encode_public_key,
    fingerprint,
    sign,
    signed_message,
    verify_signature,
)
from .auth import credential_lines

__all__ = [
    "AUTH_SCHEME",
    "CHALLENGES_PER_SOURCE",
    "ChallengeStore",
    "KeyAuth",
    "KeyGrant",
    "decode_public_key",
    "derived_name",
    "encode_public_key",
    "fingerprint",
    "read_authorized_keys",
    "sign",
    "signed_message",
    "verify_signature",
]

_KEY_TYPE = "ed25519"
#: Outstanding challenges per source address: an agent needs one at a time, a few agents
#: behind one NAT a few.
CHALLENGES_PER_SOURCE = 16
#: Outstanding challenges in all: a few hundred kilobytes, whatever a flood sends.
CHALLENGES_TOTAL = 4096
#: Seconds a challenge stays good: one round trip is enough, a slow link gets plenty.
CHALLENGE_LIFETIME = 30.0


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """An authorized agent key and the tunnel names it may claim (None: any)."""

    key: bytes
    names: frozenset[str] | None

    def allows(self, name: str) -> bool:
        return self.names is None or name in self.names


class KeyAuth:
    """The authorized keys, and whether open registration lets any key have its derived name."""

    def __init__(self, grants: list[KeyGrant], *, open_registration: bool = False) -> None:
        self._grants: dict[bytes, list[KeyGrant]] = {}
        for grant in grants:
            self._grants.setdefault(grant.key, []).append(grant)
        self.open_registration = open_registration

    def __len__(self) -> int:
        return len(self._grants)

    def __bool__(self) -> bool:
        return bool(self._grants) or self.open_registration

    def allows(self, raw_key: bytes, name: str) -> bool:
        """Whether the holder of ``raw_key`` may serve tunnel ``name``."""
        if any(grant.allows(name) for grant in self._grants.get(raw_key, ())):
            return True
        return self.open_registration and name == derived_name(raw_key)


def read_authorized_keys(path: str | Path) -> list[KeyGrant]:
    """Keys from a file of lines ``ed25519 BASE64 NAME [NAME ...]`` (``*``: any name); ``#`` comments.

    Raises:
        ConfigError: unreadable file, or a bad line (the message names the file and line).
    """
    grants: list[KeyGrant] = []
    for number, fields in credential_lines(path):
        where = f"{path}: line {number}"
        if fields[0].lower() != _KEY_TYPE:
            raise ConfigError(f"{where}: expected 'ed25519 KEY NAME...', got key type {fields[0][:20]!r}")
        if len(fields) < 3:
            raise ConfigError(f"{where}: expected 'ed25519 KEY NAME...' (the names it may claim, or *)")
        try:
            raw = decode_public_key(fields[1])
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        names = fields[2:]
        for name in names:
            if name != "*" and not is_tunnel_name(name):
                raise ConfigError(f"{where}: expected a DNS label (a-z, 0-9, -) or *, got {name!r}")
        grants.append(KeyGrant(raw, None if "*" in names else frozenset(names)))
    return grants


class ChallengeStore:
    """Outstanding nonces, each good once and for ``lifetime`` seconds.

    The challenge endpoint is open to anyone, so the store is bounded twice: one source holds
    at most ``per_source`` nonces (its oldest go first), and all sources together at most
    ``capacity`` (the oldest overall go first). A flood therefore costs a fixed amount of
    memory, and one flooding address mostly pushes out its own nonces.
    """

    def __init__(
        self,
        capacity: int = CHALLENGES_TOTAL,
        per_source: int = CHALLENGES_PER_SOURCE,
        lifetime: float = CHALLENGE_LIFETIME,
    ) -> None:
        self.capacity = capacity
        self.per_source = per_source
        self.lifetime = lifetime
        self._nonces: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._by_source: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._nonces)

    def issue(self, source: str) -> str:
        self._expire()
        mine = self._by_source.setdefault(source, OrderedDict())
        while len(mine) >= self.per_source:
            self._forget(next(iter(mine)))
        while len(self._nonces) >= self.capacity:
            self._forget(next(iter(self._nonces)))
        nonce = secrets.token_urlsafe(24)
        self._nonces[nonce] = (time.monotonic() + self.lifetime, source)
        self._by_source.setdefault(source, OrderedDict())[nonce] = None
        return nonce

    def consume(self, nonce: str) -> bool:
        """Whether ``nonce`` was outstanding; it is not any more either way."""
        self._expire()
        if nonce not in self._nonces:
            return False
        self._forget(nonce)
        return True

    def _forget(self, nonce: str) -> None:
        _, source = self._nonces.pop(nonce)
        mine = self._by_source.get(source)
        if mine is not None:
            mine.pop(nonce, None)
            if not mine:
                del self._by_source[source]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._nonces:
            nonce, (deadline, _) = next(iter(self._nonces.items()))
            if deadline > now:
                break
            self._forget(nonce)
