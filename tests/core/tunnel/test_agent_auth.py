"""Who may open a tunnel: tokens, protocol versions and tunnel names, checked before any upgrade."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import Agent, AgentConfig, AuthenticationError
from rproxy_core.agent import AgentState
from tests.conftest import ROOT, TOKEN, Proc, free_port, running_agent, running_bridge, start_app, wait_http

CONNECT = "/_rproxy/connect"
WRONG = "wrong-token-value-" + "q" * 12


def agent_headers(token: str = TOKEN, protocol: str = "1", name: str = "home") -> dict[str, str]:
    """The upgrade headers a real agent sends."""
    return {
        "Authorization": f"Bearer {token}",
        "Rproxy-Protocol": protocol,
        "Rproxy-Tunnel": name,
        "Rproxy-Agent-Id": "auth-test",
    }


async def health(http: aiohttp.ClientSession, base: str) -> dict[str, object]:
    async with http.get(base + "/_rproxy/health") as response:
        assert response.status == 200
        return await response.json()  # type: ignore[no-any-return]


async def hello_app() -> tuple[web.AppRunner, str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from home")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return await start_app(app)


def clean_env() -> dict[str, str]:
    """The environment without rproxy settings that could leak into a CLI run."""
    import os

    names = ("PORT", "REMOTE_URL", "LOCAL_URL", "AGENT_ID")
    return {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_") and k not in names}


async def test_a_wrong_token_is_refused_with_401_before_any_tunnel_exists(http: aiohttp.ClientSession) -> None:
    """The upgrade with a wrong token (or none) fails with 401 and the health page lists no tunnel."""
    async with asyncio.timeout(20), running_bridge() as bridge:
        url = bridge.url + CONNECT
        for headers in (agent_headers(WRONG), {k: v for k, v in agent_headers().items() if k != "Authorization"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(url, headers=headers)
            assert info.value.status == 401
        assert (await health(http, bridge.url))["tunnels"] == {}
        assert bridge.registry.tunnels() == {}


async def test_an_in_process_agent_with_a_wrong_token_fails_for_good() -> None:
    """Agent.wait() raises AuthenticationError and the agent's state is FAILED; it does not retry."""
    runner, target = await hello_app()
    try:
        async with running_bridge() as bridge:
            agent = Agent(
                AgentConfig(
                    bridge=bridge.url,
                    token=WRONG,
                    target=target,
                    agent_id="wrong",
                    backoff_initial=0.1,
                    backoff_max=0.2,
                )
            )
            try:
                async with asyncio.timeout(20):
                    with pytest.raises(AuthenticationError, match="token"):
                        await agent.wait()
                assert agent.state is AgentState.FAILED
                assert agent.last_error is not None and "token" in agent.last_error
                assert agent.reconnects == 0
                assert bridge.registry.tunnels() == {}
            finally:
                await agent.stop()
    finally:
        await runner.cleanup()


async def test_the_cli_agent_with_a_wrong_token_exits_3_with_one_line_and_the_bridge_logs_no_token(
    procs: Callable[..., Proc],
) -> None:
    """The agent exits 3 with one stderr line about the token; the bridge logs "refused agent" but no token."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, env={"RPROXY_LOG_LEVEL": "debug"})
    await wait_http(base + "/_rproxy/health")
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "rproxy_core",
            "agent",
            "--bridge",
            base,
            "--token",
            WRONG,
            "--target",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=clean_env(),
    )
    assert result.returncode == 3, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "token" in lines[0]
    assert "Traceback" not in result.stderr and WRONG not in result.stderr
    assert result.stdout == ""

    deadline = time.monotonic() + 10
    while "refused agent" not in bridge.output() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert bridge.stop() == 0
    log = bridge.log_path.read_text()  # output() needs the log file still open
    assert "refused agent" in log
    assert WRONG not in log and TOKEN not in log


async def test_an_unsupported_protocol_version_is_refused_with_426(http: aiohttp.ClientSession) -> None:
    """An agent offering only protocol 99 gets 426 and the versions the bridge speaks."""
    async with asyncio.timeout(20), running_bridge() as bridge:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(bridge.url + CONNECT, headers=agent_headers(protocol="99"))
        assert info.value.status == 426
        async with http.get(bridge.url + CONNECT, headers=agent_headers(protocol="99")) as response:
            assert response.status == 426
            assert response.headers["Rproxy-Protocol"] == "1"
        assert bridge.registry.tunnels() == {}


@pytest.mark.parametrize(
    "name", ["Home", "-home", "a_b", "x" * 64, ""], ids=["upper", "dash", "underscore", "long", "empty"]
)
async def test_a_bad_tunnel_name_is_refused_with_400(name: str, http: aiohttp.ClientSession) -> None:
    """A tunnel name that is not a lower-case DNS label gets 400 before the upgrade."""
    async with asyncio.timeout(20), running_bridge() as bridge:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(bridge.url + CONNECT, headers=agent_headers(name=name))
        assert info.value.status == 400
        assert bridge.registry.tunnels() == {}


async def test_a_plain_get_on_the_connect_path_is_refused_with_400(http: aiohttp.ClientSession) -> None:
    """A correctly authenticated request that is not a WebSocket upgrade gets 400, not a tunnel."""
    async with asyncio.timeout(20), running_bridge() as bridge:
        async with http.get(bridge.url + CONNECT, headers=agent_headers()) as response:
            assert response.status == 400
            assert "WebSocket" in await response.text()
        assert bridge.registry.tunnels() == {}


async def test_every_token_in_a_token_file_is_accepted(
    procs: Callable[..., Proc], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A bridge started with --token-file holding two tokens (and a comment) accepts agents with either."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# agents allowed in\nfirst-token-aaaaaaaaaaaa\n\n  second-token-bbbbbbbbbbb  \n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs("bridge", "--listen", f"127.0.0.1:{port}", "--token-file", str(tokens))
    await wait_http(base + "/_rproxy/health")
    runner, target = await hello_app()
    agents = [
        Agent(
            AgentConfig(
                bridge=base, token=token, target=target, name=name, agent_id=name, backoff_initial=0.1, backoff_max=0.2
            )
        )
        for token, name in (("first-token-aaaaaaaaaaaa", "one"), ("second-token-bbbbbbbbbbb", "two"))
    ]
    try:
        async with asyncio.timeout(30):
            for agent in agents:
                await agent.start()
                await agent.wait_connected(timeout=15)
            deadline = time.monotonic() + 10
            while set((await health(http, base))["tunnels"]) != {"one", "two"}:  # type: ignore[arg-type]
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for name in ("one", "two"):
                async with http.get(base + "/", headers={"Host": f"{name}.example"}) as response:
                    assert response.status == 200
                    assert await response.text() == "hello from home"
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(base + CONNECT, headers=agent_headers("# agents allowed in"))
            assert info.value.status == 401
    finally:
        for agent in agents:
            await agent.stop()
        await runner.cleanup()


async def test_debug_logging_never_shows_the_token_or_visitor_traffic(caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG, neither the agent token nor a visitor's cookie appears in any log record."""
    from homeapps import serve_home

    caplog.set_level(logging.DEBUG)
    secret_cookie = "session=" + "c00kie" * 4
    async with serve_home() as (_home, target), running_bridge() as bridge:
        async with running_agent(bridge.url, target), aiohttp.ClientSession() as session:
            async with session.get(bridge.url + "/hello", headers={"Cookie": secret_cookie}) as response:
                assert response.status == 200
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "Authorization: [redacted]" in text  # the handshake is still logged, masked
    assert TOKEN not in text
    assert "c00kie" not in text
