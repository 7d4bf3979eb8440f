"""A real ssh session through a tunnel: OpenSSH's client, with ``rproxy tcp --stdio`` as its ProxyCommand,
reaches Debian's sshd behind a real agent, through a real bridge, all as separate processes.

ssh has no other way to the server: with a ProxyCommand it never opens a connection itself."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import TOKEN, Proc, free_port, wait_listed

RPROXY = str(Path(sys.executable).with_name("rproxy"))
FILE_SIZE = 50 * 1000 * 1000


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run a command off the event loop; the token reaches the ProxyCommand only through the environment."""
    env = {**os.environ, "RPROXY_TOKEN": TOKEN}
    return await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


async def test_ssh_command_and_50_mb_scp_both_ways_through_the_tunnel(
    procs: Callable[..., Proc], sshd: Any, tmp_path: Path
) -> None:
    """ssh runs a command, and scp copies 50 MB to the server and back with the same SHA-256, with every
    byte of the sessions carried by ``rproxy tcp --stdio`` over the bridge's one port."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    agent = procs(
        "agent", "--bridge", f"ws://127.0.0.1:{port}", "--token", TOKEN, "--service", f"ssh=tcp://127.0.0.1:{sshd.port}"
    )
    await wait_listed(base, "home")
    proxy = shlex.join([RPROXY, "tcp", "--stdio", "--bridge", f"ws://127.0.0.1:{port}", "--service", "ssh"])
    options = sshd.options(proxy)

    session = await run(["ssh", *options, sshd.destination, "echo hi; uname"])
    assert session.returncode == 0, session.stderr + sshd.log.read_text()
    assert session.stdout.splitlines() == ["hi", "Linux"]

    original = tmp_path / "random.bin"
    original.write_bytes(os.urandom(FILE_SIZE))
    remote = tmp_path / "uploaded.bin"  # the sshd runs on this machine: "remote" is a path it writes
    returned = tmp_path / "returned.bin"
    upload = await run(["scp", "-q", *options, str(original), f"{sshd.destination}:{remote}"])
    assert upload.returncode == 0, upload.stderr
    download = await run(["scp", "-q", *options, f"{sshd.destination}:{remote}", str(returned)])
    assert download.returncode == 0, download.stderr

    expected = file_sha256(original)
    assert file_sha256(remote) == expected
    assert file_sha256(returned) == expected
    assert returned.stat().st_size == FILE_SIZE
    assert TOKEN not in bridge.output() + agent.output() + session.stderr + upload.stderr + download.stderr
