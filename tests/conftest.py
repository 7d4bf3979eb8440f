"""Fixtures shared by every test: real servers on 127.0.0.1, started and stopped per test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl as ssl_module
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import Agent, AgentConfig, Bridge, BridgeConfig

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-" + "x" * 16


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on 127.0.0.1; return the runner and its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{bound}"


@asynccontextmanager
async def running_bridge(**overrides: object) -> AsyncIterator[Bridge]:
    """A real bridge on 127.0.0.1 with the test token."""
    config = BridgeConfig(host="127.0.0.1", port=0, tokens=[TOKEN], access_log=False)
    for key, value in overrides.items():
        setattr(config, key, value)
    bridge = Bridge(config)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@asynccontextmanager
async def running_agent(bridge_url: str, target: str, **overrides: object) -> AsyncIterator[Agent]:
    """A real agent connected (waited for) to ``bridge_url``, serving ``target``."""
    config = AgentConfig(
        bridge=bridge_url, token=TOKEN, target=target, agent_id="test-agent", backoff_initial=0.1, backoff_max=0.5
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    agent = Agent(config)
    await agent.start()
    try:
        await agent.wait_connected(timeout=10)
        yield agent
    finally:
        await agent.stop()


@asynccontextmanager
async def text_app(answer: Callable[[web.Request], str]) -> AsyncIterator[str]:
    """A home app answering every GET with ``answer(request)`` as text; yields its URL."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=answer(request))

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner, url = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


async def wait_listed(base: str, name: str = "home", timeout: float = 20) -> None:
    """Poll a bridge's health page (``base`` is its URL) until tunnel ``name`` is listed."""
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(base + "/_rproxy/health") as response:
                    if name in (await response.json())["tunnels"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def wait_for_tunnel(bridge: Bridge, name: str = "home", agents: int = 1, timeout: float = 15) -> None:
    """Wait until the bridge's registry shows ``agents`` agents for ``name``."""
    async with asyncio.timeout(timeout):
        while bridge.registry.tunnels().get(name, 0) != agents:
            await asyncio.sleep(0.02)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A visitor's HTTP client (no connection limit, no decompression)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        yield session


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True, scope="session")
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A bridge started without a credential keeps the token it makes under $XDG_STATE_HOME
    (rproxy_core/cli/state.py): in the tests, never in the developer's own home."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


# Processes: the CLI as users run it, for tests that kill or measure a bridge or an agent.


class Proc:
    """A running ``rproxy`` process with its output in a file."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        *,
        cwd: Path = ROOT,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log
        self._log = log.open("w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "rproxy_core", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**(os.environ if base_env is None else base_env), **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_kib(self) -> int:
        """Resident memory of the process now."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)
            self.popen.wait(timeout=15)

    def exit_code(self, timeout: float = 15) -> int:
        """The exit code of a process already told to stop (a second SIGTERM would hurry it)."""
        return self.popen.wait(timeout=timeout)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._log.close()
        return self.popen.returncode


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``rproxy`` processes; every one is stopped at the end of the test."""
    started: list[Proc] = []

    def start(
        *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, base_env: dict[str, str] | None = None
    ) -> Proc:
        proc = Proc(list(args), tmp_path / f"proc-{len(started)}.log", env, cwd=cwd, base_env=base_env)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


async def wait_http(url: str, status: int = 200, timeout: float = 20, ssl: ssl_module.SSLContext | None = None) -> None:
    """Poll ``url`` until it answers ``status`` (``ssl``: the context that trusts a test CA)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url, ssl=ssl if ssl is not None else True) as response:
                    if response.status == status:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer {status}")
            await asyncio.sleep(0.1)
