"""Fuzzing the tunnel over real sockets: hostile frames into a real bridge, and into a real agent.

Seeded and bounded: RPROXY_FUZZ_SEED picks the run (default fixed, so a failure repeats),
RPROXY_FUZZ_ROUNDS how many hostile connections (default 12 per side, a few seconds); a
release runs e.g. ``RPROXY_FUZZ_ROUNDS=500 ./scripts/test core tests/core/security/test_tunnel_fuzz.py``
(see docs/RELEASING.md). Whatever arrives, the bridge keeps serving the good tunnel next to it,
nothing is logged with a traceback, and every byte the budgets counted is released again.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import Agent, AgentConfig
from rproxy_core.protocol.frames import Flags, FrameType, MessageKind, encode_code, encode_u32
from rproxy_core.protocol.heads import RequestHead, ResponseHead
from rproxy_core.transport import budget as budget_module
from tests.conftest import TOKEN, running_agent, running_bridge, start_app, wait_for_tunnel
from tests.core.security.tunnel_peers import fake_bridge, frame, raw_agent

SEED = int(os.environ.get("RPROXY_FUZZ_SEED", "1515"))
ROUNDS = int(os.environ.get("RPROXY_FUZZ_ROUNDS", "12"))


def _payload(rng: random.Random, stream_ids: list[int]) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return b""
    if choice == 1:
        return rng.randbytes(rng.randrange(1, 64))
    if choice == 2:
        return encode_u32(rng.choice([0, 1, 4096, 1 << 20, 2**31 - 1, 2**32 - 1]))
    if choice == 3:
        return encode_code(rng.randrange(0, 0x20), rng.choice(["", "x", "\r\n\x1b[31m", "é" * 70]))
    if choice == 4:
        return ResponseHead(rng.choice([101, 200, 204, 304, 404, 999]), "", [("A", "b")]).encode()
    if choice == 5:
        return RequestHead("GET", rng.choice(["/", "/../x", "", "*"]), [("Host", "h")]).encode()
    if choice == 6:
        return json.dumps({"version": rng.choice([1, 2, "1"]), "window": rng.choice([1, -1, 1 << 40])}).encode()
    if choice == 7:
        return b"d" * rng.choice([1, 15, 16, 4096, 65536, 300_000])
    return b"{" * rng.randrange(1, 40)


def hostile_message(rng: random.Random, stream_ids: list[int]) -> bytes:
    """One message of 1-8 frames: any type (some unknown), flags, stream (live, stale, wild), payload."""
    parts = []
    for _ in range(rng.randrange(1, 9)):
        kind = rng.choice([*FrameType, *FrameType, 0x9, 0xFF])
        stream = rng.choice([0, *stream_ids, rng.randrange(1, 64), 2**31 - 1, 2**32 - 1])
        flags = rng.choice(
            [0, Flags.FIN, Flags.MORE, MessageKind.TEXT.flag_bits, MessageKind.CLOSE.flag_bits, rng.randrange(256)]
        )
        parts.append(frame(kind, stream, _payload(rng, stream_ids), flags))
    if rng.random() < 0.05:  # a torn frame now and then
        return b"".join(parts)[:-3]
    return b"".join(parts)


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info is not None]


async def test_hostile_frames_from_agents_never_break_the_bridge(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(SEED)
    caplog.set_level(logging.INFO)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="good")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner, target = await start_app(app)
    try:
        async with asyncio.timeout(120), running_bridge(domain="fz.test") as bridge:
            async with running_agent(bridge.url, target, name="good"):
                await wait_for_tunnel(bridge, "good")
                for round_ in range(ROUNDS):
                    name = f"fz{round_}"
                    async with raw_agent(bridge, name) as agent:
                        # Streams the bridge opened to this agent, for the fuzz to hit.
                        visitors = [
                            asyncio.create_task(http.get(bridge.url + "/", headers={"Host": f"{name}.fz.test"}))
                            for _ in range(3)
                        ]
                        ids = [(await agent.next_open())[0] for _ in visitors]
                        for _ in range(rng.randrange(5, 40)):
                            try:
                                await agent.send(hostile_message(rng, ids))
                            except Exception:
                                break  # the bridge ended it
                        for task in visitors:
                            task.cancel()
                        await asyncio.gather(*visitors, return_exceptions=True)
                    async with http.get(bridge.url + "/", headers={"Host": "good.fz.test"}) as response:
                        assert response.status == 200 and await response.text() == "good", round_
                    await wait_for_tunnel(bridge, name, 0)
                assert bridge.registry.tunnels() == {"good": 1}
        gc.collect()  # streams in reference cycles release what they held when collected
        assert bridge.memory.used == 0
    finally:
        await runner.cleanup()
    assert not _tracebacks(caplog), _tracebacks(caplog)


async def test_hostile_frames_from_a_bridge_never_break_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED + 1)
    caplog.set_level(logging.INFO)
    sessions = 0

    async def hostile(ws: web.WebSocketResponse) -> None:
        nonlocal sessions
        sessions += 1
        head = RequestHead("GET", "/", [("Host", "h")], request_id="fz").encode()
        await ws.send_bytes(frame(FrameType.OPEN, 1, head, Flags.FIN) + frame(FrameType.OPEN, 3, head))
        for _ in range(rng.randrange(5, 40)):
            if ws.closed:
                break
            try:
                await ws.send_bytes(hostile_message(rng, [1, 3, 5]))
            except ConnectionError:
                break
        await ws.close()

    async def home(request: web.Request) -> web.Response:
        return web.Response(text="home")

    app = web.Application()
    app.router.add_get("/{tail:.*}", home)
    runner, target = await start_app(app)
    try:
        async with asyncio.timeout(120), fake_bridge(hostile) as fake:
            agent = Agent(
                AgentConfig(
                    bridge=fake.url, token=TOKEN, target=target, agent_id="fz", backoff_initial=0.01, backoff_max=0.05
                )
            )
            await agent.start()
            try:
                while sessions < ROUNDS:
                    await asyncio.sleep(0.05)
                    assert agent.last_error is None or "refused" not in str(agent.last_error)
            finally:
                await agent.stop()
    finally:
        await runner.cleanup()
    assert sessions >= ROUNDS
    gc.collect()
    assert budget_module.PROCESS_BUDGET.used == 0
    assert not _tracebacks(caplog), _tracebacks(caplog)
