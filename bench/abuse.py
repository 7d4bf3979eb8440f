"""scripts/bench abuse: a real bridge and agent under the memory and event-loop attacks of issue 15.

For each attack a fresh ``rproxy bridge`` and ``rproxy agent`` (real processes) serve a home app
(another process, ``--home``); the attack runs for at most ``--seconds`` while the RSS of bridge
and agent is sampled and a probe request (``GET /small`` through the tunnel) is timed every
quarter second from another address (127.0.0.2). Reported per attack: RSS before, peak during and settled after
(MiB), and the
probe's median and worst latency with the number of probes that failed or took over 5 s.

Attacks (each bounded in time):

- ``stalled``: 400 visitors ask for a 256 MiB download and never read (4 KiB receive buffers);
- ``bigws``: 40 WebSockets offering permessage-deflate each send two 16 MiB messages (zeros,
  ~16 KB deflated) to a home app that never reads;
- ``idlews``: as many idle WebSockets as open from one address, up to 16,384;
- ``pingflood``: an agent of its own tunnel sends 256 KiB of PINGs per message and never reads.

Runs on ``.venv``'s Python (aiohttp, and rproxy_core for the frame encoding). ``--rproxy-src DIR``
runs the bridge and agent from another checkout (e.g. a worktree of an older commit) to compare.
Writes ``bench/results/abuse-latest.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from procs import Supervisor, free_port, http_status, log, raise_nofile, rss_kib, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATTACKS = ("stalled", "bigws", "idlews", "pingflood")
DOMAIN = "bench.test"
HOME = f"home.{DOMAIN}"
PROBE_TIMEOUT = 5.0


# The home app (its own process).


def home_app() -> web.Application:
    async def small(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 256 << 20
        await response.prepare(request)
        chunk = b"\0" * (256 << 10)
        for _ in range(1024):
            await response.write(chunk)
        return response

    async def sink(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await asyncio.sleep(3600)  # never reads
        return ws

    async def idle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/big", big)
    app.router.add_get("/ws-sink", sink)
    app.router.add_get("/ws-idle", idle)
    return app


# The attacks (in this process).


async def stalled(base: str, stop: asyncio.Event, count: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    port = int(base.rsplit(":", 1)[1])
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, f"GET /big HTTP/1.1\r\nHost: {HOME}\r\n\r\n".encode())
            socks.append(sock)
        await stop.wait()
        return {"opened": len(socks)}
    finally:
        for sock in socks:
            sock.close()


async def bigws(base: str, stop: asyncio.Event, count: int) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    message = b"\0" * ((16 << 20) - 4096)  # just under the old 16 MiB limit

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.ws_connect(
                base.replace("http", "ws", 1) + "/ws-sink", headers={"Host": HOME}, compress=15, max_msg_size=0
            ) as ws:
                key = "deflate" if ws.compress else "plain"
                for _ in range(2):
                    await ws.send_bytes(message)
                closed = ws.closed or (await asyncio.wait_for(ws.receive(), 0.2)).type is aiohttp.WSMsgType.CLOSE
                key += f" sent, close {ws.close_code}" if closed else " sent"
                outcomes[key] = outcomes.get(key, 0) + 1
                await stop.wait()
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as err:
            key = f"error {type(err).__name__}"
            outcomes[key] = outcomes.get(key, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"outcomes": outcomes}


async def idlews(base: str, stop: asyncio.Event, count: int) -> dict[str, Any]:
    opened: list[aiohttp.ClientWebSocketResponse] = []
    refused: dict[str, int] = {}
    gate = asyncio.Semaphore(128)

    async def one(session: aiohttp.ClientSession) -> None:
        async with gate:
            if stop.is_set():
                return
            try:
                ws = await session.ws_connect(
                    base.replace("http", "ws", 1) + "/ws-idle",
                    headers={"Host": HOME},
                    autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_close=1),
                )
                opened.append(ws)
            except aiohttp.WSServerHandshakeError as err:
                refused[str(err.status)] = refused.get(str(err.status), 0) + 1
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                refused[type(err).__name__] = refused.get(type(err).__name__, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        still = sum(1 for ws in opened if not ws.closed)
        for ws in opened:
            ws._response.close()  # no close handshakes: 16k of them would outlast the bound
    return {"opened": len(opened), "open_at_end": still, "refused": refused}


async def pingflood(base: str, stop: asyncio.Event, token: str) -> dict[str, Any]:
    from rproxy_core.protocol.frames import FrameType, encode_header

    def frame(kind: int, payload: bytes) -> bytes:
        return encode_header(kind, 0, 0, len(payload)) + payload

    hello = json.dumps({"version": 1, "agent_id": "flood"}).encode()
    batch = b"".join(frame(FrameType.PING, b"p" * (16 << 10)) for _ in range(16))
    headers = {
        "Authorization": f"Bearer {token}",
        "Rproxy-Protocol": "1",
        "Rproxy-Tunnel": "flood",
        "Rproxy-Agent-Id": "flood",
    }
    sent = 0
    ended = "still open"
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(
                base.replace("http", "ws", 1) + "/_rproxy/connect", headers=headers, max_msg_size=0, autoping=False
            ) as ws:
                await ws.receive()  # the bridge's HELLO; nothing is read after it
                await ws.send_bytes(frame(FrameType.HELLO, hello))
                transport = ws._writer.transport  # the client learns of a close only by reading
                while not stop.is_set() and not ws.closed and sent < 4 << 30:
                    if transport.is_closing():
                        break
                    await ws.send_bytes(batch)
                    sent += len(batch)
                    await asyncio.sleep(0)
                ended = "cut off by the bridge" if ws.closed or transport.is_closing() else "still open"
        except (aiohttp.ClientError, ConnectionError) as err:
            ended = f"cut off ({type(err).__name__})"
    return {"ping_bytes_sent": sent, "flooder": ended}


# One attack, measured.


async def probe(base: str, stop: asyncio.Event, latencies: list[float], failures: list[str]) -> None:
    # From another loopback address than the attack: the bridge caps what one address may have
    # in flight, and the probe stands for another visitor.
    connector = aiohttp.TCPConnector(force_close=True, local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with session.get(
                    base + "/small", headers={"Host": HOME}, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
                ) as response:
                    await response.read()
                    if response.status != 200:
                        failures.append(str(response.status))
            except (aiohttp.ClientError, TimeoutError) as err:
                failures.append(type(err).__name__)
            latencies.append(time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


async def run_attack(
    name: str, base: str, pids: dict[str, list[int]], seconds: float, smoke: bool, token: str
) -> dict[str, Any]:
    stop = asyncio.Event()
    samples = {who: [rss_kib(p)] for who, p in pids.items()}
    latencies: list[float] = []
    failures: list[str] = []
    if name == "stalled":
        attack = stalled(base, stop, 20 if smoke else 400)
    elif name == "bigws":
        attack = bigws(base, stop, 4 if smoke else 40)
    elif name == "idlews":
        attack = idlews(base, stop, 200 if smoke else 16384)
    else:
        attack = pingflood(base, stop, token)
    attacking = asyncio.create_task(attack)
    probing = asyncio.create_task(probe(base, stop, latencies, failures))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not attacking.done():
        await asyncio.sleep(0.25)
        for who, p in pids.items():
            samples[who].append(rss_kib(p))
    stop.set()
    details = await attacking
    await probing
    after: dict[str, int] = {}
    await asyncio.sleep(1.0)
    for who, p in pids.items():
        after[who] = rss_kib(p)
    ms = sorted(x * 1000 for x in latencies)
    return {
        "attack": name,
        "details": details,
        "rss_mib": {
            who: {
                "before": round(s[0] / 1024, 1),
                "peak": round(max(s) / 1024, 1),
                "after": round(after[who] / 1024, 1),
            }
            for who, s in samples.items()
        },
        "probe": {
            "count": len(ms),
            "p50_ms": round(statistics.median(ms), 1) if ms else None,
            "max_ms": round(ms[-1], 1) if ms else None,
            "failed": len(failures),
            "slow_over_1s": sum(1 for x in ms if x > 1000),
        },
    }


class Pair:
    """A bridge and an agent, real processes, from ``src``."""

    def __init__(self, sup: Supervisor, src: Path, work: Path, home_port: int, token: str) -> None:
        self.sup, self.src, self.work, self.home_port, self.token = sup, src, work, home_port, token
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, *args: str) -> list[str]:
        # -P: not the working directory first on sys.path, so PYTHONPATH picks the checkout.
        return [sys.executable, "-P", "-m", "rproxy_core", *args]

    def env(self, **extra: str) -> dict[str, str]:
        return {"PYTHONPATH": str(self.src), **extra}

    def start(self, tag: str) -> dict[str, list[int]]:
        self.port = free_port()
        token_file = self.work / "token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        bridge = self.sup.start(
            f"{tag}-bridge",
            self.argv(
                "bridge",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--token-file",
                str(token_file),
                "--domain",
                DOMAIN,
                "--no-access-log",
            ),
            env=self.env(),
        )
        wait_for(
            "bridge",
            lambda: http_status(f"http://127.0.0.1:{self.port}/_rproxy/health") == 200,
            30,
            self.sup.check_alive,
        )
        agent = self.sup.start(
            f"{tag}-agent",
            self.argv(
                "agent",
                "--bridge",
                f"ws://127.0.0.1:{self.port}",
                "--target",
                f"http://127.0.0.1:{self.home_port}",
                "--name",
                "home",
                "--agent-id",
                "bench",
            ),
            env=self.env(RPROXY_TOKEN=self.token),
        )
        wait_for(
            "tunnel", lambda: http_status(f"http://127.0.0.1:{self.port}/small", HOME) == 200, 30, self.sup.check_alive
        )
        time.sleep(0.5)
        return {"bridge": [bridge.pid], "agent": [agent.pid]}

    def stop(self, tag: str) -> None:
        self.sup.stop(f"{tag}-agent")
        self.sup.stop(f"{tag}-bridge")


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| attack | bridge RSS MiB before → peak (after) | agent RSS MiB before → peak (after) | "
        "probe p50 / max ms | probes failed (of) | attack |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        b, a, p = r["rss_mib"]["bridge"], r["rss_mib"]["agent"], r["probe"]
        lines.append(
            f"| {r['attack']} | {b['before']} → {b['peak']} ({b['after']}) | {a['before']} → {a['peak']} "
            f"({a['after']}) | {p['p50_ms']} / {p['max_ms']} | {p['failed']} ({p['count']}) | "
            f"{json.dumps(r['details'], sort_keys=True)} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small and quick: each attack 2 s, a few sockets")
    parser.add_argument("--seconds", type=float, default=20.0, help="longest time per attack (default 20)")
    parser.add_argument("--only", default=",".join(ATTACKS), help=f"comma-separated subset of {','.join(ATTACKS)}")
    parser.add_argument("--rproxy-src", type=Path, default=ROOT, help="checkout to run bridge and agent from")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="directory for abuse-latest.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rproxy-bench/abuse"), help="logs and the token")
    parser.add_argument("--home", type=int, help=argparse.SUPPRESS)  # internal: serve the home app on this port
    args = parser.parse_args(argv)
    raise_nofile()
    if args.home:
        web.run_app(home_app(), host="127.0.0.1", port=args.home, print=None, access_log=None)
        return 0
    attacks = [a for a in args.only.split(",") if a]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    seconds = 2.0 if args.smoke else args.seconds
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(args.work)
    token = secrets.token_urlsafe(24)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        home_port = free_port()
        sup.start("home", [sys.executable, str(Path(__file__)), "--home", str(home_port)])
        wait_for("home app", lambda: http_status(f"http://127.0.0.1:{home_port}/small") == 200, 30, sup.check_alive)
        pair = Pair(sup, args.rproxy_src.resolve(), args.work, home_port, token)
        for name in attacks:
            pids = pair.start(name)
            log(f"abuse: {name} (at most {seconds:g}s)")
            try:
                results.append(asyncio.run(run_attack(name, pair.base, pids, seconds, args.smoke, token)))
            finally:
                pair.stop(name)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sup.stop_all()
    data = {
        "command": os.environ.get("BENCH_COMMAND", "scripts/bench abuse"),
        "rproxy_src": str(args.rproxy_src),
        "seconds_per_attack": seconds,
        "seconds_taken": round(time.monotonic() - started, 1),
        "results": results,
    }
    (args.out / "abuse-latest.json").write_text(json.dumps(data, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
