"""A real OpenSSH server on a loopback port, with throw-away host and user keys, for TCP channel tests."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

SSHD = "/usr/sbin/sshd"
#: The name ssh checks the host key under: with a ProxyCommand the "host" is only a label.
HOST_ALIAS = "rproxy-test-sshd"


@dataclass(frozen=True)
class Sshd:
    """A running sshd and what a client needs to log in to it."""

    port: int
    user: str
    user_key: Path
    known_hosts: Path
    log: Path

    def options(self, proxy_command: str) -> list[str]:
        """ssh/scp options: no user config, only this server's host key trusted, key login, no prompts."""
        return [
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"HostKeyAlias={HOST_ALIAS}",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=30",
            "-i",
            str(self.user_key),
            "-o",
            f"ProxyCommand={proxy_command}",
        ]

    @property
    def destination(self) -> str:
        return f"{self.user}@{HOST_ALIAS}"


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rproxy-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"sshd did not listen on {port}: {log.read_text()}")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """Debian's openssh-server on 127.0.0.1:<free port>, logging in only with a throw-away key."""
    # Not a skip: scripts/test installs both, and a missing sshd must not pass as green.
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.fail("openssh-server and openssh-client are needed (scripts/test installs them)")
    home = tmp_path / "sshd"
    home.mkdir()
    host_key, user_key = home / "host_key", home / "user_key"
    _keygen(host_key)
    _keygen(user_key)
    authorized = home / "authorized_keys"
    authorized.write_text((home / "user_key.pub").read_text())
    known_hosts = home / "known_hosts"
    known_hosts.write_text(f"{HOST_ALIAS} {(home / 'host_key.pub').read_text()}")
    port = free_port()
    config = home / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
        f"PidFile {home / 'sshd.pid'}\nLogLevel VERBOSE\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # the privilege separation directory
    log = home / "sshd.log"
    with log.open("wb") as output:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, log)
        yield Sshd(port=port, user=getpass.getuser(), user_key=user_key, known_hosts=known_hosts, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
