"""The ``rproxy`` command as users run it: flags, environment, config files, exit codes, signals."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, TOKEN, Proc, free_port, text_app, wait_http, wait_listed

SEED_NAMES = ("PORT", "REMOTE_URL", "LOCAL_URL", "AGENT_ID")
#: A complete, valid agent command line (nothing listens at these addresses).
AGENT_OK = ["agent", "--bridge", "http://127.0.0.1:1", "--token", "t", "--target", "http://127.0.0.1:2"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without rproxy settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_") and k not in SEED_NAMES}
    env.update(extra)
    return env


def rproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rproxy_core ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "rproxy_core", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env if env is not None else clean_env(),
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line the command wrote to stderr (fails if there are more, or a traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
async def home() -> AsyncIterator[str]:
    """A home app answering every GET with a fixed text; yields its URL."""
    async with text_app(lambda request: f"hello from home {request.path}") as url:
        yield url


wait_tunnel = wait_listed


async def fetch(base: str, path: str = "/", host: str | None = None) -> tuple[int, str]:
    headers = {"Host": host} if host else None
    async with aiohttp.ClientSession() as session, session.get(base + path, headers=headers) as response:
        return response.status, await response.text()


@pytest.mark.parametrize("command", [[], ["bridge"], ["agent"], ["demo"]], ids=["rproxy", "bridge", "agent", "demo"])
def test_help_exits_0_for_every_subcommand(command: list[str]) -> None:
    """``--help`` prints usage and exits 0, for the command and each subcommand."""
    result = rproxy(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rproxy")
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["bridge", "--nope"], "--nope"),
        ([*AGENT_OK, "--frob"], "--frob"),
        (["bridge", "--listen", "127.0.0.1:99999", "--token", "t"], "--listen"),
        (["bridge", "--listen", "127.0.0.1:http", "--token", "t"], "--listen"),
        (["demo", "--listen", "127.0.0.1:70000"], "--listen"),
        (["agent", "--bridge", "ftp://bridge.example", "--token", "t", "--target", "http://127.0.0.1:2"], "--bridge"),
        (["agent", "--bridge", "bridge.example", "--token", "t", "--target", "http://127.0.0.1:2"], "--bridge"),
        (["agent", "--bridge", "http://127.0.0.1:1", "--token", "t", "--target", "ftp://127.0.0.1:2"], "--target"),
        ([*AGENT_OK[:-1], "http://127.0.0.1:2/?x=1"], "--target"),
        (["agent", "--bridge", "http://127.0.0.1:1", "--target", "http://127.0.0.1:2"], "--token"),
        ([*AGENT_OK, "--name", "My_Home"], "--name"),
    ],
    ids=[
        "bridge-unknown-flag",
        "agent-unknown-flag",
        "listen-port-range",
        "listen-port-text",
        "demo-listen",
        "bridge-scheme",
        "bridge-no-scheme",
        "target-scheme",
        "target-query",
        "agent-no-token",
        "bad-name",
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_the_flag(args: list[str], flag: str) -> None:
    """Each bad or missing flag gives exit code 2 and one stderr line that names it."""
    result = rproxy(*args)
    assert result.returncode == 2, result
    line = one_error_line(result)
    assert flag in line
    assert "error" in line
    assert result.stdout == ""


def test_a_bad_environment_variable_is_named_in_the_error() -> None:
    """A bad value from the environment is reported under the variable's name."""
    result = rproxy("bridge", env=clean_env(RPROXY_LISTEN="127.0.0.1:nope", RPROXY_TOKEN=TOKEN))
    assert result.returncode == 2
    assert "$RPROXY_LISTEN" in one_error_line(result)


async def test_port_sets_the_bridge_port(procs: Callable[..., Proc]) -> None:
    """With $PORT (as hosts like Heroku set it) and no --listen, the bridge listens on that port."""
    port = free_port()
    bridge = procs("bridge", "--token", TOKEN, env={"PORT": str(port)})
    await wait_http(f"http://127.0.0.1:{port}/_rproxy/health")
    assert f":{port}" in bridge.output()


