"""Floods of PINGs and cheap frames from either end of the tunnel (issue 15, findings 2 and 5).

A peer that sends PINGs and never reads their PONGs, or that floods empty frames (which use
no credit), is cut off with GOAWAY EXCESSIVE_LOAD and a logged reason; while it floods, the
bridge keeps answering others. Attack loops are bounded in count; waits are for conditions.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import Agent, AgentConfig
from rproxy_core.protocol import Multiplexer, Role
from rproxy_core.protocol import events as ev
from rproxy_core.protocol.frames import ErrorCode, FrameType
from rproxy_core.protocol.mux import MAX_UNREAD_REPLIES
from tests.conftest import TOKEN, running_bridge, wait_for_tunnel
from tests.core.protocol.helpers import raw_frame, ready_mux
from tests.core.security.tunnel_peers import fake_bridge, frame, raw_agent, read_until_goaway, reply

PING_BATCH = b"".join(frame(FrameType.PING, 0, b"p" * (16 << 10)) for _ in range(16))  # 256 KiB of PINGs


async def test_an_agent_that_pings_and_never_reads_is_cut_off_with_bounded_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The PONGs owed to a peer that does not read are capped; past the cap it gets GOAWAY and a log line."""
    caplog.set_level(logging.WARNING, "rproxy.tunnel")
    async with asyncio.timeout(60), running_bridge() as bridge:
        async with raw_agent(bridge, "flood", max_queue=1) as agent:
            conn = bridge.registry.connections_by_tunnel()["flood"][0]
            peak = 0
            for _ in range(256):  # at most 64 MiB of PINGs: the old bridge queued every PONG
                try:
                    await agent.send(PING_BATCH)
                except Exception:
                    break
                peak = max(peak, conn.mux.pending_bytes)
                if conn.closed:
                    break
            assert conn.closed, f"still open with {conn.mux.pending_bytes} bytes queued for a peer that does not read"
            assert peak < 2 * MAX_UNREAD_REPLIES + (16 << 10) * 2
            goaway = await agent.goaway()
        await wait_for_tunnel(bridge, "flood", 0)
        assert goaway is None or goaway[0] == ErrorCode.EXCESSIVE_LOAD, goaway
        assert any("does not read" in r.getMessage() for r in caplog.records), caplog.text


async def test_a_bridge_that_pings_and_never_reads_is_cut_off_by_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    """The same attack against an agent: it says GOAWAY EXCESSIVE_LOAD and logs why."""
    caplog.set_level(logging.WARNING, "rproxy.tunnel")
    seen: list[tuple[int, str] | None] = []

    async def flood(ws: web.WebSocketResponse) -> None:
        for _ in range(256):  # never reading meanwhile
            try:
                await ws.send_bytes(PING_BATCH)
            except ConnectionError:
                break
            if ws.closed:
                break
        seen.append(await read_until_goaway(ws, timeout=10))

    async with asyncio.timeout(60), fake_bridge(flood) as fake:
        agent = Agent(
            AgentConfig(
                bridge=fake.url,
                token=TOKEN,
                target="http://127.0.0.1:9",
                agent_id="victim",
                backoff_initial=5,
                backoff_max=5,
            )
        )
        await agent.start()
        try:
            await asyncio.wait_for(fake.closed.wait(), 30)
        finally:
            await agent.stop()
    assert seen and seen[0] is not None and seen[0][0] == ErrorCode.EXCESSIVE_LOAD, seen
    assert any("does not read" in r.getMessage() for r in caplog.records), caplog.text


async def test_empty_data_frames_from_an_agent_are_cut_off_and_the_bridge_keeps_answering(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Empty DATA frames use no credit: a flood of them ends in GOAWAY; /_rproxy/health answers meanwhile."""
    caplog.set_level(logging.WARNING, "rproxy.tunnel")
    async with asyncio.timeout(60), running_bridge() as bridge:
        async with raw_agent(bridge, "home") as agent:
            visitor = asyncio.create_task(http.get(bridge.url + "/", headers={"Host": "home.example"}))
            stream_id, _ = await agent.next_open()
            await agent.send(reply(stream_id))
            batch = b"".join(frame(FrameType.DATA, stream_id, b"") for _ in range(40_000))  # 400 KB
            health: list[int] = []

            async def probe() -> None:
                async with http.get(bridge.url + "/_rproxy/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    health.append(r.status)

            probing = None
            sent = 0
            for sent in range(1, 26):  # at most 1,000,000 empty frames
                try:
                    await agent.send(batch)
                except Exception:
                    break
                if sent == 2:
                    probing = asyncio.create_task(probe())
            goaway = await agent.goaway()
            assert goaway is not None and goaway[0] == ErrorCode.EXCESSIVE_LOAD, (goaway, sent)
            assert probing is not None
            await probing
            assert health == [200]
            visitor.cancel()
        await wait_for_tunnel(bridge, "home", 0)
    assert any("cheap frames" in r.getMessage() for r in caplog.records), caplog.text


def test_one_message_is_processed_a_bounded_number_of_frames_at_a_time() -> None:
    """receive_data(max_frames=N) stops after N frames; the transport lets its loop run in between."""
    mux = ready_mux(Role.BRIDGE)
    before = mux.frames_received
    pings = b"".join(raw_frame(FrameType.PING, 0, 0, b"x") for _ in range(1000))
    assert mux.receive_data(pings, max_frames=256) is False
    assert len(mux.events_received()) == 256
    done = [mux.resume_receiving(256) for _ in range(3)]
    assert done == [False, False, True]
    assert all(isinstance(e, ev.PingReceived) for e in mux.events_received())
    assert mux.frames_received - before == 1000 and mux.cheap_frames_received == 1000
    assert mux.resume_receiving(256) is True  # nothing left


def test_unread_pongs_are_capped_in_the_multiplexer() -> None:
    """Sans-I/O: PINGs whose PONGs are never taken end the connection at MAX_UNREAD_REPLIES."""
    mux: Multiplexer = ready_mux(Role.AGENT)
    ping = raw_frame(FrameType.PING, 0, 0, b"q" * 1024)
    for _ in range(1000):
        mux.receive_data(ping)
        if mux.closed:
            break
    assert mux.closed and mux.error is not None and mux.error.error_code == ErrorCode.EXCESSIVE_LOAD
    assert mux.pending_bytes < MAX_UNREAD_REPLIES + 4096
    # A peer that reads its PONGs owes nothing: the same PINGs, each answered, never trip it.
    reader = ready_mux(Role.AGENT)
    for _ in range(1000):
        reader.receive_data(ping)
        reader.data_to_send()
    assert not reader.closed
