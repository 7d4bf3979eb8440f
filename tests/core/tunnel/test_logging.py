"""Logs that follow a request from bridge to agent to home app (one request id everywhere), and
``--log-format json`` for log collectors.

Real bridge, real agent, real aiohttp home app on 127.0.0.1; the JSON test runs the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import (
    ROOT,
    TOKEN,
    Proc,
    free_port,
    running_agent,
    running_bridge,
    start_app,
    wait_for_tunnel,
    wait_http,
)


async def test_one_request_id_in_the_bridges_log_the_agents_log_and_the_home_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bridge's access-log id reaches the home app as X-Request-Id (a visitor's own value is
    replaced) and names the request in the agent's debug log."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.getall("X-Request-Id", [""])[0])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner, url = await start_app(app)
    caplog.set_level(logging.DEBUG)
    try:
        async with (
            running_bridge(access_log=True) as bridge,
            running_agent(bridge.url, url),
            aiohttp.ClientSession() as session,
        ):
            await wait_for_tunnel(bridge)
            async with session.get(bridge.url + "/traced", headers={"X-Request-Id": "forged-by-visitor"}) as response:
                assert response.status == 200
    finally:
        await runner.cleanup()
    (request_id,) = seen
    assert request_id and request_id != "forged-by-visitor"
    access = [r.getMessage() for r in caplog.records if r.name == "rproxy.access"]
    assert any(f"id={request_id}" in line and "/traced" in line for line in access), access
    agent = [r.getMessage() for r in caplog.records if r.name == "rproxy.agent"]
    assert f"request {request_id}: GET /traced → 200" in agent, agent


def test_log_format_json_writes_one_object_per_line() -> None:
    """``rproxy --log-format json bridge``: every line of its log is a JSON object with time,
    level, logger and message; a bad ``$RPROXY_LOG_FORMAT`` is one line and exit code 2."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rproxy_core",
            "--log-format",
            "json",
            "bridge",
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            TOKEN,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    proc.terminate()
    _, rest = proc.communicate(timeout=15)
    lines = [line for line in (first + rest).splitlines() if line.strip()]
    assert len(lines) >= 2
    for line in lines:
        entry = json.loads(line)
        assert set(entry) >= {"time", "level", "logger", "message"}, entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])
    assert json.loads(lines[0])["message"].startswith("bridge listening on")
    assert TOKEN not in first + rest

    bad = subprocess.run(
        [sys.executable, "-m", "rproxy_core", "bridge", "--token", TOKEN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "RPROXY_LOG_FORMAT": "xml"},
    )
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "rproxy bridge: error: $RPROXY_LOG_FORMAT: expected text or json, got 'xml'"
    ), bad.stderr


async def test_the_agent_says_its_public_url_on_each_connect_and_one_line_per_loss(procs: Callable[..., Proc]) -> None:
    """``rproxy agent`` prints its public address when the tunnel comes up, one line when it is
    lost (with the wait before the next attempt), and the address again once it is back."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    await wait_http(base + "/_rproxy/health")
    agent = procs("agent", "--bridge", base, "--token", TOKEN, "--target", "http://127.0.0.1:9")
    await wait_output(agent, f"tunnel 'home' is up: {base}/", 1)
    bridge.kill()
    await wait_output(agent, "bridge unavailable (tunnel lost:", 1)
    procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    await wait_output(agent, f"tunnel 'home' is up: {base}/", 2)
    lines = agent.output().splitlines()
    assert sum("tunnel lost" in line for line in lines) == 1, lines
    assert all("Traceback" not in line for line in lines)


async def wait_output(proc: Proc, text: str, count: int, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while proc.output().count(text) < count:
            await asyncio.sleep(0.05)
