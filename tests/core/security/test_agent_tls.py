"""The agent verifies the bridge it gives its token to, and keeps plain ws:// on this machine.

Attacks over real sockets: a bridge whose certificate no trusted CA issued, a bridge with a
certificate other than the pinned one (an interceptor), and a plain ws:// bridge on another
address. Each time the token must not leave the agent: impostors are real TLS servers that
record every byte they receive. Both ways the agent dials are attacked: websockets (the CLI)
and an aiohttp session (Home Assistant's).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import trustme

from rproxy_core import Agent, AgentConfig, ConfigError, RproxyConnectionError
from rproxy_core.agent import AgentState, certificate_sha256, is_cleartext_remote
from tests.conftest import TOKEN, Proc, free_port, running_bridge, text_app, wait_for_tunnel, wait_http
from tests.core.tunnel.test_cli import clean_env, one_error_line, rproxy

#: Exit code of an agent the bridge (or its certificate) refused for good.
EXIT_REFUSED = 3


@dataclass
class Identity:
    """A certificate a TLS server presents, with its files and fingerprint."""

    cert: Path
    key: Path
    der: bytes

    @property
    def pin(self) -> str:
        """As openssl prints it: upper case, colon separated."""
        return certificate_sha256(self.der)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@dataclass
class Pki:
    """A private CA and what it issued, an unrelated CA, and a self-signed certificate."""

    ca_file: Path
    bridge: Identity  # issued by the private CA for localhost and 127.0.0.1
    other_ca_file: Path
    impostor: Identity  # issued by the unrelated CA for the same names
    self_signed: Identity  # no CA at all, for a name that is not the bridge's


def _write_identity(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> Identity:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return Identity(cert, key, ssl.PEM_cert_to_DER_cert(cert_pem.decode()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca, lone = trustme.CA(), trustme.CA(), trustme.CA(organization_name="self-signed bridge")
    bridge = ca.issue_cert("localhost", "127.0.0.1")
    impostor = other_ca.issue_cert("localhost", "127.0.0.1")
    ca_file, other_ca_file = directory / "ca.pem", directory / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other_ca.cert_pem.write_to_path(str(other_ca_file))
    return Pki(
        ca_file=ca_file,
        bridge=_write_identity(directory, "bridge", bridge.cert_chain_pems[0].bytes(), bridge.private_key_pem.bytes()),
        other_ca_file=other_ca_file,
        impostor=_write_identity(
            directory, "impostor", impostor.cert_chain_pems[0].bytes(), impostor.private_key_pem.bytes()
        ),
        # A CA's own certificate is self-signed, and names no host at all.
        self_signed=_write_identity(directory, "self-signed", lone.cert_pem.bytes(), lone.private_key_pem.bytes()),
    )


@pytest.fixture(params=["websockets", "aiohttp"])
def dialer(request: pytest.FixtureRequest) -> str:
    """How the agent dials: with websockets (the CLI) or a shared aiohttp session (Home Assistant)."""
    return str(request.param)


@asynccontextmanager
async def agent_for(bridge_url: str, dialer: str, **settings: object) -> AsyncIterator[Agent]:
    """An agent (started, not waited for) dialling with ``dialer``; stopped and closed afterwards."""
    config = AgentConfig(
        bridge=bridge_url,
        token=TOKEN,
        target="http://127.0.0.1:9",
        agent_id="tls-test",
        backoff_initial=0.1,
        backoff_max=0.3,
    )
    for key, value in settings.items():
        setattr(config, key, value)
    session = aiohttp.ClientSession() if dialer == "aiohttp" else None
    try:
        agent = Agent(config, tunnel_session=session)
        await agent.start()
        try:
            yield agent
        finally:
            await agent.stop()
    finally:
        if session is not None:
            await session.close()


@dataclass
class Recorder:
    """What an impostor TLS server saw: connections whose handshake it finished, and every byte after."""

    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)


@asynccontextmanager
async def impostor_server(identity: Identity) -> AsyncIterator[Recorder]:
    """A TLS server on 127.0.0.1 presenting ``identity`` that records what clients send."""
    recorder = Recorder()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        recorder.connections += 1
        try:
            while data := await reader.read(65536):
                recorder.received += data
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=identity.server_context())
    recorder.port = server.sockets[0].getsockname()[1]
    try:
        yield recorder
    finally:
        server.close()
        await server.wait_closed()


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def lan_address() -> str:
    """An IPv4 address of this machine that is not loopback (the agent must treat it as remote)."""
    output = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout
    for candidate in output.split():
        if "." in candidate and not candidate.startswith("127."):
            return candidate
    pytest.skip("this machine has no non-loopback IPv4 address to put a bridge on")


@contextmanager
def listening_socket(address: str) -> Iterator[socket.socket]:
    """A socket listening on ``address`` that nobody accepts from: any connection waits in its backlog."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def backlog_is_empty(sock: socket.socket) -> bool:
    try:
        connection, _ = sock.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


