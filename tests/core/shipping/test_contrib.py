"""contrib/: the bridge as a VPS service, checked with the real tools and run for real.

- systemd: ``systemd-analyze verify`` and ``security --offline`` judge the unit; its reload
  commands run against a real bridge; the bridge runs under the kernel's
  memory-deny-write-execute, which the unit asks for.
- contrib/bridge.yaml passes ``--check-config`` and serves a tunnel as written.
- nginx and Caddy run with the examples' site blocks (ports and certificates substituted) in
  front of a real bridge, agent and home app: plain requests, a WebSocket, streamed responses
  and uploads pass, and the home app learns the visitor's address and ``https``.
- contrib/docker/Dockerfile's health check command runs against a real bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from rproxy_core.config import BRIDGE_SCHEMA
from tests.conftest import ROOT, TOKEN, Proc, free_port, running_agent, running_bridge, start_app, wait_http

CONTRIB = ROOT / "contrib"
UNIT = CONTRIB / "systemd" / "rproxy-bridge.service"
EXAMPLE = CONTRIB / "bridge.yaml"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
#: The address the visitor's connections come from: not the proxy's 127.0.0.1, so the home app
#: can tell whether it learned the visitor's address or the proxy's.
VISITOR_ADDRESS = "127.0.0.2"
#: What the visitor forges; the bridge must not pass it on as the visitor's address.
FORGED = "203.0.113.7"
#: systemd-analyze security's overall exposure, in tenths (its --threshold unit): 2.0 and below is "OK".
EXPOSURE_THRESHOLD = 20


def substitute(text: str, old: str, new: str, count: int = 1) -> str:
    """``text`` with ``old`` replaced; fails unless ``old`` occurs exactly ``count`` times, so a
    changed example breaks this test loudly instead of being run half-substituted."""
    assert text.count(old) == count, f"expected {count}x {old!r} in the example"
    return text.replace(old, new)


def run(*args: str | Path, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


# systemd


def unit_copy(tmp_path: Path, text: str | None = None, name: str = "rproxy-bridge.service") -> Path:
    """The unit with its programs pointed at ones that exist here (verify checks they do)."""
    text = UNIT.read_text() if text is None else text
    rproxy = Path(sys.executable).with_name("rproxy")
    assert rproxy.exists(), rproxy
    path = tmp_path / name
    path.write_text(substitute(text, "/opt/rproxy/bin/rproxy", str(rproxy), count=text.count("/opt/rproxy/bin/rproxy")))
    return path


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    # --man=no: the Documentation= address is not looked up as a man page.
    return run(SYSTEMD_ANALYZE, "verify", "--man=no", unit.name, cwd=unit.parent)


def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    result = verify(unit_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    # verify only warns about a misspelled key or a bad value, and then ignores the line: a
    # hardening option lost that way must fail this test too.
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("Restart=on-failure", "Restart=sometimes", "Failed to parse"),
        ("ExecStart=/opt/rproxy/bin/rproxy bridge --config /etc/rproxy/bridge.yaml\n", "", "no ExecStart="),
    ],
    ids=["misspelled-key", "bad-value", "no-execstart"],
)
def test_systemd_analyze_verify_rejects_a_broken_unit(old: str, new: str, complaint: str, tmp_path: Path) -> None:
    """The check above can fail: each broken copy makes verify complain."""
    broken = substitute(UNIT.read_text(), old, new)
    result = verify(unit_copy(tmp_path, broken))
    assert complaint in result.stdout + result.stderr


def security(unit: Path) -> subprocess.CompletedProcess[str]:
    return run(
        SYSTEMD_ANALYZE,
        "security",
        "--offline=yes",
        f"--threshold={EXPOSURE_THRESHOLD}",
        "--no-pager",
        unit.name,
        cwd=unit.parent,
    )


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    result = security(unit_copy(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert re.search(r"Overall exposure level for rproxy-bridge\.service: [01]\.\d OK", result.stdout), result.stdout[
        -500:
    ]


def test_systemd_analyze_security_fails_the_unit_without_its_hardening(tmp_path: Path) -> None:
    """The threshold means something: the same unit without its sandbox section is rated far worse."""
    text = UNIT.read_text()
    start = text.index("# Identity:")
    stripped = text[:start] + text[text.index("[Install]") :]
    result = security(unit_copy(tmp_path, stripped))
    assert result.returncode != 0
    assert "UNSAFE" in result.stdout or "EXPOSED" in result.stdout


def test_the_unit_runs_the_bridge_as_documented() -> None:
    text = UNIT.read_text()
    assert unit_values(text, "ExecStart") == ["/opt/rproxy/bin/rproxy bridge --config /etc/rproxy/bridge.yaml"]
    assert unit_values(text, "ExecReload")[-1] == "/bin/kill -HUP $MAINPID"
    assert unit_values(text, "User") == ["rproxy"]
    assert unit_values(text, "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert unit_values(text, "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert unit_values(text, "RestartPreventExitStatus") == ["2"]  # a config error is not retried
    # systemd must not kill the bridge while it still lets requests finish.
    grace = yaml.safe_load(EXAMPLE.read_text())["shutdown_grace"]
    (stop_timeout,) = unit_values(text, "TimeoutStopSec")
    assert seconds(stop_timeout) >= grace + 10


def test_sysusers_creates_the_units_user(tmp_path: Path) -> None:
    """systemd-sysusers, on an empty root directory, creates the system user the unit runs as."""
    (tmp_path / "etc").mkdir()
    result = run(
        shutil.which("systemd-sysusers") or "/usr/bin/systemd-sysusers",
        f"--root={tmp_path}",
        CONTRIB / "systemd" / "rproxy-sysusers.conf",
    )
    assert result.returncode == 0, result.stderr
    (entry,) = [line for line in (tmp_path / "etc" / "passwd").read_text().splitlines() if line.startswith("rproxy:")]
    _, _, uid, gid, _, home, shell = entry.split(":")
    assert int(uid) < 1000 and uid == gid  # a system user, with a group of its own
    assert (home, shell) == ("/nonexistent", "/usr/sbin/nologin")


# Things the unit's commands do, run for real against the bridge.


@dataclass
class Home:
    """A home app that reports what reached it: forwarded headers, streamed chunks, WebSocket messages."""

    #: The test sets it once it has received the first chunk of /stream.
    release_stream: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once /upload has received the first part of the body, before the rest is sent.
    first_part_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/whoami", self.whoami)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/stream", self.stream)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/{tail:.*}", self.hello)
        return app

    async def whoami(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "x_forwarded_for": request.headers.getall("X-Forwarded-For", []),
                "x_forwarded_proto": request.headers.getall("X-Forwarded-Proto", []),
                "host": request.host,
            }
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """The second chunk is written only after the visitor got the first: a buffering proxy would hang.

        With a Content-Length, like a download: proxies flush bodies of unknown length on their
        own (Caddy does), so only a known length shows whether the config turned buffering off.
        """
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.content_length = len(b"first chunk\n" + b"second chunk\n")
        await response.prepare(request)
        await response.write(b"first chunk\n")
        await asyncio.wait_for(self.release_stream.wait(), 20)
        await response.write(b"second chunk\n")
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        received = b""
        async for chunk in request.content.iter_any():
            received += chunk
            if b"part one;" in received:
                self.first_part_arrived.set()
        return web.Response(text=f"received {len(received)} bytes")

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from home {request.path}")


@asynccontextmanager
async def serve(home: Home) -> AsyncIterator[str]:
    runner, url = await start_app(home.build())
    try:
        yield url
    finally:
        await runner.cleanup()


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


#: Runs ARGS of ``rproxy`` under the kernel's memory-deny-write-execute (prctl PR_SET_MDWE,
#: Linux 6.3+): what MemoryDenyWriteExecute=yes in the unit enforces (newer systemd uses the
#: same prctl). The setting survives exec; the probe shows it is in force before rproxy starts.
MDWE_LAUNCHER = """
import ctypes, mmap, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("write+execute mapping refused", flush=True)
else:
    sys.exit("memory-deny-write-execute is not in force")
