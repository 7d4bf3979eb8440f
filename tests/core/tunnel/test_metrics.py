"""The bridge's metrics (Prometheus text, parsed with prometheus-client's own parser) and status
JSON, checked against traffic the test sent; ``rproxy status`` against a live bridge process;
the admin token required and never logged.

Real bridge, real agents, real aiohttp home app on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from rproxy_core import Agent, AgentConfig
from rproxy_core.bridge.auth import hash_token
from tests.conftest import ROOT, TOKEN, free_port, running_agent, running_bridge, start_app, wait_for_tunnel, wait_http

ADMIN = "admin-token-" + "a" * 24
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(base + "/_rproxy/metrics", headers=AUTH) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(await response.text())


async def home_app() -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/missing":
            return web.Response(status=404, text="no")
        if request.path == "/broken":
            return web.Response(status=500, text="oops")
        await request.read()
        return web.Response(body=b"x" * 10_000)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return await start_app(app)


async def test_metrics_count_the_traffic_the_test_sent() -> None:
    """Requests by status class, unrouted answers, latency histogram, tunnel bytes, agents,
    agent connects across a reconnect, refused agents by reason: all equal what was sent."""
    runner, url = await home_app()
    try:
        async with (
            running_bridge(admin_token=ADMIN, domain="example.test") as bridge,
            aiohttp.ClientSession() as session,
        ):
            async with running_agent(bridge.url, url):
                await wait_for_tunnel(bridge)
                for path, count in (("/ok", 20), ("/missing", 3), ("/broken", 2)):
                    for _ in range(count):
                        async with session.post(
                            bridge.url + path, data=b"u" * 5000, headers={"Host": "home.example.test"}
                        ) as response:
                            await response.read()
                async with session.get(bridge.url + "/", headers={"Host": "elsewhere.test"}) as response:
                    assert response.status == 404
                first = await scrape(session, bridge.url)
            home = (("tunnel", "home"),)
            assert first[("rproxy_requests_total", (("code", "2xx"), *home))] == 20
            assert first[("rproxy_requests_total", (("code", "4xx"), *home))] == 3
            assert first[("rproxy_requests_total", (("code", "5xx"), *home))] == 2
            assert first[("rproxy_unrouted_requests_total", (("code", "4xx"),))] == 1
            assert first[("rproxy_request_duration_seconds_count", home)] == 25
            assert first[("rproxy_request_duration_seconds_bucket", (("le", "+Inf"), *home))] == 25
            assert first[("rproxy_agents", home)] == 1 and first[("rproxy_tunnels", ())] == 1
            # 25 bodies of 5,000 bytes went to the agent, 20 of 10,000 came back (plus framing).
            assert 25 * 5000 < first[("rproxy_tunnel_sent_bytes_total", home)] < 25 * 5000 + 25 * 2000
            assert 20 * 10_000 < first[("rproxy_tunnel_received_bytes_total", home)] < 20 * 10_000 + 25 * 2000
            assert first[("rproxy_agent_connects_total", home)] == 1

            async with running_agent(bridge.url, url):  # the same tunnel again: a reconnect
                await wait_for_tunnel(bridge)
                wrong = Agent(AgentConfig(bridge=bridge.url, token="wrong-" + "w" * 20, target=url))
                with pytest.raises(Exception, match="401"):
                    await wrong.probe()
                second = await scrape(session, bridge.url)
            assert second[("rproxy_agent_connects_total", home)] == 2
            assert second[("rproxy_agent_handshake_failures_total", (("reason", "credential"),))] == 1
            # Bytes of the closed first connection are kept.
            assert (
                second[("rproxy_tunnel_received_bytes_total", home)]
                >= first[("rproxy_tunnel_received_bytes_total", home)]
            )
    finally:
        await runner.cleanup()


async def test_status_json_lists_tunnels_agents_and_streams() -> None:
    """The status JSON: the tunnel, its agent (id, address, protocol, round-trip time) and a
    visitor WebSocket in flight."""

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    runner, url = await start_app(app)
    try:
        async with (
            running_bridge(admin_token=ADMIN) as bridge,
            running_agent(bridge.url, url, heartbeat_interval=0.2),
            aiohttp.ClientSession() as session,
        ):
            await wait_for_tunnel(bridge)
            async with session.ws_connect(bridge.url + "/ws") as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "hi"
                await asyncio.sleep(0.5)  # a heartbeat or two: the round-trip time is known
                async with session.get(bridge.url + "/_rproxy/status.json", headers=AUTH) as response:
                    status = await response.json()
            (tunnel,) = status["tunnels"]
            (agent,) = tunnel["agents"]
            assert tunnel["name"] == "home" and agent["id"] == "test-agent" and agent["address"] == "127.0.0.1"
            assert agent["protocol"] == 1 and agent["websockets"] == 1 and agent["streams"] == 1
            assert agent["rtt_ms"] is not None and agent["rtt_ms"] > 0
            # On loopback no window needs more than its fixed credit.
            assert 0 < agent["link_rtt_ms"] <= agent["rtt_ms"] and agent["tuned_window_bytes"] == 0
            assert status["visitor_connections"] >= 1
    finally:
        await runner.cleanup()


async def test_the_admin_token_is_required_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No admin token configured: 404. Configured: 401 without it or with a wrong one (logged
    without the token), 200 with it; a sha256: hash of it works as well."""
    caplog.set_level(logging.DEBUG)
    async with running_bridge() as bridge, aiohttp.ClientSession() as session:
        for path in ("/_rproxy/metrics", "/_rproxy/status.json"):
            async with session.get(bridge.url + path, headers=AUTH) as response:
                assert response.status == 404
    for configured in (ADMIN, hash_token(ADMIN)):
        async with running_bridge(admin_token=configured) as bridge, aiohttp.ClientSession() as session:
            for path in ("/_rproxy/metrics", "/_rproxy/status.json"):
                for headers, status in (({}, 401), ({"Authorization": "Bearer guess-" + "g" * 20}, 401), (AUTH, 200)):
                    async with session.get(bridge.url + path, headers=headers) as response:
                        assert response.status == status, (configured[:7], path, headers)
                        if status == 401:
                            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert ADMIN not in caplog.text and "guess-" not in caplog.text
    assert "wrong admin token" in caplog.text


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rproxy_core", "status", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def test_rproxy_status_prints_a_live_bridges_tunnels(tmp_path: Path) -> None:
    """``rproxy status`` against a real bridge process: the tunnel and its agent in tables, --json
    the same data; a wrong token exits 3, a bridge without an admin token 1, each in one line."""
    runner, url = await home_app()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "bridge.log").open("w")
    bridge = subprocess.Popen(
        [sys.executable, "-m", "rproxy_core", "bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RPROXY_ADMIN_TOKEN": ADMIN},
    )
    try:
        await wait_http(base + "/_rproxy/health")
        async with running_agent(base, url, agent_id="pi@garden"), aiohttp.ClientSession() as session:
            for _ in range(7):
                async with session.get(base + "/x") as response:
                    await response.read()
            shown = await asyncio.to_thread(run_status, "--bridge", base, env={"RPROXY_ADMIN_TOKEN": ADMIN})
            assert shown.returncode == 0, shown.stderr
            lines = shown.stdout.splitlines()
            assert lines[0].startswith(f"bridge {base} (rproxy ")
            tunnel_row = next(line for line in lines if line.startswith("home "))
            assert tunnel_row.split()[:4] == ["home", "1", "0", "7"]
            assert any(line.startswith("pi@garden ") and " home " in line for line in lines), shown.stdout
            as_json = await asyncio.to_thread(run_status, "--bridge", base, "--admin-token", ADMIN, "--json")
            data: dict[str, Any] = json.loads(as_json.stdout)
            assert data["tunnels"][0]["requests"]["2xx"] == 7
        wrong = await asyncio.to_thread(run_status, "--bridge", base, "--admin-token", "nope-" + "n" * 20)
        assert wrong.returncode == 3 and wrong.stderr.strip().count("\n") == 0, wrong.stderr
        assert "refused the admin token (401)" in wrong.stderr
        missing = await asyncio.to_thread(run_status, "--bridge", base)
        assert missing.returncode == 2 and "--admin-token" in missing.stderr
    finally:
        bridge.terminate()
        bridge.wait(timeout=15)
        log.close()
        await runner.cleanup()
    assert ADMIN not in (tmp_path / "bridge.log").read_text()
    off = await asyncio.to_thread(run_status, "--bridge", base, "--admin-token", ADMIN)
    assert off.returncode == 1 and "cannot connect" in off.stderr