# Which bridges count as this machine.


@pytest.mark.parametrize(
    ("bridge", "cleartext_remote"),
    [
        ("ws://127.0.0.1:8080", False),
        ("http://127.45.6.7", False),  # all of 127.0.0.0/8 is loopback
        ("ws://[::1]:8080", False),
        ("ws://[::ffff:127.0.0.1]:8080", False),
        ("ws://localhost:8080", False),
        ("http://LOCALHOST.:8080", False),
        ("ws://192.168.1.20:8080", True),  # the LAN is a network too: --insecure
        ("ws://10.0.0.1", True),
        ("http://[fd00::2]:8080", True),
        ("ws://bridge.example.com", True),
        ("ws://localhost.example.com", True),  # not resolved: only the name localhost itself counts
        ("ws://127.0.0.1.nip.io", True),
        ("ws://2130706433", True),  # 127.0.0.1 as a number: not an address rproxy reads, so not trusted
        ("wss://bridge.example.com", False),
        ("https://192.168.1.20", False),
    ],
)
def test_which_bridges_are_cleartext_over_a_network(bridge: str, cleartext_remote: bool) -> None:
    assert is_cleartext_remote(bridge) is cleartext_remote


# Certificates.


async def test_a_ca_file_makes_the_agent_trust_a_private_ca(pki: Pki, dialer: str) -> None:
    """With --ca-file the agent accepts a bridge certificate issued by that CA and serves visitors."""
    async with (
        text_app(lambda request: f"home says {request.path}") as home,
        running_bridge(ssl_context=pki.bridge.server_context()) as bridge,
        agent_for(bridge.url, dialer, target=home, ca_file=str(pki.ca_file)) as agent,
    ):
        await agent.wait_connected(timeout=10)
        await wait_for_tunnel(bridge)
        visitor_tls = ssl.create_default_context(cafile=str(pki.ca_file))
        async with aiohttp.ClientSession() as session, session.get(bridge.url + "/hi", ssl=visitor_tls) as response:
            assert response.status == 200
            assert await response.text() == "home says /hi"


async def test_a_certificate_from_an_untrusted_ca_is_refused_before_the_token_is_sent(pki: Pki, dialer: str) -> None:
    """A bridge whose certificate the CA file did not issue gets a TLS handshake and nothing else.

    Without verification the impostor would receive the upgrade request with the token.
    """
    async with (
        impostor_server(pki.impostor) as impostor,
        agent_for(f"wss://127.0.0.1:{impostor.port}", dialer, ca_file=str(pki.ca_file)) as agent,
    ):
        await wait_until(lambda: agent.reconnects >= 2)
        assert agent.state in (AgentState.CONNECTING, AgentState.WAITING)  # retried: mended on the bridge
        assert agent.last_error is not None
        assert agent.last_error.startswith("the bridge's certificate is not trusted: unable to get local issuer")
        assert "--ca-file" in agent.last_error
        assert impostor.received == b""
        assert TOKEN.encode() not in impostor.received