os.execv(sys.executable, [sys.executable, "-m", "rproxy_core", *sys.argv[1:]])
"""


async def test_the_bridge_serves_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the rproxy command (with uvloop) relays under it and stops cleanly."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "bridge.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
    process = subprocess.Popen(
        [sys.executable, "-c", MDWE_LAUNCHER, "bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(60), serve(Home()) as home_url:
            await wait_http(base + "/_rproxy/health")
            assert "write+execute mapping refused" in (tmp_path / "bridge.log").read_text()
            assert "/uvloop/" in loaded_libraries(process.pid)  # the fast loop, not a fallback
            async with running_agent(base, home_url), aiohttp.ClientSession() as session:
                async with session.get(base + "/hello") as response:
                    assert (response.status, await response.text()) == (200, "hello from home /hello")
                async with session.ws_connect(base + "/ws") as ws:
                    await ws.send_str("ping")
                    assert (await ws.receive(timeout=10)).data == "echo: ping"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def example_copy(tmp_path: Path, port: int, tokens_file_text: str = "") -> Path:
    """contrib/bridge.yaml with its listen port and token file moved into the test's reach."""
    tokens = tmp_path / "tokens"
    tokens.write_text(tokens_file_text or f"{TOKEN}\n")
    text = substitute(EXAMPLE.read_text(), "listen: 127.0.0.1:8080", f"listen: 127.0.0.1:{port}")
    text = substitute(text, "token_file: /etc/rproxy/tokens", f"token_file: {tokens}")
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    return path


def rproxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
    return run(sys.executable, "-m", "rproxy_core", *args, cwd=ROOT, env=env)


def test_the_example_config_names_every_bridge_setting() -> None:
    """Every key the bridge accepts is in the example, set or (TLS) shown commented out."""
    text = EXAMPLE.read_text()
    keys = {str(key) for key in BRIDGE_SCHEMA.schema}
    missing = {key for key in keys if not re.search(rf"^(# )?{key}:", text, re.MULTILINE)}
    assert not missing, missing
    assert set(yaml.safe_load(text)) <= keys


def test_the_example_config_passes_check_config(tmp_path: Path) -> None:
    result = rproxy_cli("bridge", "--check-config", str(example_copy(tmp_path, 8080)))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_the_example_config_with_tls_enabled_passes_check_config(tmp_path: Path) -> None:
    """Its commented TLS lines, uncommented with a real certificate, are valid too."""
    certificate = trustme.CA().issue_cert("bridge.example.com", "*.example.com")
    certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "fullchain.pem"))
    certificate.private_key_pem.write_to_path(str(tmp_path / "privkey.pem"))
    config = example_copy(tmp_path, 8443)
    text = substitute(
        config.read_text(), "# tls_cert: /etc/rproxy/tls/fullchain.pem", f"tls_cert: {tmp_path}/fullchain.pem"
    )
    config.write_text(substitute(text, "# tls_key: /etc/rproxy/tls/privkey.pem", f"tls_key: {tmp_path}/privkey.pem"))
    result = rproxy_cli("bridge", "--check-config", str(config))
    assert result.returncode == 0, result.stderr


def inline_tokens_enabled(text: str) -> str:
    """The example with its commented-out inline tokens switched on, exactly as they are written."""
    commented = re.search(r"^tokens: \[\]\n((?:# .*\n)+)", text, re.MULTILINE)
    assert commented, "the example should show inline tokens, commented out, below `tokens: []`"
    enabled = "".join(line[2:] + "\n" for line in commented[1].splitlines())
    assert enabled.startswith("tokens:\n")
    return text.replace(commented[0], enabled)


