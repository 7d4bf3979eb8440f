"""Agent features an embedding application uses: its own tunnel session, probe, stats, reconnect,
and the per-agent options (request timeout, forwarded headers, visitor credentials, admit hook).

Every test runs a real bridge, a real agent and a real aiohttp home app on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy

from rproxy_core import Agent, AgentConfig, AuthenticationError, Bridge, ConfigError, RproxyConnectionError
from rproxy_core.agent import AgentState, AgentStats
from tests.conftest import TOKEN, free_port, running_agent, running_bridge, start_app, wait_for_tunnel

WRONG = "wrong-token-value-" + "q" * 12
UPLOAD = 100 << 10
DOWNLOAD = 200 << 10
VIA = ["websockets", "session"]


@dataclass
class Seen:
    path: str
    headers: CIMultiDictProxy[str]


@dataclass
class Home:
    """A home app that records what reached it, with a handler per behaviour under test."""

    seen: list[Seen] = field(default_factory=list)
    #: The slow handler noticed its client (the agent) leave.
    slow_abandoned: asyncio.Event = field(default_factory=asyncio.Event)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/big", self.big)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/trickle", self.trickle)
        app.router.add_get("/ws", self.websocket)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def _record(self, request: web.Request) -> None:
        self.seen.append(Seen(request.path, request.headers))

    async def echo(self, request: web.Request) -> web.Response:
        self._record(request)
        body = await request.read()
        return web.json_response({"path": request.path, "body": body.decode("latin-1")})

    async def big(self, request: web.Request) -> web.Response:
        """Reads the upload whole and answers DOWNLOAD bytes."""
        self._record(request)
        body = await request.read()
        return web.Response(body=b"d" * DOWNLOAD, headers={"X-Upload-Size": str(len(body))})

    async def slow(self, request: web.Request) -> web.Response:
        """Answers after 2 s, unless its client leaves first."""
        self._record(request)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if request.transport is None or request.transport.is_closing():
                self.slow_abandoned.set()
                break
            await asyncio.sleep(0.02)
        return web.Response(text="slow answer")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        """Sends its head at once, then six pieces 0.15 s apart (0.9 s of body)."""
        self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for i in range(6):
            await asyncio.sleep(0.15)
            await response.write(f"piece {i};".encode())
        await response.write_eof()
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str("echo: " + msg.data)
        return ws


@asynccontextmanager
async def serve_home() -> AsyncIterator[tuple[Home, str]]:
    home = Home()
    runner, url = await start_app(home.build())
    try:
        yield home, url
    finally:
        await runner.cleanup()


@asynccontextmanager
async def tunnel(
    bridge_overrides: dict[str, object] | None = None, **agent_overrides: object
) -> AsyncIterator[tuple[Bridge, Agent, Home]]:
    """Home app ← agent (with ``agent_overrides`` on its config) ← bridge."""
    async with (
        asyncio.timeout(15),
        serve_home() as (home, target),
        running_bridge(**(bridge_overrides or {})) as bridge,
        running_agent(bridge.url, target, **agent_overrides) as agent,
    ):
        # The agent is up once it has the bridge's HELLO; the bridge routes to it once it has
        # the agent's, a moment later.
        await wait_for_tunnel(bridge, timeout=5)
        yield bridge, agent, home


@asynccontextmanager
async def tunnel_session(via: str) -> AsyncIterator[aiohttp.ClientSession | None]:
    """None (the agent dials with websockets) or an application's session the test owns."""
    if via == "websockets":
        yield None
        return
    async with aiohttp.ClientSession() as session:
        yield session