async def test_the_system_cas_refuse_a_private_certificate(pki: Pki) -> None:
    """Without --ca-file or a pin, a certificate from a private CA is not trusted (the default)."""
    async with (
        running_bridge(ssl_context=pki.bridge.server_context()) as bridge,
        agent_for(bridge.url, "websockets") as agent,
    ):
        await wait_until(lambda: agent.last_error is not None)
        assert agent.last_error is not None
        assert agent.last_error.startswith("the bridge's certificate is not trusted")
        assert "--pin-sha256" in agent.last_error
        assert not bridge.registry.names()


async def test_a_pin_is_enough_for_a_self_signed_bridge(pki: Pki, dialer: str) -> None:
    """A pinned self-signed certificate is accepted though no CA issued it and it names no host;
    a second pin (the next certificate, during a rotation) does not get in the way."""
    pin = pki.self_signed.pin
    assert ":" in pin and pin == pin.upper()
    async with (
        text_app(lambda request: "pinned") as home,
        running_bridge(ssl_context=pki.self_signed.server_context()) as bridge,
        agent_for(bridge.url, dialer, target=home, pins=(pki.bridge.pin, pin.lower())) as agent,
    ):
        await agent.wait_connected(timeout=10)
        await wait_for_tunnel(bridge)
        visitor = aiohttp.Fingerprint(hashlib.sha256(pki.self_signed.der).digest())
        async with aiohttp.ClientSession() as session, session.get(bridge.url + "/", ssl=visitor) as response:
            assert await response.text() == "pinned"


async def test_a_wrong_pin_is_fatal_and_names_the_certificate_seen(pki: Pki, dialer: str) -> None:
    """An interceptor with another certificate (even one a trusted CA issued) stops the agent for
    good, like ssh's changed host key, and receives no byte of the upgrade request."""
    async with (
        impostor_server(pki.impostor) as impostor,
        agent_for(f"wss://127.0.0.1:{impostor.port}", dialer, pins=(pki.bridge.pin,)) as agent,
    ):
        async with asyncio.timeout(10):
            with pytest.raises(RproxyConnectionError) as refused:
                await agent.wait()
        message = str(refused.value)
        assert message.startswith("the bridge's certificate does not match --pin-sha256: it has SHA-256 ")
        assert pki.impostor.pin in message
        assert agent.state is AgentState.FAILED
        assert agent.reconnects == 0
        assert impostor.received == b""


@pytest.mark.parametrize("wrong", ["ca_file", "pin"])
async def test_a_pin_with_a_ca_file_needs_both(pki: Pki, wrong: str) -> None:
    """--ca-file and --pin-sha256 together: the certificate must be issued by the CA and pinned."""
    ca_file = pki.other_ca_file if wrong == "ca_file" else pki.ca_file
    pin = pki.impostor.pin if wrong == "pin" else pki.bridge.pin
    async with (
        running_bridge(ssl_context=pki.bridge.server_context()) as bridge,
        agent_for(bridge.url, "websockets", ca_file=str(ca_file), pins=(pin,)) as agent,
    ):
        await wait_until(lambda: agent.last_error is not None)
        expected = "is not trusted" if wrong == "ca_file" else "does not match --pin-sha256"
        assert agent.last_error is not None and expected in agent.last_error
        assert not bridge.registry.names()


def test_settings_the_agent_refuses_at_once(pki: Pki) -> None:
    """A malformed pin, an unreadable CA file, or either with a ws:// bridge: ConfigError, no dialling."""
    base = {"token": TOKEN, "target": "http://127.0.0.1:9"}
    cases = [
        (AgentConfig(bridge="wss://b.example", pins=("ab:cd",), **base), "--pin-sha256: expected the SHA-256"),
        (AgentConfig(bridge="wss://b.example", pins=("g" * 64,), **base), "--pin-sha256"),
        (AgentConfig(bridge="wss://b.example", ca_file=str(pki.ca_file) + ".missing", **base), "no such file"),
        (AgentConfig(bridge="wss://b.example", ca_file=str(pki.bridge.key), **base), "no PEM certificate"),
        (AgentConfig(bridge="ws://127.0.0.1:1", pins=(pki.bridge.pin,), **base), "--pin-sha256: only means"),
        (AgentConfig(bridge="http://127.0.0.1:1", ca_file=str(pki.ca_file), **base), "--ca-file: only means"),
    ]
    for config, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace("-", r"\-")):
            Agent(config)
    # The pin's spellings all work: colons or not, any case.
    bare = hashlib.sha256(pki.bridge.der).hexdigest()
    for spelling in (bare, bare.upper(), pki.bridge.pin, pki.bridge.pin.lower()):
        Agent(AgentConfig(bridge="wss://b.example", pins=(spelling,), **base))


