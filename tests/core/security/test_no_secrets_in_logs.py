"""No agent token in any log line or error message, whatever happens, at ``--log-level debug``.

Real bridge and agent processes go through every path where a token is handled: accepted,
wrong, bound to another name, stored as a hash, revoked by SIGHUP, a reload that fails, and
config mistakes on both sides (including the add-on's start script). Their whole output is
searched for every token, and for any 12-character piece of one, so that a truncated token
in a message counts as a leak too.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from rproxy_core.bridge.auth import hash_token
from rproxy_core.cli.hash_token import new_token as make_new_token
from tests.conftest import Proc, free_port, wait_http
from tests.core.shipping.test_addon import config, run_addon, write_options
from tests.core.tunnel.test_cli import clean_env, fetch, home, one_error_line, rproxy, wait_tunnel

__all__ = ["config", "home"]  # fixtures, imported so that pytest finds them here

#: The length of a piece of a token that counts as a leak.
PIECE = 12


def new_token() -> str:
    """A token as ``rproxy hash-token --new`` makes them: random, so no piece of it occurs by chance."""
    return make_new_token()


def leaks(texts: Iterable[str], tokens: Iterable[str]) -> list[str]:
    """Every line of ``texts`` holding a token or a PIECE-long part of one."""
    pieces = {token[i : i + PIECE] for token in tokens for i in range(len(token) - PIECE + 1)}
    return [line for text in texts for line in text.splitlines() if any(piece in line for piece in pieces)]


def outputs(results: Iterable[subprocess.CompletedProcess[str]]) -> list[str]:
    return [result.stdout + result.stderr for result in results]


def test_the_leak_check_finds_a_whole_or_cut_token() -> None:
    token = new_token()
    assert leaks([f"ok\nrefused {token}\n"], [token]) == [f"refused {token}"]
    assert leaks([f"token starts with {token[:PIECE]}..."], [token])
    assert leaks([f"...{token[-PIECE:]}"], [token])
    assert leaks(["refused agent: invalid token", hash_token(token)], [token]) == []


async def wait_output(proc: Proc, text: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while text not in proc.output():
            await asyncio.sleep(0.05)


def write_bridge_config(path: Path, port: int, token_file: Path, tokens: list[Any]) -> None:
    path.write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{port}",
                "domain": "example.test",
                "token_file": str(token_file),
                "tokens": tokens,
            }
        )
    )


async def test_no_bridge_or_agent_logs_a_token_at_debug_level(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    bound, anyname, hashed, revoked, wrong = (new_token() for _ in range(5))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{anyname}\n{revoked} garage\n")
    config_file = tmp_path / "bridge.yaml"
    tokens = [{"token": bound, "name": "home"}, {"token": hash_token(hashed), "name": "shed"}]
    write_bridge_config(config_file, port, token_file, tokens)
    bridge = procs("--log-level", "debug", "bridge", "--config", str(config_file), env=clean_env())

    def agent(token: str, name: str, *extra: str) -> Proc:
        return procs(
            "--log-level",
            "debug",
            "agent",
            "--bridge",
            base,
            "--token",
            token,
            "--target",
            home,
            "--name",
            name,
            *extra,
            env=clean_env(),
        )

    await wait_http(base + "/_rproxy/health")
    agents = [agent(bound, "home"), agent(hashed, "shed"), agent(anyname, "printer")]
    # The token in the environment rather than on the command line: the other way users give it.
    cut_off = procs(
        "--log-level",
        "debug",
        "agent",
        "--bridge",
        base,
        "--target",
        home,
        "--name",
        "garage",
        env=clean_env(RPROXY_TOKEN=revoked),
    )
    for name in ("home", "shed", "printer", "garage"):
        await wait_tunnel(base, name)
        assert await fetch(base, "/x", host=f"{name}.example.test") == (200, "hello from home /x")
    refused = [agent(wrong, "home"), agent(bound, "lights")]
    for proc in refused:
        assert await asyncio.to_thread(proc.popen.wait, 20) == 3

    # Revocation by SIGHUP, then reloads that fail: broken YAML, and a token written as a key.
    token_file.write_text(f"{anyname}\n")
    bridge.popen.send_signal(signal.SIGHUP)
    assert await asyncio.to_thread(cut_off.popen.wait, 20) == 3
    config_file.write_text(f"tokens: [{bound}, {{token: {anyname}\n")
    bridge.popen.send_signal(signal.SIGHUP)
    await wait_output(bridge, "reload failed")
    config_file.write_text(f"listen: 127.0.0.1:{port}\ntokens:\n  {bound}: home\n")
    bridge.popen.send_signal(signal.SIGHUP)
    await wait_output(bridge, "tokens[0]: unknown key in a token entry")

    # A bridge that is not there: the agent's retries at debug level.
    lonely = procs(
        "--log-level",
        "debug",
        "agent",
        "--bridge",
        f"http://127.0.0.1:{free_port()}",
        "--token",
        bound,
        "--target",
        home,
        env=clean_env(),
    )
    await wait_output(lonely, "retrying in")
    for proc in [*agents, lonely, bridge]:
        proc.stop()

    bridge_log = bridge.output()
    # The paths were taken, so their lines were there to be searched (the bridge logs little
    # at debug level; the agent logs its whole handshake).
    for expected in (
        "refused agent from 127.0.0.1: invalid token",
        "may not serve tunnel 'lights'",
        "cut off: its token is no longer accepted",
        "reload failed, the running settings stay",
        "agent shed/",
    ):
        assert expected in bridge_log, expected
    assert "refused the agent token (401)" in refused[0].output()
    assert "DEBUG" in agents[0].output()
    everything = [p.output() for p in [bridge, *agents, cut_off, *refused, lonely]]
    assert leaks(everything, [bound, anyname, hashed, revoked, wrong]) == []


def test_no_config_error_prints_a_token(tmp_path: Path) -> None:
    """Each mistake is refused (exit 2) with a message that names where, never the token."""
    token, other = new_token(), new_token()
    files = {
        "bad-name.tokens": f"{token}\n{other} Bad_Name\n",
        "token-as-key.yaml": f"tokens:\n  {token}: garage\n  {other}: shed\n",
        "number.yaml": "tokens: [{token: 918273645546372819, name: garage}]\n",
        "typo-hash.yaml": f"tokens: ['sha256:{token}']\n",
        "bad-listen.yaml": f"tokens: [{token}]\nlisten: 127.0.0.1:99999\n",
        "broken.yaml": f"tokens: [{token}, {{token: {other}\n",
        "broken.toml": f'tokens = ["{token}", {other}]\n',
        "agent-unknown-key.yaml": (
            f"bridge: http://127.0.0.1:1\ntarget: http://127.0.0.1:2\ntoken: {token}\ntokne: {other}\n"
        ),
        "agent-bad-target.yaml": f"bridge: http://127.0.0.1:1\ntarget: ftp://nas\ntoken: {token}\n",
        "agent-token-list.yaml": f"bridge: http://127.0.0.1:1\ntarget: http://127.0.0.1:2\ntoken: [{token}]\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)

    def bridge(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return rproxy("--log-level", "debug", "bridge", *args, env=clean_env(**env))

    def agent(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return rproxy("--log-level", "debug", "agent", *args, env=clean_env(**env))

    results = [
        bridge("--check-config", "/dev/null", "--token-file", str(tmp_path / "bad-name.tokens")),
        bridge("--check-config", str(tmp_path / "token-as-key.yaml")),
        bridge("--check-config", str(tmp_path / "typo-hash.yaml")),
        bridge("--check-config", str(tmp_path / "bad-listen.yaml")),
        bridge("--check-config", str(tmp_path / "broken.yaml")),
        bridge("--check-config", str(tmp_path / "broken.toml")),
        bridge("--config", str(tmp_path / "token-as-key.yaml")),
        bridge("--check-config", "/dev/null", "--token", token, "--listen", "nowhere:port"),
        bridge("--check-config", "/dev/null", "--token", f"sha256:{token}"),
        bridge("--check-config", "/dev/null", RPROXY_TOKEN=f"sha256:{other}"),
        agent("--config", str(tmp_path / "agent-unknown-key.yaml")),
        agent("--config", str(tmp_path / "agent-bad-target.yaml")),
        agent("--config", str(tmp_path / "agent-token-list.yaml")),
        agent("--bridge", "ftp://bridge", "--token", token, "--target", "http://127.0.0.1:2"),
        agent("--bridge", "http://127.0.0.1:1", "--token", f"{token}\n{other}", "--target", "http://127.0.0.1:2"),
        agent(
            "--bridge", "http://127.0.0.1:1", "--target", "http://127.0.0.1:2", "--name", "Bad_Name", RPROXY_TOKEN=token
        ),
    ]
    number = bridge("--check-config", str(tmp_path / "number.yaml"))
    assert [r.returncode for r in [*results, number]] == [2] * (len(results) + 1), outputs([*results, number])
    for result in results:  # each refused for its own mistake, in one line
        assert one_error_line(result).startswith(("rproxy bridge: error: ", "rproxy agent: error: ")), result
        assert "unrecognized arguments" not in result.stderr
    assert leaks(outputs(results), [token, other]) == []
    assert "918273645546372819" not in number.stderr


def test_the_add_on_start_script_prints_no_token(config: dict[str, Any], tmp_path: Path) -> None:
    """The add-on's options file holds the token; a mistake next to it is reported without it."""
    token = new_token()
    options = write_options(
        tmp_path / "options.json", config, bridge="ws://127.0.0.1:1", token=token, log_level="debug"
    )
    values = json.loads(options.read_text())
    values["services"] = [{"name": "printer", "target": "gopher://printer"}]
    options.write_text(json.dumps(values))
    result = run_addon(options)
    assert result.returncode == 2, result
    assert "services[0].target" in result.stderr
    assert leaks(outputs([result]), [token]) == []


@pytest.mark.parametrize("args", [[], ["--token"]], ids=["positional", "flag"])
def test_the_hash_token_command_takes_no_token_as_an_argument(args: list[str]) -> None:
    """There is no way to pass the token as an argument, where shell history and ps keep it."""
    result = rproxy("hash-token", *args, new_token())
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
