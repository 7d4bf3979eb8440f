"""scripts/bench longlink: rproxy across a long, thin link beside a plain TCP connection over it.

A home uplink is not loopback: the agent sits 20 to 80 ms from the VPS behind a link of some tens
of Mbit/s with a router queue in front. Here the agent and the home app run in a network
namespace of their own, joined to the bridge's by an emulated link (``bench/linkemu.py``: TUN
devices, delay, rate, tail-drop queue, loss; the kernel has no ``tc netem``). Real ``rproxy
bridge`` and ``rproxy agent`` processes; the visitor (this process) is beside the bridge.

For each link variant (``--loss``, default a clean link and 1% loss) it measures:

- **one download**: bytes per second of one ``GET`` read for ``--seconds``;
- **8 parallel downloads**: the sum, each read for ``--seconds``;
- **1 KiB request p50**: ``--requests`` small ``GET``s one after another on one keep-alive
  connection (median and 90th percentile);

each through rproxy (visitor → bridge → tunnel across the link → agent → home app) and over
one plain TCP connection across the same link straight to the home app (the "open port" a
tunnel replaces). Ratios: rproxy / plain for the rates; for the p50 the time rproxy adds
beyond one round trip. Needs root (namespaces, TUN). Writes ``bench/results/longlink-latest.json``.
``--rproxy-src DIR`` runs bridge and agent from another checkout to compare commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from procs import Supervisor, log, raise_nofile, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETNS = "rpxll-home"
NEAR, FAR = "rpxll-vps", "rpxll-home"
NEAR_IP, FAR_IP = "10.213.0.1", "10.213.0.2"
DOMAIN = "bench.test"
HOST = f"home.{DOMAIN}"
PIECE = 256 << 10
SMALL = b"x" * 1024


# The home app (in the namespace): an endless body and a 1 KiB answer.


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    piece = bytes(PIECE)
    with contextlib.suppress(ConnectionError):
        while True:
            await response.write(piece)
    return response


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="application/octet-stream")


def home_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/endless", endless)
    app.router.add_get("/1k", small)
    return app


# The link.


def sh(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not check else None)


def link_up() -> None:
    """The namespace and a TUN device on each side, addressed; linkemu.py carries packets between them."""
    link_down()
    sh("ip", "netns", "add", NETNS)
    sh("ip", "tuntap", "add", "dev", NEAR, "mode", "tun")
    sh("ip", "addr", "add", f"{NEAR_IP}/30", "dev", NEAR)
    sh("ip", "link", "set", NEAR, "up")
    inside = ("ip", "netns", "exec", NETNS)
    sh(*inside, "ip", "link", "set", "lo", "up")
    sh(*inside, "ip", "tuntap", "add", "dev", FAR, "mode", "tun")
    sh(*inside, "ip", "addr", "add", f"{FAR_IP}/30", "dev", FAR)
    sh(*inside, "ip", "link", "set", FAR, "up")


def link_down() -> None:
    sh("ip", "link", "del", NEAR, check=False)
    sh("ip", "netns", "del", NETNS, check=False)


# Measuring (from this process, beside the bridge).


async def read_for(session: aiohttp.ClientSession, url: str, host: str | None, seconds: float) -> tuple[int, float]:
    """Bytes of ``url`` read in ``seconds`` from sending the request, and the seconds taken."""
    started = time.monotonic()
    got = 0
    async with session.get(url, headers={"Host": host} if host else {}) as response:
        response.raise_for_status()
        while time.monotonic() - started < seconds:
            chunk = await response.content.readany()
            if not chunk:
                break
            got += len(chunk)
    return got, time.monotonic() - started


async def downloads(url: str, host: str | None, seconds: float, parallel: int) -> float:
    """MB/s of ``parallel`` downloads together."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        results = await asyncio.gather(*(read_for(session, url, host, seconds) for _ in range(parallel)))
    return round(sum(got for got, _ in results) / max(taken for _, taken in results) / 1e6, 2)