# Plain ws:// across a network.


async def test_plain_ws_to_another_address_is_refused_without_a_connection() -> None:
    """``ws://`` and ``http://`` to this machine's LAN address: one line, exit 2, and the
    listening socket there never sees a connection (nothing was sent, not even a SYN)."""
    address = lan_address()
    with listening_socket(address) as sock:
        port = sock.getsockname()[1]
        for scheme in ("ws", "http"):
            result = rproxy(
                "agent", "--bridge", f"{scheme}://{address}:{port}", "--token", TOKEN, "--target", "http://127.0.0.1:9"
            )
            assert result.returncode == 2, result.stderr
            line = one_error_line(result)
            assert line.startswith(f"rproxy agent: error: --bridge '{scheme}://{address}:{port}': refusing plain ws://")
            assert "clear text" in line and "wss://" in line and "--insecure" in line
            assert TOKEN not in line
        with pytest.raises(ConfigError, match="refusing plain ws://"):
            Agent(AgentConfig(bridge=f"ws://{address}:{port}", token=TOKEN, target="http://127.0.0.1:9"))
        assert backlog_is_empty(sock)


async def test_insecure_allows_plain_ws_to_a_lan_bridge(tmp_path: Path, procs: Callable[..., Proc]) -> None:
    """With --insecure (here ``insecure: true`` in the config file) a bridge on the LAN address
    serves the tunnel over ws://, and the agent says in its log that nothing is encrypted."""
    address = lan_address()
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = probe.getsockname()[1]
    procs("bridge", "--listen", f"{address}:{port}", "--token", TOKEN)
    async with text_app(lambda request: "over the lan") as home:
        config = tmp_path / "agent.yaml"
        config.write_text(f"bridge: ws://{address}:{port}\ntoken: {TOKEN}\ntarget: {home}\ninsecure: true\n")
        agent = procs("agent", "--config", str(config))
        await wait_http(f"http://{address}:{port}/")
        async with aiohttp.ClientSession() as session, session.get(f"http://{address}:{port}/") as response:
            assert await response.text() == "over the lan"
        assert (
            f"plain ws:// to ws://{address}:{port} (insecure is on): the token and all traffic cross the network "
            "unencrypted"
        ) in agent.output()
        assert TOKEN not in agent.output()


# The CLI against bridge processes.


async def test_cli_agent_with_a_ca_file_reaches_a_tls_bridge(pki: Pki, procs: Callable[..., Proc]) -> None:
    """``rproxy agent --ca-file`` against ``rproxy bridge --tls-cert/--tls-key``, end to end."""
    port = free_port()
    procs(
        "bridge",
        "--listen",
        f"127.0.0.1:{port}",
        "--token",
        TOKEN,
        "--tls-cert",
        str(pki.bridge.cert),
        "--tls-key",
        str(pki.bridge.key),
    )
    async with text_app(lambda request: "verified") as home:
        agent = procs(
            "agent",
            "--bridge",
            f"wss://localhost:{port}",
            "--token",
            TOKEN,
            "--target",
            home,
            "--ca-file",
            str(pki.ca_file),
            env={"SSL_CERT_FILE": str(pki.other_ca_file)},
        )
        visitor_tls = ssl.create_default_context(cafile=str(pki.ca_file))
        await wait_http(f"https://localhost:{port}/", ssl=visitor_tls)
        assert f"https://localhost:{port}/" in agent.output()


