"""WebSocket loads, run as a process of their own so their event loop competes with the relays as wrk does.

``python bench/wsload.py rtt URL SECONDS [--host H]``
    One WebSocket; send a small message, await its echo, repeat for SECONDS. Prints one JSON line:
    round trips, per second, p50/p99 in ms.

``python bench/wsload.py hold URL [--host H]``
    Many idle WebSockets, driven by commands on stdin, one JSON line answered per command:
    ``open N`` opens more until N are open (or have failed), ``echo`` sends one message on
    each open socket and awaits its echo, ``quit`` closes them all and exits. The sockets come
    from many loopback addresses, SOCKETS_PER_ADDRESS each: a bridge caps what one visitor
    address may hold (256 WebSockets per tunnel), and the benchmark measures many visitors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
from procs import raise_nofile

MESSAGE = "x" * 32
OPENING_AT_ONCE = 200
#: Below the bridge's per-address cap (const.MAX_WEBSOCKETS_PER_VISITOR, 256).
SOCKETS_PER_ADDRESS = 200


def visitor_address(index: int) -> str:
    """The loopback address the index-th socket comes from: 127.0.1.1, then 127.0.1.2, ..."""
    block = index // SOCKETS_PER_ADDRESS
    return f"127.0.{1 + block // 250}.{1 + block % 250}"


async def rtt(url: str, seconds: float, host: str | None) -> dict[str, Any]:
    headers = {"Host": host} if host else {}
    times: list[float] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=headers, compress=0) as ws:
        for _ in range(100):  # warm-up, not counted
            await ws.send_str(MESSAGE)
            await ws.receive()
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            await ws.send_str(MESSAGE)
            reply = await ws.receive()
            if reply.type != aiohttp.WSMsgType.TEXT or reply.data != MESSAGE:
                raise RuntimeError(f"bad echo: {reply.type} {str(reply.data)[:40]!r}")
            after = time.perf_counter()
            times.append(after - now)
            now = after
        elapsed = now - start
    times.sort()
    return {
        "round_trips": len(times),
        "seconds": round(elapsed, 3),
        "per_s": round(len(times) / elapsed, 1),
        "p50_ms": round(statistics.median(times) * 1e3, 4),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3, 4),
    }


class Holder:
    """Opens and keeps many WebSockets, from many visitor addresses; counts what failed, by kind."""

    def __init__(self, url: str, host: str | None) -> None:
        self.url = url
        self.headers = {"Host": host} if host else {}
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.attempts = 0
        self.errors: Counter[str] = Counter()

    def _session(self, address: str) -> aiohttp.ClientSession:
        if address not in self.sessions:
            connector = aiohttp.TCPConnector(limit=0, force_close=True, local_addr=(address, 0))
            self.sessions[address] = aiohttp.ClientSession(connector=connector)
        return self.sessions[address]

    async def _open_one(self, gate: asyncio.Semaphore, index: int) -> None:
        async with gate:
            try:
                ws = await self._session(visitor_address(index)).ws_connect(
                    self.url,
                    headers=self.headers,
                    compress=0,
                    heartbeat=None,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5),
                )
            except aiohttp.WSServerHandshakeError as err:
                self.errors[f"handshake {err.status}"] += 1
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                self.errors[type(err).__name__] += 1
            else:
                self.sockets.append(ws)

    async def open(self, total: int) -> dict[str, Any]:
        start = time.perf_counter()
        gate = asyncio.Semaphore(OPENING_AT_ONCE)
        first = self.attempts
        self.attempts = max(self.attempts, total)
        await asyncio.gather(*(self._open_one(gate, index) for index in range(first, total)))
        return {
            "open": len(self.sockets),
            "attempts": self.attempts,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "seconds": round(time.perf_counter() - start, 2),
        }

    async def echo(self) -> dict[str, Any]:
        start = time.perf_counter()
        gate = asyncio.Semaphore(OPENING_AT_ONCE)
        failed: Counter[str] = Counter()

        async def one(ws: aiohttp.ClientWebSocketResponse) -> bool:
            async with gate:
                try:
                    await ws.send_str(MESSAGE)
                    reply = await asyncio.wait_for(ws.receive(), 30)
                except (TimeoutError, aiohttp.ClientError, OSError, ConnectionError) as err:
                    failed[type(err).__name__] += 1
                    return False
                if reply.type == aiohttp.WSMsgType.TEXT and reply.data == MESSAGE:
                    return True
                failed[f"reply {reply.type.name}"] += 1
                return False

        results = await asyncio.gather(*(one(ws) for ws in self.sockets))
        return {
            "echo_ok": sum(results),
            "echo_failed": len(results) - sum(results),
            "echo_error_kinds": dict(failed),
            "seconds": round(time.perf_counter() - start, 2),
        }

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        await asyncio.gather(*(session.close() for session in self.sessions.values()))


async def hold(url: str, host: str | None) -> None:
    loop = asyncio.get_running_loop()
    holder = Holder(url, host)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "open":
                answer = await holder.open(int(words[1]))
            elif words[0] == "echo":
                answer = await holder.echo()
            else:
                answer = {"error": f"unknown command {words[0]!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        await holder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["rtt", "hold"])
    parser.add_argument("url")
    parser.add_argument("seconds", nargs="?", type=float, default=5.0)
    parser.add_argument("--host", help="Host header (which service of a tunnel)")
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.mode == "rtt":
        print(json.dumps(runner(rtt(args.url, args.seconds, args.host))), flush=True)
    else:
        runner(hold(args.url, args.host))


if __name__ == "__main__":
    main()
