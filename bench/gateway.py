"""What the WebSocket-to-POST gateway costs: a real ``rproxy gateway`` process on loopback.

Run with the project's interpreter::

    .venv/bin/python bench/gateway.py [--seconds 5] [--connections 50] [--idle 1000] [--json]

The backend (aiohttp) runs in a second process, the WebSocket clients (websockets) in this
one; only the gateway's own process is measured for CPU and memory. Four figures:

- round trips per second: each of ``--connections`` clients sends a frame, the backend gets it
  as a POST and sends it back through the callback URL, the client waits for it, and again;
- gateway CPU seconds per 1,000 of those round trips (user + system, from /proc);
- one-way frames per second: clients send as fast as the gateway takes them, the backend only
  answers 204 (one POST outstanding per connection, so this is POSTs per second);
- memory per idle connection: the gateway's resident memory before and after ``--idle``
  clients connect and sit, divided by their number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Backend:
    """/echo sends each frame back through its callback; /sink only counts."""

    def __init__(self) -> None:
        self.sunk = 0
        self.session: aiohttp.ClientSession | None = None

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        assert self.session is not None
        async with self.session.post(
            request.headers["x-ws-proxy-send"], data=body, headers={"Content-Type": "text/plain"}
        ) as response:
            await response.read()
        return web.Response(status=204)

    async def sink(self, request: web.Request) -> web.Response:
        await request.read()
        self.sunk += 1
        return web.Response(status=204)

    async def count(self, request: web.Request) -> web.Response:
        return web.json_response(self.sunk)

    async def ignore(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)


async def round_trips(gateway: str, backend: str, connections: int, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        async with connect(f"{gateway}/connect?f={backend}/echo&d={backend}/gone", compression=None) as ws:
            while time.monotonic() < stop:
                await ws.send("ping")
                await ws.recv()
                done += 1

    await asyncio.gather(*(client() for _ in range(connections)))
    return done


async def sunk(session: aiohttp.ClientSession, backend: str) -> int:
    async with session.get(f"{backend}/sunk") as response:
        return int(await response.json())


async def one_way(gateway: str, backend: str, session: aiohttp.ClientSession, connections: int, seconds: float) -> int:
    stop = time.monotonic() + seconds
    start = await sunk(session, backend)

    async def client() -> None:
        async with connect(f"{gateway}/connect?f={backend}/sink", compression=None) as ws:
            while time.monotonic() < stop:
                await ws.send("frame")

    await asyncio.gather(*(client() for _ in range(connections)))
    await asyncio.sleep(0.2)  # the last POSTs land
    return await sunk(session, backend) - start


async def idle_memory(gateway: str, backend: str, pid: int, count: int) -> float:
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    held = []
    try:
        for start in range(0, count, 50):
            held += await asyncio.gather(
                *(
                    connect(f"{gateway}/connect?f={backend}/sink&d={backend}/gone", compression=None)
                    for _ in range(min(50, count - start))
                )
            )
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
    finally:
        await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    return (after - before) / count


async def serve_backend(port: int) -> None:
    """The backend in a process of its own, so the clients' CPU does not slow it down."""
    state = Backend()
    app = web.Application()
    app.router.add_post("/echo", state.echo)
    app.router.add_post("/sink", state.sink)
    app.router.add_post("/gone", state.ignore)
    app.router.add_get("/sunk", state.count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        state.session = session
        await asyncio.Event().wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load (default 5)")
    parser.add_argument("--connections", type=int, default=50, help="busy clients at once (default 50)")
    parser.add_argument("--idle", type=int, default=1000, help="idle clients for the memory figure (default 1000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_backend:
        await serve_backend(args.serve_backend)
        return
    backend_port = free_port()
    backend_process = subprocess.Popen([sys.executable, __file__, "--serve-backend", str(backend_port)], cwd=ROOT)
    backend = f"http://127.0.0.1:{backend_port}"
    port = free_port()
    # $RPROXY_BENCH_PROFILE=FILE: the gateway runs under cProfile, its stats written to FILE.
    profile = os.environ.get("RPROXY_BENCH_PROFILE")
    process = subprocess.Popen(
        [
            sys.executable,
            *(["-m", "cProfile", "-o", profile] if profile else []),
            "-m",
            "rproxy_core",
            "--log-level",
            "warning",
            "gateway",
            "--address",
            f"127.0.0.1:{port}",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--allowlist",
            r"http://127\.0\.0\.1:\d+/.*",
            "--no-access-log",
            "--max-connections-per-address",
            "1000000",
            "--callback-rate",
            "100000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=sys.stderr,
    )
    gateway = f"ws://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with (
                        session.get(f"http://127.0.0.1:{port}/connect") as response,
                        session.get(f"{backend}/sunk") as ready,
                    ):
                        if response.status == 426 and ready.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway did not start")
                await asyncio.sleep(0.1)
            cpu = cpu_seconds(process.pid)
            started = time.monotonic()
            trips = await round_trips(gateway, backend, args.connections, args.seconds)
            trip_seconds = time.monotonic() - started
            cpu_per_1000 = (cpu_seconds(process.pid) - cpu) / trips * 1000
            started = time.monotonic()
            frames = await one_way(gateway, backend, session, args.connections, args.seconds)
            frame_seconds = time.monotonic() - started
            per_idle = await idle_memory(gateway, backend, process.pid, args.idle)
    finally:
        process.terminate()
        # Waited for off the loop: the backend here must go on answering the disconnect POSTs.
        await asyncio.to_thread(process.wait, 15)
        backend_process.terminate()
        backend_process.wait(15)
    results = {
        "round_trips_per_s": round(trips / trip_seconds),
        "gateway_cpu_s_per_1000_round_trips": round(cpu_per_1000, 3),
        "one_way_frames_per_s": round(frames / frame_seconds),
        "kib_per_idle_connection": round(per_idle, 1),
        "connections": args.connections,
        "idle_connections": args.idle,
        "seconds": args.seconds,
    }
    if args.json:
        print(json.dumps(results))
        return
    print(f"round trips/s ({args.connections} connections):     {results['round_trips_per_s']:>8}")
    print(f"gateway CPU s per 1,000 round trips:     {results['gateway_cpu_s_per_1000_round_trips']:>8}")
    print(f"one-way frames/s ({args.connections} connections):  {results['one_way_frames_per_s']:>8}")
    print(f"KiB per idle connection ({args.idle}):        {results['kib_per_idle_connection']:>8}")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
