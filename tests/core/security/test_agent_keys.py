"""Agent identity by Ed25519 key: a signed, single-use challenge instead of a token.

Every test attacks over real sockets: a real bridge (in this process or as ``rproxy bridge``),
real agents, and raw clients that replay or forge what an agent sends.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import ssl
import stat
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rproxy_core import Agent, AgentConfig
from rproxy_core.bridge.keys import (
    CHALLENGES_PER_SOURCE,
    ChallengeStore,
    KeyGrant,
    derived_name,
    encode_public_key,
    fingerprint,
    read_authorized_keys,
    sign,
)
from rproxy_core.cli.keygen import load_private_key
from rproxy_core.const import CHALLENGE_PATH, CONNECT_PATH, HEADER_PROTOCOL, HEADER_TUNNEL
from rproxy_core.dial import certificate_sha256
from rproxy_core.exceptions import AuthenticationError, ConfigError
from tests.conftest import TOKEN, Proc, free_port, running_bridge, wait_for_tunnel, wait_http
from tests.core.tunnel.test_cli import fetch, home, one_error_line, rproxy, wait_tunnel

__all__ = ["home"]  # the fixture, imported so that pytest finds it here

DOMAIN = "example.test"


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def keygen(tmp_path: Path, file: str, *names: str) -> tuple[Path, str]:
    """``rproxy keygen`` into ``tmp_path/file``; the key file and its authorized-keys line."""
    out = tmp_path / file
    result = rproxy("keygen", "--out", str(out), *[arg for name in names for arg in ("--name", name)])
    assert result.returncode == 0, result.stderr
    return out, result.stdout.strip()


async def challenge(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + CHALLENGE_PATH) as response:
        assert response.status == 200
        nonce = (await response.json())["nonce"]
        assert isinstance(nonce, str)
        return nonce


def upgrade_headers(authorization: str, name: str) -> dict[str, str]:
    return {"Authorization": authorization, HEADER_PROTOCOL: "1", HEADER_TUNNEL: name}


async def try_connect(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> int:
    """Upgrade to the agent endpoint with ``headers``: 101 if the bridge let us in, else its status.

    An accepted socket is closed at once (it never sends HELLO: the bridge drops it).
    """
    try:
        ws = await session.ws_connect(base + CONNECT_PATH, headers=headers)
    except aiohttp.WSServerHandshakeError as err:
        return err.status
    await ws.close()
    return 101


# Keys and files.


def test_keygen_writes_a_private_0600_key_once_and_prints_its_line(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "agent.key"
    result = rproxy("keygen", "--out", str(out), "--name", "garage", "--name", "shed")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = load_private_key(str(out))
    assert result.stdout == f"ed25519 {encode_public_key(key.public_key())} garage shed\n"
    assert len(base64.b64decode(result.stdout.split()[1])) == 32
    assert f"fingerprint: {fingerprint(raw(key))}" in result.stderr
    assert f"open-registration bridge: {derived_name(raw(key))}" in result.stderr
    assert "PRIVATE" not in result.stdout + result.stderr
    before = out.read_bytes()
    again = rproxy("keygen", "--out", str(out))
    assert again.returncode == 2
    assert "exists; not overwritten" in one_error_line(again)
    assert out.read_bytes() == before


def test_derived_names_are_dns_labels_that_differ_per_key() -> None:
    names = {derived_name(raw(Ed25519PrivateKey.generate())) for _ in range(50)}
    assert len(names) == 50
    assert all(len(name) == 16 and name.isalnum() and name == name.lower() for name in names)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ssh-rsa AAAA garage", "line 2: expected 'ed25519 KEY NAME...', got key type 'ssh-rsa'"),
        ("ed25519 {key}", "line 2: expected 'ed25519 KEY NAME...' (the names it may claim, or *)"),
        ("ed25519 bm90IGEga2V5 garage", "line 2: an Ed25519 public key has 32 bytes, this one 9"),
        ("ed25519 ***** garage", "line 2: the public key is not base64"),
        ("ed25519 {key} Bad_Name", "line 2: expected a DNS label (a-z, 0-9, -) or *, got 'Bad_Name'"),
    ],
)
def test_a_bad_authorized_keys_line_is_named_by_file_and_line(line: str, message: str, tmp_path: Path) -> None:
    key = encode_public_key(Ed25519PrivateKey.generate().public_key())
    file = tmp_path / "authorized_keys"
    file.write_text("# agents\n" + line.format(key=key) + "\n")
    with pytest.raises(ConfigError) as caught:
        read_authorized_keys(file)
    assert str(caught.value) == f"{file}: {message}"


# The signed challenge, attacked with a raw client.


async def test_a_listed_key_serves_its_name_and_a_replayed_registration_is_refused(home: str) -> None:
    key = Ed25519PrivateKey.generate()
    async with running_bridge(
        tokens=[], domain=DOMAIN, authorized_keys=[KeyGrant(raw(key), frozenset({"garage"}))]
    ) as bridge:
        config = AgentConfig(bridge=bridge.url, token="", key=key, target=home, name="garage", backoff_initial=0.1)
        async with Agent(config) as agent:
            await agent.wait_connected(timeout=10)
            assert await fetch(bridge.url, "/door", host=f"garage.{DOMAIN}") == (200, "hello from home /door")
        async with aiohttp.ClientSession() as session:
            nonce = await challenge(session, bridge.url)
            captured = upgrade_headers(sign(key, nonce, "garage", "127.0.0.1"), "garage")
            assert await try_connect(session, bridge.url, captured) == 101
            # Someone who saw that request (a log, a proxy) sends it again.
            assert await try_connect(session, bridge.url, captured) == 401
            assert await try_connect(session, bridge.url, captured) == 401


async def test_a_signature_for_another_name_or_another_host_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    async with (
        running_bridge(tokens=[], authorized_keys=[KeyGrant(raw(key), None)]) as bridge,
        aiohttp.ClientSession() as session,
    ):
        # The key may claim any name: only the signature can make these fail.
        nonce = await challenge(session, bridge.url)
        signed_for_garage = sign(key, nonce, "garage", "127.0.0.1")
        assert await try_connect(session, bridge.url, upgrade_headers(signed_for_garage, "home")) == 401
        nonce = await challenge(session, bridge.url)
        signed_for_other_bridge = sign(key, nonce, "garage", "bridge.elsewhere.example")
        assert await try_connect(session, bridge.url, upgrade_headers(signed_for_other_bridge, "garage")) == 401
        # Another key's signature over the right message, presented with this key.
        nonce = await challenge(session, bridge.url)
        forged = sign(Ed25519PrivateKey.generate(), nonce, "garage", "127.0.0.1").split()
        forged[1] = encode_public_key(key.public_key())
        assert await try_connect(session, bridge.url, upgrade_headers(" ".join(forged), "garage")) == 401
        # The same, done right, is let in: the refusals above were the signature's.
        nonce = await challenge(session, bridge.url)
        assert (
            await try_connect(session, bridge.url, upgrade_headers(sign(key, nonce, "garage", "127.0.0.1"), "garage"))
            == 101
        )


async def test_an_unknown_key_is_refused_even_with_a_good_signature() -> None:
    listed, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    async with (
        running_bridge(tokens=[], authorized_keys=[KeyGrant(raw(listed), None)]) as bridge,
        aiohttp.ClientSession() as session,
    ):
        nonce = await challenge(session, bridge.url)
        assert (
            await try_connect(session, bridge.url, upgrade_headers(sign(stranger, nonce, "home", "127.0.0.1"), "home"))
            == 403
        )


async def test_the_challenge_store_stays_bounded_under_a_burst() -> None:
    key = Ed25519PrivateKey.generate()
    async with (
        running_bridge(tokens=[], authorized_keys=[KeyGrant(raw(key), None)]) as bridge,
        aiohttp.ClientSession() as session,
    ):
        nonces = await asyncio.gather(*(challenge(session, bridge.url) for _ in range(20 * CHALLENGES_PER_SOURCE)))
        assert len(set(nonces)) == len(nonces)
        assert len(bridge.challenges) <= CHALLENGES_PER_SOURCE
        # The flood pushed out this source's oldest nonces; its newest still works.
        first, last = nonces[0], nonces[-1]
        assert (
            await try_connect(session, bridge.url, upgrade_headers(sign(key, first, "home", "127.0.0.1"), "home"))
            == 401
        )
        assert (
            await try_connect(session, bridge.url, upgrade_headers(sign(key, last, "home", "127.0.0.1"), "home")) == 101
        )


async def test_a_malformed_key_authorization_is_a_clean_401(caplog: pytest.LogCaptureFixture) -> None:
    key = Ed25519PrivateKey.generate()
    public = encode_public_key(key.public_key())
    async with (
        running_bridge(tokens=[], authorized_keys=[KeyGrant(raw(key), None)]) as bridge,
        aiohttp.ClientSession() as session,
    ):
        nonce = await challenge(session, bridge.url)
        malformed = [
            "Rproxy-Key",
            "Rproxy-Key " + public,
            f"Rproxy-Key {public} {nonce}",
            f"Rproxy-Key ***** {nonce} AAAA",
            f"Rproxy-Key {base64.b64encode(b'short').decode()} {nonce} AAAA",
            f"Rproxy-Key {public} {nonce} not-base64!",
            f"Rproxy-Key {public} never-issued AAAA",
            f"Rproxy-Key {public} {nonce} {base64.b64encode(b'x' * 64).decode()} extra",
        ]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rproxy"):
            for value in malformed:
                assert await try_connect(session, bridge.url, upgrade_headers(value, "home")) == 401, value
        refusals = [r for r in caplog.records if r.getMessage().startswith("refused agent from 127.0.0.1")]
        assert len(refusals) == len(malformed)
        assert not any(r.exc_info for r in caplog.records)
        assert all(r.levelno <= logging.WARNING for r in caplog.records)


# Open registration.


async def test_open_registration_serves_a_key_under_its_derived_name_only(home: str) -> None:
    key = Ed25519PrivateKey.generate()
    name = derived_name(raw(key))
    async with running_bridge(tokens=[], domain=DOMAIN, open_registration=True) as bridge:
        config = AgentConfig(bridge=bridge.url, token="", key=key, target=home, name=name, backoff_initial=0.1)
        async with Agent(config) as agent:
            await agent.wait_connected(timeout=10)
            await wait_for_tunnel(bridge, name)
            assert await fetch(bridge.url, "/", host=f"{name}.{DOMAIN}") == (200, "hello from home /")
            assert agent.public_url is not None and agent.public_url.startswith(f"http://{name}.{DOMAIN}:")
        squatter = AgentConfig(bridge=bridge.url, token="", key=Ed25519PrivateKey.generate(), target=home, name=name)
        async with Agent(squatter) as thief:
            with pytest.raises(AuthenticationError, match="403"):
                await asyncio.wait_for(thief.wait(), 10)


# The CLI: what an operator does.


async def test_a_key_claiming_a_name_it_was_not_given_is_refused_and_the_agent_stops(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    key_file, line = keygen(tmp_path, "garage.key", "garage")
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"# the garage agent\n{line}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--authorized-keys", str(keys), "--domain", DOMAIN)
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--key", str(key_file), "--target", home, "--name", "garage")
    await wait_tunnel(base, "garage")
    assert await fetch(base, "/x", host=f"garage.{DOMAIN}") == (200, "hello from home /x")
    thief = procs("agent", "--bridge", base, "--key", str(key_file), "--target", home, "--name", "lights")
    assert await asyncio.to_thread(thief.popen.wait, 20) == 3
    assert "may not serve tunnel 'lights'" in bridge.output()
    assert "(403)" in thief.output()
    assert key_file.read_text().splitlines()[1] not in bridge.output() + thief.output()


async def test_open_registration_from_the_cli_names_the_tunnel_after_the_key(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    key_file, _ = keygen(tmp_path, "agent.key")
    name = derived_name(raw(load_private_key(str(key_file))))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs("bridge", "--listen", f"127.0.0.1:{port}", "--open-registration", "--domain", DOMAIN)
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--key", str(key_file), "--target", home)  # no --name
    await wait_tunnel(base, name)
    assert await fetch(base, "/", host=f"{name}.{DOMAIN}") == (200, "hello from home /")
    other_key, _ = keygen(tmp_path, "other.key")
    squatter = procs("agent", "--bridge", base, "--key", str(other_key), "--target", home, "--name", name)
    assert await asyncio.to_thread(squatter.popen.wait, 20) == 3
    no_domain = rproxy("bridge", "--check-config", "/dev/null", "--open-registration")
    assert no_domain.returncode == 2
    assert "--open-registration: needs --domain" in one_error_line(no_domain)


async def test_sighup_cuts_off_the_tunnel_of_a_removed_key_at_once(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    stays_key, stays_line = keygen(tmp_path, "stays.key", "home")
    goes_key, goes_line = keygen(tmp_path, "goes.key", "garage")
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"{stays_line}\n{goes_line}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--authorized-keys", str(keys), "--domain", DOMAIN)
    await wait_http(base + "/_rproxy/health")
    stays = procs("agent", "--bridge", base, "--key", str(stays_key), "--target", home, "--name", "home")
    goes = procs("agent", "--bridge", base, "--key", str(goes_key), "--target", home, "--name", "garage")
    await wait_tunnel(base, "home")
    await wait_tunnel(base, "garage")
    keys.write_text(f"{stays_line}\n")
    bridge.popen.send_signal(signal.SIGHUP)
    assert await asyncio.to_thread(goes.popen.wait, 20) == 3
    goes_fingerprint = fingerprint(raw(load_private_key(str(goes_key))))
    assert f"its key {goes_fingerprint} is no longer accepted" in bridge.output()
    assert (await fetch(base, "/", host=f"garage.{DOMAIN}"))[0] == 503
    assert await fetch(base, "/still", host=f"home.{DOMAIN}") == (200, "hello from home /still")
    assert stays.popen.poll() is None


def test_an_agent_needs_exactly_one_of_token_and_key(tmp_path: Path) -> None:
    key_file, _ = keygen(tmp_path, "agent.key")
    common = ("agent", "--bridge", "http://127.0.0.1:1", "--target", "http://127.0.0.1:2")
    both = rproxy(*common, "--key", str(key_file), "--token", "t" * 24)
    assert both.returncode == 2 and "--token and --key: two credentials; give one of them" in one_error_line(both)
    unreadable = tmp_path / "not-a-key"
    unreadable.write_text("hello\n")
    os.chmod(unreadable, 0o600)
    bad = rproxy(*common, "--key", str(unreadable))
    assert bad.returncode == 2 and "not an unencrypted PEM private key" in one_error_line(bad)


async def test_a_challenge_expires_unused() -> None:
    store = ChallengeStore(lifetime=0.2)
    stale, fresh = store.issue("192.0.2.1"), store.issue("192.0.2.1")
    await asyncio.sleep(0.3)
    late = store.issue("192.0.2.1")
    assert not store.consume(stale) and not store.consume(fresh)
    assert store.consume(late) and not store.consume(late)
    assert len(store) == 0


async def test_editing_the_files_revokes_without_a_signal(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    key_file, line = keygen(tmp_path, "garage.key", "garage")
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"{line}\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} home\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs(
        "bridge",
        "--listen",
        f"127.0.0.1:{port}",
        "--authorized-keys",
        str(keys),
        "--token-file",
        str(tokens),
        "--domain",
        DOMAIN,
    )
    await wait_http(base + "/_rproxy/health")
    by_key = procs("agent", "--bridge", base, "--key", str(key_file), "--target", home, "--name", "garage")
    by_token = procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--name", "home")
    await wait_tunnel(base, "garage")
    await wait_tunnel(base, "home")
    keys.write_text("# garage key withdrawn\n")
    assert await asyncio.to_thread(by_key.popen.wait, 20) == 3
    assert by_token.popen.poll() is None
    tokens.write_text("# home token withdrawn\nanother-token-" + "a" * 20 + "\n")
    assert await asyncio.to_thread(by_token.popen.wait, 20) == 3
    assert f"{keys} changed: reloading" in bridge.output()
    assert "its token is no longer accepted" in bridge.output()


@pytest.mark.parametrize("dialer", ["websockets", "aiohttp"])
async def test_a_key_agent_signs_over_either_dialer_through_a_pinned_tls_bridge(dialer: str, home: str) -> None:
    ca = trustme.CA()
    served = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.configure_cert(server_context)
    pin = certificate_sha256(ssl.PEM_cert_to_DER_cert(served.cert_chain_pems[0].bytes().decode()))
    key = Ed25519PrivateKey.generate()
    grants = [KeyGrant(raw(key), frozenset({"garage"}))]
    async with (
        running_bridge(tokens=[], domain=DOMAIN, ssl_context=server_context, authorized_keys=grants) as bridge,
        aiohttp.ClientSession() as shared,
    ):
        config = AgentConfig(
            bridge=bridge.url, token="", key=key, target=home, name="garage", pins=(pin,), backoff_initial=0.1
        )
        agent = Agent(config, tunnel_session=shared if dialer == "aiohttp" else None)
        async with agent:
            await agent.wait_connected(timeout=10)
            await wait_for_tunnel(bridge, "garage")
        assert bridge.url.startswith("https://") and len(bridge.challenges) == 0
