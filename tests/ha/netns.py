"""A visitor network for browser tests: a network namespace joined to this host by a veth pair.

Programs run inside it (``ip netns exec``) connect from addresses of TEST-NET-3
(203.0.113.0/24), not loopback, as visitors from the internet do; this host is reachable from
there at ``host_address``. Each run gets names and an address block of its own (other test
runs on the machine may hold other blocks at the same time), and everything is removed when
the context ends, also after a failure.

Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) and ``ip`` (iproute2).
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_network

import pytest

#: Visitors' addresses come from here, split in blocks of 8 (one per run).
VISITOR_NETWORK = ip_network("203.0.113.0/24")
BLOCK_PREFIX = 29


@dataclass(frozen=True)
class VisitorNetwork:
    """A namespace ``name`` whose interface has ``visitor_address``; this host is ``host_address``."""

    name: str
    host_address: str
    visitor_address: str

    def command(self, *args: str) -> list[str]:
        """``args`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def connect(self, host: str, port: int, timeout: float = 10) -> socket.socket:
        """A TCP connection made from inside the namespace (to its own loopback, say).

        A socket belongs to the namespace it was created in, whichever thread uses it later:
        a short-lived thread enters the namespace, connects and hands the socket back.
        """
        result: list[socket.socket | BaseException] = []

        def enter_and_connect() -> None:
            try:
                with open(f"/run/netns/{self.name}", "rb") as namespace:
                    os.setns(namespace.fileno(), os.CLONE_NEWNET)
                result.append(socket.create_connection((host, port), timeout=timeout))
            except BaseException as err:  # reported by the caller's thread
                result.append(err)

        thread = threading.Thread(target=enter_and_connect, name=f"connect in {self.name}")
        thread.start()
        thread.join(timeout + 5)
        if not result:
            raise TimeoutError(f"connecting to {host}:{port} inside {self.name} took too long")
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        outcome.settimeout(None)
        return outcome


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def _free_block() -> IPv4Network:
    """A block of VISITOR_NETWORK no interface of this host uses (another run may hold one)."""
    shown = _run("ip", "-o", "-4", "addr", "show").stdout
    blocks = list(VISITOR_NETWORK.subnets(new_prefix=BLOCK_PREFIX))
    random.shuffle(blocks)
    for block in blocks:
        if not any(str(address) in shown for address in block):
            return block
    pytest.fail(f"every block of {VISITOR_NETWORK} is in use on this host")


@contextmanager
def visitor_network() -> Iterator[VisitorNetwork]:
    """A namespace with a veth pair to this host; removed afterwards."""
    tag = secrets.token_hex(4)
    name, host_side, visitor_side = f"rproxy-ui-{tag}", f"rpxh{tag}", f"rpxv{tag}"
    block = _free_block()
    host_address, visitor_address = str(block[1]), str(block[2])
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        pytest.fail(
            "this test needs a network namespace of its own (root, or CAP_SYS_ADMIN and CAP_NET_ADMIN): "
            f"ip netns add: {made.stderr.strip()}"
        )
    try:
        steps = [
            ("ip", "link", "add", host_side, "type", "veth", "peer", "name", visitor_side),
            ("ip", "link", "set", visitor_side, "netns", name),
            ("ip", "addr", "add", f"{host_address}/{BLOCK_PREFIX}", "dev", host_side),
            ("ip", "link", "set", host_side, "up"),
            (
                "ip",
                "netns",
                "exec",
                name,
                "ip",
                "addr",
                "add",
                f"{visitor_address}/{BLOCK_PREFIX}",
                "dev",
                visitor_side,
            ),
            ("ip", "netns", "exec", name, "ip", "link", "set", visitor_side, "up"),
            ("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _run(*step)
            if done.returncode != 0:
                pytest.fail(f"setting up the visitor network: {' '.join(step)}: {done.stderr.strip()}")
        yield VisitorNetwork(name, host_address, visitor_address)
    finally:
        # Deleting the namespace deletes its end of the pair, and with it this host's end.
        _run("ip", "netns", "delete", name)
        _run("ip", "link", "delete", host_side)