async def small_requests(url: str, host: str | None, count: int) -> dict[str, float]:
    """Milliseconds of ``count`` 1 KiB GETs, one after another on one connection."""
    times = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for n in range(count + 3):
            started = time.perf_counter()
            async with session.get(url, headers={"Host": host} if host else {}) as response:
                body = await response.read()
            if len(body) != len(SMALL):
                raise RuntimeError(f"{url}: {response.status}, {len(body)} bytes")
            if n >= 3:  # the first ones open the connection and warm both ends
                times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(len(times) * 0.9)], 2)}


async def measure(base: str, host: str | None, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "one_download_MBps": await downloads(base + "/endless", host, args.seconds, 1),
        "parallel_downloads_MBps": await downloads(base + "/endless", host, args.seconds, args.parallel),
        "small_request": await small_requests(base + "/1k", host, args.requests),
    }


def http_ok(url: str, host: str | None = None) -> bool:
    async def probe() -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
                session.get(url, headers={"Host": host} if host else {}) as response,
            ):
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    return asyncio.run(probe())


def variant(sup: Supervisor, args: argparse.Namespace, loss: float, token_file: Path, token: str) -> dict[str, Any]:
    """One link variant: the link, the home app, bridge and agent; then both ways measured."""
    tag = f"loss{loss:g}"
    sup.start(
        f"{tag}-link",
        [
            sys.executable,
            str(HERE / "linkemu.py"),
            "--near",
            NEAR,
            "--far",
            FAR,
            "--netns",
            NETNS,
            "--rtt-ms",
            str(args.rtt_ms),
            "--rate-mbit",
            str(args.rate_mbit),
            "--queue-ms",
            str(args.queue_ms),
            "--loss",
            str(loss / 100),
        ],
    )
    inside = ["ip", "netns", "exec", NETNS]
    home_port, bridge_port = 18080, 18443
    sup.start(f"{tag}-home", [*inside, sys.executable, str(Path(__file__)), "--home", str(home_port)])
    wait_for("the home app across the link", lambda: http_ok(f"http://{FAR_IP}:{home_port}/1k"), 30, sup.check_alive)
    rproxy = [sys.executable, "-P", "-m", "rproxy_core"]
    env = {"PYTHONPATH": str(args.rproxy_src.resolve())}
    sup.start(
        f"{tag}-bridge",
        [
            *rproxy,
            "bridge",
            "--listen",
            f"{NEAR_IP}:{bridge_port}",
            "--token-file",
            str(token_file),
            "--domain",
            DOMAIN,
            "--no-access-log",
        ],
        env=env,
    )
    # The token goes by environment (ip netns exec passes it on): nothing secret in a process list.
    sup.start(
        f"{tag}-agent",
        [
            *inside,
            *rproxy,
            "agent",
            "--bridge",
            f"ws://{NEAR_IP}:{bridge_port}",
            "--target",
            f"http://127.0.0.1:{home_port}",
            "--name",
            "home",
            "--agent-id",
            "longlink",
            "--insecure",  # plain ws:// across the emulated link: TLS would measure the cipher, not the link
        ],
        env={**env, "RPROXY_TOKEN": token},
    )
    bridge = f"http://{NEAR_IP}:{bridge_port}"
    wait_for("the tunnel across the link", lambda: http_ok(bridge + "/1k", HOST), 60, sup.check_alive)
    time.sleep(1.0)  # the tunnel's first PINGs: the bridge knows the round trip
    log(f"longlink: {tag}: plain TCP across the link")
    plain = asyncio.run(measure(f"http://{FAR_IP}:{home_port}", None, args))
    log(f"longlink: {tag}: through rproxy")
    through = asyncio.run(measure(bridge, HOST, args))
    for name in ("agent", "bridge", "home", "link"):
        sup.stop(f"{tag}-{name}")
    ratios = {
        "one_download": round(through["one_download_MBps"] / plain["one_download_MBps"], 2),
        "parallel_downloads": round(through["parallel_downloads_MBps"] / plain["parallel_downloads_MBps"], 2),
        "small_request_added_ms": round(through["small_request"]["p50_ms"] - args.rtt_ms, 2),
        "small_request_added_over_plain_ms": round(
            through["small_request"]["p50_ms"] - plain["small_request"]["p50_ms"], 2
        ),
    }
    return {"loss_percent": loss, "plain": plain, "rproxy": through, "ratios": ratios}


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"link: {args.rtt_ms:g} ms round trip, {args.rate_mbit:g} Mbit/s each way, {args.queue_ms:g} ms queue",
        "| loss | row | plain TCP | rproxy | ratio (goal) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        p, t, q = r["plain"], r["rproxy"], r["ratios"]
        loss = f"{r['loss_percent']:g}%"
        lines += [
            f"| {loss} | one download, MB/s | {p['one_download_MBps']} | {t['one_download_MBps']} "
            f"| {q['one_download']}x (≥ 0.9x) |",
            f"| {loss} | {args.parallel} parallel downloads, MB/s | {p['parallel_downloads_MBps']} "
            f"| {t['parallel_downloads_MBps']} | {q['parallel_downloads']}x |",
            f"| {loss} | 1 KiB request p50 (p90), ms | {p['small_request']['p50_ms']} ({p['small_request']['p90_ms']}) "
            f"| {t['small_request']['p50_ms']} ({t['small_request']['p90_ms']}) "
            f"| +{q['small_request_added_ms']} ms over the round trip (≤ +2 ms), "
            f"+{q['small_request_added_over_plain_ms']} ms over plain |",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench longlink", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="quick: 2 s per download, 10 requests, no loss variant")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round trip of the link (default 40)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="rate each way in Mbit/s (default 100)")
    parser.add_argument("--queue-ms", type=float, default=50.0, help="router queue in ms at the rate (default 50)")
    parser.add_argument("--loss", default="0,1", help="comma-separated loss variants in percent (default 0,1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each download is read (default 10)")
    parser.add_argument("--parallel", type=int, default=8, help="downloads at once in the parallel row (default 8)")
    parser.add_argument("--requests", type=int, default=50, help="small requests for the p50 (default 50)")
    parser.add_argument("--rproxy-src", type=Path, default=ROOT, help="checkout to run bridge and agent from")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="directory for longlink-latest.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rproxy-bench/longlink"), help="logs and the token")
    parser.add_argument("--home", type=int, help=argparse.SUPPRESS)  # internal: serve the home app on this port
    args = parser.parse_args(argv)
    raise_nofile()
    if args.home:
        web.run_app(home_app(), host="0.0.0.0", port=args.home, print=None, access_log=None)  # in its namespace
        return 0
    if os.geteuid() != 0:
        parser.error("needs root: it makes a network namespace and TUN devices")
    try:
        losses = [float(x) for x in args.loss.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--loss: not a comma-separated list of numbers: {args.loss!r}")
    if args.smoke:
        args.seconds, args.requests, losses = 2.0, 10, losses[:1]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = args.work / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    sup = Supervisor(args.work)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        link_up()
        for loss in losses:
            results.append(variant(sup, args, loss, token_file, token))
    finally:
        signal.signal(signal.SIGTERM, previous)
        sup.stop_all()
        link_down()
    data = {
        "command": os.environ.get("BENCH_COMMAND", "scripts/bench longlink"),
        "rproxy_src": str(args.rproxy_src),
        "link": {"rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit, "queue_ms": args.queue_ms},
        "seconds_per_download": args.seconds,
        "requests": args.requests,
        "seconds_taken": round(time.monotonic() - started, 1),
        "results": results,
    }
    (args.out / "longlink-latest.json").write_text(json.dumps(data, indent=2) + "\n")
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
