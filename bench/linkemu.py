"""A long, thin link emulated in user space: two TUN devices, packets passed with delay, rate and loss.

The benchmark's long-link mode needs a link like a home uplink to a VPS: tens of milliseconds
of delay, a rate of about 100 Mbit/s, a bounded router queue, sometimes loss. ``tc netem`` would
be the usual tool, but the kernels this project is measured on are built without it (``tc qdisc
add ... netem`` answers "Specified qdisc kind is unknown"). So this process is the link: it
holds a TUN device in the root network namespace and one in another namespace, reads each IP
packet that one side's kernel routes into its device and writes it into the other's after

- **serialization** at the link rate (a packet leaves once the ones before it have), so the
  rate is a true bottleneck that TCP's congestion control finds;
- a **queue** in front of the link bounded in time (``--queue-ms`` of sending at the rate):
  packets arriving at a full queue are dropped, as a router's tail drop does;
- **propagation delay** (half the round-trip time each way);
- random **loss** with probability ``--loss`` per packet, each way.

Real kernels run TCP at both ends, so slow start, congestion control and retransmission
behave as across a real link. Usage (as root; ``bench/longlink.py`` starts it)::

    python bench/linkemu.py --near rpxll-vps --far rpxll-home --netns rpxll-home \\
        --rtt-ms 40 --rate-mbit 100 [--loss 0.01] [--queue-ms 50]

It prints "ready" once both devices are open, and counts what it passed and dropped to stderr
when stopped (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import os
import random
import signal
import struct
import sys
from collections import deque

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
#: Packets taken from a device per wake-up before other work runs.
_BATCH = 64


def open_tun(name: str) -> int:
    """Attach to the existing TUN device ``name`` of the current network namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def enter_netns(name: str) -> None:
    """Move this process into network namespace ``name`` (made by ``ip netns add``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


class Direction:
    """One way of the link: packets read from ``source`` are written to ``sink`` when due."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: int,
        sink: int,
        *,
        delay: float,
        rate: float,
        queue: float,
        loss: float,
        rng: random.Random,
    ) -> None:
        self.loop, self.source, self.sink = loop, source, sink
        self.delay, self.rate, self.queue, self.loss, self.rng = delay, rate, queue, loss, rng
        self.in_flight: deque[tuple[float, bytes]] = deque()
        self.free_at = 0.0  # when the link has sent everything accepted so far
        self.timer: asyncio.TimerHandle | None = None
        self.passed = self.lost = self.tail_dropped = 0

    def readable(self) -> None:
        for _ in range(_BATCH):
            try:
                packet = os.read(self.source, 65536)
            except BlockingIOError:
                break
            self.accept(packet)

    def accept(self, packet: bytes) -> None:
        now = self.loop.time()
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        start = max(now, self.free_at)
        if start - now > self.queue:  # the router's queue is full: tail drop
            self.tail_dropped += 1
            return
        self.free_at = start + len(packet) / self.rate
        self.in_flight.append((self.free_at + self.delay, packet))
        if self.timer is None:
            self.timer = self.loop.call_at(self.free_at + self.delay, self.deliver)

    def deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        queue = self.in_flight
        while queue and queue[0][0] <= now + 0.0005:
            _, packet = queue.popleft()
            try:
                os.write(self.sink, packet)
                self.passed += 1
            except BlockingIOError:
                self.tail_dropped += 1  # the far kernel's device queue is full
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self.deliver)


async def run(args: argparse.Namespace) -> None:
    near = open_tun(args.near)
    enter_netns(args.netns)
    far = open_tun(args.far)
    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed)
    settings = {
        "delay": args.rtt_ms / 2000,
        "rate": args.rate_mbit * 1e6 / 8,
        "queue": args.queue_ms / 1000,
        "loss": args.loss,
        "rng": rng,
    }
    ways = [Direction(loop, near, far, **settings), Direction(loop, far, near, **settings)]  # type: ignore[arg-type]
    for way in ways:
        loop.add_reader(way.source, way.readable)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for name, way in zip(("near->far", "far->near"), ways, strict=True):
        print(f"{name}: {way.passed} passed, {way.lost} lost, {way.tail_dropped} dropped at the queue", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--near", required=True, help="TUN device in this (the root) namespace")
    parser.add_argument("--far", required=True, help="TUN device in --netns")
    parser.add_argument("--netns", required=True, help="namespace of --far")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time the link adds (default 40)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="rate each way, Mbit/s (default 100)")
    parser.add_argument("--loss", type=float, default=0.0, help="probability a packet is lost, each way (default 0)")
    parser.add_argument("--queue-ms", type=float, default=50.0, help="router queue, in ms at the rate (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the loss pattern")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