async def test_seed_environment_variables_configure_an_agent_end_to_end(procs: Callable[..., Proc], home: str) -> None:
    """A bridge and an agent configured only by environment (REMOTE_URL, LOCAL_URL, AGENT_ID) relay a request."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", env={"RPROXY_LISTEN": f"127.0.0.1:{port}", "RPROXY_TOKEN": TOKEN})
    await wait_http(base + "/_rproxy/health")
    procs("agent", env={"REMOTE_URL": base, "LOCAL_URL": home, "AGENT_ID": "seed-agent", "RPROXY_TOKEN": TOKEN})
    await wait_tunnel(base, "home")
    assert await fetch(base, "/lights") == (200, "hello from home /lights")
    assert "home/seed-agent" in bridge.output()


async def test_rproxy_environment_variables_configure_an_agent_end_to_end(
    procs: Callable[..., Proc], home: str
) -> None:
    """RPROXY_BRIDGE, RPROXY_TARGET, RPROXY_NAME, RPROXY_AGENT_ID and RPROXY_DOMAIN work like their flags."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs(
        "bridge", env={"RPROXY_LISTEN": f"127.0.0.1:{port}", "RPROXY_TOKEN": TOKEN, "RPROXY_DOMAIN": "example.test"}
    )
    await wait_http(base + "/_rproxy/health")
    procs(
        "agent",
        env={
            "RPROXY_BRIDGE": base.replace("http", "ws", 1),
            "RPROXY_TARGET": home,
            "RPROXY_NAME": "garage",
            "RPROXY_AGENT_ID": "env-agent",
            "RPROXY_TOKEN": TOKEN,
        },
    )
    await wait_tunnel(base, "garage")
    assert await fetch(base, "/door", host=f"garage.example.test:{port}") == (200, "hello from home /door")
    assert (await fetch(base, "/door", host=f"other.example.test:{port}"))[0] == 503  # no agent for "other"
    assert (await fetch(base, "/door", host=f"garage.elsewhere.test:{port}"))[0] == 404  # not under the domain
    assert "garage/env-agent" in bridge.output()


async def test_a_flag_wins_over_its_environment_variable(procs: Callable[..., Proc]) -> None:
    """--listen is used even when $RPROXY_LISTEN holds something else (here: something invalid)."""
    port = free_port()
    procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, env={"RPROXY_LISTEN": "not-an-address"})
    await wait_http(f"http://127.0.0.1:{port}/_rproxy/health")


async def test_toml_config_files_configure_bridge_and_agent(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    """Bridge and agent read every setting from --config TOML files (dashed or underscored keys)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge_toml = tmp_path / "bridge.toml"
    bridge_toml.write_text(
        f'listen = "127.0.0.1:{port}"\ntoken = ["{TOKEN}", "another-token"]\nrequest-timeout = 5\naccess_log = false\n'
    )
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        f'bridge = "{base}"\ntoken = "{TOKEN}"\ntarget = "{home}"\nname = "cabin"\nagent-id = "toml-agent"\n'
    )
    bridge = procs("bridge", "--config", str(bridge_toml))
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--config", str(agent_toml))
    await wait_tunnel(base, "cabin")
    assert await fetch(base, "/x") == (200, "hello from home /x")
    assert "cabin/toml-agent" in bridge.output()


@pytest.mark.parametrize("command", ["bridge", "agent"])
def test_an_unknown_key_in_a_config_file_is_a_one_line_error(command: str, tmp_path: Path) -> None:
    """A key the schema does not know is named in a single-line error, exit code 2."""
    config = tmp_path / "rproxy.toml"
    if command == "bridge":
        config.write_text(f'token = "{TOKEN}"\nlisten_port = 8080\n')
    else:
        config.write_text(
            f'bridge = "http://127.0.0.1:1"\ntoken = "{TOKEN}"\ntarget = "http://127.0.0.1:2"\nlisten_port = 1\n'
        )
    result = rproxy(command, "--config", str(config))
    assert result.returncode == 2
    line = one_error_line(result)
    assert "listen_port" in line and "unknown" in line


def test_a_bridge_on_a_port_already_in_use_exits_1_with_one_line() -> None:
    """Listening on a taken port fails at once: exit code 1 and one line saying so."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = rproxy("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    assert result.returncode == 1
    assert "in use" in one_error_line(result)


async def test_sigterm_stops_bridge_and_agent_with_exit_code_0(procs: Callable[..., Proc], home: str) -> None:
    """SIGTERM ends a connected agent and then the bridge, each with exit code 0; the agent says goodbye."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    await wait_http(base + "/_rproxy/health")
    agent = procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--agent-id", "sig")
    await wait_tunnel(base, "home")
    assert await fetch(base) == (200, "hello from home /")
    assert await asyncio.to_thread(agent.stop) == 0
    async with asyncio.timeout(10):
        while "disconnected" not in bridge.output():
            await asyncio.sleep(0.05)
    assert "home/sig from 127.0.0.1 disconnected: peer said goodbye" in bridge.output()
    assert await asyncio.to_thread(bridge.stop) == 0


async def test_the_bridge_lifts_its_open_file_limit_to_the_hard_limit(tmp_path: Path) -> None:
    """Started with the common soft limit of 1024 open files, the bridge raises it to the hard limit:
    each visitor connection and stream is a socket, and 1024 would cap it far below its capacity."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert hard > 1024, "this test needs a hard limit above 1024"
    port = free_port()
    log = (tmp_path / "bridge.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rproxy_core", "bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/_rproxy/health")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        soft = line.split()[3]
        assert soft == (str(hard) if hard != resource.RLIM_INFINITY else str(1 << 20)), line
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
