"""Visitor protection at the bridge (issue 5): allowlist, basic and bearer auth, rate limit, slowed logins.

Real bridge, real agent, real home app on 127.0.0.1. Visitors come from 127.0.0.1 or 127.0.0.2
(both loopback; the client socket is bound to the one wanted), or, behind a trusted proxy,
from the address the proxy forwards. Every refusal is also checked not to have reached the
home app, which counts what it sees.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rproxy_core.agent import Agent, AgentConfig
from rproxy_core.bridge import Bridge
from rproxy_core.bridge.visitor_policy import LoginDelay, VisitorPolicy, hash_password, parse_password_hash
from rproxy_core.cli import _build_parser
from rproxy_core.cli.agent import agent_settings
from rproxy_core.cli.bridge import bridge_settings
from rproxy_core.exceptions import ConfigError
from tests.conftest import TOKEN, running_agent, running_bridge, start_app, text_app, wait_for_tunnel
from tests.core.tunnel.test_cli import clean_env, one_error_line, rproxy

# A cheap scrypt cost keeps the tests fast; the check is the same at any cost.
OWNER_HASH = hash_password("correct horse", n=1 << 10)
OWNER = parse_password_hash(OWNER_HASH)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Site:
    bridge: Bridge
    #: Paths the home app was asked for, in order.
    seen: list[str] = field(default_factory=list)


@asynccontextmanager
async def protected_site(
    agent_overrides: dict[str, object] | None = None, **bridge_overrides: object
) -> AsyncIterator[Site]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="home")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner, target = await start_app(app)
    try:
        async with (
            running_bridge(**bridge_overrides) as bridge,
            running_agent(bridge.url, target, **(agent_overrides or {})),
        ):
            await wait_for_tunnel(bridge)
            yield Site(bridge, seen)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def visitor_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A visitor whose connections leave from ``address`` (a loopback address other than 127.0.0.1 works too)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response


async def test_basic_auth_is_asked_and_only_the_right_password_passes() -> None:
    policy = VisitorPolicy(basic={"owner": OWNER})
    async with protected_site(visitor_policies={"home": policy}) as site, visitor_from("127.0.0.1") as visitor:
        url = site.bridge.url + "/lights"
        response = await get(visitor, url)
        assert response.status == 401
        assert response.headers.getall("WWW-Authenticate") == ['Basic realm="home", charset="UTF-8"']
        for wrong in (
            basic("owner", "wrong"),
            basic("stranger", "correct horse"),
            {"Authorization": "Basic !!!"},
            {"Authorization": "Bearer correct horse"},
        ):
            assert (await get(visitor, url, wrong)).status == 401
        assert site.seen == []
        for _ in range(3):  # later requests are answered from the remembered login, same result
            response = await get(visitor, url, basic("owner", "correct horse"))
            assert response.status == 200
        assert site.seen == ["/lights"] * 3


async def test_bearer_token_is_asked_and_only_the_right_token_passes() -> None:
    policy = VisitorPolicy(bearer=(hashlib.sha256(b"door-token-1234567890").digest(),))
    async with protected_site(visitor_policies={"home": policy}) as site, visitor_from("127.0.0.1") as visitor:
        url = site.bridge.url + "/api"
        response = await get(visitor, url, {"Authorization": "Bearer not-the-token"})
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="home"'
        assert site.seen == []
        assert (await get(visitor, url, {"Authorization": "Bearer door-token-1234567890"})).status == 200
        assert site.seen == ["/api"]


async def test_allowlist_refuses_addresses_outside_and_admits_those_inside() -> None:
    policy = VisitorPolicy(allow=(ip_network("127.0.0.2/32"), ip_network("10.1.0.0/16")))
    async with protected_site(visitor_policies={"home": policy}, trusted_proxies=[ip_network("127.0.0.3/32")]) as site:
        url = site.bridge.url + "/garage"
        async with visitor_from("127.0.0.1") as outsider, visitor_from("127.0.0.2") as insider:
            refused = await get(outsider, url)
            assert refused.status == 403
            # A visitor cannot talk its way in by claiming an allowed address: it is not a trusted proxy.
            assert (await get(outsider, url, {"X-Forwarded-For": "127.0.0.2"})).status == 403
            assert site.seen == []
            assert (await get(insider, url)).status == 200
        async with visitor_from("127.0.0.3") as proxy:
            # Behind a trusted proxy the forwarded address is the visitor's, and is what is checked.
            assert (await get(proxy, url, {"X-Forwarded-For": "10.9.9.9"})).status == 403
            assert (await get(proxy, url, {"X-Forwarded-For": "10.1.2.3"})).status == 200
        assert site.seen == ["/garage", "/garage"]


async def test_brute_force_logins_slow_down_but_the_owner_gets_in_after_the_wait() -> None:
    policy = VisitorPolicy(basic={"owner": OWNER}, login_delay=LoginDelay(free=2, first=1, longest=2))
    async with protected_site(visitor_policies={"home": policy}) as site:
        url = site.bridge.url + "/lock"
        async with visitor_from("127.0.0.1") as attacker, visitor_from("127.0.0.2") as owner_elsewhere:
            for _ in range(2):
                assert (await get(attacker, url, basic("owner", "guess"))).status == 401
            slowed = await get(attacker, url, basic("owner", "guess"))
            assert (slowed.status, slowed.headers["Retry-After"]) == (429, "1")
            # While the wait runs, even the right password from that address is not tried.
            during = await get(attacker, url, basic("owner", "correct horse"))
            assert (during.status, during.headers["Retry-After"]) == (429, "1")
            # Only that address is slowed: the owner elsewhere gets in at once.
            assert (await get(owner_elsewhere, url, basic("owner", "correct horse"))).status == 200
            await asyncio.sleep(1.1)
            slower = await get(attacker, url, basic("owner", "guess"))
            assert (slower.status, slower.headers["Retry-After"]) == (429, "2")  # the wait doubled
            await asyncio.sleep(2.1)
            assert (await get(attacker, url, basic("owner", "correct horse"))).status == 200
            # A correct login clears the count: the next mistake is a plain 401 again.
            assert (await get(attacker, url, basic("owner", "typo"))).status == 401
        assert site.seen == ["/lock", "/lock"]  # not one wrong attempt reached the home app


async def test_rate_limit_per_visitor_address() -> None:
    policy = VisitorPolicy(rate=2, burst=3)
    async with protected_site(visitor_policies={"home": policy}) as site:
        url = site.bridge.url + "/feed"
        async with visitor_from("127.0.0.1") as flooder, visitor_from("127.0.0.2") as neighbour:
            statuses = [(await get(flooder, url)).status for _ in range(3)]
            assert statuses == [200, 200, 200]
            over = await get(flooder, url)
            assert (over.status, over.headers["Retry-After"]) == (429, "1")
            assert (await get(neighbour, url)).status == 200  # each address has its own bucket
            await asyncio.sleep(0.6)  # one request's worth refilled at 2 per second
            assert (await get(flooder, url)).status == 200
        assert len(site.seen) == 5


async def test_agent_asks_for_protection_in_its_hello() -> None:
    agent = {"visitor_basic": (("family", OWNER_HASH),), "visitor_allow": ("127.0.0.2/32",)}
    async with protected_site(agent) as site:
        url = site.bridge.url + "/photos"
        async with visitor_from("127.0.0.1") as outsider, visitor_from("127.0.0.2") as insider:
            assert (await get(outsider, url, basic("family", "correct horse"))).status == 403
            assert (await get(insider, url)).status == 401
            assert (await get(insider, url, basic("family", "correct horse"))).status == 200
        assert site.seen == ["/photos"]


async def test_an_agents_policy_leaves_with_it() -> None:
    """The next agent of the tunnel, asking nothing, serves an open site; nothing stays behind."""
    async with text_app(lambda request: "home") as target, running_bridge() as bridge:
        async with running_agent(bridge.url, target, visitor_allow=("127.0.0.2/32",)):
            await wait_for_tunnel(bridge)
            async with visitor_from("127.0.0.1") as visitor:
                assert (await get(visitor, bridge.url + "/")).status == 403
        await wait_for_tunnel(bridge, agents=0)
        assert not bridge.visitor_guard.protects("home")
        async with running_agent(bridge.url, target), visitor_from("127.0.0.1") as visitor:
            await wait_for_tunnel(bridge)
            assert (await get(visitor, bridge.url + "/")).status == 200


async def test_bridge_config_wins_over_the_agents_hello() -> None:
    operator = VisitorPolicy(basic={"operator": parse_password_hash(hash_password("operator pw", n=1 << 10))})
    agent = {"visitor_basic": (("family", OWNER_HASH),), "visitor_allow": ("127.0.0.2/32",)}
    async with protected_site(agent, visitor_policies={"home": operator}) as site:
        url = site.bridge.url + "/photos"
        async with visitor_from("127.0.0.1") as outsider, visitor_from("127.0.0.2") as insider:
            # The agent's login is replaced by the operator's, not added to it ...
            assert (await get(insider, url, basic("family", "correct horse"))).status == 401
            assert (await get(insider, url, basic("operator", "operator pw"))).status == 200
            # ... while the part the operator left unset (the allowlist) is the agent's.
            assert (await get(outsider, url, basic("operator", "operator pw"))).status == 403
        assert site.seen == ["/photos"]


async def test_memory_for_visitor_addresses_is_bounded() -> None:
    policy = VisitorPolicy(rate=1000, burst=1000)
    async with (
        protected_site(
            visitor_policies={"home": policy}, trusted_proxies=[ip_network("127.0.0.1/32")], max_tracked_visitors=50
        ) as site,
        visitor_from("127.0.0.1") as proxy,
    ):
        for i in range(200):
            assert (
                await get(proxy, site.bridge.url + "/", {"X-Forwarded-For": f"10.0.{i // 250}.{i % 250}"})
            ).status == 200
        assert site.bridge.visitor_guard.tracked("home") == 50
        assert len(site.seen) == 200


async def test_unprotected_tunnels_keep_no_visitor_state() -> None:
    async with (
        protected_site(visitor_policies={"other": VisitorPolicy(rate=1)}) as site,
        visitor_from("127.0.0.1") as v,
    ):
        for _ in range(5):
            assert (await get(v, site.bridge.url + "/")).status == 200
        assert not site.bridge.visitor_guard.protects("home")
        assert site.bridge.visitor_guard.tracked("home") == 0


def test_agent_refuses_a_malformed_policy_before_dialling() -> None:
    config = AgentConfig(
        bridge="ws://127.0.0.1:1", token=TOKEN, target="http://127.0.0.1:2", visitor_basic=(("family", "hunter2"),)
    )
    with pytest.raises(ConfigError, match="scrypt"):
        config.validate()
    # A hash with a cost that would make the bridge spend gigabytes per login is refused too.
    huge = OWNER_HASH.replace("$1024$", f"${1 << 24}$")
    with pytest.raises(ConfigError, match="cost"):
        AgentConfig(
            bridge="ws://127.0.0.1:1", token=TOKEN, target="http://127.0.0.1:2", visitor_basic=(("family", huge),)
        ).validate()


# From the config file and the agent's flags, as users write them.


def write_bridge_yaml(path: Path, tunnel_lines: str) -> Path:
    path.write_text(f"listen: 127.0.0.1:0\ntokens: [{TOKEN}]\naccess_log: false\ntunnels:\n{tunnel_lines}")
    return path


async def test_bridge_yaml_and_agent_flags_set_up_protection(tmp_path: Path) -> None:
    config_file = write_bridge_yaml(
        tmp_path / "bridge.yaml",
        (
            "  home:\n"
            "    auth:\n"
            f"      basic: [{{user: owner, password_hash: '{OWNER_HASH}'}}]\n"
            "    rate_limit: {per_second: 50, burst: 10}\n"
            "    failed_logins: {free: 1, first_delay: 30}\n"
        ),
    )
    bridge_config = bridge_settings(_build_parser().parse_args(["bridge", "--config", str(config_file)]), {}).config
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="home")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner, target = await start_app(app)
    bridge = Bridge(bridge_config)
    await bridge.start()
    try:
        flags = [
            "agent",
            "--bridge",
            bridge.url,
            "--token",
            TOKEN,
            "--target",
            target,
            "--name",
            "home",
            "--visitor-allow",
            "127.0.0.2",
            "--visitor-auth",
            f"family:{OWNER_HASH}",
        ]
        agent = Agent(agent_settings(_build_parser().parse_args(flags), {}).configs[0])
        await agent.start()
        try:
            await agent.wait_connected(timeout=10)
            url = bridge.url + "/door"
            async with visitor_from("127.0.0.1") as outsider, visitor_from("127.0.0.2") as insider:
                assert (
                    await get(outsider, url, basic("owner", "correct horse"))
                ).status == 403  # the agent's allowlist
                assert (
                    await get(insider, url, basic("family", "correct horse"))
                ).status == 401  # the file's login wins
                assert (await get(insider, url, basic("owner", "correct horse"))).status == 200
                assert (await get(insider, url, basic("owner", "no"))).status == 401  # the one free failure
                slowed = await get(insider, url, basic("owner", "no"))
                assert (slowed.status, slowed.headers["Retry-After"]) == (429, "30")  # first_delay from the file
            assert seen == ["/door"]
        finally:
            await agent.stop()
    finally:
        await bridge.stop()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("tunnel_lines", "where"),
    [
        (
            "  home: {auth: {basic: [{user: owner, password_hash: hunter2}]}}\n",
            "tunnels.home.auth.basic[0].password_hash",
        ),
        ("  home: {auth: {bearer: [the-clear-token-itself]}}\n", "tunnels.home.auth.bearer[0]"),
        ("  home: {allow: [10.0.0.300]}\n", "tunnels.home.allow"),
        ("  Home: {allow: [10.0.0.0/8]}\n", "tunnels"),
        ("  home: {rate_limit: {burst: 5}}\n", "tunnels.home.rate_limit.per_second"),
    ],
)
def test_a_bad_tunnels_entry_is_one_line_naming_it(tmp_path: Path, tunnel_lines: str, where: str) -> None:
    result = rproxy(
        "bridge", "--check-config", str(write_bridge_yaml(tmp_path / "bridge.yaml", tunnel_lines)), env=clean_env()
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"bridge.yaml: {where}:" in line
    assert "hunter2" not in line and "the-clear-token-itself" not in line  # secrets are not echoed


def test_the_agent_flag_refuses_a_clear_password(tmp_path: Path) -> None:
    result = rproxy(
        "agent",
        "--bridge",
        "ws://127.0.0.1:1",
        "--token",
        TOKEN,
        "--target",
        "http://127.0.0.1:2",
        "--visitor-auth",
        "family:hunter2",
        env=clean_env(),
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--visitor-auth" in line and "hunter2" not in line
