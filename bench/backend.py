"""The benchmark's dynamic backend: a WebSocket echo and an upload sink (aiohttp, uvloop when installed).

nginx serves the static files; this process serves what nginx cannot do cheaply:

- ``GET /ws``: a WebSocket that sends every message straight back;
- ``PUT /sink`` (or POST): reads the whole body, throws it away, answers with the byte count,
  so an upload's size can be checked at the client;
- ``GET /health``: 200, for readiness.

Usage: ``python bench/backend.py PORT`` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import WSMsgType, web
from procs import raise_nofile


async def echo(request: web.Request) -> web.WebSocketResponse:
    # No compression: the relays are measured, not zlib; no heartbeat: idle sockets stay idle.
    ws = web.WebSocketResponse(compress=False, max_msg_size=0)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def sink(request: web.Request) -> web.Response:
    received = 0
    while chunk := await request.content.readany():
        received += len(chunk)
    return web.Response(text=str(received))


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    raise_nofile()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_put("/sink", sink)
    app.router.add_post("/sink", sink)
    app.router.add_get("/health", health)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        backlog=4096,
        print=None,
        shutdown_timeout=1,
        loop=loop,
    )


if __name__ == "__main__":
    main()
