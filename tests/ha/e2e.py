"""The machinery of the tests that run Home Assistant as a user runs it (``.venv-e2e``).

``.venv-e2e`` is Home Assistant 2025.4.4 with its own frontend and rproxy-core installed from a
wheel built from this checkout, made by ``scripts/_env.sh``'s ``ensure_e2e_venv`` (``scripts/test
ha`` runs it; ``ensure_e2e_venv()`` here runs it too, a no-op when nothing changed). The tests
start ``hass``, ``rproxy bridge`` and other programs of that venv as child processes
(``Process``), each with its output in a file, and drive Home Assistant through its HTTP and
WebSocket APIs (``HomeAssistantApi``) as the frontend does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_E2E = ROOT / ".venv-e2e"


def ensure_e2e_venv() -> None:
    """Build the wheel and (re)install .venv-e2e if the sources changed; a no-op otherwise."""
    script = 'source "$1" && ensure_e2e_venv'
    try:
        done = subprocess.run(
            ["bash", "-c", script, "ensure_e2e_venv", str(ROOT / "scripts" / "_env.sh")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("installing .venv-e2e took more than 300 s (see .venv-e2e/install.log)")
    if done.returncode != 0:
        pytest.fail(f"installing .venv-e2e failed:\n{done.stdout}\n{done.stderr}")


def child_env() -> dict[str, str]:
    """The environment of the processes: nothing pointing back into this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "COV_CORE"))}
    env["PATH"] = f"{VENV_E2E / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


class Process:
    """A child process whose output goes to a file."""

    def __init__(self, name: str, args: list[str], cwd: Path, log: Path) -> None:
        self.name = name
        self.log = log
        #: The exit code once stopped; None if it had to be killed.
        self.exit_code: int | None = None
        self._file = log.open("wb")
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{tail(self.output())}")

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        else:
            self.exit_code = self.popen.returncode
        self._file.close()


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


async def wait_until(what: str, timeout: float, probe: Callable[[], Any], *alive: Process) -> Any:
    """Await ``probe()`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        for process in alive:
            process.check_running()
        try:
            result = probe()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return result
        except (aiohttp.ClientError, OSError, ValueError) as err:
            last_error = err
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def processes() -> AsyncIterator[dict[str, Process]]:
    """Started processes by name; all stopped at the end (Home Assistant first)."""
    started: dict[str, Process] = {}

    def stop_all() -> None:
        # Home Assistant first (its tunnels say goodbye to a bridge still there), then the
        # others, the last started first.
        for name in sorted(reversed(started), key=lambda name: name != "hass"):
            started[name].stop(timeout=30 if name == "hass" else 10)

    try:
        yield started
    finally:
        await asyncio.to_thread(stop_all)


class HomeAssistantApi:
    """Home Assistant's HTTP and WebSocket APIs, as the frontend calls them."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.token = ""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_id = 0

    @property
    def client_id(self) -> str:
        return f"{self.url}/"

    async def request(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.request(method, f"{self.url}{path}", headers=headers, **kwargs) as response:
            text = await response.text()
            assert response.status == expect, f"{method} {path}: {response.status} {text}"
            return json.loads(text) if text else None

    async def onboard(self) -> None:
        """Create the owner (onboarding's user step) and log in with the code it returns."""
        password = secrets.token_urlsafe(12)
        created = await self.request(
            "POST",
            "/api/onboarding/users",
            json={
                "client_id": self.client_id,
                "name": "Owner",
                "username": "owner",
                "password": password,
                "language": "en",
            },
        )
        tokens = await self.request(
            "POST",
            "/auth/token",
            data={"grant_type": "authorization_code", "code": created["auth_code"], "client_id": self.client_id},
        )
        self.token = tokens["access_token"]

    @asynccontextmanager
    async def websocket(self) -> AsyncIterator[None]:
        async with self.session.ws_connect(f"{self.url}/api/websocket") as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": self.token})
            assert (await ws.receive_json(timeout=10))["type"] == "auth_ok"
            self._ws = ws
            try:
                yield
            finally:
                self._ws = None

    async def command(self, message: dict[str, Any]) -> Any:
        assert self._ws is not None
        self._ws_id += 1
        await self._ws.send_json({"id": self._ws_id, **message})
        while True:
            answer = await self._ws.receive_json(timeout=10)
            if answer.get("id") == self._ws_id and answer["type"] == "result":
                assert answer["success"], answer
                return answer["result"]

    async def flow_step(self, flow_id: str, user_input: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/api/config/config_entries/flow/{flow_id}", json=user_input
        )
        return result

    async def states(self) -> dict[str, dict[str, Any]]:
        return {state["entity_id"]: state for state in await self.request("GET", "/api/states")}


def bridge_url_from(output: str) -> str | None:
    """The URL a bridge logged it listens on, once it has."""
    match = re.search(r"bridge listening on (http://\d+\.\d+\.\d+\.\d+:\d+)", output)
    return match.group(1) if match else None


def log_records(text: str) -> list[str]:
    """Home Assistant's log split into records (a record's traceback lines stay with it)."""
    records: list[str] = []
    for line in text.splitlines():
        if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records