def test_check_config_rejects_a_broken_copy_of_the_example(tmp_path: Path) -> None:
    """The check above can fail: a tunnel name the bridge cannot serve is named in one line, exit 2."""
    config = example_copy(tmp_path, 8080)
    config.write_text(substitute(inline_tokens_enabled(config.read_text()), "    name: cabin", "    name: Cabin_1"))
    result = rproxy_cli("bridge", "--check-config", str(config))
    assert result.returncode == 2
    assert "Cabin_1" in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_the_example_config_serves_its_named_tunnel(procs: Callable[..., Proc], tmp_path: Path) -> None:
    """A bridge started as the unit starts it, on a copy of the example with its inline tokens
    switched on, serves cabin.example.com to the cabin token."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = example_copy(tmp_path, port)
    config.write_text(inline_tokens_enabled(config.read_text()))
    assert rproxy_cli("bridge", "--check-config", str(config)).returncode == 0
    procs("bridge", "--config", str(config))
    await wait_http(base + "/_rproxy/health")
    cabin_token = "a-long-random-token-for-the-cabin"
    async with (
        asyncio.timeout(30),
        serve(Home()) as home_url,
        running_agent(base, home_url, token=cabin_token, name="cabin"),
        aiohttp.ClientSession() as session,
        session.get(base + "/door", headers={"Host": f"cabin.example.com:{port}"}) as response,
    ):
        assert (response.status, await response.text()) == (200, "hello from home /door")


async def test_the_units_reload_commands_swap_tokens_and_keep_tunnels(
    procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """``systemctl reload`` runs ExecReload=: the config check, then SIGHUP. A token added to the token
    file is accepted afterwards, and the tunnel that was up stays up without reconnecting."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = example_copy(tmp_path, port)
    bridge: Proc = procs("bridge", "--config", str(config))
    await wait_http(base + "/_rproxy/health")
    new_token = "added-by-reload-" + "z" * 16
    async with asyncio.timeout(60), serve(Home()) as home_url, running_agent(base, home_url, name="home") as agent:
        (tmp_path / "tokens").write_text(f"{TOKEN}\n{new_token}\n")
        for command in unit_values(UNIT.read_text(), "ExecReload"):
            command = command.replace("/opt/rproxy/bin/rproxy", shlex.join([sys.executable, "-m", "rproxy_core"]))
            command = command.replace("/etc/rproxy/bridge.yaml", str(config))
            command = command.replace("$MAINPID", str(bridge.pid))
            result = await asyncio.to_thread(run, *shlex.split(command), cwd=ROOT)
            assert result.returncode == 0, (command, result.stderr)
        async with (
            running_agent(base, home_url, token=new_token, name="cabin", agent_id="after-reload"),
            aiohttp.ClientSession() as session,
        ):
            for host in ("cabin", "home"):
                async with session.get(base + "/x", headers={"Host": f"{host}.example.com:{port}"}) as response:
                    assert response.status == 200, host
        assert agent.reconnects == 0


# The reverse proxies in front of the bridge


class ExampleDomainResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1, so the visitor uses real host names (SNI, Host) offline."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        pass


@dataclass
class Certificate:
    """The proxy's certificate and key files, and the CA a visitor needs to trust them."""

    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    """A certificate for bridge.example.com and *.example.com from a CA only this test trusts."""
    ca = trustme.CA()
    issued = ca.issue_cert("bridge.example.com", "*.example.com")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    for blob in issued.cert_chain_pems:
        with cert.open("ab") as handle:
            handle.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    return Certificate(ca, cert, key)


@dataclass
class Proxy:
    """A reverse proxy in front of the bridge: its ports and, once started, its process and log."""

    https_port: int
    http_port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@asynccontextmanager
async def tunnel_behind(
    proxy_factory: Callable[[int], AbstractContextManager[Proxy]],
) -> AsyncIterator[tuple[Home, Proxy]]:
    """A home app, an agent, and a bridge trusting only 127.0.0.1 behind the proxy ``proxy_factory`` starts."""
    home = Home()
    async with (
        serve(home) as home_url,
        running_bridge(trusted_proxies=[ip_network("127.0.0.1/32")], domain="example.com") as bridge,
        running_agent(bridge.url, home_url),
    ):
        bridge_port = URL(bridge.url).port
        assert bridge_port
        with proxy_factory(bridge_port) as proxy:
            await wait_listening(proxy)
            yield home, proxy


