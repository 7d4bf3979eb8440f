"""``rproxy tcp`` as users run it: flags, refusals and exit codes, half-close, bulk transfer, no token in logs.

The bridge and agent are real ones in this process; every ``rproxy tcp`` is a real subprocess
(started without blocking the loop that serves the bridge and agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rproxy_core import Bridge
from rproxy_core.bridge.keys import KeyGrant
from tests.conftest import ROOT, TOKEN, free_port, running_agent, running_bridge

#: A well-formed command line up to the mode flag (nothing listens at that bridge).
BASE = ["tcp", "--bridge", "ws://127.0.0.1:1", "--service", "echo"]


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    def one_error_line(self) -> str:
        """The single stderr line (fails on more, or on a traceback)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_")}
    env.update(extra)
    return env


async def rproxy(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    """Run ``python -m rproxy_core ARGS`` to completion with ``stdin`` as its input."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rproxy_core",
        *args,
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    communicating = asyncio.ensure_future(proc.communicate(stdin))
    done, _ = await asyncio.wait({communicating}, timeout=timeout)
    if not done:
        proc.kill()
        stdout, stderr = await communicating
        raise AssertionError(f"rproxy {' '.join(args)} did not finish in {timeout} s; stderr: {stderr.decode()}")
    stdout, stderr = communicating.result()
    assert proc.returncode is not None
    return Result(proc.returncode, stdout, stderr.decode())


def answer_for(data: bytes) -> bytes:
    """What the half-close service sends back after reading ``data`` to its end."""
    return hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1]


@asynccontextmanager
async def tcp_service(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1; yields its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def half_close_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads until the client shuts its write side, then answers: it needs half-close both ways."""
    data = bytearray()
    while chunk := await reader.read(1 << 16):
        data += chunk
    writer.write(answer_for(bytes(data)))
    await writer.drain()
    writer.close()


@dataclass
class Tunnel:
    bridge: Bridge
    ws: str
    echo_port: int


@pytest.fixture
async def tunnel() -> AsyncIterator[Tunnel]:
    """A bridge, and an agent offering ``echo`` (the half-close service) and ``closed`` (nothing listens)."""
    async with tcp_service(half_close_echo) as echo_port, running_bridge() as bridge:
        ws = bridge.url.replace("http://", "ws://")
        services = {"echo": f"tcp://127.0.0.1:{echo_port}", "closed": f"tcp://127.0.0.1:{free_port()}"}
        async with running_agent(ws, "", services=services):
            yield Tunnel(bridge, ws, echo_port)


# Flags.


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["tcp", "--bridge", "ws://127.0.0.1:1", "--stdio", "--token", "t"], "--service"),
        ([*BASE, "--token", "t"], "--listen"),
        ([*BASE, "--token", "t", "--stdio", "--listen", "2222"], "--listen"),
        ([*BASE, "--token", "t", "--listen", "127.0.0.1:99999"], "--listen"),
        ([*BASE, "--token", "t", "--listen", "localhost:ssh"], "--listen"),
        ([*BASE, "--stdio", "--token", "t", "--key", "/nonexistent"], "--key"),
        ([*BASE, "--stdio", "--token", "t", "--token-file", "/nonexistent"], "--token-file"),
        ([*BASE, "--stdio"], "--token"),
        (["tcp", "--service", "echo", "--stdio", "--token", "t"], "--bridge"),
        (["tcp", "--bridge", "ws://bridge.example", "--service", "echo", "--stdio", "--token", "t"], "--bridge"),
        ([*BASE[:-1], "Echo", "--stdio", "--token", "t"], "--service"),
        ([*BASE, "--stdio", "--token", "t", "--tunnel", "a/b"], "--tunnel"),
        ([*BASE, "--stdio", "--token-file", "/nonexistent"], "--token-file"),
        ([*BASE, "--stdio", "--token", "t", "--pin-sha256", "ab"], "--pin-sha256"),
    ],
    ids=[
        "no-service",
        "no-mode",
        "both-modes",
        "listen-port-range",
        "listen-port-name",
        "token-and-key",
        "token-and-token-file",
        "no-credential",
        "no-bridge",
        "cleartext-remote-bridge",
        "bad-service",
        "bad-tunnel",
        "unreadable-token-file",
        "pin-without-wss",
    ],
)
async def test_a_bad_flag_exits_2_with_one_line_naming_it(args: list[str], flag: str) -> None:
    result = await rproxy(*args)
    assert result.returncode == 2, result
    line = result.one_error_line()
    assert flag in line
    assert line.startswith("rproxy tcp: error:")
    assert result.stdout == b""


