"""The agents of one tunnel cannot weaken its visitor protection (issue 15, finding 8).

Agent 1 asked the bridge for a visitor login; agent 2 of the same tunnel asked for none, and
the tunnel became open (and stayed open after agent 2 left). Now the first agent of a tunnel
sets what its agents ask for; a later agent asking for anything else is refused with the
reason (GOAWAY, logged), what was asked goes with the last agent, and the bridge's own
``tunnels:`` config wins over every agent. Real bridge, real agents, real home app; the
misbehaving second agent is also played by a small fake speaking the wire protocol.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.client import connect as ws_connect

from rproxy_core.agent import Agent, AgentConfig
from rproxy_core.bridge.visitor_policy import VisitorPolicy, hash_password, parse_password_hash
from rproxy_core.protocol.frames import ErrorCode
from tests.conftest import TOKEN, running_agent, running_bridge, text_app, wait_for_tunnel
from tests.core.security.test_visitor_protection import OWNER_HASH, basic, get, visitor_from
from tests.core.tunnel.test_resilience import CONNECT, agent_headers, goaway_before_close, hello_frame

LOGIN = {"visitor_basic": (("family", OWNER_HASH),)}
RIGHT = basic("family", "correct horse")


async def _fake_agent_asking(bridge_url: str, agent_id: str, **asked: object) -> tuple[int, str] | None:
    """An agent that sends a HELLO asking for ``asked``; returns the GOAWAY it got before the bridge hung up."""
    ws_url = bridge_url.replace("http", "ws", 1) + CONNECT
    async with asyncio.timeout(10), ws_connect(ws_url, additional_headers=agent_headers("home", agent_id)) as raw:
        await raw.recv()  # the bridge's HELLO
        await raw.send(hello_frame(agent_id=agent_id, **asked))
        return await goaway_before_close(raw)


async def test_a_second_agent_asking_for_no_login_is_refused_and_the_login_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "rproxy.bridge")
    async with text_app(lambda request: "home") as target, running_bridge() as bridge:
        url = bridge.url + "/door"
        async with running_agent(bridge.url, target, **LOGIN), visitor_from("127.0.0.1") as visitor:
            await wait_for_tunnel(bridge)
            assert (await get(visitor, url)).status == 401
            # The attack: a second agent of the tunnel whose HELLO asks for nothing.
            goaway = await _fake_agent_asking(bridge.url, "second")
            assert goaway is not None, "the differing agent was accepted"
            assert goaway[0] == ErrorCode.PROTOCOL_ERROR and "visitor policy" in goaway[1], goaway
            assert bridge.registry.tunnels() == {"home": 1}
            # The tunnel asks for the login still, and once the second agent is gone.
            response = await get(visitor, url)
            assert response.status == 401, "the tunnel was opened by the second agent"
            assert (await get(visitor, url, RIGHT)).status == 200
            refusals = [r.getMessage() for r in caplog.records if "home/second" in r.getMessage()]
            assert refusals and "refused" in refusals[0] and "visitor policy" in refusals[0], refusals
            assert not any(r.exc_info for r in caplog.records)


async def test_a_real_second_agent_with_another_policy_learns_why_and_keeps_retrying() -> None:
    async with text_app(lambda request: "home") as target, running_bridge() as bridge:
        async with running_agent(bridge.url, target, **LOGIN), visitor_from("127.0.0.1") as visitor:
            await wait_for_tunnel(bridge)
            second = Agent(
                AgentConfig(
                    bridge=bridge.url,
                    token=TOKEN,
                    target=target,
                    agent_id="second",
                    visitor_allow=("127.0.0.0/8",),
                    backoff_initial=0.1,
                    backoff_max=0.5,
                )
            )
            await second.start()
            try:
                async with asyncio.timeout(10):
                    while "visitor policy" not in (second.last_error or ""):
                        await asyncio.sleep(0.02)
                assert bridge.registry.tunnels() == {"home": 1}
                assert (await get(visitor, bridge.url + "/")).status == 401
            finally:
                await second.stop()


async def test_agents_asking_for_the_same_share_the_tunnel_and_the_policy_leaves_with_the_last() -> None:
    same = {"visitor_basic": (("family", OWNER_HASH),), "visitor_allow": ("127.0.0.1/32", "10.0.0.0/8")}
    reordered = {"visitor_basic": (("family", OWNER_HASH),), "visitor_allow": ("10.0.0.0/8", "127.0.0.1/32")}
    async with text_app(lambda request: "home") as target, running_bridge() as bridge:
        url = bridge.url + "/"
        async with visitor_from("127.0.0.1") as visitor:
            async with running_agent(bridge.url, target, agent_id="one", **same):
                async with running_agent(bridge.url, target, agent_id="two", **reordered):
                    await wait_for_tunnel(bridge, agents=2)
                    assert (await get(visitor, url)).status == 401
                await wait_for_tunnel(bridge, agents=1)
                # The first agent left is still protected by what both asked for.
                assert (await get(visitor, url)).status == 401
                assert (await get(visitor, url, RIGHT)).status == 200
            await wait_for_tunnel(bridge, agents=0)
            assert not bridge.visitor_guard.protects("home")
            assert bridge.visitor_guard.agent_policy("home") is None
            # With every agent gone, the next one sets the policy afresh: here, none.
            async with running_agent(bridge.url, target, agent_id="three"):
                await wait_for_tunnel(bridge)
                assert (await get(visitor, url)).status == 200


async def test_a_stricter_newcomer_is_refused_too_so_the_pool_never_disagrees() -> None:
    """Refusing every difference (not only a looser one) keeps one answer per tunnel: restart the pool to change it."""
    async with text_app(lambda request: "home") as target, running_bridge() as bridge:
        async with running_agent(bridge.url, target), visitor_from("127.0.0.1") as visitor:
            await wait_for_tunnel(bridge)
            goaway = await _fake_agent_asking(
                bridge.url, "stricter", visitor_basic=[{"user": "family", "password_hash": OWNER_HASH}]
            )
            assert goaway is not None and "visitor policy" in goaway[1], goaway
            assert (await get(visitor, bridge.url + "/")).status == 200
            assert bridge.registry.tunnels() == {"home": 1}


async def test_the_bridge_config_holds_whatever_any_agent_asks() -> None:
    operator = VisitorPolicy(basic={"operator": parse_password_hash(hash_password("operator pw", n=1 << 10))})
    async with (
        text_app(lambda request: "home") as target,
        running_bridge(visitor_policies={"home": operator}) as bridge,
    ):
        url = bridge.url + "/"
        async with running_agent(bridge.url, target), visitor_from("127.0.0.1") as visitor:
            await wait_for_tunnel(bridge)
            assert (await get(visitor, url)).status == 401
            assert (await get(visitor, url, basic("operator", "operator pw"))).status == 200
        await wait_for_tunnel(bridge, agents=0)
        # The operator's policy outlives every agent.
        assert bridge.visitor_guard.protects("home")