async def wait_listening(proxy: Proxy, timeout: float = 20) -> None:
    assert proxy.process and proxy.log
    async with asyncio.timeout(timeout):
        while True:
            assert proxy.process.poll() is None, f"the proxy exited: {proxy.log.read_text()[-3000:]}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", proxy.https_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


@contextmanager
def running_process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


async def visit_through(proxy: Proxy, home: Home, certificate: Certificate) -> None:
    """What a visitor does through the proxy, from 127.0.0.2 with a forged X-Forwarded-For."""
    connector = aiohttp.TCPConnector(
        resolver=ExampleDomainResolver(), local_addr=(VISITOR_ADDRESS, 0), ssl=certificate.client_context()
    )
    base = f"https://home.example.com:{proxy.https_port}"
    async with asyncio.timeout(60), aiohttp.ClientSession(connector=connector) as session:
        # A plain request: the home app sees the visitor's address and https, not the forgery.
        async with session.get(base + "/whoami", headers={"X-Forwarded-For": FORGED}) as response:
            assert response.status == 200
            seen = await response.json()
        assert seen["x_forwarded_for"] == [VISITOR_ADDRESS]
        assert seen["x_forwarded_proto"] == ["https"]
        assert seen["host"].split(":")[0] == "home.example.com"

        # A WebSocket, text and binary.
        async with session.ws_connect(base + "/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "echo: hello"
            await ws.send_bytes(b"\x01\x02\x03")
            assert (await ws.receive(timeout=10)).data == b"\x03\x02\x01"

        # A streamed response: its first chunk arrives while the home app still holds the rest back.
        async with session.get(base + "/stream") as response:
            assert response.status == 200
            assert await asyncio.wait_for(response.content.readline(), 15) == b"first chunk\n"
            home.release_stream.set()
            assert await response.content.read() == b"second chunk\n"

        # A streamed upload: its first part reaches the home app before the visitor sends the rest.
        async def body() -> AsyncIterator[bytes]:
            yield b"part one;"
            await asyncio.wait_for(home.first_part_arrived.wait(), 15)
            yield b"part two"

        async with session.post(base + "/upload", data=body()) as response:
            assert (response.status, await response.text()) == (200, "received 17 bytes")

        # Plain HTTP is redirected to HTTPS.
        async with session.get(f"http://home.example.com:{proxy.http_port}/lights", allow_redirects=False) as response:
            assert response.status == 308
            assert response.headers["Location"].startswith("https://home.example.com")
            assert response.headers["Location"].endswith("/lights")


def nginx_site(bridge_port: int, proxy: Proxy, certificate: Certificate) -> str:
    """contrib/nginx/rproxy.conf on this test's ports and certificate, nothing else changed."""
    site = (CONTRIB / "nginx" / "rproxy.conf").read_text()
    site = substitute(site, "server 127.0.0.1:8080;", f"server 127.0.0.1:{bridge_port};")
    site = substitute(site, "    listen 80;\n    listen [::]:80;\n", f"    listen 127.0.0.1:{proxy.http_port};\n")
    site = substitute(
        site,
        "    listen 443 ssl http2;\n    listen [::]:443 ssl http2;\n",
        f"    listen 127.0.0.1:{proxy.https_port} ssl http2;\n",
    )
    site = substitute(site, "/etc/letsencrypt/live/example.com/fullchain.pem", str(certificate.cert))
    return substitute(site, "/etc/letsencrypt/live/example.com/privkey.pem", str(certificate.key))


def nginx_main_config(prefix: Path, site: Path) -> str:
    """The smallest nginx.conf around the site: one process, everything under ``prefix``."""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp_paths}
    include {site};
}}
"""


@contextmanager
def nginx_in_front(bridge_port: int, certificate: Certificate, prefix: Path) -> Iterator[Proxy]:
    proxy = Proxy(https_port=free_port(), http_port=free_port())
    prefix.mkdir()
    site = prefix / "rproxy.conf"
    site.write_text(nginx_site(bridge_port, proxy, certificate))
    config = prefix / "nginx.conf"
    config.write_text(nginx_main_config(prefix, site))
    # -e: the error log before the config is read (else nginx opens /var/log/nginx/error.log).
    args = [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)]
    checked = run(*args, "-t")
    assert checked.returncode == 0, checked.stderr
    with running_process(args, prefix / "output.log") as proxy.process:
        proxy.log = prefix / "error.log"
        yield proxy


async def test_nginx_example_passes_requests_websockets_and_streams(tmp_path: Path, certificate: Certificate) -> None:
    """contrib/nginx/rproxy.conf in a real nginx: visitor → nginx (TLS) → bridge → agent → home app."""
    async with tunnel_behind(lambda port: nginx_in_front(port, certificate, tmp_path / "nginx")) as (home, proxy):
        await visit_through(proxy, home, certificate)


def test_nginx_rejects_a_broken_copy_of_the_example(tmp_path: Path, certificate: Certificate) -> None:
    """``nginx -t`` on the example can fail: a misspelled directive is refused."""
    proxy = Proxy(https_port=free_port(), http_port=free_port())
    site = tmp_path / "rproxy.conf"
    site.write_text(substitute(nginx_site(8080, proxy, certificate), "proxy_buffering off;", "proxy_bufering off;"))
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_main_config(tmp_path, site))
    result = run(NGINX, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(config))
    assert result.returncode != 0
    assert 'unknown directive "proxy_bufering"' in result.stderr


def caddyfile(bridge_port: int, proxy: Proxy, certificate: Certificate, storage: Path) -> str:
    """contrib/caddy/Caddyfile offline: this test's certificate instead of the DNS-01 wildcard
    (no ACME), its ports on 127.0.0.1, no admin endpoint, nothing installed into trust stores."""
    text = (CONTRIB / "caddy" / "Caddyfile").read_text()
    text = substitute(
        text,
        "{\n\t# Let's Encrypt",
        "{\n"
        + "".join(
            f"\t{option}\n"
            for option in (
                "admin off",
                "skip_install_trust",
                f"http_port {proxy.http_port}",
                f"https_port {proxy.https_port}",
                "default_bind 127.0.0.1",
                f"storage file_system {storage}",
            )
        )
        + "\t# Let's Encrypt",
    )
    text = substitute(
        text,
        "\ttls {\n\t\tdns cloudflare {env.CLOUDFLARE_API_TOKEN}\n\t}\n",
        f"\ttls {certificate.cert} {certificate.key}\n",
    )
    return substitute(text, "reverse_proxy 127.0.0.1:8080 {", f"reverse_proxy 127.0.0.1:{bridge_port} {{")


def caddy_env(home: Path) -> dict[str, str]:
    """Caddy keeps data and config under $HOME/XDG dirs: the test's own."""
    return {
        **os.environ,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }


