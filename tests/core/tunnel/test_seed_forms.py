"""The seeds' own command lines, run as their documents write them (only host names and ports
changed): real ``rproxy`` processes, a real aiohttp home app, a visitor through the bridge.

Seed 0, node-rproxy::

    node bridgeproxy.js 8080 username:password
    node autoconnectproxy.js ws://username:password@my.public.websocket:8080 ws://localhost:8080

Seed 1, NAT Web Reverse Proxy: a ``.env`` file with AGENT_ID, REMOTE_URL and LOCAL_URL next to
the client, and a server with no configuration at all.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pty
import select
import shlex
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import AgentConfig
from rproxy_core.cli.state import PLACEHOLDER_HOST, agent_command, state_directory
from tests.conftest import ROOT, TOKEN, Proc, free_port, start_app, wait_http, wait_listed
from tests.core.tunnel.test_cli import clean_env, one_error_line, rproxy

PASSWORD = "s3cret-pass-phrase"


@pytest.fixture
async def websocket_app() -> AsyncIterator[int]:
    """node-rproxy's home app is a WebSocket app: a page and an echo socket; yields its port."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"rpi-webapp {request.path}")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo: " + message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/{tail:.*}", page)
    runner, url = await start_app(app)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        await runner.cleanup()


async def visit(base: str) -> tuple[int, str, str]:
    """A visitor: one page and one WebSocket message through the bridge at ``base``."""
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/lights") as response:
            status, text = response.status, await response.text()
        async with session.ws_connect(base.replace("http", "ws", 1) + "/ws") as ws:
            await ws.send_str("hello")
            echoed = await asyncio.wait_for(ws.receive_str(), 10)
    return status, text, echoed


async def test_node_rproxys_command_lines_serve_the_home_app(procs: Callable[..., Proc], websocket_app: int) -> None:
    """``rproxy bridge 8080 username:password`` and ``rproxy agent ws://username:password@HOST:8080
    ws://localhost:8080``: a page and a WebSocket reach the home app; the password is in no log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    agent = procs(
        "agent", f"ws://username:{PASSWORD}@localhost:{port}", f"ws://localhost:{websocket_app}", base_env=clean_env()
    )
    await wait_listed(base, "home")
    assert await visit(base) == (200, "rpi-webapp /lights", "echo: hello")
    bridge.stop(), agent.stop()
    for proc in (bridge, agent):
        assert PASSWORD not in proc.output()
        assert base64.b64encode(f"username:{PASSWORD}".encode()).decode() not in proc.output()
        assert "Traceback" not in proc.output()


async def test_a_wrong_password_in_the_bridge_url_is_refused_for_good(procs: Callable[..., Proc]) -> None:
    """The bridge's USER:PASS accepts exactly that credential: another password exits 3 with one line."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    wrong = await asyncio.to_thread(
        rproxy, "agent", f"ws://username:not-{PASSWORD}@127.0.0.1:{port}", "http://127.0.0.1:9"
    )
    assert wrong.returncode == 3
    assert "refused the agent token (401)" in one_error_line(wrong)
    assert "not-" + PASSWORD not in wrong.stderr + bridge.output()


