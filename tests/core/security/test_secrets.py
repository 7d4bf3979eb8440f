"""Secrets at rest: a bridge whose token file and config hold only hashes still lets its agents in.

A leaked bridge config must not be an agent credential: the ``sha256:`` line itself is refused
when presented as a token, bindings to tunnel names and SIGHUP revocation work as with clear
tokens, and ``rproxy hash-token`` makes those lines without the token touching the command line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from rproxy_core.bridge.auth import TokenAuth, hash_token, read_token_file
from rproxy_core.cli.hash_token import new_token
from rproxy_core.config import TokenGrant
from rproxy_core.const import CONNECT_PATH, HEADER_PROTOCOL, HEADER_TUNNEL
from rproxy_core.exceptions import ConfigError
from tests.conftest import ROOT, TOKEN, Proc, free_port, wait_http
from tests.core.tunnel.test_cli import clean_env, fetch, home, one_error_line, rproxy, wait_tunnel

__all__ = ["home"]  # the fixture, imported so that pytest finds it here

GARAGE_TOKEN = "garage-token-" + "g" * 24
OTHER_TOKEN = "other-token-" + "o" * 24


def hash_token_command(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``rproxy hash-token ARGS`` with ``stdin`` piped in (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "rproxy_core", "hash-token", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=clean_env(),
    )


def sha256_line(token: str) -> str:
    """The hash line computed independently of rproxy's own helper."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


# TokenAuth: hashed and clear entries side by side.


def test_a_hashed_entry_accepts_its_token_and_refuses_the_hash_itself() -> None:
    auth = TokenAuth([TOKEN, TokenGrant(sha256_line(GARAGE_TOKEN), frozenset({"garage"}))])
    assert auth.match(TOKEN) == TokenGrant(TOKEN)
    assert auth.allows(GARAGE_TOKEN, "garage")
    assert not auth.allows(GARAGE_TOKEN, "home")  # the binding holds for a hashed entry
    assert auth.match(sha256_line(GARAGE_TOKEN)) is None  # a leaked file gives no credential
    assert auth.match(sha256_line(TOKEN)) is None
    assert auth.match(GARAGE_TOKEN[:-1]) is None
    assert auth.match("") is None and auth.match(None) is None


def test_hash_token_is_the_plain_sha256_of_the_token_and_upper_case_hex_is_read_too() -> None:
    assert hash_token(GARAGE_TOKEN) == sha256_line(GARAGE_TOKEN)
    auth = TokenAuth(["SHA256:" + hashlib.sha256(GARAGE_TOKEN.encode()).hexdigest().upper()])
    assert auth.check(GARAGE_TOKEN)