def test_caddy_example_fails_validation_only_for_the_dns_module(tmp_path: Path) -> None:
    """As shipped, Debian's caddy (no DNS provider modules) can only object to the DNS-01 provider."""
    result = run(CADDY, "adapt", "--config", CONTRIB / "caddy" / "Caddyfile", "--validate", env=caddy_env(tmp_path))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "module not registered: dns.providers.cloudflare" in errors[0], result.stderr


def test_caddy_validates_the_example_and_it_is_formatted(tmp_path: Path, certificate: Certificate) -> None:
    proxy = Proxy(https_port=free_port(), http_port=free_port())
    path = tmp_path / "Caddyfile"
    path.write_text(caddyfile(8080, proxy, certificate, tmp_path / "storage"))
    result = run(CADDY, "adapt", "--config", path, "--validate", env=caddy_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "not formatted" not in result.stderr
    adapted = json.loads(result.stdout)
    assert adapted["admin"] == {"disabled": True}
    formatted = run(CADDY, "fmt", CONTRIB / "caddy" / "Caddyfile", env=caddy_env(tmp_path))
    assert formatted.stdout == (CONTRIB / "caddy" / "Caddyfile").read_text()


def test_caddy_rejects_a_broken_copy_of_the_example(tmp_path: Path, certificate: Certificate) -> None:
    proxy = Proxy(https_port=free_port(), http_port=free_port())
    path = tmp_path / "Caddyfile"
    path.write_text(
        substitute(caddyfile(8080, proxy, certificate, tmp_path / "storage"), "flush_interval -1", "flush_intervall -1")
    )
    result = run(CADDY, "adapt", "--config", path, "--validate", env=caddy_env(tmp_path))
    assert result.returncode != 0
    assert "flush_intervall" in result.stderr


@contextmanager
def caddy_in_front(bridge_port: int, certificate: Certificate, home: Path) -> Iterator[Proxy]:
    proxy = Proxy(https_port=free_port(), http_port=free_port())
    home.mkdir()
    path = home / "Caddyfile"
    path.write_text(caddyfile(bridge_port, proxy, certificate, home / "storage"))
    with running_process(
        [CADDY, "run", "--adapter", "caddyfile", "--config", str(path)], home / "caddy.log", env=caddy_env(home)
    ) as proxy.process:
        proxy.log = home / "caddy.log"
        yield proxy


async def test_caddy_example_passes_requests_websockets_and_streams(tmp_path: Path, certificate: Certificate) -> None:
    """contrib/caddy/Caddyfile in a real Caddy (offline certificate): visitor → Caddy → bridge → agent → home app."""
    async with tunnel_behind(lambda port: caddy_in_front(port, certificate, tmp_path / "caddy")) as (home, proxy):
        await visit_through(proxy, home, certificate)


# contrib/docker/Dockerfile


def dockerfile_healthcheck() -> list[str]:
    text = (CONTRIB / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    return list(json.loads(line.split(" CMD ", 1)[1]))


async def run_healthcheck(port: int) -> int:
    command = [part.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for part in dockerfile_healthcheck()]
    assert command[0] == "python"
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_images_health_check_passes_on_a_serving_bridge_and_fails_without_one() -> None:
    async with running_bridge() as bridge:
        port = URL(bridge.url).port
        assert port
        assert await run_healthcheck(port) == 0
    assert await run_healthcheck(free_port()) != 0


def test_the_image_runs_the_bridge_on_the_documented_config_path() -> None:
    text = (CONTRIB / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["rproxy"]' in text
    assert 'CMD ["bridge", "--config", "/etc/rproxy/bridge.yaml"]' in text
    assert re.search(r"^USER \d+:\d+$", text, re.MULTILINE)  # not root
    assert "EXPOSE 8080" in text and "STOPSIGNAL SIGTERM" in text


# The agent's unit (a Pi at home)

AGENT_UNIT = CONTRIB / "systemd" / "rproxy-agent.service"


def test_systemd_analyze_verify_accepts_the_agent_unit_without_a_warning(tmp_path: Path) -> None:
    result = verify(unit_copy(tmp_path, AGENT_UNIT.read_text(), name=AGENT_UNIT.name))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_security_rates_the_agent_unit_ok(tmp_path: Path) -> None:
    result = security(unit_copy(tmp_path, AGENT_UNIT.read_text(), name=AGENT_UNIT.name))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert re.search(r"Overall exposure level for rproxy-agent\.service: [01]\.\d OK", result.stdout), result.stdout[
        -500:
    ]


def test_the_agent_unit_reads_its_config_as_a_credential_and_gives_up_on_refusals() -> None:
    text = AGENT_UNIT.read_text()
    assert unit_values(text, "LoadCredential") == ["agent.yaml:/etc/rproxy/agent.yaml"]
    assert unit_values(text, "ExecStart") == ["/opt/rproxy/bin/rproxy agent --config %d/agent.yaml"]
    assert unit_values(text, "DynamicUser") == ["yes"]
    # Exit codes of `rproxy agent` that a restart cannot fix: bad config, refused by the bridge.
    assert unit_values(text, "RestartPreventExitStatus") == ["2 3"]
    assert "AF_NETLINK" in unit_values(text, "RestrictAddressFamilies")[0]  # zeroconf's interface list
