"""An agent that lies about the round trip cannot make tuned windows outgrow the bridge's budget.

Windows grow with the link's round-trip time (docs/PROTOCOL.md §5), which the bridge measures
with PINGs the agent answers. This agent answers with a forged clock, so the bridge believes
every round trip takes 100 ms more than it does, and sends whatever credit it is given; its
visitors read at a pace that a 1 MiB window across such a link would hold back. Every window
then wants to grow; what stops them is the budget: tuned credit stays within an eighth of the
tunnel's budget (transport/budget.py, growth_room).
"""

from __future__ import annotations

import asyncio
import json
import struct

import aiohttp

from tests.conftest import TOKEN, running_bridge, wait_for_tunnel
from tests.core.security.hostile_agent import DATA, HELLO, OPEN, PING, PONG, WINDOW, frame, parse, reply

BUDGET = 16 << 20
DOWNLOADS = 8
EACH = 8 << 20
PIECE = 256 << 10
#: Seconds the agent adds to every round trip it answers.
LIE = 0.1


async def lying_agent(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Answer every OPEN with an endless body, sent as fast as credit allows; PONG with a forged clock."""
    credit: dict[int, int] = {}
    async for message in ws:
        if message.type is not aiohttp.WSMsgType.BINARY:
            return
        out: list[bytes] = []
        for kind, _flags, stream, payload in parse(message.data):
            if kind == OPEN:
                credit[stream] = 1 << 20
                out.append(reply(stream, 200, [["Content-Type", "application/octet-stream"]]))
            elif kind == WINDOW and stream in credit:
                credit[stream] += struct.unpack(">I", payload)[0]
            elif kind == PING:
                # The payload is the bridge's clock when it sent the PING: 100 ms earlier, says this one.
                (sent,) = struct.unpack("!d", payload)
                out.append(frame(PONG, 0, struct.pack("!d", sent - LIE)))
        for stream, available in credit.items():
            while available >= PIECE:
                out.append(frame(DATA, stream, bytes(PIECE)))
                available -= PIECE
            credit[stream] = available
        for start in range(0, len(out), 4):
            await ws.send_bytes(b"".join(out[start : start + 4]))


async def test_a_lying_agents_windows_grow_only_within_an_eighth_of_the_budget(http: aiohttp.ClientSession) -> None:
    """Forged PONGs make every window want to grow; tuned credit stays within an eighth of the budget, and returns."""
    async with asyncio.timeout(90), running_bridge(tunnel_memory_budget=BUDGET) as bridge:
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Rproxy-Protocol": "1",
            "Rproxy-Tunnel": "home",
            "Rproxy-Agent-Id": "liar",
        }
        hello = {"version": 1, "window": 1 << 20, "max_frame": PIECE, "max_streams": 100, "services": {"": "http"}}
        async with aiohttp.ClientSession() as session:
            url = bridge.url.replace("http", "ws", 1) + "/_rproxy/connect"
            async with session.ws_connect(url, headers=headers, max_msg_size=0) as ws:
                await ws.send_bytes(frame(HELLO, 0, json.dumps(hello).encode()))
                first = await ws.receive(timeout=10)
                assert first.type is aiohttp.WSMsgType.BINARY and parse(first.data)[0][0] == HELLO, first
                agent = asyncio.create_task(lying_agent(ws))
                try:
                    await wait_for_tunnel(bridge)
                    conn = bridge.registry.connections()[0]
                    while conn.mux.link_rtt is None:  # the bridge's first PING, answered with the lie
                        await asyncio.sleep(0.01)
                    assert conn.mux.link_rtt >= LIE, conn.mux.link_rtt

                    most = 0

                    async def watch() -> None:
                        nonlocal most
                        while True:
                            most = max(most, conn.budget.reserved)
                            await asyncio.sleep(0.002)

                    async def download() -> int:
                        got = 0
                        async with http.get(bridge.url + "/big", headers={"Host": "home.example"}) as response:
                            assert response.status == 200
                            # 12.5 MB/s: across the claimed 100 ms a 1 MiB window would hold it back.
                            while got < EACH:
                                got += len(await response.content.read(PIECE))
                                await asyncio.sleep(0.02)
                        return got

                    watcher = asyncio.create_task(watch())
                    try:
                        assert min(await asyncio.gather(*(download() for _ in range(DOWNLOADS)))) >= EACH
                    finally:
                        watcher.cancel()
                    # The lie took (windows grew), and the budget held: tuned credit within an eighth of it.
                    assert most > 0
                    assert most <= BUDGET // 8, most
                    while conn.streams or conn.budget.reserved:  # the visitors left: their credit is released
                        await asyncio.sleep(0.02)
                    assert bridge.memory.reserved == 0
                finally:
                    agent.cancel()
                    await asyncio.gather(agent, return_exceptions=True)