async def test_the_bridge_reads_a_basic_credential_strictly(procs: Callable[..., Proc]) -> None:
    """A fake agent's Basic headers: malformed base64, no colon, the right user with a wrong
    password: each 401 with a logged reason; the right one gets past authentication."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")

    def basic(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    cases = {
        "Basic !!!not-base64": 401,
        basic("username" + PASSWORD): 401,  # no colon
        basic(f"username:{PASSWORD}x"): 401,
        "Basic " + base64.b64encode(b"username:\xff\xfe").decode(): 401,  # not UTF-8
        f"Bearer username:{PASSWORD}": 426,  # the same credential as a token: past auth (no protocol offered)
        basic(f"username:{PASSWORD}"): 426,
    }
    async with aiohttp.ClientSession() as session:
        for header, status in cases.items():
            async with session.get(base + "/_rproxy/connect", headers={"Authorization": header}) as response:
                assert response.status == status, header
    assert "malformed basic credential" in bridge.output()
    assert PASSWORD not in bridge.output()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["agent", "ws://127.0.0.1:1", "--bridge", "ws://127.0.0.1:1", "--token", "t"], "BRIDGE_URL and --bridge"),
        (
            ["agent", "ws://127.0.0.1:1", "http://127.0.0.1:2", "--target", "http://127.0.0.1:2", "--token", "t"],
            "TARGET_URL and --target",
        ),
        (
            ["agent", f"ws://u:{PASSWORD}@127.0.0.1:1", "http://127.0.0.1:2", "--token", "t"],
            "--token and user:password@ in --bridge: two credentials",
        ),
        (["bridge", "8080", "--listen", "127.0.0.1:8080"], "PORT and --listen"),
        (["bridge", "8080", f"u:{PASSWORD}", "--token", "t"], "USER:PASS and --token"),
        (["bridge", "8080", PASSWORD], "USER:PASS: expected a user, a colon and a password"),
        (["bridge", "http"], "PORT: expected a port number"),
        (["agent", f"ftp://u:{PASSWORD}@127.0.0.1:1", "http://127.0.0.1:2"], "--bridge: expected"),
        (["agent", f"ws://:{PASSWORD}@127.0.0.1:1", "http://127.0.0.1:2"], "needs a user"),
    ],
    ids=[
        "bridge-twice",
        "target-twice",
        "two-credentials",
        "port-twice",
        "userpass-and-token",
        "userpass-no-colon",
        "port-not-a-number",
        "bad-scheme-with-password",
        "password-without-user",
    ],
)
def test_a_positional_beside_its_flag_or_a_bad_one_is_a_one_line_error(args: list[str], expected: str) -> None:
    """Mixing a positional and its flag, or a malformed one: exit 2, one line naming both, no password."""
    result = rproxy(*args)
    assert result.returncode == 2, result
    line = one_error_line(result)
    assert expected in line
    assert PASSWORD not in line


async def test_the_password_from_the_environment_counts_as_the_credential(
    procs: Callable[..., Proc], websocket_app: int
) -> None:
    """$REMOTE_URL with user:password@ is the same credential as on the command line."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    procs(
        "agent",
        base_env=clean_env(
            REMOTE_URL=f"http://username:{PASSWORD}@127.0.0.1:{port}", LOCAL_URL=f"ws://localhost:{websocket_app}"
        ),
    )
    await wait_listed(base, "home")
    assert (await visit(base))[0] == 200


def test_the_agent_config_never_shows_its_token() -> None:
    """repr() of an AgentConfig (a log line, a traceback's locals) leaves the credential out."""
    config = AgentConfig(bridge="ws://127.0.0.1:1", token=f"username:{PASSWORD}", target="http://x", basic_auth=True)
    assert PASSWORD not in repr(config)
    assert "basic_auth=True" in repr(config)


def test_agent_help_shows_the_seed_forms_and_the_warning() -> None:
    result = rproxy("agent", "--help")
    assert result.returncode == 0
    assert "BRIDGE_URL [TARGET_URL]" in result.stdout
    assert "rproxy bridge 8080 user:password" in result.stdout
    assert "ps" in result.stdout and ".env" in result.stdout


# Seed 1: NAT Web Reverse Proxy's client, configured "in a .env file".

#: Its README's lines, comments included; only the URLs' ports are the test's.
SEED1_ENV = """\
AGENT_ID=mac@home # A unique identifier of the proxy client
REMOTE_URL=http://localhost:{bridge} # The base URL of the proxy server
LOCAL_URL=http://localhost:{home} # The base URL of the local HTTP server
"""
TOKEN_LINE = "RPROXY_TOKEN={token}\n"


