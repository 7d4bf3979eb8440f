"""The visitor guard's bookkeeping: per-address shares, the allowlist, the rate bucket, login slow-down."""

from __future__ import annotations

import base64
import hashlib
from ipaddress import ip_network

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from rproxy_core.bridge.shares import Shares, address_share
from rproxy_core.bridge.visitor_policy import (
    LoginDelay,
    VisitorGuard,
    VisitorPolicy,
    address_allowed,
    hash_password,
    parse_password_hash,
)

TOKEN = "let-me-in"


def request(authorization: str | None = None) -> web.Request:
    """A visitor's request as aiohttp hands it to the bridge (the guard reads only its headers)."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    return make_mocked_request("GET", "/", headers=headers)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer_policy(**kwargs: object) -> VisitorPolicy:
    return VisitorPolicy(bearer=(hashlib.sha256(TOKEN.encode()).digest(),), **kwargs)  # type: ignore[arg-type]


async def status(guard: VisitorGuard, address: str, authorization: str | None = None) -> int:
    """The guard's answer: 0 when it lets the visitor through, else the refusal's status."""
    refusal = await guard.admit(request(authorization), "home", address)
    return 0 if refusal is None else refusal.status


@pytest.mark.parametrize(
    ("address", "share"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
        ("", ""),
        ("not an address", "not an address"),
    ],
)
def test_an_address_counts_under_its_share(address: str, share: str) -> None:
    """IPv4 addresses count alone, IPv6 ones per /64, mapped IPv4 as IPv4, anything else as itself."""
    assert address_share(address) == share


@pytest.mark.parametrize("limit", [None, 0, 1, 3])
def test_shares_cap_each_key_and_forget_keys_that_hold_nothing(limit: int | None) -> None:
    """Each key takes up to ``limit``, others are unaffected, and giving back empties the table."""
    shares: Shares[str] = Shares(limit)
    taken = sum(shares.take("a") for _ in range(5))
    assert taken == (5 if limit is None else min(limit, 5))
    assert shares.take("b") is (limit != 0)
    for _ in range(taken):
        shares.give_back("a")
    shares.give_back("a")  # more than held: nothing below zero
    assert shares.held("a") == 0
    assert len(shares) == (0 if limit == 0 else 1)


@pytest.mark.parametrize(
    ("address", "networks", "allowed"),
    [
        ("203.0.113.5", ["203.0.113.0/24"], True),
        ("203.0.114.5", ["203.0.113.0/24"], False),
        ("::ffff:203.0.113.5", ["203.0.113.0/24"], True),
        ("2001:db8::1", ["2001:db8::/32", "10.0.0.0/8"], True),
        ("garbage", ["0.0.0.0/0"], False),
    ],
)
def test_the_allowlist(address: str, networks: list[str], allowed: bool) -> None:
    """address_allowed: inside one of the networks (IPv4-mapped counted as IPv4); no address, no entry."""
    assert address_allowed(address, [ip_network(n) for n in networks]) is allowed


async def test_a_tunnel_without_a_policy_is_not_guarded() -> None:
    """No policy, or an empty one: every visitor passes and nothing is remembered."""
    guard = VisitorGuard({"home": VisitorPolicy()})
    assert not guard.protects("home")
    assert await status(guard, "203.0.113.5") == 0
    assert guard.tracked("home") == 0


async def test_the_allowlist_refuses_other_addresses() -> None:
    guard = VisitorGuard({"home": VisitorPolicy(allow=(ip_network("203.0.113.0/24"),))})
    assert [await status(guard, a) for a in ("203.0.113.9", "198.51.100.1")] == [0, 403]


async def test_the_rate_bucket_is_per_address_share() -> None:
    """A burst of 3 per address: the fourth request waits (429 with Retry-After); another address has its own."""
    guard = VisitorGuard({"home": VisitorPolicy(rate=0.001, burst=3)})
    answers = [await status(guard, "2001:db8::1") for _ in range(3)]
    refusal = await guard.admit(request(), "home", "2001:db8::2")  # the same /64: the same bucket
    assert answers == [0, 0, 0]
    assert refusal is not None and refusal.status == 429 and int(refusal.headers["Retry-After"]) >= 1
    assert await status(guard, "203.0.113.5") == 0
    assert guard.tracked("home") == 2


@pytest.mark.parametrize(
    ("delay", "failures", "wait"),
    [
        (LoginDelay(5, 1.0, 300.0), 6, 1.0),
        (LoginDelay(5, 1.0, 300.0), 7, 2.0),
        (LoginDelay(5, 1.0, 300.0), 10, 16.0),
        (LoginDelay(5, 1.0, 300.0), 15, 300.0),
        (LoginDelay(5, 1.0, 300.0), 10_000, 300.0),
        (LoginDelay(0, 0.5, 4.0), 1, 0.5),
    ],
)
def test_login_delays_double_up_to_the_longest(delay: LoginDelay, failures: int, wait: float) -> None:
    """After the free failures the wait doubles from ``first``, capped at ``longest`` (and no overflow)."""
    assert delay.delay(failures) == wait


async def test_failed_logins_slow_one_address_down_and_a_good_one_resets() -> None:
    """Two free failures, then 429 with a growing wait; another address is not slowed; a right token passes."""
    guard = VisitorGuard({"home": bearer_policy(login_delay=LoginDelay(free=2, first=1.0, longest=60.0))})
    assert await status(guard, "203.0.113.5") == 401  # no credentials: the challenge, no failure counted
    answers = [await status(guard, "203.0.113.5", bearer("wrong")) for _ in range(2)]
    blocked = await guard.admit(request(bearer("wrong")), "home", "203.0.113.5")
    assert answers == [401, 401]
    assert blocked is not None and blocked.status == 429 and blocked.headers["Retry-After"] == "1"
    # While blocked even the right token waits: a guesser cannot try in between.
    assert await status(guard, "203.0.113.5", bearer(TOKEN)) == 429
    assert await status(guard, "198.51.100.7", bearer(TOKEN)) == 0
    assert await status(guard, "198.51.100.7", bearer("wrong")) == 401


async def test_a_basic_login_is_checked_once_and_then_remembered() -> None:
    """The right password passes (hashed once), a wrong one is challenged; the realm is the tunnel."""
    stored = parse_password_hash(hash_password("secret", n=2))
    guard = VisitorGuard({"home": VisitorPolicy(basic={"ann": stored})})
    assert await status(guard, "203.0.113.5", basic("ann", "secret")) == 0
    assert await status(guard, "203.0.113.5", basic("ann", "secret")) == 0  # from the cache
    challenge = await guard.admit(request(basic("ann", "wrong")), "home", "203.0.113.5")
    assert challenge is not None and challenge.status == 401
    assert challenge.headers["WWW-Authenticate"] == 'Basic realm="home", charset="UTF-8"'
    assert await status(guard, "203.0.113.5", basic("bob", "secret")) == 401
    assert await status(guard, "203.0.113.5", "Basic !!!notbase64") == 401


async def test_agents_of_one_tunnel_must_ask_for_the_same_protection() -> None:
    """The first agent's ask applies; a second asking otherwise is refused; the last leaving clears it."""
    guard = VisitorGuard({})
    ask = VisitorPolicy(allow=(ip_network("203.0.113.0/24"),))
    assert guard.agent_joins("home", "agent-1", ask) is None
    assert guard.protects("home") and guard.agent_policy("home") == ask
    refusal = guard.agent_joins("home", "agent-2", None)
    assert refusal is not None and "differs" in refusal
    assert guard.agent_joins("home", "agent-3", ask) is None
    guard.agent_leaves("home", "agent-1")
    assert guard.protects("home")
    guard.agent_leaves("home", "agent-3")
    assert not guard.protects("home") and guard.agent_policy("home") is None
