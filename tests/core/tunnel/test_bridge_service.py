"""The bridge as a VPS service: YAML config files, --check-config, SIGHUP reloads, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from rproxy_core.const import HEADER_PROTOCOL, HEADER_TUNNEL
from rproxy_core.dial import certificate_sha256
from tests.conftest import ROOT, TOKEN, Proc, free_port, running_agent, running_bridge, start_app, text_app, wait_http
from tests.core.tunnel.test_cli import clean_env, fetch, one_error_line, rproxy, wait_tunnel

OTHER_TOKEN = "other-token-" + "y" * 16
#: The slow download: 4 MiB in 64 chunks, one every 40 ms (about 2.5 s in all).
DOWNLOAD_CHUNKS, DOWNLOAD_CHUNK = 64, 64 << 10


@pytest.fixture
async def home() -> AsyncIterator[str]:
    """A home app: ``/download`` streams slowly, anything else answers its path."""

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = DOWNLOAD_CHUNKS * DOWNLOAD_CHUNK
        await response.prepare(request)
        for index in range(DOWNLOAD_CHUNKS):
            await response.write(bytes([index]) * DOWNLOAD_CHUNK)
            await asyncio.sleep(0.04)
        return response

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from home {request.path}")

    app = web.Application()
    app.router.add_get("/download", download)
    app.router.add_get("/{tail:.*}", hello)
    runner, url = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


def write_config(path: Path, port: int, tokens: list[object], **extra: object) -> None:
    """A bridge YAML config (written as JSON, which is YAML)."""
    path.write_text(json.dumps({"listen": f"127.0.0.1:{port}", "tokens": tokens, **extra}))


async def wait_output(proc: Proc, text: str, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while text not in proc.output():
            await asyncio.sleep(0.05)


# Config files: each kind of mistake is one exact line and exit code 2.


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "tokens: [a, {token: b, name: Bad_Name}]\n",
            "tokens[1].name: expected a DNS label (a-z, 0-9, -), got 'Bad_Name'",
        ),
        ("tokens: [a, {name: home}]\n", "tokens[1].token: is required (the secret an agent presents)"),
        ("tokens: [a, {token: b, names: []}]\n", "tokens[1].names: expected at least one tunnel name"),
        (
            "tokens: [a, {token: b, names: [ok, NO]}]\n",
            "tokens[1].names[1]: expected a DNS label (a-z, 0-9, -), got 'NO'",
        ),
        ("tokens: [a, 42]\n", "tokens[1]: expected a token, or a mapping with token and name, got int"),
        ("tokens: [a]\nlisten: 127.0.0.1:99999\n", "listen: port 99999 is out of range 0-65535"),
        ("tokens: [a]\nrequest_timeout: soon\n", "request_timeout: expected seconds, got 'soon'"),
        ("tokens: [a]\nshutdown_grace: -1\n", "shutdown_grace: expected seconds between 0 and 3600, got -1"),
        ("tokens: [a]\naccess_log: maybe\n", "access_log: expected true or false, got 'maybe'"),
        (
            "tokens: [a]\ntrusted_proxies: [10.0.0.0/33]\n",
            "trusted_proxies: '10.0.0.0/33' is not an IP address or CIDR network",
        ),
        ("tokens: [a]\ndomain: 'exa mple.com'\n", "domain: expected a domain name, got 'exa mple.com'"),
        ("tokens: [a]\nlog_level: loud\n", "log_level: expected one of debug, info, warning, error, got 'loud'"),
        ("tokens: [a]\nlisten_port: 80\n", "listen_port: unknown key"),
        ("tokens: [a\n", "not valid YAML: line 2 column 1: expected ',' or ']', but got '<stream end>'"),
        ("- tokens\n", "expected a mapping of settings at the top, got list"),
    ],
    ids=[
        "token-name",
        "token-missing",
        "names-empty",
        "names-item",
        "token-type",
        "listen",
        "timeout",
        "grace",
        "bool",
        "proxy",
        "domain",
        "log-level",
        "unknown-key",
        "yaml-syntax",
        "not-a-mapping",
    ],
)
def test_each_mistake_in_a_config_file_is_one_exact_line(content: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(content)
    for flag in ("--config", "--check-config"):
        result = rproxy("bridge", flag, str(config))
        assert result.returncode == 2, result
        assert one_error_line(result) == f"rproxy bridge: error: {config}: {message}"
        assert result.stdout == ""


def test_an_unreadable_config_file_and_a_missing_token_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = rproxy("bridge", "--config", str(missing))
    assert (result.returncode, one_error_line(result)) == (
        2,
        f"rproxy bridge: error: {missing}: cannot read: No such file or directory",
    )
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    # No credential: the bare bridge makes its own token on its first start; a check makes none.
    state = tmp_path / "state"
    result = rproxy("bridge", "--check-config", str(empty), env=clean_env(RPROXY_STATE_DIRECTORY=str(state)))
    assert result.returncode == 0, result.stderr
    assert f"no credential: the first start makes an agent token in {state}/agent-token" in result.stdout
    assert not state.exists()


def test_check_config_accepts_a_complete_file_and_the_environment_overrides_it(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("bridge.example.com")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    token_file = tmp_path / "tokens"
    token_file.write_text("# one per line\nfile-token garage shed\nany-name-token\n")
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "listen: 127.0.0.1:8443\n"
        "domain: Example.COM\n"
        "tokens:\n  - plain-token\n  - {token: bound-token, name: home}\n  - {token: two-names, names: [a, b]}\n"
        f"token_file: {token_file}\n"
        "request_timeout: 20\nshutdown_grace: 3\n"
        f"tls_cert: {cert}\ntls_key: {key}\n"
        "access_log: false\ntrusted_proxies: [127.0.0.1/32, '::1']\nlog_level: warning\n"
    )
    result = rproxy("bridge", "--check-config", str(config))
    assert result.returncode == 0, result
    assert result.stdout == f"{config}: OK: listen 127.0.0.1:8443, 5 token(s), domain example.com, TLS\n"
    # Environment variables win over the file, flags over both.
    result = rproxy("bridge", "--check-config", str(config), env=clean_env(RPROXY_LISTEN="127.0.0.1:9000"))
    assert "listen 127.0.0.1:9000," in result.stdout
    result = rproxy(
        "bridge",
        "--check-config",
        str(config),
        "--listen",
        "127.0.0.1:9001",
        env=clean_env(RPROXY_LISTEN="127.0.0.1:9000"),
    )
    assert "listen 127.0.0.1:9001," in result.stdout
    # A bad variable is named as the variable, even though the file is fine.
    result = rproxy("bridge", "--check-config", str(config), env=clean_env(RPROXY_SHUTDOWN_GRACE="long"))
    assert one_error_line(result) == "rproxy bridge: error: $RPROXY_SHUTDOWN_GRACE: expected seconds, got 'long'"
    # A certificate that does not load is caught before the bridge would start.
    key.write_text("not a key")
    result = rproxy("bridge", "--check-config", str(config))
    assert result.returncode == 2
    assert one_error_line(result).startswith("rproxy bridge: error: --tls-cert/--tls-key: cannot load")


def test_a_bad_line_in_the_token_file_names_the_line_not_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("good-token\nsecret-token-value Bad_Name\n")
    result = rproxy("bridge", "--check-config", "/dev/null", "--token-file", str(token_file))
    assert one_error_line(result) == (
        f"rproxy bridge: error: {token_file}: line 2: expected a DNS label (a-z, 0-9, -), got 'Bad_Name'"
    )
    assert "secret-token-value" not in result.stderr


# Tokens bound to tunnel names.


async def test_a_token_serves_only_the_names_it_is_bound_to(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "bridge.yaml"
    write_config(config, port, [TOKEN, {"token": OTHER_TOKEN, "name": "garage"}], domain="example.test")
    bridge = procs("bridge", "--config", str(config))
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--token", OTHER_TOKEN, "--target", home, "--name", "garage")
    await wait_tunnel(base, "garage")
    assert await fetch(base, "/door", host="garage.example.test") == (200, "hello from home /door")
    # The same token may not take another name: refused for good (exit 3), logged on both sides.
    thief = procs("agent", "--bridge", base, "--token", OTHER_TOKEN, "--target", home, "--name", "home")
    assert await asyncio.to_thread(thief.popen.wait, 20) == 3
    assert "403" in thief.output() and "'home'" in thief.output()
    assert "its token may not serve tunnel 'home'" in bridge.output()
    # An unbound token may take any name.
    procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--name", "home")
    await wait_tunnel(base, "home")


# SIGHUP: reload tokens and certificate without dropping tunnels.


async def test_sighup_adds_a_token_without_dropping_a_live_tunnel(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "bridge.yaml"
    write_config(config, port, [TOKEN], domain="example.test")
    bridge = procs("bridge", "--config", str(config))
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--name", "home", "--agent-id", "first")
    await wait_tunnel(base, "home")
    # A download running across the reload: the tunnel it uses must survive.
    download = base + "/download"
    async with (
        aiohttp.ClientSession() as visitor,
        visitor.get(download, headers={"Host": "home.example.test"}) as response,
    ):
        first = await response.content.readexactly(DOWNLOAD_CHUNK)
        write_config(config, port, [TOKEN, {"token": OTHER_TOKEN, "name": "garage"}], domain="example.test")
        bridge.popen.send_signal(signal.SIGHUP)
        await wait_output(bridge, "reloaded: 2 token(s)")
        rest = await response.read()
    assert len(first) + len(rest) == DOWNLOAD_CHUNKS * DOWNLOAD_CHUNK
    procs("agent", "--bridge", base, "--token", OTHER_TOKEN, "--target", home, "--name", "garage")
    await wait_tunnel(base, "garage")
    assert await fetch(base, "/x", host="garage.example.test") == (200, "hello from home /x")
    assert await fetch(base, "/y", host="home.example.test") == (200, "hello from home /y")
    output = bridge.output()
    assert output.count("home/first from 127.0.0.1 connected") == 1
    assert "home/first from 127.0.0.1 disconnected" not in output


async def test_sighup_cuts_off_an_agent_whose_token_was_removed(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n{OTHER_TOKEN} garage\n")
    bridge = procs(
        "bridge", "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file), "--domain", "example.test"
    )
    await wait_http(base + "/_rproxy/health")
    stays = procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--name", "home")
    goes = procs("agent", "--bridge", base, "--token", OTHER_TOKEN, "--target", home, "--name", "garage")
    await wait_tunnel(base, "home")
    await wait_tunnel(base, "garage")
    token_file.write_text(f"{TOKEN}\n")
    bridge.popen.send_signal(signal.SIGHUP)
    # Cut off at once; its reconnection is refused, so it stops with exit code 3.
    assert await asyncio.to_thread(goes.popen.wait, 20) == 3
    assert "token is no longer accepted" in bridge.output()
    assert "refused the agent token (401)" in goes.output()
    assert OTHER_TOKEN not in bridge.output() + goes.output()
    assert await fetch(base, "/", host="garage.example.test") == (
        503,
        "503 Service Unavailable: no agent is connected for 'garage'\n",
    )
    assert await fetch(base, "/still", host="home.example.test") == (200, "hello from home /still")
    assert stays.popen.poll() is None


async def test_a_broken_config_on_sighup_keeps_the_running_settings(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "bridge.yaml"
    write_config(config, port, [TOKEN])
    bridge = procs("bridge", "--config", str(config))
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--token", TOKEN, "--target", home)
    await wait_tunnel(base, "home")
    config.write_text("tokens: [\n")
    bridge.popen.send_signal(signal.SIGHUP)
    await wait_output(bridge, "reload failed, the running settings stay")
    assert await fetch(base, "/ok") == (200, "hello from home /ok")
    assert bridge.popen.poll() is None


async def test_sighup_reloads_the_tls_certificate_for_new_connections(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    def issue() -> bytes:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    first_der = issue()
    port = free_port()
    url = f"https://localhost:{port}"
    bridge = procs(
        "bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--tls-cert", str(cert), "--tls-key", str(key)
    )
    tls = ssl.create_default_context(cafile=str(ca_file))
    await wait_http(url + "/_rproxy/health", ssl=tls)
    procs(
        "agent",
        "--bridge",
        f"wss://localhost:{port}",
        "--token",
        TOKEN,
        "--target",
        home,
        env={"SSL_CERT_FILE": str(ca_file)},
    )
    await wait_http(url + "/up", ssl=tls)

    async def served_certificate() -> bytes:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return bytes(der)

    assert await served_certificate() == first_der
    second_der = issue()
    bridge.popen.send_signal(signal.SIGHUP)
    await wait_output(bridge, "TLS certificate reloaded")
    assert await served_certificate() == second_der
    # The fingerprint agents pin is logged at start and after each reload.
    for der in (first_der, second_der):
        assert f"TLS certificate SHA-256 (for agents' --pin-sha256): {certificate_sha256(der)}" in bridge.output()
    async with aiohttp.ClientSession() as session, session.get(url + "/after", ssl=tls) as response:
        assert (response.status, await response.text()) == (200, "hello from home /after")
    assert bridge.output().count("connected (protocol") == 1


# SIGTERM: graceful stop.


async def test_sigterm_lets_a_download_in_flight_finish(procs: Callable[..., Proc], home: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--shutdown-grace", "20")
    await wait_http(base + "/_rproxy/health")
    agent = procs("agent", "--bridge", base, "--token", TOKEN, "--target", home, "--agent-id", "drained")
    await wait_tunnel(base, "home")
    digest = hashlib.sha256()
    async with aiohttp.ClientSession() as visitor, visitor.get(base + "/download") as response:
        digest.update(await response.content.readexactly(DOWNLOAD_CHUNK))
        bridge.popen.send_signal(signal.SIGTERM)
        await wait_output(bridge, "waiting up to 20s for 1 request(s) in flight")
        # Stopped listening: a new visitor is refused, while the download goes on.
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as late, late.get(base + "/late"):
                pass
        async for chunk in response.content.iter_chunked(1 << 16):
            digest.update(chunk)
    expected = hashlib.sha256(b"".join(bytes([i]) * DOWNLOAD_CHUNK for i in range(DOWNLOAD_CHUNKS)))
    assert digest.hexdigest() == expected.hexdigest()
    # Then the bridge goes at once (not after the whole grace period), saying goodbye to the agent.
    assert await asyncio.wait_for(asyncio.to_thread(bridge.popen.wait), 10) == 0
    await wait_output(agent, "bridge shutting down")
    assert agent.popen.poll() is None  # it keeps trying to reconnect, as it should
    assert "cut off" not in bridge.output()


async def test_a_second_sigterm_ends_the_grace_period(procs: Callable[..., Proc], home: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--shutdown-grace", "600")
    await wait_http(base + "/_rproxy/health")
    procs("agent", "--bridge", base, "--token", TOKEN, "--target", home)
    await wait_tunnel(base, "home")
    async with aiohttp.ClientSession() as visitor, visitor.get(base + "/download") as response:
        await response.content.readexactly(DOWNLOAD_CHUNK)
        bridge.popen.send_signal(signal.SIGTERM)
        await wait_output(bridge, "waiting up to 600s")
        bridge.popen.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(bridge.popen.wait), 10) == 0
    assert "1 request(s) still in flight are cut off" in bridge.output()


# The agent's config file: extra services, each a tunnel of its own.


async def test_an_agent_config_file_serves_extra_services(
    procs: Callable[..., Proc], home: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--domain", "example.test")
    await wait_http(base + "/_rproxy/health")
    async with text_app(lambda request: f"sprinklers {request.path}") as sprinklers_url:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"bridge: {base}\ntoken: {TOKEN}\ntarget: {home}\nname: house\nlog_level: debug\n"
            f"services:\n  - name: garden\n    target: {sprinklers_url}\n"
        )
        agent = procs("agent", "--config", str(config))
        await wait_tunnel(base, "house")
        assert await fetch(base, "/a", host="house.example.test") == (200, "hello from home /a")
        assert await fetch(base, "/zone/1", host="garden.house.example.test") == (200, "sprinklers /zone/1")
        assert (await fetch(base, "/zone/1", host="garden.example.test"))[0] == 503  # no tunnel of its own
        assert "DEBUG" in agent.output()  # log_level from the file
        assert await asyncio.to_thread(agent.stop) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("services: [{name: garden}]\n", "services[0].target: is required (the service's URL)"),
        (
            "services: [{name: garden, target: 'ftp://x'}]\n",
            "services[0].target: expected an http(s):// URL, zeroconf:NAME or tcp://HOST:PORT, got 'ftp://x'",
        ),
        (
            "services: [{name: a, target: 'http://x'}, {name: a, target: 'http://y'}]\n",
            "services[1].name: 'a' is named twice",
        ),
        (
            "services: {ssh: 'tcp://pi'}\n",
            "services[0].target: 'tcp://pi': expected tcp://HOST:PORT, e.g. tcp://192.168.1.5:22",
        ),
        ("services: [{name: a, target: 'http://x', port: 1}]\n", "services[0].port: unknown key"),
        ("target: 'zeroconf:'\n", "target: expected zeroconf:NAME with the name of an announced app, got 'zeroconf:'"),
    ],
    ids=["no-target", "bad-target", "twice", "tcp-without-port", "unknown", "zeroconf-empty"],
)
def test_each_mistake_in_an_agent_config_file_is_one_exact_line(content: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    base = "bridge: http://127.0.0.1:1\ntoken: t\n"
    config.write_text(base + ("" if content.startswith("target") else "target: http://127.0.0.1:2\n") + content)
    result = rproxy("agent", "--config", str(config))
    assert result.returncode == 2, result
    assert one_error_line(result) == f"rproxy agent: error: {config}: {message}"


def test_the_installed_rproxy_script_reads_a_json_file_like_the_add_on_options(tmp_path: Path) -> None:
    """options.json (JSON is YAML) works as an agent config file with the rproxy console script."""
    options = tmp_path / "options.json"
    options.write_text('{"bridge": "http://127.0.0.1:1", "token": "t", "target": "http://127.0.0.1:2", "name": "Nope"}')
    result = subprocess.run(
        [str(Path(sys.executable).parent / "rproxy"), "agent", "--config", str(options)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert (
        one_error_line(result)
        == f"rproxy agent: error: {options}: name: expected a DNS label (a-z, 0-9, -), got 'Nope'"
    )


async def test_while_draining_a_kept_alive_visitor_gets_503_and_an_agent_is_refused(home: str) -> None:
    """During the grace period, requests on connections opened before the stop get 503, not a relay."""
    async with running_bridge(shutdown_grace=30) as bridge, running_agent(bridge.url, home):
        connector = aiohttp.TCPConnector(limit=1)  # one connection, reused for every request
        async with aiohttp.ClientSession(connector=connector) as kept, aiohttp.ClientSession() as downloader:
            async with kept.get(bridge.url + "/first") as response:
                assert await response.text() == "hello from home /first"
            download = await downloader.get(bridge.url + "/download")
            await download.content.readexactly(DOWNLOAD_CHUNK)
            stopping = asyncio.create_task(bridge.stop())
            while not bridge.draining:
                await asyncio.sleep(0.01)
            # An agent dialling in over such a connection is turned away (a new connection is not
            # even accepted: the listener is closed).
            headers = {"Authorization": f"Bearer {TOKEN}", HEADER_PROTOCOL: "1", HEADER_TUNNEL: "late"}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await kept.ws_connect(bridge.url + "/_rproxy/connect", headers=headers)
            assert refused.value.status == 503
            with pytest.raises(aiohttp.ClientConnectorError):
                async with aiohttp.ClientSession() as late, late.get(bridge.url + "/_rproxy/health"):
                    pass
            # So is a visitor's next request, and that connection is closed after the answer.
            async with kept.get(bridge.url + "/second") as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "5"
                assert "the bridge is restarting" in await response.text()
            rest = await download.read()
            download.release()
            assert len(rest) == (DOWNLOAD_CHUNKS - 1) * DOWNLOAD_CHUNK
            await asyncio.wait_for(stopping, 10)