async def test_a_dotenv_file_in_the_working_directory_configures_the_agent(
    procs: Callable[..., Proc], websocket_app: int, tmp_path: Path
) -> None:
    """``rproxy agent`` alone in a directory with the seed's ``.env`` (plus the bridge's token)
    serves the home app; the http:// REMOTE_URL is the bridge's WebSocket address; AGENT_ID names
    the agent in the bridge's log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    (tmp_path / ".env").write_text(SEED1_ENV.format(bridge=port, home=websocket_app) + TOKEN_LINE.format(token=TOKEN))
    agent = procs("agent", cwd=tmp_path, base_env=clean_env())
    await wait_listed(base, "home")
    assert await visit(base) == (200, "rpi-webapp /lights", "echo: hello")
    assert "home/mac@home" in bridge.output()
    agent.stop()
    assert TOKEN not in agent.output()


async def test_the_real_environment_wins_over_the_dotenv_file(
    procs: Callable[..., Proc], websocket_app: int, tmp_path: Path
) -> None:
    """A variable set in the environment beats the same one in ``--env-file F``."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    env_file = tmp_path / "agent.env"
    env_file.write_text(SEED1_ENV.format(bridge=free_port(), home=1) + TOKEN_LINE.format(token="not-the-token"))
    procs(
        "agent",
        "--env-file",
        str(env_file),
        base_env=clean_env(REMOTE_URL=base, LOCAL_URL=f"http://127.0.0.1:{websocket_app}", RPROXY_TOKEN=TOKEN),
    )
    await wait_listed(base, "home")
    assert (await visit(base))[0] == 200


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('AGENT_ID=mac@home\nRPROXY_TOKEN="unterminated\n', ".env: line 2: not a NAME=VALUE line"),
        ("AGENT_ID=mac@home\n\nthis is not a setting\n", ".env: line 3: not a NAME=VALUE line"),
        (b"AGENT_ID=\xff\xfe\n", ".env: not UTF-8 text"),
    ],
    ids=["unterminated-quote", "not-an-assignment", "not-utf8"],
)
def test_a_malformed_dotenv_file_is_a_one_line_error_naming_the_line(
    content: str | bytes, expected: str, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_bytes(content.encode() if isinstance(content, str) else content)
    result = subprocess.run(
        [sys.executable, "-m", "rproxy_core", "agent"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert expected in line
    assert "unterminated" not in line


def test_a_missing_env_file_given_by_flag_is_an_error_but_no_dotenv_is_fine(tmp_path: Path) -> None:
    missing = rproxy("agent", "--env-file", str(tmp_path / "nope.env"))
    assert missing.returncode == 2
    assert "--env-file" in one_error_line(missing) and "no such file" in missing.stderr
    # Without a .env and without settings: the usual missing-setting line, nothing about .env.
    result = subprocess.run(
        [sys.executable, "-m", "rproxy_core", "agent"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 2
    assert "--bridge: is required" in one_error_line(result)


# The bare bridge: seed 1's server "has no configuration at all".


def _read_until(fd: int, marker: str, timeout: float = 20) -> str:
    """What a process wrote to its terminal (``fd``, the pty's master end) up to the line holding ``marker``."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen or not seen.split(marker.encode(), 1)[1].count(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} on the terminal: {seen.decode(errors='replace')!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the process closed its end
                chunk = b""
            assert chunk, f"the terminal closed before {marker!r}: {seen.decode(errors='replace')!r}"
            seen += chunk
    return seen.decode()


async def test_a_bare_bridge_makes_a_token_prints_the_agent_command_once_and_that_command_serves(
    procs: Callable[..., Proc], websocket_app: int, tmp_path: Path
) -> None:
    """``rproxy bridge`` with no flags: a 0600 token file in the state directory, the agent's
    command on the terminal, and that command (with the home app's address) serves a visitor.
    A second start reuses the token and says where it is, without printing it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmp_path / "state"
    env = clean_env(RPROXY_STATE_DIRECTORY=str(state), RPROXY_LISTEN=f"127.0.0.1:{port}")
    master, slave = pty.openpty()
    with (tmp_path / "bridge.log").open("w") as log:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "rproxy_core", "bridge"],
            stdout=slave,
            stderr=log,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    os.close(slave)
    try:
        terminal = await asyncio.to_thread(_read_until, master, "rproxy agent ")
        token_file = state / "agent-token"
        token = token_file.read_text().strip()
        assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert str(token_file) in terminal
        command = next(line.strip() for line in terminal.splitlines() if line.strip().startswith("rproxy agent "))
        assert command == f"rproxy agent ws://127.0.0.1:{port} http://127.0.0.1:8080 --token {token}"
        argv = [
            f"http://127.0.0.1:{websocket_app}" if arg == "http://127.0.0.1:8080" else arg
            for arg in shlex.split(command)[1:]
        ]
        await wait_http(base + "/_rproxy/health")
        procs(*argv, base_env=clean_env())
        await wait_listed(base, "home")
        assert (await visit(base))[0] == 200
        assert token not in (tmp_path / "bridge.log").read_text()
    finally:
        bridge.terminate()
        await asyncio.to_thread(bridge.wait, 15)
        os.close(master)
    # Again, not on a terminal (a service): the same token, named by its file only.
    again = procs("bridge", base_env=env)
    await wait_http(base + "/_rproxy/health")
    again.stop()
    assert token_file.read_text().strip() == token
    assert f"this bridge's agent token is in {token_file}" in again.output()
    assert token not in again.output()


async def test_a_bare_bridge_under_a_service_manager_logs_the_file_and_listens_on_port(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Without a terminal the new token is never printed: the log names its file. $PORT sets the
    port; systemd's $STATE_DIRECTORY is used when $RPROXY_STATE_DIRECTORY is not set."""
    port = free_port()
    state = tmp_path / "systemd-state"
    state.mkdir(mode=0o700)
    bridge = procs("bridge", base_env=clean_env(PORT=str(port), STATE_DIRECTORY=str(state)))
    await wait_http(f"http://127.0.0.1:{port}/_rproxy/health")
    bridge.stop()
    token = (state / "agent-token").read_text().strip()
    assert f"a new agent token is in {state}/agent-token" in bridge.output()
    assert token not in bridge.output()


def test_the_state_directory_follows_the_environment(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert state_directory(home) == tmp_path / ".local/state/rproxy"
    assert state_directory({**home, "XDG_STATE_HOME": "/x"}) == Path("/x/rproxy")
    assert state_directory({**home, "XDG_STATE_HOME": "/x", "STATE_DIRECTORY": "/s:/t"}) == Path("/s")
    assert state_directory({**home, "STATE_DIRECTORY": "/s", "RPROXY_STATE_DIRECTORY": "/r"}) == Path("/r")


def test_a_token_file_that_holds_no_token_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "agent-token").write_text("\n")
    result = rproxy("bridge", "--listen", "127.0.0.1:0", env=clean_env(RPROXY_STATE_DIRECTORY=str(tmp_path)))
    assert result.returncode == 2
    assert "agent-token: expected one agent token on one line" in one_error_line(result)


def test_the_printed_agent_command_fits_the_bridge() -> None:
    """TLS gives wss://; a bridge on every address names this machine and, without TLS, says
    --insecure (the token would cross a network in clear text); loopback needs neither."""
    host = next(
        (
            n
            for n in (socket.getfqdn(), socket.gethostname())
            if n and n.lower() not in ("localhost", "localhost.localdomain") and not n.startswith("127.")
        ),
        PLACEHOLDER_HOST,
    )
    assert agent_command("0.0.0.0", 8080, "T", tls=False) == (
        f"rproxy agent ws://{host}:8080 http://127.0.0.1:8080 --token T --insecure",
        True,
    )
    assert agent_command("0.0.0.0", 443, "T", tls=True) == (
        f"rproxy agent wss://{host}:443 http://127.0.0.1:8080 --token T",
        False,
    )
    assert agent_command("::1", 8080, "T", tls=False)[0].startswith("rproxy agent ws://[::1]:8080 ")
    assert agent_command("127.0.0.1", 8080, "T", tls=False)[1] is False
