"""``rproxy gateway`` as users run it: one-line errors for bad flags, and the seed's own example."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import connect

from tests.conftest import ROOT, Proc, free_port, wait_http

from .conftest import LOCAL, Backend


def rproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rproxy_core", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--base-url: is required"),
        (["--base-url", "ftp://gw"], "--base-url: expected a http:// or https:// URL"),
        (["--base-url", "http://gw", "--allowlist", "https://(a"], "--allowlist: not a regular expression"),
        (["--base-url", "http://gw", "--address", "nowhere"], "--address: expected HOST:PORT"),
        (["--base-url", "http://gw", "--listen", "1.2.3.4:99999"], "--address: port 99999 is out of range"),
        (["--base-url", "http://gw", "--cert", "/nonexistent"], "--cert and --key go together"),
        (["--base-url", "http://gw", "--cert", "/nonexistent", "--key", "/nonexistent"], "--cert/--key: cannot load"),
        (["--base-url", "http://gw", "--max-message-size", "lots"], "--max-message-size: expected a size"),
        (["--base-url", "http://gw", "--idle-timeout", "0"], "--idle-timeout: expected seconds between"),
        (["--base-url", "http://gw", "--retries", "many"], "--retries: expected a whole number"),
        (["--base-url", "http://gw", "--forward-header", "Host"], "--forward-header: host is not replayed"),
        (["--base-url", "http://gw", "--callback-rate", "0"], "--callback-rate: expected callbacks per second"),
        (["--base-url", "http://gw", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_get_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = rproxy("gateway", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith(("rproxy gateway: error: ", "rproxy: error: ")) and message in lines[0]
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_environment_and_config_file_name_the_culprit(tmp_path: Path) -> None:
    result = rproxy("gateway", "--base-url", "http://gw", env={"RPROXY_RETRIES": "x"})
    assert result.returncode == 2 and "$RPROXY_RETRIES: expected a whole number" in result.stderr
    config = tmp_path / "gateway.yaml"
    config.write_text("base_url: http://gw\nallowlist:\n  - 'ok'\n  - '[unclosed'\nbogus: 1\n")
    result = rproxy("gateway", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"rproxy gateway: error: {config}: ")
    config.write_text("base_url: http://gw\nallowlist: ['[unclosed']\n")
    result = rproxy("gateway", "--config", str(config))
    assert f"{config}: allowlist[0]: not a regular expression" in result.stderr


def test_help_says_the_patterns_match_the_whole_url() -> None:
    result = rproxy("gateway", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "match as a WHOLE" in text and "https://api.example.com.evil.test/" in text
    assert "--address" in text and "--listen" in text and "--tls-cert" in text and "--cert" in text


async def test_the_seeds_example_against_a_real_gateway_process(
    procs: Callable[..., Proc], backend: Backend, tmp_path: Path
) -> None:
    """The seed's README, unchanged flags, over TLS: frames POSTed with x-ws-proxy-send, then the disconnect."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    port = free_port()
    gateway = procs(
        "gateway",
        "--address",
        f"127.0.0.1:{port}",
        "--base-url",
        f"https://127.0.0.1:{port}",
        "--cert",
        str(cert_file),
        "--key",
        str(key_file),
        "--allowlist",
        LOCAL,
        env={"RPROXY_EVENT_LOOP": "asyncio"},
    )
    await wait_http(f"https://127.0.0.1:{port}/connect", status=426, ssl=client_ssl)
    url = f"wss://127.0.0.1:{port}/connect?f={backend.url}/frame&d={backend.url}/disconnect"
    async with connect(url, ssl=client_ssl) as ws:
        await ws.send("from websocat")
        (frame,) = await backend.wait_posts("/frame", 1)
        callback = frame.headers["x-ws-proxy-send"]
        assert callback.startswith(f"https://127.0.0.1:{port}/")
        assert backend.session is not None
        async with backend.session.post(
            callback, data="hello back", headers={"Content-Type": "text/plain"}, ssl=client_ssl
        ) as response:
            assert response.status == 204
        assert await ws.recv() == "hello back"
    (gone,) = await backend.wait_posts("/disconnect", 1)
    assert gone.headers["x-ws-proxy-send"] == callback
    # SIGTERM: a client still connected gets 1001 and its disconnect is POSTed.
    async with connect(url, ssl=client_ssl) as ws:
        await ws.send("still here")
        await backend.wait_posts("/frame", 2)
        gateway.popen.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), 15)
        assert ws.close_code == 1001
    await backend.wait_posts("/disconnect", 2)
    assert json.loads(backend.on("/disconnect")[1].body)["reason"] == "gateway shutting down"
    assert gateway.exit_code() == 0
    assert "Traceback" not in gateway.output()