async def test_the_environment_or_a_token_file_gives_the_settings(tunnel: Tunnel, tmp_path: Path) -> None:
    """$RPROXY_BRIDGE, $RPROXY_TUNNEL and $RPROXY_TOKEN stand in for the flags; --token-file's first line is
    the token, and a credential flag wins over the environment's."""
    env = clean_env(RPROXY_BRIDGE=tunnel.ws, RPROXY_TUNNEL="home", RPROXY_TOKEN=TOKEN)
    result = await rproxy("tcp", "--service", "echo", "--stdio", stdin=b"from env", env=env)
    assert (result.returncode, result.stdout) == (0, answer_for(b"from env")), result.stderr
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\nnot this line\n")
    env["RPROXY_TOKEN"] = "wrong-token-0123456789"
    result = await rproxy(
        "tcp", "--service", "echo", "--stdio", "--token-file", str(token_file), stdin=b"file", env=env
    )
    assert (result.returncode, result.stdout) == (0, answer_for(b"file")), result.stderr


# Refusals: one line on stderr, nothing on stdout (in --stdio mode that is the service's stream).


@pytest.mark.parametrize(
    ("service", "token", "code", "words"),
    [
        ("echo", "wrong-token-0123456789", 3, "401"),
        ("nosuch", TOKEN, 1, "404"),
        ("closed", TOKEN, 1, "502"),
    ],
    ids=["wrong-token", "unknown-service", "service-refuses"],
)
async def test_a_refused_channel_exits_with_one_line(
    tunnel: Tunnel, service: str, token: str, code: int, words: str
) -> None:
    result = await rproxy(
        "tcp", "--bridge", tunnel.ws, "--service", service, "--stdio", env=clean_env(RPROXY_TOKEN=token)
    )
    assert result.returncode == code, result
    line = result.one_error_line()
    assert words in line
    if words == "404":
        assert f"no such service {service!r}" in line
    assert result.stdout == b""
    assert token not in result.stderr


async def test_no_agent_or_no_bridge_exits_1() -> None:
    async with running_bridge() as bridge:
        ws = bridge.url.replace("http://", "ws://")
        no_agent = await rproxy("tcp", "--bridge", ws, "--service", "echo", "--stdio", "--token", TOKEN)
    assert no_agent.returncode == 1
    assert "503" in no_agent.one_error_line()
    gone = await rproxy("tcp", "--bridge", ws, "--service", "echo", "--stdio", "--token", TOKEN)
    assert gone.returncode == 1
    assert "cannot connect to the bridge" in gone.one_error_line()


def write_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key


async def test_an_agent_key_opens_a_channel_to_the_tunnels_it_may_claim(tmp_path: Path) -> None:
    """--key signs a fresh challenge instead of sending a token: a key listed for the tunnel gets through,
    a key listed only for another tunnel, or not listed at all, is refused (exit 3, one line)."""
    home_key, garage_key = write_key(tmp_path / "home.key"), write_key(tmp_path / "garage.key")
    write_key(tmp_path / "stranger.key")
    grants = [
        KeyGrant(home_key.public_key().public_bytes_raw(), frozenset({"home"})),
        KeyGrant(garage_key.public_key().public_bytes_raw(), frozenset({"garage"})),
    ]
    async with tcp_service(half_close_echo) as port, running_bridge(authorized_keys=grants) as bridge:
        ws = bridge.url.replace("http://", "ws://")
        async with running_agent(ws, "", services={"echo": f"tcp://127.0.0.1:{port}"}):
            command = ["tcp", "--bridge", ws, "--tunnel", "home", "--service", "echo", "--stdio", "--key"]
            allowed = await rproxy(*command, str(tmp_path / "home.key"), stdin=b"signed")
            assert (allowed.returncode, allowed.stdout) == (0, answer_for(b"signed")), allowed.stderr
            for name in ("garage", "stranger"):
                refused = await rproxy(*command, str(tmp_path / f"{name}.key"), stdin=b"signed")
                assert refused.returncode == 3, refused
                assert "(403)" in refused.one_error_line()  # the bridge knows whose signature it checked


# Half-close: the service answers only after the client's end of input reached it.