async def test_cli_agent_pinned_through_the_environment_reaches_a_self_signed_bridge(
    pki: Pki, procs: Callable[..., Proc]
) -> None:
    """$RPROXY_PIN_SHA256 with two pins (comma-separated, one of them stale) against a bridge process
    with a self-signed certificate."""
    port = free_port()
    procs(
        "bridge",
        "--listen",
        f"127.0.0.1:{port}",
        "--token",
        TOKEN,
        "--tls-cert",
        str(pki.self_signed.cert),
        "--tls-key",
        str(pki.self_signed.key),
    )
    async with text_app(lambda request: "pinned") as home:
        pins = f"{pki.bridge.pin}, {pki.self_signed.pin}"
        procs(
            "agent",
            "--bridge",
            f"https://127.0.0.1:{port}",
            "--token",
            TOKEN,
            "--target",
            home,
            env={"RPROXY_PIN_SHA256": pins},
        )
        visitor = aiohttp.Fingerprint(hashlib.sha256(pki.self_signed.der).digest())
        async with asyncio.timeout(20), aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"https://127.0.0.1:{port}/", ssl=visitor) as response:
                        if response.status == 200:
                            assert await response.text() == "pinned"
                            break
                except aiohttp.ClientConnectorError:  # the bridge is not listening yet
                    pass
                await asyncio.sleep(0.1)


async def test_cli_agent_with_a_wrong_pin_exits_3_naming_the_fingerprint(pki: Pki, procs: Callable[..., Proc]) -> None:
    """A bridge process with a certificate other than the pinned one: the agent stops for good
    with one line giving the certificate's fingerprint, and exit code 3."""
    port = free_port()
    procs(
        "bridge",
        "--listen",
        f"127.0.0.1:{port}",
        "--token",
        TOKEN,
        "--tls-cert",
        str(pki.impostor.cert),
        "--tls-key",
        str(pki.impostor.key),
    )
    await wait_http(
        f"https://127.0.0.1:{port}/_rproxy/health", ssl=ssl.create_default_context(cafile=str(pki.other_ca_file))
    )
    agent = procs(
        "agent",
        "--bridge",
        f"wss://127.0.0.1:{port}",
        "--token",
        TOKEN,
        "--target",
        "http://127.0.0.1:9",
        "--pin-sha256",
        pki.bridge.pin,
        "--ca-file",
        str(pki.other_ca_file),
    )
    returncode = await asyncio.to_thread(agent.popen.wait, 20)
    assert returncode == EXIT_REFUSED
    errors = [line for line in agent.output().splitlines() if "error" in line.lower()]
    assert errors == [
        f"rproxy agent: error: the bridge's certificate does not match --pin-sha256: it has SHA-256 "
        f"{pki.impostor.pin}; if the bridge's certificate was replaced, pin the new one, otherwise someone may "
        "be intercepting the connection"
    ]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--pin-sha256", "sha256:abc"], {}, "rproxy agent: error: --pin-sha256: expected the SHA-256 fingerprint"),
        ([], {"RPROXY_PIN_SHA256": "00" * 31}, "rproxy agent: error: $RPROXY_PIN_SHA256: expected the SHA-256"),
        (
            ["--ca-file", "/nonexistent/ca.pem"],
            {},
            "rproxy agent: error: --ca-file '/nonexistent/ca.pem': no such file",
        ),
        ([], {"RPROXY_INSECURE": "perhaps"}, "rproxy agent: error: $RPROXY_INSECURE: expected true or false"),
    ],
    ids=["pin-flag", "pin-env", "ca-file-missing", "insecure-env"],
)
def test_cli_tls_setting_mistakes_are_one_line(args: list[str], env: dict[str, str], expected: str) -> None:
    result = rproxy(
        "agent",
        "--bridge",
        "wss://127.0.0.1:1",
        "--token",
        TOKEN,
        "--target",
        "http://127.0.0.1:9",
        *args,
        env=clean_env(**env),
    )
    assert result.returncode == 2
    assert one_error_line(result).startswith(expected)