def config(bridge: str, target: str, token: str = TOKEN, **overrides: object) -> AgentConfig:
    cfg = AgentConfig(
        bridge=bridge, token=token, target=target, agent_id="feature-test", backoff_initial=0.1, backoff_max=0.2
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def ws_url(bridge: Bridge, path: str) -> str:
    return bridge.url.replace("http", "ws", 1) + path


def stats_timers(agent: Agent) -> list[asyncio.TimerHandle]:
    """Live timer handles on this loop that would emit ``agent``'s stats."""
    scheduled = getattr(asyncio.get_running_loop(), "_scheduled", [])
    return [h for h in scheduled if not h.cancelled() and getattr(h, "_callback", None) == agent._emit_stats]


# Dialling through the application's aiohttp session.


class CountingConnector(aiohttp.TCPConnector):
    """A TCPConnector noting every connection it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.requested: list[str] = []

    async def connect(self, req, traces, timeout):  # type: ignore[no-untyped-def]
        self.requested.append(req.url.path)
        return await super().connect(req, traces, timeout)


async def test_an_agent_dials_through_the_applications_session_and_leaves_it_open(http: aiohttp.ClientSession) -> None:
    """HTTP and a WebSocket relay over a tunnel dialled through the test's session; stop() leaves it usable."""
    async with asyncio.timeout(15), serve_home() as (home, target), running_bridge() as bridge:
        connector = CountingConnector()
        async with aiohttp.ClientSession(connector=connector) as session:
            agent = Agent(config(bridge.url, target), tunnel_session=session)
            await agent.start()
            try:
                assert await agent.wait_connected(timeout=5) == bridge.url + "/"
                assert connector.requested == ["/_rproxy/connect"]  # the tunnel went through our pool
                await wait_for_tunnel(bridge, timeout=5)
                async with http.post(bridge.url + "/via-session", data=b"ping") as response:
                    assert response.status == 200
                    assert await response.json() == {"path": "/via-session", "body": "ping"}
                async with http.ws_connect(ws_url(bridge, "/ws")) as ws:
                    await ws.send_str("hello")
                    assert (await ws.receive_str()) == "echo: hello"
            finally:
                await agent.stop()
            assert agent.state is AgentState.STOPPED
            assert not session.closed
            assert not connector.closed
            async with session.get(bridge.url + "/_rproxy/health") as response:  # still usable
                assert response.status == 200
            await until(lambda: not bridge.registry.names())
        assert home.paths() == ["/via-session", "/ws"]


async def test_a_wrong_token_through_a_session_fails_for_good() -> None:
    """A refused token dialled through a session: AuthenticationError, state FAILED, no retry."""
    async with (
        asyncio.timeout(15),
        serve_home() as (_, target),
        running_bridge() as bridge,
        aiohttp.ClientSession() as session,
    ):
        agent = Agent(config(bridge.url, target, token=WRONG), tunnel_session=session)
        try:
            with pytest.raises(AuthenticationError):
                await agent.wait()
            assert agent.state is AgentState.FAILED
            assert isinstance(agent.failure, AuthenticationError)
            assert agent.reconnects == 0
        finally:
            await agent.stop()
        assert not session.closed
        assert not bridge.registry.names()


@pytest.mark.parametrize("via", VIA)
async def test_a_bridge_that_redirects_the_agent_is_not_followed(via: str) -> None:
    """A 302 on the connect path is an error: the agent never dials (nor sends its token to) the Location."""
    elsewhere: list[str] = []
    dialled: list[str] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(f"{request.path} {request.headers.get('Authorization', '')}")
        return web.Response(text="not a bridge")

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", record)
    async with asyncio.timeout(15), serve_home() as (_, target):
        other_runner, other_url = await start_app(other)

        async def redirect(request: web.Request) -> web.Response:
            dialled.append(request.path)
            raise web.HTTPFound(other_url + "/_rproxy/connect")

        redirector = web.Application()
        redirector.router.add_route("*", "/{tail:.*}", redirect)
        runner, url = await start_app(redirector)
        try:
            async with tunnel_session(via) as session:
                agent = Agent(config(url, target), tunnel_session=session)
                await agent.start()
                try:
                    await until(lambda: len(dialled) >= 2)  # it tried, and tried again
                    assert agent.state is not AgentState.CONNECTED
                    assert "302" in (agent.last_error or "")
                finally:
                    await agent.stop()
        finally:
            await runner.cleanup()
            await other_runner.cleanup()
    assert dialled[:2] == ["/_rproxy/connect", "/_rproxy/connect"]
    assert elsewhere == []


# probe()


@pytest.mark.parametrize("via", VIA)
async def test_probe_returns_the_public_url_and_leaves_no_tunnel(via: str, caplog: pytest.LogCaptureFixture) -> None:
    """probe() completes the handshake, returns the bridge's public URL, and says goodbye."""
    caplog.set_level(logging.INFO, logger="rproxy.bridge")
    async with asyncio.timeout(15), serve_home() as (home, target), running_bridge() as bridge:
        async with tunnel_session(via) as session:
            agent = Agent(config(bridge.url, target), tunnel_session=session)
            assert await agent.probe(timeout=5) == bridge.url + "/"
            await until(lambda: not bridge.registry.names())
            await asyncio.sleep(0.1)
            assert not bridge.registry.names()
            assert not bridge.registry.connections()
            assert agent.state is AgentState.STOPPED
            assert agent.connection is None
            if session is not None:
                assert not session.closed
            # A second probe works too (nothing was left half-open).
            assert await agent.probe(timeout=5) == bridge.url + "/"
            await until(lambda: not bridge.registry.names())
            await until(lambda: caplog.text.count("disconnected: peer said goodbye: probe done") == 2)
        assert home.seen == []


@pytest.mark.parametrize("via", VIA)
async def test_probe_with_a_wrong_token_raises_authentication_error(via: str) -> None:
    async with (
        asyncio.timeout(15),
        serve_home() as (_, target),
        running_bridge() as bridge,
        tunnel_session(via) as session,
    ):
        agent = Agent(config(bridge.url, target, token=WRONG), tunnel_session=session)
        with pytest.raises(AuthenticationError):
            await agent.probe(timeout=5)
        assert not bridge.registry.names()
        if session is not None:
            assert not session.closed


@pytest.mark.parametrize("via", VIA)
async def test_probe_with_nothing_listening_raises_connection_error(via: str) -> None:
    async with asyncio.timeout(15), serve_home() as (_, target), tunnel_session(via) as session:
        agent = Agent(config(f"http://127.0.0.1:{free_port()}", target), tunnel_session=session)
        with pytest.raises(RproxyConnectionError) as info:
            await agent.probe(timeout=5)
        assert not isinstance(info.value, AuthenticationError)
        if session is not None:
            assert not session.closed


# Stats.


async def test_stats_count_requests_and_tunnel_bytes(http: aiohttp.ClientSession) -> None:
    """requests_served counts each request; the byte counters grow by at least the bodies relayed."""
    async with tunnel() as (bridge, agent, _):
        before = agent.stats
        assert (before.requests_served, before.active_streams, before.reconnects) == (0, 0, 0)
        async with http.post(bridge.url + "/big", data=b"u" * UPLOAD) as response:
            assert response.status == 200
            assert response.headers["X-Upload-Size"] == str(UPLOAD)
            assert len(await response.read()) == DOWNLOAD
        for i in range(2):
            async with http.get(bridge.url + f"/small/{i}") as response:
                assert response.status == 200
        await until(lambda: agent.stats.requests_served == 3)
        after = agent.stats
        assert after.requests_served == 3
        assert after.active_streams == 0
        assert after.bytes_received - before.bytes_received >= UPLOAD
        assert after.bytes_sent - before.bytes_sent >= DOWNLOAD
        assert after.bytes_received - before.bytes_received < UPLOAD + 20_000  # counted once, not per copy
        assert after.bytes_sent - before.bytes_sent < DOWNLOAD + 20_000


async def test_rtt_becomes_a_float_after_a_heartbeat() -> None:
    async with tunnel(heartbeat_interval=0.2) as (_, agent, _):
        await until(lambda: agent.stats.rtt is not None)
        rtt = agent.stats.rtt
        assert isinstance(rtt, float)
        assert 0.0 <= rtt < 1.0
    assert agent.stats.rtt is None  # stopped: no connection, no RTT


async def test_a_stats_listener_hears_changes_only_until_removed(http: aiohttp.ClientSession) -> None:
    """The listener gets each changed AgentStats, nothing while traffic is idle, and nothing after remove()."""
    calls: list[AgentStats] = []
    async with tunnel() as (bridge, agent, _):  # default heartbeat: RTT stays None, so idle means unchanged
        remove = agent.add_stats_listener(calls.append, interval=0.1)
        await asyncio.sleep(0.35)
        assert len(calls) <= 1  # at most the first snapshot
        async with http.get(bridge.url + "/one") as response:
            assert response.status == 200
        await until(lambda: bool(calls) and calls[-1].requests_served == 1)
        await asyncio.sleep(0.25)  # let trailing tunnel frames (window updates) be counted
        settled = len(calls)
        assert calls[-1] == agent.stats
        await asyncio.sleep(0.4)  # four intervals without traffic
        assert len(calls) == settled
        assert all(a != b for a, b in itertools.pairwise(calls))
        assert all(isinstance(c, AgentStats) for c in calls)
        remove()
        async with http.get(bridge.url + "/two") as response:
            assert response.status == 200
        await until(lambda: agent.stats.requests_served == 2)
        await asyncio.sleep(0.35)
        assert len(calls) == settled
        assert stats_timers(agent) == []


async def test_stop_cancels_the_stats_timer() -> None:
    calls: list[AgentStats] = []
    async with tunnel() as (_, agent, _):
        agent.add_stats_listener(calls.append, interval=0.1)
        await until(lambda: bool(calls))
        assert len(stats_timers(agent)) == 1
    # running_agent's exit called agent.stop()
    assert stats_timers(agent) == []
    count = len(calls)
    await asyncio.sleep(0.3)
    assert len(calls) == count


async def test_stats_listeners_keep_hearing_after_reconnect(http: aiohttp.ClientSession) -> None:
    """reconnect() is stop() + start(): a listener added before it still hears about new traffic."""
    calls: list[AgentStats] = []
    async with tunnel() as (bridge, agent, _):
        agent.add_stats_listener(calls.append, interval=0.1)
        await until(lambda: bool(calls))
        await agent.reconnect()
        await agent.wait_connected(timeout=5)
        await wait_for_tunnel(bridge, "home", 1, timeout=5)
        heard = len(calls)
        async with http.get(bridge.url + "/after-reconnect") as response:
            assert response.status == 200
        await until(lambda: agent.stats.requests_served >= 1)
        await asyncio.sleep(0.35)
        assert len(calls) > heard, "the stats listener went silent after reconnect()"


# reconnect()


async def test_reconnect_drops_the_tunnel_and_dials_again(http: aiohttp.ClientSession) -> None:
    async with tunnel() as (bridge, agent, home):
        [first] = bridge.registry.connections()
        await agent.reconnect()
        assert await agent.wait_connected(timeout=5) == bridge.url + "/"
        await until(lambda: len(bridge.registry.connections()) == 1 and bridge.registry.connections()[0] is not first)
        assert first.closed
        assert agent.state is AgentState.CONNECTED
        async with http.get(bridge.url + "/after") as response:
            assert response.status == 200
        assert home.paths() == ["/after"]


async def test_reconnect_on_a_stopped_agent_does_nothing() -> None:
    async with asyncio.timeout(15), serve_home() as (_, target), running_bridge() as bridge:
        never_started = Agent(config(bridge.url, target))
        await never_started.reconnect()
        assert never_started.state is AgentState.STOPPED
        stopped = Agent(config(bridge.url, target))
        await stopped.start()
        await stopped.wait_connected(timeout=5)
        await wait_for_tunnel(bridge, timeout=5)
        await stopped.stop()
        await stopped.reconnect()
        assert stopped.state is AgentState.STOPPED
        await asyncio.sleep(0.3)
        assert not bridge.registry.names()
        assert never_started.state is stopped.state is AgentState.STOPPED


# request_timeout


async def test_the_agents_request_timeout_answers_504_before_the_bridges(http: aiohttp.ClientSession) -> None:
    """A home app that thinks for 2 s: 504 after about 0.3 s, and the agent leaves the home app."""
    async with tunnel({"request_timeout": 10.0}, request_timeout=0.3) as (bridge, _, home):
        started = time.monotonic()
        async with http.get(bridge.url + "/slow") as response:
            assert response.status == 504
        assert time.monotonic() - started < 1.5
        async with asyncio.timeout(1.5):
            await home.slow_abandoned.wait()


async def test_the_agents_request_timeout_does_not_cut_a_slow_body(http: aiohttp.ClientSession) -> None:
    """The timeout covers the response head only: a body trickling for 0.9 s arrives whole."""
    async with tunnel({"request_timeout": 10.0}, request_timeout=0.3) as (bridge, _, _):
        started = time.monotonic()
        async with http.get(bridge.url + "/trickle") as response:
            assert response.status == 200
            body = await response.read()
        assert body == b"".join(f"piece {i};".encode() for i in range(6))
        assert time.monotonic() - started >= 0.8


# forward_headers


async def test_only_the_chosen_forwarded_headers_reach_the_home_app(http: aiohttp.ClientSession) -> None:
    async with tunnel(forward_headers=("X-Forwarded-For",)) as (bridge, _, home):
        async with http.get(bridge.url + "/fwd") as response:
            assert response.status == 200
        [seen] = home.seen
        assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert "X-Forwarded-Proto" not in seen.headers
        assert "X-Forwarded-Host" not in seen.headers


async def test_by_default_all_three_forwarded_headers_reach_the_home_app(http: aiohttp.ClientSession) -> None:
    async with tunnel() as (bridge, _, home):
        async with http.get(bridge.url + "/fwd") as response:
            assert response.status == 200
        [seen] = home.seen
        assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert seen.headers.getall("X-Forwarded-Proto") == ["http"]
        assert seen.headers.getall("X-Forwarded-Host") == [f"127.0.0.1:{bridge.port}"]


# visitor_credentials


async def test_visitor_credentials_guard_http_requests(http: aiohttp.ClientSession) -> None:
    """No or wrong credentials: 401 with a Basic challenge and nothing reaches the home app; right ones pass."""
    async with tunnel(visitor_credentials=("alice", "s3cret")) as (bridge, _, home):
        for headers in (
            {},
            {"Authorization": basic("alice", "wrong")},
            {"Authorization": basic("bob", "s3cret")},
            {"Authorization": "Bearer s3cret"},
        ):
            async with http.get(bridge.url + "/private", headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"].startswith("Basic ")
        assert home.seen == []
        async with http.post(
            bridge.url + "/private", data=b"x", headers={"Authorization": basic("alice", "s3cret")}
        ) as response:
            assert response.status == 200
            assert await response.json() == {"path": "/private", "body": "x"}
        [seen] = home.seen
        assert "Authorization" not in seen.headers
        assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_visitor_credentials_guard_websocket_upgrades(http: aiohttp.ClientSession) -> None:
    async with tunnel(visitor_credentials=("alice", "s3cret")) as (bridge, _, home):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(ws_url(bridge, "/ws"))
        assert info.value.status == 401
        assert home.seen == []
        async with http.ws_connect(ws_url(bridge, "/ws"), headers={"Authorization": basic("alice", "s3cret")}) as ws:
            await ws.send_str("let me in")
            assert (await ws.receive_str()) == "echo: let me in"
        [seen] = home.seen
        assert seen.path == "/ws"
        assert "Authorization" not in seen.headers


@pytest.mark.parametrize("credentials", [("al:ice", "s3cret"), ("alice", ""), ("", "s3cret")])
def test_bad_visitor_credentials_are_a_config_error(credentials: tuple[str, str]) -> None:
    cfg = AgentConfig(
        bridge="http://127.0.0.1:1", token=TOKEN, target="http://127.0.0.1:2", visitor_credentials=credentials
    )
    with pytest.raises(ConfigError, match="credentials"):
        cfg.validate()
    with pytest.raises(ConfigError):
        Agent(cfg)


# admit


async def test_an_admit_hook_refuses_visitors_with_403_and_its_text(http: aiohttp.ClientSession) -> None:
    asked: list[str] = []

    def admit(address: str) -> str | None:
        asked.append(address)
        return "visitors from here are not welcome" if len(asked) == 1 else None

    async with asyncio.timeout(15), serve_home() as (home, target), running_bridge() as bridge:
        agent = Agent(config(bridge.url, target), admit=admit)
        await agent.start()
        try:
            await agent.wait_connected(timeout=5)
            await wait_for_tunnel(bridge, timeout=5)
            async with http.get(bridge.url + "/refused") as response:
                assert response.status == 403
                assert "visitors from here are not welcome" in await response.text()
            assert home.seen == []
            async with http.get(bridge.url + "/admitted") as response:
                assert response.status == 200
        finally:
            await agent.stop()
    assert asked == ["127.0.0.1", "127.0.0.1"]
    assert home.paths() == ["/admitted"]


async def test_the_admit_hook_also_guards_websockets(http: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(15), serve_home() as (home, target), running_bridge() as bridge:
        agent = Agent(config(bridge.url, target), admit=lambda address: f"no entry for {address}")
        await agent.start()
        try:
            await agent.wait_connected(timeout=5)
            await wait_for_tunnel(bridge, timeout=5)
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(ws_url(bridge, "/ws"))
            assert info.value.status == 403
        finally:
            await agent.stop()
    assert home.seen == []
