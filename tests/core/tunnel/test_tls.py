"""The bridge terminates TLS: agents dial wss://, visitors use https://, certificates are verified."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import trustme
from homeapps import serve_home

from tests.conftest import TOKEN, Proc, free_port, wait_http


async def test_agent_and_visitors_reach_a_tls_bridge_with_verified_certificates(
    tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    """A bridge with --tls-cert/--tls-key serves an agent over wss:// and a visitor over https://."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    server_cert.private_key_pem.write_to_path(str(key))
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    bridge = procs(
        "bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--tls-cert", str(cert), "--tls-key", str(key)
    )
    visitor_tls = ssl.create_default_context(cafile=str(ca_file))
    async with serve_home() as (home, target):
        # The agent verifies the bridge against the system's trust store; point it at the test CA.
        agent = procs(
            "agent",
            "--bridge",
            f"wss://localhost:{port}",
            "--token",
            TOKEN,
            "--target",
            target,
            env={"SSL_CERT_FILE": str(ca_file)},
        )
        url = f"https://localhost:{port}"
        await wait_http(url + "/id/1", ssl=visitor_tls)
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/over-tls?x=1", ssl=visitor_tls) as response:
                assert response.status == 200
                assert (await response.json())["raw_path"] == "/over-tls?x=1"
            # A client that does not trust the test CA is refused by its own verification.
            try:
                async with session.get(url + "/id/8") as response:
                    raise AssertionError(f"untrusted certificate accepted: {response.status}")
            except aiohttp.ClientConnectorCertificateError:
                pass
        forwarded = dict(home.seen[-1].headers)
        assert forwarded.get("X-Forwarded-Proto") == "https"
        assert f"https://localhost:{port}/" in agent.output()
    assert "Traceback" not in bridge.output()