async def test_stdio_half_close_gets_the_whole_answer(tunnel: Tunnel) -> None:
    """stdin's end is passed on as a half-close; the answer that follows still arrives whole on stdout."""
    data = os.urandom(300_000)
    result = await rproxy(
        "tcp", "--bridge", tunnel.ws, "--service", "echo", "--stdio", stdin=data, env=clean_env(RPROXY_TOKEN=TOKEN)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer_for(data)
    assert result.stderr == ""  # quiet in an ssh session when all is well


@asynccontextmanager
async def listener(
    ws: str, *extra: str, log_level: str = "info"
) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """``rproxy tcp --listen`` on a free port, ready; yields the port and the process (its stderr is a pipe)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rproxy_core",
        "--log-level",
        log_level,
        "tcp",
        "--bridge",
        ws,
        "--service",
        "echo",
        "--listen",
        str(port),
        *extra,
        cwd=ROOT,
        env=clean_env(RPROXY_TOKEN=TOKEN),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            first = (await proc.stderr.readline()).decode()
        assert f"listening on 127.0.0.1:{port} -> service echo of tunnel home via {ws}" in first, first
        yield port, proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, shut the write side, read the answer to its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def send() -> None:
            for i in range(0, len(data), 1 << 20):
                writer.write(data[i : i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        answer = await reader.read()
        await sending
        return answer
    finally:
        writer.close()


async def test_listen_carries_each_connection_with_half_close_and_stops_on_sigterm(tunnel: Tunnel) -> None:
    """Each connection to the local port is a channel of its own (three at once here); a client that shut
    its write side gets the service's whole answer; SIGTERM stops the command with exit code 0."""
    async with listener(tunnel.ws) as (port, proc):
        payloads = [os.urandom(size) for size in (1, 70_000, 500_000)]
        async with asyncio.timeout(30):
            answers = await asyncio.gather(*(exchange(port, data) for data in payloads))
        assert answers == [answer_for(data) for data in payloads]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert "Traceback" not in stderr.decode()


async def test_listen_carries_a_big_transfer_intact(tunnel: Tunnel) -> None:
    """48 MB up and 48 MB back through one channel arrive with the same checksum."""
    data = os.urandom(48 * 1000 * 1000)
    async with listener(tunnel.ws) as (port, _):
        async with asyncio.timeout(120):
            answer = await exchange(port, data)
    assert hashlib.sha256(answer).hexdigest() == hashlib.sha256(answer_for(data)).hexdigest()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_slow_local_reader_holds_back_the_service_in_bounded_memory() -> None:
    """Flow control: 128 MB from a service that writes as fast as it can, read slowly at the local port,
    pass through rproxy tcp without piling up in its memory."""
    total = 128 << 20

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = bytes(1 << 16)
        with contextlib.suppress(ConnectionError):
            for _ in range(total // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            await reader.read()
        writer.close()

    async with tcp_service(firehose) as port, running_bridge() as bridge:
        ws = bridge.url.replace("http://", "ws://")
        async with running_agent(ws, "", services={"echo": f"tcp://127.0.0.1:{port}"}), listener(ws) as (local, proc):
            before = rss_kib(proc.pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", local, limit=1 << 16)
            received, peak, next_pause = 0, before, 8 << 20
            async with asyncio.timeout(120):
                while chunk := await reader.read(1 << 16):
                    received += len(chunk)
                    if received >= next_pause:  # a slow reader: the service is held back meanwhile
                        next_pause += 8 << 20
                        peak = max(peak, rss_kib(proc.pid))
                        await asyncio.sleep(0.1)
            writer.close()
    assert received == total
    assert peak - before < 24 << 10, f"rproxy tcp grew from {before} KiB to {peak} KiB"


async def test_listen_closes_a_refused_connection_and_keeps_serving(tunnel: Tunnel) -> None:
    """A channel the bridge refuses costs the local connection one log line, not the listener."""
    async with running_bridge() as bridge:  # a bridge without agents: every channel gets 503
        ws = bridge.url.replace("http://", "ws://")
        async with listener(ws) as (port, proc):
            for _ in range(2):
                async with asyncio.timeout(20):
                    assert await exchange(port, b"anyone?") == b""
            assert proc.stderr is not None
            async with asyncio.timeout(10):
                lines = [(await proc.stderr.readline()).decode() for _ in range(2)]
            assert all("503" in line and "connection from 127.0.0.1:" in line for line in lines), lines
            assert proc.returncode is None


async def test_a_channel_aborted_by_the_tunnel_side_exits_1_with_one_line() -> None:
    """When the agent goes away mid-connection the bridge aborts the channel (1011): --stdio says so in one
    line and exits 1 instead of passing it off as a normal end."""
    reached = asyncio.Event()

    async def holds_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)  # bytes through the channel: it is open end to end
        reached.set()
        await reader.read()

    async with tcp_service(holds_on) as port, running_bridge() as bridge:
        ws = bridge.url.replace("http://", "ws://")
        async with running_agent(ws, "", services={"quiet": f"tcp://127.0.0.1:{port}"}) as agent:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rproxy_core",
                "tcp",
                "--bridge",
                ws,
                "--service",
                "quiet",
                "--stdio",
                cwd=ROOT,
                env=clean_env(RPROXY_TOKEN=TOKEN),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert proc.stdin is not None
                proc.stdin.write(b"ping")  # stdin stays open: only the tunnel side can end this
                async with asyncio.timeout(20):
                    await reached.wait()
                await agent.stop()
                async with asyncio.timeout(20):
                    stdout, stderr = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    assert proc.returncode == 1
    assert stdout == b""
    result = Result(proc.returncode, stdout, stderr.decode())
    assert "aborted the channel (1011" in result.one_error_line()


async def test_the_service_ending_first_reaches_the_client_while_it_still_sends() -> None:
    """The other half-close: a service that shuts its write side first. The end of its greeting reaches the
    client (stdout closes in --stdio mode, a FIN with --listen), and what the client sends after that still
    reaches the service."""
    heard: asyncio.Queue[bytes] = asyncio.Queue()

    async def greets_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, then silence")
        writer.write_eof()
        await heard.put(await reader.read())
        writer.close()

    async with tcp_service(greets_first) as port, running_bridge() as bridge:
        ws = bridge.url.replace("http://", "ws://")
        async with running_agent(ws, "", services={"echo": f"tcp://127.0.0.1:{port}"}):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rproxy_core",
                "tcp",
                "--bridge",
                ws,
                "--service",
                "echo",
                "--stdio",
                cwd=ROOT,
                env=clean_env(RPROXY_TOKEN=TOKEN),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert proc.stdin is not None and proc.stdout is not None
                async with asyncio.timeout(20):
                    assert await proc.stdout.read() == b"hello, then silence"  # read to EOF
                proc.stdin.write(b"words after the greeting ended")
                proc.stdin.close()
                async with asyncio.timeout(20):
                    assert await heard.get() == b"words after the greeting ended"
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

            async with listener(ws) as (local, _):
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                try:
                    async with asyncio.timeout(20):
                        assert await reader.read() == b"hello, then silence"
                    writer.write(b"and over a socket")
                    writer.write_eof()
                    async with asyncio.timeout(20):
                        assert await heard.get() == b"and over a socket"
                finally:
                    writer.close()


# Secrets.


async def test_the_token_is_in_no_output_at_debug_level(tunnel: Tunnel) -> None:
    """At --log-level debug (websockets logs its handshake headers then), neither an accepted nor a refused
    token appears, whole or in part, in what rproxy tcp prints."""
    wrong = "wrong-" + "y" * 20
    outputs = []
    for token in (TOKEN, wrong):
        result = await rproxy(
            "--log-level",
            "debug",
            "tcp",
            "--bridge",
            tunnel.ws,
            "--service",
            "echo",
            "--stdio",
            stdin=b"x",
            env=clean_env(RPROXY_TOKEN=token),
        )
        outputs.append(result.stderr)
    assert "Authorization" in outputs[0]  # the handshake was logged, with the credential masked
    async with listener(tunnel.ws, log_level="debug") as (port, proc):
        assert await exchange(port, b"y") == answer_for(b"y")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, stderr = await proc.communicate()
        outputs.append(stderr.decode())
    text = "\n".join(outputs)
    for token in (TOKEN, wrong):
        pieces = {token[i : i + 12] for i in range(len(token) - 11)}
        assert not [piece for piece in pieces if piece in text], text


async def test_sigterm_with_a_connection_open_stops_cleanly(tunnel: Tunnel) -> None:
    """SIGTERM while a channel is carrying a connection: exit code 0, no traceback (Python 3.11's
    start_server reports a cancelled connection handler as an error unless it ends quietly)."""
    async with listener(tunnel.ws) as (port, proc):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"half a request")
        await writer.drain()
        await asyncio.sleep(0.5)  # the channel opens and the service starts reading
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, stderr = await proc.communicate()
            assert await reader.read() == b""  # the local connection was closed
        writer.close()
        assert proc.returncode == 0, stderr.decode()
        assert "Traceback" not in stderr.decode() and "Exception in callback" not in stderr.decode(), stderr.decode()
