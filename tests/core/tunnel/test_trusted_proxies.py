"""Bridges behind a load balancer: whose X-Forwarded-For/-Proto the bridge believes, and how it is set.

The visitor here connects from 127.0.0.1, so trusting 127.0.0.0/8 makes the test client play
the trusted proxy in front of the bridge.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path

import aiohttp
import pytest
from homeapps import HomeApp, home_tunnel, serve_home

from rproxy_core import Agent, AgentConfig, ConfigError
from rproxy_core.cli import _build_parser, bridge_config
from tests.conftest import ROOT, TOKEN, Proc, free_port, running_bridge, wait_for_tunnel, wait_http

LOOPBACK = [ip_network("127.0.0.0/8")]


async def forwarded(url: str, headers: dict[str, str], home: HomeApp) -> tuple[list[str], list[str]]:
    """Send a GET with ``headers``; return the X-Forwarded-For and -Proto values the home app saw."""
    before = len(home.seen)
    async with aiohttp.ClientSession() as session, session.get(url + "/whoami", headers=headers) as response:
        assert response.status == 200
    assert len(home.seen) == before + 1
    seen = home.seen[-1]
    return seen.header_values("X-Forwarded-For"), seen.header_values("X-Forwarded-Proto")


def _is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


SPOOF = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9", "X-Forwarded-Proto": "https"}


async def test_without_trusted_proxies_visitor_forwarding_headers_are_replaced() -> None:
    async with asyncio.timeout(15), home_tunnel() as t:
        assert await forwarded(t.url, {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}, t.home) == (
            ["127.0.0.1"],
            ["http"],
        )
        assert await forwarded(t.url, SPOOF, t.home) == (["127.0.0.1"], ["http"])


async def test_a_trusted_proxys_chain_gives_the_rightmost_untrusted_address() -> None:
    """From a trusted peer, the walk from the right stops at the first untrusted entry; proto is believed."""
    async with asyncio.timeout(15), home_tunnel(trusted_proxies=LOOPBACK) as t:
        assert await forwarded(t.url, SPOOF, t.home) == (["203.0.113.9"], ["https"])
        # Trusted hops on the right are walked past.
        chain = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 127.0.0.5, 127.0.0.9"}
        assert await forwarded(t.url, chain, t.home) == (["203.0.113.9"], ["http"])
        # Several header lines form one chain.
        async with aiohttp.ClientSession() as session:
            headers = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9, 127.0.0.5")]
            async with session.get(t.url + "/lines", headers=headers) as response:
                assert response.status == 200
        assert t.home.seen[-1].header_values("X-Forwarded-For") == ["203.0.113.9"]
        # No X-Forwarded-* at all: the peer itself is the visitor.
        assert await forwarded(t.url, {}, t.home) == (["127.0.0.1"], ["http"])
        # A proto other than http/https is not believed.
        assert await forwarded(t.url, {"X-Forwarded-Proto": "gopher"}, t.home) == (["127.0.0.1"], ["http"])


async def test_a_garbage_entry_left_of_the_visitor_is_ignored() -> None:
    async with asyncio.timeout(15), home_tunnel(trusted_proxies=LOOPBACK) as t:
        for chain in ("not-an-ip, 203.0.113.9", "999.1.1.1,203.0.113.9", "<script>, 203.0.113.9, 127.0.0.2"):
            assert (await forwarded(t.url, {"X-Forwarded-For": chain}, t.home))[0] == ["203.0.113.9"], chain


@pytest.mark.parametrize("chain", ["not-an-ip", "203.0.113.9, garbage", "203.0.113.9, , 127.0.0.5", "unknown"])
async def test_a_garbage_entry_where_an_address_belongs_gives_a_real_address(chain: str) -> None:
    """The bridge never crashes on a broken chain, and the home app gets one IP address, never the garbage."""
    async with asyncio.timeout(15), home_tunnel(trusted_proxies=LOOPBACK) as t:
        [address], _ = await forwarded(t.url, {"X-Forwarded-For": chain}, t.home)
        assert _is_ip(address), f"the home app was told the visitor is {address!r}"


async def test_proxies_that_are_not_the_peer_do_not_make_its_headers_believed() -> None:
    """Trusting 10.0.0.0/8 does not trust a visitor connecting from 127.0.0.1."""
    async with asyncio.timeout(15), home_tunnel(trusted_proxies=[ip_network("10.0.0.0/8")]) as t:
        assert await forwarded(t.url, SPOOF, t.home) == (["127.0.0.1"], ["http"])
        assert await forwarded(t.url, {"X-Forwarded-For": "10.1.2.3"}, t.home) == (["127.0.0.1"], ["http"])


async def test_the_admit_hook_sees_the_address_found_behind_the_proxy() -> None:
    asked: list[str] = []

    def admit(address: str) -> str | None:
        asked.append(address)
        return "not from there" if address.startswith("203.0.113.") else None

    async with asyncio.timeout(15), serve_home() as (home, target), running_bridge(trusted_proxies=LOOPBACK) as bridge:
        agent = Agent(AgentConfig(bridge=bridge.url, token=TOKEN, target=target, agent_id="admit"), admit=admit)
        await agent.start()
        try:
            await agent.wait_connected(timeout=5)
            await wait_for_tunnel(bridge, timeout=5)
            async with aiohttp.ClientSession() as session:
                async with session.get(bridge.url + "/x", headers=SPOOF) as response:
                    assert response.status == 403
                async with session.get(bridge.url + "/y", headers={"X-Forwarded-For": "198.51.100.7"}) as response:
                    assert response.status == 200
        finally:
            await agent.stop()
    assert asked == ["203.0.113.9", "198.51.100.7"]
    assert [s.raw_path for s in home.seen] == ["/y"]


# Configuration: flag, environment, config file.


def parse_bridge(*flags: str, environ: dict[str, str] | None = None) -> list[object]:
    args = _build_parser().parse_args(["bridge", "--token", TOKEN, *flags])
    return list(bridge_config(args, environ or {}).trusted_proxies)


def test_trusted_proxy_flags_parse_into_networks() -> None:
    assert parse_bridge() == []
    assert parse_bridge("--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "127.0.0.1") == [
        ip_network("10.0.0.0/8"),
        ip_network("127.0.0.1/32"),
    ]
    assert parse_bridge("--trusted-proxy", "2001:db8::/32", "--trusted-proxy", "10.1.2.3/8") == [
        ip_network("2001:db8::/32"),
        ip_network("10.0.0.0/8"),  # host bits allowed, as in a copied interface address
    ]


def test_trusted_proxies_from_the_environment_and_a_config_file(tmp_path: Path) -> None:
    env = {"RPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.0.0/16"}
    assert parse_bridge(environ=env) == [ip_network("10.0.0.0/8"), ip_network("192.168.0.0/16")]
    # The flag wins over the variable.
    assert parse_bridge("--trusted-proxy", "172.16.0.0/12", environ=env) == [ip_network("172.16.0.0/12")]
    toml = tmp_path / "bridge.toml"
    toml.write_text('trusted_proxy = ["10.0.0.0/8", "::1"]\n')
    assert parse_bridge("--config", str(toml)) == [ip_network("10.0.0.0/8"), ip_network("::1/128")]
    toml.write_text('trusted-proxy = "192.0.2.1"\n')
    assert parse_bridge("--config", str(toml)) == [ip_network("192.0.2.1/32")]


def test_a_bad_trusted_proxy_is_a_config_error_naming_where_it_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--trusted-proxy") as info:
        parse_bridge("--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "not-an-ip")
    assert "not-an-ip" in str(info.value)
    with pytest.raises(ConfigError, match=r"\$RPROXY_TRUSTED_PROXIES"):
        parse_bridge(environ={"RPROXY_TRUSTED_PROXIES": "10.0.0.0/8,10.0.0.0/33"})
    toml = tmp_path / "bridge.toml"
    toml.write_text('trusted_proxy = ["example.com"]\n')
    with pytest.raises(ConfigError, match="trusted_proxy"):
        parse_bridge("--config", str(toml))


def _clean_env() -> dict[str, str]:
    names = ("PORT", "REMOTE_URL", "LOCAL_URL", "AGENT_ID")
    return {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_") and k not in names}


def test_the_rproxy_command_exits_2_with_one_line_for_a_bad_trusted_proxy() -> None:
    rproxy = Path(sys.executable).parent / "rproxy"
    result = subprocess.run(
        [
            str(rproxy),
            "bridge",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--token",
            TOKEN,
            "--trusted-proxy",
            "not-an-ip",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=_clean_env(),
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--trusted-proxy" in lines[0] and "not-an-ip" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_a_bridge_process_started_with_trusted_proxy_believes_that_proxy(procs: Callable[..., Proc]) -> None:
    """End to end: ``rproxy bridge --trusted-proxy 127.0.0.1`` hands the visitor's address to the home app."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs(
        "bridge",
        "--listen",
        f"127.0.0.1:{port}",
        "--token",
        TOKEN,
        "--trusted-proxy",
        "127.0.0.1",
        "--no-access-log",
        env=_clean_env(),
    )
    async with asyncio.timeout(20), serve_home() as (home, target):
        await wait_http(base + "/_rproxy/health")
        agent = Agent(AgentConfig(bridge=base, token=TOKEN, target=target, agent_id="cli-proxy"))
        await agent.start()
        try:
            await agent.wait_connected(timeout=5)
            async with aiohttp.ClientSession() as session:
                while True:  # until the bridge has registered the agent (it answers 503 before)
                    async with session.get(base + "/_rproxy/health") as response:
                        if "home" in (await response.json())["tunnels"]:
                            break
                    await asyncio.sleep(0.02)
            assert await forwarded(base, SPOOF, home) == (["203.0.113.9"], ["https"])
        finally:
            await agent.stop()
