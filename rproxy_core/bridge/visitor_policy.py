"""Visitor protection per tunnel, at the bridge: IP allowlist, basic or bearer auth, rate limit.

A tunnel's policy comes from the bridge's config (``tunnels:``) or from its agent's HELLO
(``visitor_allow``, ``visitor_basic``); where both set the same part, the bridge's wins, so an
agent cannot loosen what the operator decided. Every check runs before a stream is opened:
a refused visitor never reaches the tunnel, the agent or the home app.

Agents of one tunnel (a pool) must all ask for the same protection. Were the latest agent's
request to win, a second agent asking for nothing would open a tunnel whose first agent asked
for a login (and it would stay open after the second left). So the first agent of a tunnel
sets what its agents asked for; a later one asking for anything else is refused with the
reason, and what was asked goes when the tunnel's last agent does. The bridge's own ``tunnels:``
config wins over all of them, part by part.

All per-visitor state is bounded (an LRU of addresses per tunnel): this faces the internet,
and an attacker with many addresses must not be able to grow it without end. The price of the
bound is that a visitor pushed out of the table starts afresh.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from aiohttp import hdrs, web

# The model and its parsers are neutral (the agent builds policies too); the guard is the bridge's.
from ..policy import (
    LoginDelay,
    PasswordHash,
    VisitorPolicy,
    address_allowed,
    hash_password,
    parse_agent_policy,
    parse_password_hash,
    parse_tunnel_policies,
)
from .pages import error_response
from .shares import address_share

__all__ = [
    "DEFAULT_MAX_TRACKED_VISITORS",
    "LoginDelay",
    "VisitorGuard",
    "VisitorPolicy",
    "address_allowed",
    "hash_password",
    "parse_agent_policy",
    "parse_password_hash",
    "parse_tunnel_policies",
]

#: Visitor addresses remembered per protected tunnel (rate buckets and failed logins).
DEFAULT_MAX_TRACKED_VISITORS = 10_000

#: Successful basic logins remembered, so a browser that sends its password with every
#: request costs one scrypt per visitor, not one per request.
_VERIFIED_CACHE = 256
#: scrypt checks at once (each holds its memory for the duration).
_CONCURRENT_CHECKS = 2
#: scrypt checks running or waiting for a turn, over all tunnels and visitors; more get 503.
#: Each address may have at most its allowance of failed logins among them, so a single
#: address cannot fill this; it bounds the queue (and the wait) under a many-address attack.
_MAX_QUEUED_CHECKS = 64


class _Visitor:
    """What the bridge remembers of one visitor address on one tunnel."""

    __slots__ = ("tokens", "refilled", "failures", "last_failure", "blocked_until", "checking")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.refilled = now
        self.failures = 0
        self.last_failure = 0.0
        self.blocked_until = 0.0
        #: Logins of this address being hashed now (each a reserved try).
        self.checking = 0


class _TunnelGuard:
    def __init__(self, name: str, policy: VisitorPolicy, max_tracked: int) -> None:
        self.name = name
        self.policy = policy
        self.max_tracked = max_tracked
        self.visitors: OrderedDict[str, _Visitor] = OrderedDict()
        self.verified: OrderedDict[bytes, None] = OrderedDict()

    def visitor(self, address: str, now: float) -> _Visitor:
        visitor = self.visitors.get(address)
        if visitor is None:
            visitor = self.visitors[address] = _Visitor(self.policy.burst, now)
            if len(self.visitors) > self.max_tracked:
                self.visitors.popitem(last=False)
        else:
            self.visitors.move_to_end(address)
        return visitor


class VisitorGuard:
    """The bridge's visitor checks for every protected tunnel."""

    def __init__(self, policies: Mapping[str, VisitorPolicy], max_tracked: int = DEFAULT_MAX_TRACKED_VISITORS) -> None:
        self._configured = dict(policies)
        self._max_tracked = max_tracked
        #: Only tunnels with a non-empty policy: the relay's hot path is one lookup here.
        self._guards: dict[str, _TunnelGuard] = {}
        for name, policy in self._configured.items():
            self._apply(name, policy)
        self._cache_key = secrets.token_bytes(32)
        self._checks = asyncio.Semaphore(_CONCURRENT_CHECKS)
        #: Basic logins being hashed, by (tunnel, keyed digest of the credentials), and how many
        #: (running or waiting for a turn).
        self._checking: dict[tuple[str, bytes], asyncio.Task[bool]] = {}
        self._queued = 0
        #: Per tunnel with agents: what its agents asked for, and which agents they are.
        self._asked: dict[str, tuple[VisitorPolicy | None, set[Hashable]]] = {}

    def _apply(self, name: str, policy: VisitorPolicy) -> None:
        guard = self._guards.get(name)
        if policy.is_empty:
            self._guards.pop(name, None)
        elif guard is None:
            self._guards[name] = _TunnelGuard(name, policy, self._max_tracked)
        elif guard.policy != policy:
            guard.policy = policy
            guard.verified.clear()  # a password that was right may no longer be

    def agent_joins(self, name: str, agent: Hashable, asked: VisitorPolicy | None) -> str | None:
        """Agent ``agent`` of tunnel ``name`` asked for ``asked`` (None: nothing) in its HELLO.

        Every agent of a tunnel must ask for the same (see the module's note on agent pools):
        returns why ``agent`` is refused when it asks for anything else, None once it counts
        as one of the tunnel's agents (until :meth:`agent_leaves`).
        """
        joined = self._asked.get(name)
        if joined is None:
            self._asked[name] = (asked, {agent})
            self._apply(name, self._configured.get(name, VisitorPolicy()).over(asked))
            return None
        policy, agents = joined
        if not _same_ask(policy, asked):
            return (
                f"its visitor policy (visitor_allow, visitor_auth) differs from the one the tunnel's "
                f"{len(agents)} connected agent(s) asked for; give every agent of tunnel {name!r} the same"
            )
        agents.add(agent)
        return None

    def agent_leaves(self, name: str, agent: Hashable) -> None:
        """``agent`` no longer serves ``name``; with the last one, what they asked for goes too."""
        joined = self._asked.get(name)
        if joined is None or agent not in joined[1]:
            return
        joined[1].discard(agent)
        if not joined[1]:
            del self._asked[name]
            self._apply(name, self._configured.get(name, VisitorPolicy()))

    def agent_policy(self, name: str) -> VisitorPolicy | None:
        """What the agents of tunnel ``name`` asked for (None: nothing, or no agent)."""
        joined = self._asked.get(name)
        return joined[0] if joined is not None else None

    def policy(self, name: str) -> VisitorPolicy | None:
        guard = self._guards.get(name)
        return guard.policy if guard is not None else None

    def tracked(self, name: str) -> int:
        """Visitor addresses remembered for tunnel ``name``."""
        guard = self._guards.get(name)
        return len(guard.visitors) if guard is not None else 0

    def protects(self, name: str) -> bool:
        return name in self._guards

    async def admit(self, request: web.Request, name: str, address: str) -> web.Response | None:
        """None if the visitor may go on to tunnel ``name``; otherwise the answer that refuses it."""
        guard = self._guards.get(name)
        if guard is None:
            return None
        policy = guard.policy
        if policy.allow and not address_allowed(address, policy.allow):
            return error_response(request, 403, "this address may not visit this site")
        now = time.monotonic()
        # Counted per address share (an IPv6 /64 counts as one address, see shares.py): one
        # subscriber cannot get a fresh allowance of logins or requests per address.
        visitor = guard.visitor(address_share(address), now)
        if policy.rate:
            visitor.tokens = min(float(policy.burst), visitor.tokens + (now - visitor.refilled) * policy.rate)
            visitor.refilled = now
            if visitor.tokens < 1:
                wait = (1 - visitor.tokens) / policy.rate
                return error_response(request, 429, "too many requests, slow down", {"Retry-After": _seconds(wait)})
            visitor.tokens -= 1
        if not policy.asks_login:
            return None
        if visitor.blocked_until > now:
            return _too_many_failures(request, visitor.blocked_until - now)
        presented = request.headers.get(hdrs.AUTHORIZATION)
        if presented is None:
            return _challenge(request, guard)
        verdict = self._quick_verdict(guard, presented)
        if isinstance(verdict, _Check):
            check = self._checking.get((name, verdict.remembered))
            if check is None:
                # A try is reserved before the slow hash runs, and counted when it ends (in
                # _check_done), so N concurrent guesses cost what N guesses one after the other
                # would: at most the allowance is checked, the rest are refused unchecked.
                delays = policy.login_delay
                if visitor.failures and now - visitor.last_failure > 2 * delays.longest:
                    visitor.failures = 0
                if visitor.checking >= max(delays.free - visitor.failures, 1):
                    return error_response(
                        request,
                        429,
                        "too many logins at once from this address, try one at a time",
                        {"Retry-After": "1"},
                    )
                if self._queued >= _MAX_QUEUED_CHECKS:
                    return error_response(
                        request, 503, "too many logins are being checked, try again shortly", {"Retry-After": "1"}
                    )
                check = self._start_check(guard, visitor, verdict)
            # The same credentials already being checked (a browser's parallel requests after
            # the login): one hash for all, one try counted. Shielded: a visitor who hangs up
            # does not cancel the check, so hanging up cannot free a reservation early.
            ok = await asyncio.shield(check)
            if ok:
                return None
            now = time.monotonic()
            if visitor.blocked_until > now:
                return _too_many_failures(request, visitor.blocked_until - now)
            return _challenge(request, guard)
        if verdict:
            visitor.failures = 0
            return None
        failed = self._count_failure(visitor, policy.login_delay)
        return _too_many_failures(request, failed) if failed else _challenge(request, guard)

    @staticmethod
    def _count_failure(visitor: _Visitor, delays: LoginDelay) -> float:
        """Count one failed login; the seconds the address must now wait (0: none yet)."""
        now = time.monotonic()
        if now - visitor.last_failure > 2 * delays.longest:
            visitor.failures = 0
        visitor.failures += 1
        visitor.last_failure = now
        if visitor.failures > delays.free:
            wait = delays.delay(visitor.failures)
            visitor.blocked_until = now + wait
            return wait
        return 0.0

    def _quick_verdict(self, guard: _TunnelGuard, presented: str) -> bool | _Check:
        """What can be told without the slow hash: True or False, or the scrypt check still to run."""
        policy = guard.policy
        scheme, _, credentials = presented.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and policy.bearer:
            digest = hashlib.sha256(credentials.strip().encode("utf-8", "surrogateescape")).digest()
            # Every entry is compared, so the time taken does not tell which one matched.
            return sum(hmac.compare_digest(digest, accepted) for accepted in policy.bearer) > 0
        if scheme != "basic" or not policy.basic:
            return False
        try:
            user_password = base64.b64decode(credentials.strip(), validate=True)
        except (ValueError, binascii.Error):
            return False
        remembered = hmac.new(self._cache_key, user_password, hashlib.sha256).digest()
        if remembered in guard.verified:
            guard.verified.move_to_end(remembered)
            return True
        user, colon, password = user_password.partition(b":")
        if not colon:
            return False
        return _Check(policy, remembered, user, password)

    def _start_check(self, guard: _TunnelGuard, visitor: _Visitor, check: _Check) -> asyncio.Task[bool]:
        visitor.checking += 1
        self._queued += 1
        task = asyncio.create_task(self._scrypt(check))
        key = (guard.name, check.remembered)
        self._checking[key] = task

        def done(task: asyncio.Task[bool]) -> None:
            visitor.checking -= 1
            self._queued -= 1
            self._checking.pop(key, None)
            ok = not task.cancelled() and task.exception() is None and task.result()
            if ok:
                visitor.failures = 0
                if guard.policy is check.policy:
                    guard.verified[check.remembered] = None
                    if len(guard.verified) > _VERIFIED_CACHE:
                        guard.verified.popitem(last=False)
            else:
                self._count_failure(visitor, check.policy.login_delay)

        task.add_done_callback(done)
        return task

    async def _scrypt(self, check: _Check) -> bool:
        users = check.policy.basic
        stored = _stored_hash(users, check.user)
        # At most _CONCURRENT_CHECKS hashes at once, each in a worker thread (the event loop
        # never waits for one), and at most _MAX_QUEUED_CHECKS waiting (more get 503).
        async with self._checks:
            ok = await asyncio.to_thread(stored.matches, check.password)
        return ok and any(hmac.compare_digest(check.user, name.encode()) for name in users)


