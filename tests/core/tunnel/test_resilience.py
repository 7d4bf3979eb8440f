"""Tunnels under stress: dead agents, restarted bridges, agent pools, silent and hostile peers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from rproxy_core import Agent, AgentConfig
from rproxy_core.agent import AgentState
from rproxy_core.bridge import agents as bridge_agents
from rproxy_core.protocol.frames import ErrorCode, FrameType, decode_code, encode_header, iter_frames
from tests.conftest import TOKEN, Proc, free_port, running_agent, running_bridge, start_app, wait_for_tunnel, wait_http

CONNECT = "/_rproxy/connect"


def agent_headers(name: str, agent_id: str = "raw-agent", token: str = TOKEN) -> dict[str, str]:
    """The upgrade headers a real agent sends."""
    return {
        "Authorization": f"Bearer {token}",
        "Rproxy-Protocol": "1",
        "Rproxy-Tunnel": name,
        "Rproxy-Agent-Id": agent_id,
    }


def hello_frame(**settings: object) -> bytes:
    """A valid HELLO frame (protocol version 1) as one tunnel message."""
    body = json.dumps({"version": 1, **settings}).encode()
    return encode_header(FrameType.HELLO, 0, 0, len(body)) + body


def counting_app(name: str, counts: Counter[str]) -> web.Application:
    """A home app that counts the requests it serves under ``name``."""

    async def hello(request: web.Request) -> web.Response:
        counts[name] += 1
        return web.Response(text=f"served by {name}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


class SlowApp:
    """A home app whose /hang never answers and whose /stream sends one chunk, then stalls."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/fast", self._fast)
        self.app.router.add_get("/hang", self._hang)
        self.app.router.add_get("/stream", self._stream)
        self.app.router.add_get("/echo", self._echo)

    async def _fast(self, request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def _echo(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    async def _hang(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(text="late")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1 << 20
        await response.prepare(request)
        await response.write(b"x" * 1024)
        await self.release.wait()
        return response


@pytest.fixture
async def slow_app() -> AsyncIterator[tuple[SlowApp, str]]:
    slow = SlowApp()
    runner, url = await start_app(slow.app)
    try:
        yield slow, url
    finally:
        slow.release.set()
        await runner.cleanup()


async def keep_requesting(http: aiohttp.ClientSession, url: str, host: str, stop: asyncio.Event) -> list[int]:
    """GET ``url`` with Host ``host`` until ``stop`` is set; return every status seen."""
    statuses = []
    while not stop.is_set():
        async with http.get(url, headers={"Host": host}) as response:
            await response.read()
            statuses.append(response.status)
        await asyncio.sleep(0.02)
    return statuses


async def test_killing_the_agent_mid_traffic_fails_requests_in_flight_and_a_new_agent_serves_again(
    procs: Callable[..., Proc], slow_app: tuple[SlowApp, str], http: aiohttp.ClientSession
) -> None:
    """SIGKILLed agent: waiting visitors get 502/503, streaming ones are cut, the tunnel goes, a new agent serves."""
    _, target = slow_app
    async with asyncio.timeout(60), running_bridge() as bridge:
        agent = procs("agent", "--bridge", bridge.url, "--token", TOKEN, "--target", target)
        await wait_for_tunnel(bridge, "home", 1)
        async with http.get(bridge.url + "/fast") as response:
            assert response.status == 200

        async def waiting() -> int:
            async with http.get(bridge.url + "/hang") as response:
                return response.status

        async def streaming() -> str:
            async with http.get(bridge.url + "/stream") as response:
                assert response.status == 200
                assert len(await response.content.readexactly(1024)) == 1024
                started.release()
                try:
                    await response.read()
                except aiohttp.ClientError as err:
                    return f"cut: {err.__class__.__name__}"
                return "complete"

        started = asyncio.Semaphore(0)
        waiters = [asyncio.create_task(waiting()) for _ in range(5)]
        streamers = [asyncio.create_task(streaming()) for _ in range(3)]
        for _ in streamers:
            await started.acquire()
        # All eight requests are in flight: the bridge holds one open stream for each.
        while len(bridge.registry.connections()[0].streams) < 8:
            await asyncio.sleep(0.02)

        agent.kill(signal.SIGKILL)

        statuses = await asyncio.gather(*waiters)
        assert all(status in (502, 503) for status in statuses), statuses
        outcomes = await asyncio.gather(*streamers)
        assert all(outcome.startswith("cut") for outcome in outcomes), outcomes
        await wait_for_tunnel(bridge, "home", 0)
        async with http.get(bridge.url + "/fast") as response:
            assert response.status == 503

        procs("agent", "--bridge", bridge.url, "--token", TOKEN, "--target", target)
        await wait_for_tunnel(bridge, "home", 1)
        async with http.get(bridge.url + "/fast") as response:
            assert response.status == 200
            assert await response.text() == "fast"


async def test_an_agent_reconnects_by_itself_after_the_bridge_restarts(
    procs: Callable[..., Proc], slow_app: tuple[SlowApp, str], http: aiohttp.ClientSession
) -> None:
    """The bridge process dies and a new one starts on the same port; the waiting agent comes back."""
    _, target = slow_app
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    await wait_http(base + "/_rproxy/health")
    states: list[AgentState] = []
    config = AgentConfig(
        bridge=base, token=TOKEN, target=target, agent_id="restart", backoff_initial=0.1, backoff_max=0.5
    )
    async with asyncio.timeout(60), Agent(config) as agent:
        agent.add_listener(lambda a: states.append(a.state))
        await agent.wait_connected(timeout=15)
        await wait_http(base + "/fast")

        bridge.kill(signal.SIGKILL)
        while agent.state is AgentState.CONNECTED:
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # a few failed attempts while no bridge listens
        assert agent.state is not AgentState.CONNECTED
        assert agent.state is not AgentState.FAILED

        procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
        await agent.wait_connected(timeout=20)
        await wait_http(base + "/fast")
        async with http.get(base + "/fast") as response:
            assert await response.text() == "fast"
        assert AgentState.WAITING in states
        assert agent.reconnects >= 2


async def test_a_pool_of_two_agents_shares_the_load_and_the_survivor_serves_everything(
    http: aiohttp.ClientSession,
) -> None:
    """Two agents under one name both serve; after one stops, every request succeeds via the other."""
    counts: Counter[str] = Counter()
    runner_a, target_a = await start_app(counting_app("a", counts))
    runner_b, target_b = await start_app(counting_app("b", counts))
    try:
        async with (
            asyncio.timeout(60),
            running_bridge() as bridge,
            running_agent(bridge.url, target_a, agent_id="agent-a"),
            running_agent(bridge.url, target_b, agent_id="agent-b") as agent_b,
        ):
            await wait_for_tunnel(bridge, "home", 2)
            for _ in range(20):
                async with http.get(bridge.url + "/") as response:
                    assert response.status == 200
            assert counts["a"] > 0 and counts["b"] > 0
            assert counts["a"] + counts["b"] == 20

            await agent_b.stop()
            served_by_b = counts["b"]
            for _ in range(30):
                async with http.get(bridge.url + "/") as response:
                    assert response.status == 200
                    assert await response.text() == "served by a"
            assert counts["b"] == served_by_b
            assert bridge.registry.tunnels() == {"home": 1}
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


async def test_an_agent_whose_bridge_goes_silent_declares_it_dead_and_reconnects(
    slow_app: tuple[SlowApp, str],
) -> None:
    """A fake bridge completes HELLO then says nothing; after dead_after the agent dials again."""
    _, target = slow_app
    connections: list[web.Request] = []
    more = asyncio.Condition()
    done = asyncio.Event()

    async def silent_bridge(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_bytes(hello_frame(tunnel="home", public_url="http://silent.invalid/"))
        async with more:
            connections.append(request)
            more.notify_all()
        await done.wait()  # never read, never write: a peer that has vanished
        return ws

    app = web.Application()
    app.router.add_get(CONNECT, silent_bridge)
    runner, bridge_url = await start_app(app)
    errors: list[str] = []
    config = AgentConfig(
        bridge=bridge_url,
        token=TOKEN,
        target=target,
        agent_id="hb",
        heartbeat_interval=0.2,
        dead_after=1.0,
        backoff_initial=0.1,
        backoff_max=0.2,
    )
    agent = Agent(config)
    agent.add_listener(lambda a: errors.append(a.last_error or "") if a.state is AgentState.WAITING else None)
    try:
        async with asyncio.timeout(30):
            await agent.start()
            assert await agent.wait_connected(timeout=10) == "http://silent.invalid/"
            async with more:
                await more.wait_for(lambda: len(connections) >= 2)
        assert errors and "silent" in errors[0], errors
    finally:
        await agent.stop()
        done.set()
        await runner.cleanup()


async def test_the_bridge_drops_an_agent_that_goes_silent(http: aiohttp.ClientSession) -> None:
    """An agent that completes HELLO and then never answers a PING loses its tunnel after dead_after."""
    async with asyncio.timeout(30), running_bridge(heartbeat_interval=0.2, dead_after=1.0) as bridge:
        ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
        async with ws_connect(ws_url, additional_headers=agent_headers("quiet")) as raw:
            assert next(iter(iter_frames(await raw.recv(), 1 << 20))).type is FrameType.HELLO
            await raw.send(hello_frame(agent_id="quiet"))
            await wait_for_tunnel(bridge, "quiet", 1)
            pings = 0
            with pytest.raises(websockets.ConnectionClosed):
                while True:  # read (so the socket stays open) but never answer
                    for frame in iter_frames(await raw.recv(), 1 << 20):
                        pings += frame.type is FrameType.PING
            assert pings >= 2
        await wait_for_tunnel(bridge, "quiet", 0)
        async with http.get(bridge.url + "/_rproxy/health") as response:
            assert (await response.json())["tunnels"] == {}


@pytest.mark.parametrize(
    "junk",
    [b"\xff" * 32, "hello, I am text"],
    ids=["garbage-bytes", "text-message"],
)
async def test_a_misbehaving_agent_loses_only_its_own_tunnel(junk: bytes | str, http: aiohttp.ClientSession) -> None:
    """After HELLO, garbage (or a text message) closes that agent's tunnel; another tunnel keeps serving."""
    counts: Counter[str] = Counter()
    runner, target = await start_app(counting_app("good", counts))
    stop = asyncio.Event()
    try:
        async with asyncio.timeout(30), running_bridge() as bridge, running_agent(bridge.url, target, name="good"):
            load = asyncio.create_task(keep_requesting(http, bridge.url + "/", "good.example", stop))
            ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
            async with ws_connect(ws_url, additional_headers=agent_headers("junk")) as raw:
                frames = list(iter_frames(await raw.recv(), 1 << 20))
                assert frames[0].type is FrameType.HELLO
                await raw.send(hello_frame(agent_id="raw-agent"))
                await wait_for_tunnel(bridge, "junk", 1)
                async with http.get(bridge.url + "/_rproxy/health") as response:
                    assert set((await response.json())["tunnels"]) == {"good", "junk"}

                await raw.send(junk)
                goaway = await goaway_before_close(raw)
                assert goaway is not None and goaway[0] != ErrorCode.NO_ERROR, goaway
                assert raw.close_code == 1002

            await wait_for_tunnel(bridge, "junk", 0)
            async with http.get(bridge.url + "/_rproxy/health") as response:
                assert set((await response.json())["tunnels"]) == {"good"}
            await asyncio.sleep(0.2)  # the good tunnel keeps going after the other one is gone
            stop.set()
            statuses = await load
            assert statuses and set(statuses) == {200}
    finally:
        stop.set()
        await runner.cleanup()


async def test_an_agent_that_never_sends_hello_is_dropped_without_affecting_others(
    monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    """A peer that upgrades but stays silent is closed after the handshake timeout; others keep serving."""
    monkeypatch.setattr(bridge_agents, "HANDSHAKE_TIMEOUT", 0.5)
    counts: Counter[str] = Counter()
    runner, target = await start_app(counting_app("good", counts))
    stop = asyncio.Event()
    try:
        async with asyncio.timeout(30), running_bridge() as bridge, running_agent(bridge.url, target, name="good"):
            load = asyncio.create_task(keep_requesting(http, bridge.url + "/", "good.example", stop))
            ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
            async with ws_connect(ws_url, additional_headers=agent_headers("mute")) as raw:
                frames = list(iter_frames(await raw.recv(), 1 << 20))
                assert frames[0].type is FrameType.HELLO
                assert "mute" not in bridge.registry.tunnels()
                goaway = await goaway_before_close(raw)
                assert goaway is not None and "HELLO" in goaway[1], goaway
            assert "mute" not in bridge.registry.tunnels()
            stop.set()
            statuses = await load
            assert statuses and set(statuses) == {200}
            assert bridge.registry.tunnels() == {"good": 1}
    finally:
        stop.set()
        await runner.cleanup()


async def goaway_before_close(raw: ClientConnection) -> tuple[int, str] | None:
    """Read frames until the bridge closes the socket; return the GOAWAY's code and reason, if one came."""
    goaway = None
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            for frame in iter_frames(await raw.recv(), 1 << 20):
                if frame.type is FrameType.GOAWAY:
                    goaway = decode_code(frame.payload)
    return goaway


async def hang(session: aiohttp.ClientSession, url: str) -> int | str:
    """GET ``url``; return the status, or "cut" if the connection broke."""
    try:
        async with session.get(url) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError:
        return "cut"


def _open_sockets() -> set[str]:
    """Inodes of the sockets this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            found.add(link)
    return found


async def test_stopping_bridge_and_agent_leaves_no_tasks_and_no_sockets() -> None:
    """After Bridge.stop() and Agent.stop() (with a visitor WebSocket and a request open) nothing is left running."""
    sockets_before = _open_sockets()
    tasks_before = asyncio.all_tasks()
    slow = SlowApp()
    runner, target = await start_app(slow.app)
    async with asyncio.timeout(30):
        async with running_bridge(shutdown_grace=1.0) as bridge:
            agent = Agent(
                AgentConfig(
                    bridge=bridge.url,
                    token=TOKEN,
                    target=target,
                    agent_id="clean",
                    backoff_initial=0.1,
                    backoff_max=0.2,
                )
            )
            await agent.start()
            await agent.wait_connected(timeout=10)
            async with aiohttp.ClientSession() as visitor:
                async with visitor.get(bridge.url + "/fast") as response:
                    assert await response.text() == "fast"
                hanging = asyncio.create_task(hang(visitor, bridge.url + "/hang"))
                ws = await visitor.ws_connect(bridge.url.replace("http", "ws", 1) + "/echo")
                await ws.send_str("ping")
                assert (await ws.receive()).data == "ping"
                while len(bridge.registry.connections()[0].streams) < 2:
                    await asyncio.sleep(0.02)
                await bridge.stop()
                assert await hanging in (502, "cut")
                assert (await ws.receive()).type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
                await ws.close()
                await agent.stop()
        assert agent.state is AgentState.STOPPED
        slow.release.set()  # the home app's own handlers are not rproxy's to stop
        await runner.cleanup()
        # Give closed transports one loop turn to release their file descriptors.
        for _ in range(50):
            leftover = asyncio.all_tasks() - tasks_before
            if not leftover and _open_sockets() <= sockets_before:
                break
            await asyncio.sleep(0.02)
    assert asyncio.all_tasks() - tasks_before == set()
    assert _open_sockets() - sockets_before == set()


async def test_stopping_an_agent_while_its_tunnel_is_being_torn_down_returns(slow_app: tuple[SlowApp, str]) -> None:
    """Agent.stop() at any moment of the bridge's goodbye ends the agent instead of losing the cancellation."""
    _, target = slow_app
    async with running_bridge() as bridge:
        for turns in range(0, 40, 2):  # stop the agent at a different point of its teardown each time
            agent = Agent(
                AgentConfig(
                    bridge=bridge.url,
                    token=TOKEN,
                    target=target,
                    agent_id=f"quick-{turns}",
                    backoff_initial=0.1,
                    backoff_max=0.2,
                )
            )
            await agent.start()
            await agent.wait_connected(timeout=10)
            await wait_for_tunnel(bridge, "home", 1)
            connection = bridge.registry.connections()[0]
            goodbye = asyncio.create_task(connection.close())
            for _ in range(turns):
                await asyncio.sleep(0)
            task = agent._task
            assert task is not None
            async with asyncio.timeout(10) as deadline:
                await agent.stop()
                await goodbye
            assert not deadline.expired(), f"Agent.stop() hung (stopped {turns} loop turns into the goodbye)"
            assert task.done()
            assert agent.state is AgentState.STOPPED
            await wait_for_tunnel(bridge, "home", 0)


async def test_an_agent_still_in_its_handshake_when_the_bridge_stops_is_told_goodbye() -> None:
    """An agent upgraded but not yet through HELLO gets GOAWAY at once when the bridge stops, not a timeout."""
    async with running_bridge(shutdown_grace=60) as bridge:
        ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
        async with asyncio.timeout(20) as deadline, ws_connect(ws_url, additional_headers=agent_headers("late")) as raw:
            assert next(iter(iter_frames(await raw.recv(), 1 << 20))).type is FrameType.HELLO
            stopping = asyncio.create_task(bridge.stop())
            goaway = None
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    for frame in iter_frames(await raw.recv(), 1 << 20):
                        if frame.type is FrameType.GOAWAY:
                            goaway = decode_code(frame.payload)
            await stopping
        assert not deadline.expired()
        assert goaway is not None and "shutting down" in goaway[1], goaway
