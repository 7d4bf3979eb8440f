"""``rproxy agent --token-file``: the token need not be on the command line, which ``ps`` shows.

Through the real CLI (a subprocess) against a real bridge: the agent serves with the token read
from a file, its argv (``/proc/PID/cmdline``, what ``ps`` prints) and its debug log hold no
piece of the token; ``$RPROXY_TOKEN_FILE`` and ``token_file`` in a config file do the same; a
missing, empty, unreadable or hash-holding file, or a second credential, is one line naming
the flag, exit code 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from rproxy_core.bridge.auth import hash_token
from tests.conftest import Proc, running_bridge, wait_for_tunnel
from tests.core.security.test_no_secrets_in_logs import leaks, new_token
from tests.core.tunnel.test_cli import clean_env, home, one_error_line, rproxy  # noqa: F401 (home: a fixture)


async def _serves_through(bridge_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(bridge_url + "/x") as response:
        assert response.status == 200
        assert await response.text() == "hello from home /x"


@pytest.mark.parametrize("given_by", ["flag", "environment", "config-file"])
async def test_the_agent_reads_its_token_from_a_file_and_shows_it_nowhere(
    given_by: str, procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    token = new_token()
    token_file = tmp_path / "agent.token"
    token_file.write_text(f"{token}\n# the rest of the file is not read\n")
    token_file.chmod(0o600)
    async with asyncio.timeout(60), running_bridge(tokens=[token]) as bridge:
        argv = ["--log-level", "debug", "agent", "--bridge", bridge.url, "--target", home]
        env = clean_env()
        if given_by == "flag":
            argv += ["--token-file", str(token_file)]
        elif given_by == "environment":
            env["RPROXY_TOKEN_FILE"] = str(token_file)
        else:
            config = tmp_path / "agent.yaml"
            config.write_text(f"token-file: {token_file}\n")
            argv += ["--config", str(config)]
        agent = procs(*argv, env=env)
        await wait_for_tunnel(bridge, timeout=30)
        await _serves_through(bridge.url)
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert leaks([cmdline], [token]) == [], cmdline
        assert agent.stop() == 0
        output = agent.output()
        assert "DEBUG" in output
        assert leaks([output], [token]) == []


def _agent(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = rproxy(
        "agent", "--bridge", "http://127.0.0.1:1", "--target", "http://127.0.0.1:2", *argv, env=env or clean_env()
    )
    return result.returncode, one_error_line(result)


def test_a_bad_token_file_is_one_line_naming_the_flag_and_exit_code_2(tmp_path: Path) -> None:
    token = new_token()
    empty = tmp_path / "empty"
    empty.write_text("\n\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00token")
    hashed = tmp_path / "hashed"
    hashed.write_text(hash_token(token) + "\n")
    cases = {
        str(tmp_path / "missing"): "cannot read: No such file or directory",
        str(tmp_path): "cannot read: Is a directory",  # unreadable (as root, a mode is no obstacle)
        str(empty): "the first line is empty",
        str(binary): "not a text file",
        str(hashed): "this is a token's hash",
    }
    for path, problem in cases.items():
        code, line = _agent("--token-file", path)
        assert code == 2, line
        assert line.startswith(f"rproxy agent: error: --token-file {path}: {problem}"), line
        assert leaks([line], [token]) == []
    code, line = _agent(env=clean_env(RPROXY_TOKEN_FILE=str(empty)))
    assert (code, line.startswith(f"rproxy agent: error: $RPROXY_TOKEN_FILE {empty}: the first line is empty")) == (
        2,
        True,
    )


def test_the_token_file_is_one_credential_of_token_token_file_and_key(tmp_path: Path) -> None:
    token = new_token()
    token_file = tmp_path / "agent.token"
    token_file.write_text(token + "\n")
    code, line = _agent("--token", token, "--token-file", str(token_file))
    assert code == 2 and "--token and --token-file: two credentials" in line, line
    code, line = _agent("--token-file", str(token_file), "--key", str(tmp_path / "key"))
    assert code == 2 and "--token-file and --key: two credentials" in line, line
    code, line = _agent("--token-file", str(token_file), env=clean_env(RPROXY_TOKEN=token))
    assert code == 2 and "two credentials" in line, line
    assert leaks([line], [token]) == []
    code, line = _agent()
    assert code == 2 and "--token-file" in line, line