def test_every_entry_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first entry matching costs as many comparisons as none matching."""
    tokens: list[str | TokenGrant] = [TOKEN, sha256_line(GARAGE_TOKEN), OTHER_TOKEN, sha256_line("x" * 30)]
    auth = TokenAuth(tokens)
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in (TOKEN, GARAGE_TOKEN, OTHER_TOKEN, "x" * 30, "nobody", "y" * 500):
        calls.clear()
        auth.match(presented)
        # Always digests of 32 bytes: neither a token's length nor its entry's form shows.
        assert calls == [(32, 32)] * len(tokens), presented


@pytest.mark.parametrize(
    "entry",
    ["sha256:", "sha256:abc", "sha256:" + "g" * 64, "sha256:" + "0" * 63, "sha256:" + "0" * 65],
    ids=["empty", "short", "not-hex", "63", "65"],
)
def test_a_malformed_hash_is_refused_without_repeating_it(entry: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        TokenAuth([entry])
    assert str(caught.value) == "token 1: expected sha256: and 64 hex digits, as rproxy hash-token prints them"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n{entry} garage\n")
    with pytest.raises(ConfigError) as caught:
        read_token_file(token_file)
    assert (
        str(caught.value)
        == f"{token_file}: line 2: expected sha256: and 64 hex digits, as rproxy hash-token prints them"
    )


@pytest.mark.parametrize(
    ("tokens", "where"),
    [
        ("[good-token, 'sha256:12ab']", "tokens[1]"),
        ("[good-token, {token: 'sha256:12ab', name: garage}]", "tokens[1].token"),
    ],
    ids=["plain", "bound"],
)
def test_a_malformed_hash_in_a_config_file_is_one_line(tokens: str, where: str, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(f"tokens: {tokens}\n")
    result = rproxy("bridge", "--check-config", str(config))
    assert result.returncode == 2
    assert one_error_line(result) == (
        f"rproxy bridge: error: {config}: {where}: expected sha256: and 64 hex digits, as rproxy hash-token prints them"
    )


def test_a_number_as_token_is_refused_without_printing_it(tmp_path: Path) -> None:
    """YAML reads an unquoted numeric token as a number; the error must not echo it."""
    secret = "918273645546372819"
    config = tmp_path / "bridge.yaml"
    config.write_text(f"tokens: [good-token, {{token: {secret}, name: garage}}]\n")
    result = rproxy("bridge", "--check-config", str(config))
    assert (
        one_error_line(result)
        == f"rproxy bridge: error: {config}: tokens[1].token: expected a token (text; quote it in YAML), got int"
    )
    agent_config = tmp_path / "agent.yaml"
    agent_config.write_text(f"bridge: http://127.0.0.1:1\ntarget: http://127.0.0.1:2\ntoken: {secret}\n")
    result = rproxy("agent", "--config", str(agent_config))
    assert (
        one_error_line(result)
        == f"rproxy agent: error: {agent_config}: token: expected a token (text; quote it in YAML), got int"
    )
    assert secret not in result.stderr + result.stdout


def test_an_agent_given_a_hash_says_it_needs_the_token_itself() -> None:
    result = rproxy(
        "agent", "--bridge", "http://127.0.0.1:1", "--target", "http://127.0.0.1:2", "--token", sha256_line(TOKEN)
    )
    assert result.returncode == 2
    assert one_error_line(result) == (
        "rproxy agent: error: --token: this is a token's hash, for the bridge's token list; "
        "the agent needs the token itself"
    )


# rproxy hash-token.


def test_hash_token_reads_the_token_from_stdin_and_prints_only_the_line() -> None:
    result = hash_token_command("--name", "garage", "--name", "shed", stdin=GARAGE_TOKEN + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{sha256_line(GARAGE_TOKEN)} garage shed\n"
    assert result.stderr == ""


def test_hash_token_new_shows_the_token_once_on_stderr_and_its_hash_on_stdout() -> None:
    first, second = hash_token_command("--new"), hash_token_command("--new")
    tokens = []
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        prefix = "new agent token (give it to the agent; it is shown only now): "
        assert result.stderr.startswith(prefix) and result.stderr.count("\n") == 1
        token = result.stderr[len(prefix) :].strip()
        assert len(token) >= 43 and token.isprintable() and " " not in token
        assert result.stdout == sha256_line(token) + "\n"
        assert token not in result.stdout
        tokens.append(token)
    assert tokens[0] != tokens[1]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        ((), "", "no token on standard input (or use --new to make one)"),
        ((), "\n\n", "no token on standard input (or use --new to make one)"),
        (
            (),
            "two words-of-a-long-token\n",
            "the token must be one word of printable characters (agents send no other)",
        ),
        ((), sha256_line(TOKEN) + "\n", "this is already a token's hash; give the token itself"),
        (("--name", "Bad_Name"), TOKEN, "--name: expected a DNS label (a-z, 0-9, -), got 'Bad_Name'"),
    ],
    ids=["empty", "blank", "spaces", "already-hashed", "bad-name"],
)
def test_hash_token_refuses_what_no_agent_could_use(args: tuple[str, ...], stdin: str, message: str) -> None:
    result = hash_token_command(*args, stdin=stdin)
    assert result.returncode == 2
    assert one_error_line(result) == f"rproxy hash-token: error: {message}"
    assert result.stdout == ""


def test_hash_token_warns_about_a_short_token_but_still_hashes_it() -> None:
    result = hash_token_command(stdin="hunter2\n")
    assert result.returncode == 0
    assert result.stdout == sha256_line("hunter2") + "\n"
    assert "warning: a token shorter than 20 characters can be found from its hash by guessing" in result.stderr


# A real bridge with hashed tokens only.


async def test_a_bridge_with_only_hashes_serves_the_tokens_and_their_bindings(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    """Lines made by ``rproxy hash-token --new`` go into the token file; the agents use the clear tokens."""
    made = hash_token_command("--new", "--name", "garage")
    garage_token = made.stderr.rsplit(": ", 1)[1].strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# made by rproxy hash-token\n{made.stdout}")
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\ndomain: example.test\ntoken_file: {token_file}\n"
        f"tokens:\n  - {hash_token(TOKEN)}\n  - {{token: '{hash_token(OTHER_TOKEN)}', names: [shed]}}\n"
    )
    assert garage_token not in token_file.read_text() + config.read_text()
    checked = rproxy("bridge", "--check-config", str(config))
    assert checked.stdout == f"{config}: OK: listen 127.0.0.1:{port}, 3 token(s), domain example.test\n"
    bridge = procs("bridge", "--config", str(config))
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--token", garage_token, "--target", home, "--name", "garage")
    procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--name", "home")
    procs("agent", "--bridge", base, "--token", OTHER_TOKEN, "--target", home, "--name", "shed")
    for name in ("garage", "home", "shed"):
        await wait_tunnel(base, name)
        assert await fetch(base, "/door", host=f"{name}.example.test") == (200, "hello from home /door")
    # A bound hashed token may not take another name.
    thief = procs("agent", "--bridge", base, "--token", garage_token, "--target", home, "--name", "lights")
    assert await asyncio.to_thread(thief.popen.wait, 20) == 3
    assert "its token may not serve tunnel 'lights'" in bridge.output()
    # Someone who read the token file presents the hash: refused (the agent CLI refuses to even
    # send it, so the header goes straight to the bridge).
    status, _ = await fetch_with_token(base, made.stdout.split()[0])
    assert status == 401


async def fetch_with_token(base: str, token: str) -> tuple[int, str]:
    """An agent's upgrade request with ``token``; returns the bridge's answer."""
    headers = {"Authorization": f"Bearer {token}", HEADER_PROTOCOL: "1", HEADER_TUNNEL: "garage"}
    async with aiohttp.ClientSession() as session, session.get(base + CONNECT_PATH, headers=headers) as response:
        return response.status, await response.text()


async def test_sighup_cuts_off_an_agent_whose_hashed_token_was_removed(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{hash_token(TOKEN)}\n{hash_token(GARAGE_TOKEN)} garage\n")
    bridge = procs(
        "bridge", "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file), "--domain", "example.test"
    )
    await wait_http(base + "/_rproxy/health")
    stays = procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--name", "home")
    goes = procs("agent", "--bridge", base, "--token", GARAGE_TOKEN, "--target", home, "--name", "garage")
    await wait_tunnel(base, "home")
    await wait_tunnel(base, "garage")
    token_file.write_text(f"{hash_token(TOKEN)}\n")
    bridge.popen.send_signal(signal.SIGHUP)
    assert await asyncio.to_thread(goes.popen.wait, 20) == 3
    assert "token is no longer accepted" in bridge.output()
    assert "refused the agent token (401)" in goes.output()
    assert await fetch(base, "/", host="garage.example.test") == (
        503,
        "503 Service Unavailable: no agent is connected for 'garage'\n",
    )
    assert await fetch(base, "/still", host="home.example.test") == (200, "hello from home /still")
    assert stays.popen.poll() is None


def test_new_tokens_never_start_with_a_dash() -> None:
    """``--token -Xy...`` would read as a flag: one random token in 64 would start with ``-``."""
    tokens = [new_token() for _ in range(2000)]
    assert not any(token.startswith("-") for token in tokens)
    assert len(set(tokens)) == len(tokens)
    assert all(len(token) == 43 for token in tokens)
