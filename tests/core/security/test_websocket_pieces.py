"""A home app's big WebSocket messages cross the bridge piece by piece, never assembled (issue 15, finding 4).

Real home app, agent and bridge. The home app sends messages of several MiB; the agent sends
them on in window-sized DATA frames and the bridge writes each as a WebSocket fragment to the
visitor. While the visitor is slow to read, what the bridge's memory budget counts stays near one
window; before, the bridge assembled each message whole (up to 16 MiB a stream) first.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import running_agent, running_bridge, start_app

BINARY = bytes(range(256)) * (12 << 12)  # 12 MiB
# Multi-byte characters, so that piece boundaries fall inside them.
TEXT = "zoë ☃ 🏠 " * ((3 << 20) // 16)


async def _home(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for message in ws:
        if message.data == "binary":
            await ws.send_bytes(BINARY)
        elif message.data == "text":
            await ws.send_str(TEXT)
        elif message.data == "small":
            await ws.send_str("small")
    return ws


@pytest.mark.timeout(120)
async def test_big_messages_from_the_home_app_reach_the_visitor_whole_without_being_held_whole() -> None:
    app = web.Application()
    app.router.add_get("/ws", _home)
    runner, target = await start_app(app)
    try:
        async with running_bridge() as bridge, running_agent(bridge.url, target):
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, bridge.memory.used)
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            try:
                async with (
                    asyncio.timeout(60),
                    aiohttp.ClientSession() as session,
                    session.ws_connect(bridge.url + "/ws", max_msg_size=0) as ws,
                ):
                    for ask, expected in (("binary", BINARY), ("text", TEXT), ("small", "small"), ("binary", BINARY)):
                        await ws.send_str(ask)
                        await asyncio.sleep(0.5)  # a slow visitor: the message waits at the bridge
                        reply = await ws.receive()
                        if isinstance(expected, bytes):
                            assert reply.type is aiohttp.WSMsgType.BINARY
                            assert hashlib.sha256(reply.data).digest() == hashlib.sha256(expected).digest()
                        else:
                            assert reply.type is aiohttp.WSMsgType.TEXT and reply.data == expected
            finally:
                watcher.cancel()
            # One window (1 MiB) and what is in flight, not a 12 MiB message.
            assert peak <= 3 << 20, f"the bridge held {peak / 2**20:.1f} MiB of one stream"
    finally:
        await runner.cleanup()


async def _read_frames(reader: asyncio.StreamReader) -> list[tuple[int, bool, bytes]]:
    """Server frames (unmasked) up to the end of one message: (opcode, fin, payload) each."""
    frames = []
    while True:
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        frames.append((first & 0x0F, bool(first & 0x80), await reader.readexactly(length)))
        if first & 0x80 and first & 0x0F in (0x0, 0x1, 0x2):
            return frames


@pytest.mark.timeout(120)
async def test_a_visitor_that_stops_reading_holds_one_window_at_the_bridge_then_gets_fragments_in_order() -> None:
    app = web.Application()
    app.router.add_get("/ws", _home)
    runner, target = await start_app(app)
    try:
        async with asyncio.timeout(60), running_bridge() as bridge, running_agent(bridge.url, target):
            assert bridge.port is not None
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the visitor's kernel holds little
            sock.connect(("127.0.0.1", bridge.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET /ws HTTP/1.1\r\nHost: v.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            mask = os.urandom(4)
            ask = bytes(b ^ mask[i % 4] for i, b in enumerate(b"binary"))
            writer.write(bytes((0x81, 0x80 | 6)) + mask + ask)
            transport = writer.transport
            transport.pause_reading()  # the visitor stops reading: the bridge's writes must wait
            peak = 0
            for _ in range(100):
                await asyncio.sleep(0.01)
                peak = max(peak, bridge.memory.used)
            transport.resume_reading()
            frames = await _read_frames(reader)
            writer.close()
        assert 0 < peak <= 3 << 20, f"the bridge held {peak / 2**20:.1f} MiB of one stream"
        assert len(frames) > 1 and frames[0][0] == 0x2 and all(op == 0x0 for op, _, _ in frames[1:])
        assert not any(fin for _, fin, _ in frames[:-1]) and frames[-1][1]
        assert b"".join(payload for _, _, payload in frames) == BINARY
    finally:
        await runner.cleanup()
