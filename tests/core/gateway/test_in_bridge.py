"""The gateway inside a real bridge: frames for a tunnel's host go through a real agent to an aiohttp home app."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from yarl import URL

from rproxy_core import Bridge
from rproxy_core.bridge.visitor_policy import VisitorPolicy
from rproxy_core.gateway import GatewayConfig
from tests.conftest import ROOT, free_port, running_agent, running_bridge, start_app

from .conftest import Post

DOMAIN = "example.test"
GATEWAY_HOST = "ws.example.test"


class HomeApp:
    """A home app with no WebSocket support: it gets frames as POSTs and answers through the callback."""

    def __init__(self, bridge_port: int) -> None:
        self.bridge_port = bridge_port
        self.posts: list[Post] = []
        self.arrived = asyncio.Condition()
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        post = Post(request.path, CIMultiDict(request.headers), await request.read())
        async with self.arrived:
            self.posts.append(post)
            self.arrived.notify_all()
        if request.path == "/frame":
            # Outbound to the bridge (what NAT allows): the callback's host is the gateway's name.
            await self.send(post.headers["x-ws-proxy-send"], b"echo: " + post.body)
        return web.Response(status=204)

    async def send(self, callback: str, body: bytes) -> int:
        url = URL(callback)
        assert self.session is not None
        async with self.session.post(
            f"http://127.0.0.1:{self.bridge_port}{url.raw_path}",
            data=body,
            headers={"Host": url.raw_authority, "Content-Type": "text/plain"},
        ) as response:
            return response.status

    async def wait(self, path: str, count: int) -> list[Post]:
        async with asyncio.timeout(10), self.arrived:
            await self.arrived.wait_for(lambda: len([p for p in self.posts if p.path == path]) >= count)
        return [p for p in self.posts if p.path == path]


@asynccontextmanager
async def bridge_with_gateway(**gateway: object) -> AsyncIterator[tuple[Bridge, HomeApp]]:
    port = free_port()
    config = GatewayConfig(
        host=GATEWAY_HOST,
        base_url=f"http://{GATEWAY_HOST}:{port}",
        allowlist=(rf"http://(home|away)\.{DOMAIN.replace('.', '[.]')}/.*",),
        access_log=False,
        retry_backoff=0.02,
        post_timeout=3,
    )
    policies = gateway.pop("visitor_policies", {})
    admin = gateway.pop("admin_token", None)
    for key, value in gateway.items():
        setattr(config, key, value)
    home = HomeApp(port)
    app = web.Application()
    app.router.add_post("/{tail:.*}", home.handle)
    app.router.add_get("/", _page)
    runner, home_url = await start_app(app)
    try:
        async with (
            aiohttp.ClientSession() as session,
            running_bridge(
                port=port, domain=DOMAIN, gateway=config, visitor_policies=policies, admin_token=admin
            ) as bridge,
            running_agent(bridge.url, home_url),
        ):
            home.session = session
            yield bridge, home
    finally:
        await runner.cleanup()


async def _page(request: web.Request) -> web.Response:
    return web.Response(text="the home app's page")


def client(bridge: Bridge, frame: str = "home", extra: str = "") -> ClientConnection:
    url = (
        f"ws://{GATEWAY_HOST}:{bridge.port}/connect?f=http://{frame}.{DOMAIN}/frame"
        f"&d=http://{frame}.{DOMAIN}/disconnect{extra}"
    )
    return connect(url, host="127.0.0.1", port=bridge.port)  # type: ignore[return-value]


async def test_frames_reach_the_home_app_through_the_tunnel_and_it_answers_by_callback() -> None:
    async with bridge_with_gateway() as (bridge, home):
        async with client(bridge) as ws:
            await ws.send("open the valve")
            assert await asyncio.wait_for(ws.recv(), 10) == "echo: open the valve"
            await ws.send(b"\x01\x02")
            assert await asyncio.wait_for(ws.recv(), 10) == "echo: \x01\x02"
            (frame, _) = await home.wait("/frame", 2)
            assert frame.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert frame.headers["X-Forwarded-For"] == "127.0.0.1"
            assert frame.headers["x-ws-proxy-send"].startswith(f"http://{GATEWAY_HOST}:{bridge.port}/")
            assert frame.headers["Host"] == f"home.{DOMAIN}"
        (gone,) = await home.wait("/disconnect", 1)
        assert json.loads(gone.body)["closed_by"] == "client"
        # Every other host name is still the bridge's: the home app's page as a visitor sees it.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{bridge.port}/", headers={"Host": f"home.{DOMAIN}"}) as response,
        ):
            assert response.status == 200 and await response.text() == "the home app's page"
        # The gateway's host has only the gateway's paths.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{bridge.port}/", headers={"Host": GATEWAY_HOST}) as response,
        ):
            assert response.status == 404 and "/connect?f=" in await response.text()


async def test_the_bridges_metrics_and_status_count_the_gateway() -> None:
    admin = {"Authorization": "Bearer admin-token-for-the-test"}
    async with (
        bridge_with_gateway(admin_token="admin-token-for-the-test") as (bridge, _home),
        client(bridge) as ws,
        aiohttp.ClientSession(headers=admin) as session,
    ):
        await ws.send("count me")
        assert await asyncio.wait_for(ws.recv(), 10) == "echo: count me"
        async with session.get(f"{bridge.url}/_rproxy/status.json") as response:
            gateway = (await response.json())["gateway"]
        assert gateway["open"] == 1 and gateway["accepted"] == 1
        assert (
            gateway["frames_in"] == 1 and gateway["frames_out"] == 1 and gateway["bytes_out"] == len("echo: count me")
        )
        async with session.get(f"{bridge.url}/_rproxy/metrics") as response:
            text = await response.text()
        assert "rproxy_gateway_connections 1.0" in text and "rproxy_gateway_frames_in_total 1.0" in text


async def test_a_protected_tunnel_is_refused_for_gateway_delivery() -> None:
    policy = VisitorPolicy(allow=(ip_network("127.0.0.1/32"),))
    async with bridge_with_gateway(visitor_policies={"home": policy}) as (bridge, home), client(bridge) as ws:
        await ws.send("let me in")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "protected by visitor rules" in closed.value.rcvd.reason
        assert home.posts == []


async def test_a_tunnel_without_an_agent_is_retried_then_1011() -> None:
    async with bridge_with_gateway(retries=2) as (bridge, _home), client(bridge, frame="away") as ws:
        await ws.send("anyone home?")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert "after 3 attempts" in closed.value.rcvd.reason and "away" in closed.value.rcvd.reason


async def test_a_bridge_restart_closes_clients_with_1001_and_the_disconnects_go_through_the_tunnel() -> None:
    async with bridge_with_gateway() as (bridge, home):
        ws = await client(bridge)
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 10) == "echo: hello"
        await bridge.stop()
        (gone,) = await home.wait("/disconnect", 1)
        assert json.loads(gone.body) == {
            "id": gone.headers["x-ws-proxy-id"],
            "code": 1001,
            "reason": "gateway shutting down",
            "closed_by": "gateway",
        }
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001


def _check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "rproxy_core", "bridge", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_the_bridge_config_takes_a_gateway_section_and_names_its_mistakes(tmp_path: Path) -> None:
    good = (
        "tokens: [a-token-of-some-length]\ndomain: example.com\ngateway:\n  host: ws.example.com\n"
        "  base_url: https://ws.example.com\n  allowlist: ['https://home\\.example\\.com/.*']\n"
    )
    result = _check_config(tmp_path, good)
    assert result.returncode == 0, result.stderr
    result = _check_config(tmp_path, good.replace("  host: ws.example.com\n", ""))
    assert result.returncode == 2 and "bridge.yaml: gateway.host: is required" in result.stderr, result.stderr
    result = _check_config(tmp_path, good.replace("'https://home\\.example\\.com/.*'", "'(('"))
    assert result.returncode == 2 and "gateway.allowlist[0]: not a regular expression" in result.stderr, result.stderr
    result = _check_config(tmp_path, good + "  listen: 0.0.0.0:1\n")
    assert result.returncode == 2 and "gateway.listen: unknown key" in result.stderr, result.stderr