@dataclass(frozen=True, slots=True)
class _Check:
    """A basic login whose password still has to be hashed."""

    policy: VisitorPolicy
    remembered: bytes
    user: bytes
    password: bytes = field(repr=False)


def _same_ask(one: VisitorPolicy | None, other: VisitorPolicy | None) -> bool:
    """Whether two agents asked for the same protection (the order of the allowlist aside)."""
    if one is None or other is None:
        return one is other
    return set(one.allow) == set(other.allow) and dict(one.basic) == dict(other.basic)


def _stored_hash(users: Mapping[str, PasswordHash], user: bytes) -> PasswordHash:
    """The hash to check against; for an unknown user still a real one, so timing does not reveal who exists."""
    found = None
    for name, stored in users.items():
        if hmac.compare_digest(user, name.encode()):
            found = stored
    return found if found is not None else next(iter(users.values()))


def _seconds(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def _too_many_failures(request: web.Request, wait: float) -> web.Response:
    return error_response(
        request,
        429,
        "too many failed logins from this address, wait before trying again",
        {"Retry-After": _seconds(wait)},
    )


def _challenge(request: web.Request, guard: _TunnelGuard) -> web.Response:
    response = error_response(request, 401, "this site asks for a login")
    realm = guard.name.replace('"', "")
    if guard.policy.basic:
        response.headers.add(hdrs.WWW_AUTHENTICATE, f'Basic realm="{realm}", charset="UTF-8"')
    if guard.policy.bearer:
        response.headers.add(hdrs.WWW_AUTHENTICATE, f'Bearer realm="{realm}"')
    return response
