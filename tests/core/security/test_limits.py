"""Limits on the bridge's public side, each attacked over real sockets.

A visitor over a limit gets a short 4xx/503 answer and nothing reaches the home app; an agent
over a limit is cut off with a logged reason. Every test also shows the legitimate case next
to the attack still works, so a limit that refused everything would fail too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from rproxy_core.bridge import BridgeConfig
from rproxy_core.bridge.limits import GuardedRequestHandler
from rproxy_core.cli import _build_parser
from rproxy_core.cli.bridge import bridge_settings
from rproxy_core.const import MAX_REQUEST_HEAD
from rproxy_core.protocol.frames import ErrorCode, Flags, FrameType, encode_header, iter_frames
from rproxy_core.protocol.heads import RequestHead
from tests.conftest import TOKEN, running_bridge, wait_for_tunnel
from tests.core.tunnel.homeapps import RawResponse, home_tunnel, parse_response, raw_exchange
from tests.core.tunnel.test_cli import clean_env, one_error_line, rproxy
from tests.core.tunnel.test_resilience import CONNECT, agent_headers, goaway_before_close, hello_frame

HOST = b"Host: v.test\r\n"


async def _still_relays(http: aiohttp.ClientSession, url: str) -> None:
    async with http.post(url + "/after", data=b"normal") as response:
        assert response.status == 200
        assert json.loads(await response.read())["body"] == "normal"


def _short_plain(response: RawResponse, status: int) -> None:
    """A short answer of its own, not the parser's message quoting the visitor's bytes back."""
    assert response.status == status, response
    assert len(response.body) < 120, response.body
    assert response.body.startswith(f"{status} ".encode()), response.body


# Request heads: 414, 431.


async def test_oversized_head_parts_get_414_or_431_and_never_reach_the_home_app(http: aiohttp.ClientSession) -> None:
    """A long target → 414; a long header line, too many headers, or a huge head in total → 431."""
    async with home_tunnel() as t:
        long_target = b"GET /" + b"t" * 100_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"
        _short_plain(await raw_exchange(t.port, long_target), 414)

        long_line = b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        _short_plain(await raw_exchange(t.port, long_line), 431)

        many = b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
        _short_plain(await raw_exchange(t.port, many), 431)

        # Each line and the number of lines within bounds, the whole over MAX_REQUEST_HEAD.
        fat_lines = b"".join(b"X-F%d: %s\r\n" % (i, b"f" * 7000) for i in range(MAX_REQUEST_HEAD // 7000 + 2))
        _short_plain(await raw_exchange(t.port, b"GET / HTTP/1.1\r\n" + HOST + fat_lines + b"\r\n"), 431)

        # The same head trickled in pieces (a different path: counted as it arrives).
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\n" + HOST)
            for i in range(MAX_REQUEST_HEAD // 7000 + 2):
                writer.write(b"X-F%d: %s\r\n" % (i, b"f" * 7000))
                await writer.drain()
                await asyncio.sleep(0.01)
            async with asyncio.timeout(10):
                _short_plain(parse_response(await reader.read()), 431)
        finally:
            writer.close()

        assert t.home.seen == []
        # Just under every limit still goes through.
        fine = b"GET /fine HTTP/1.1\r\n" + HOST + b"X-Ok: " + b"o" * 8000 + b"\r\nConnection: close\r\n\r\n"
        assert (await raw_exchange(t.port, fine)).status == 200
        assert [s.raw_path for s in t.home.seen] == ["/fine"]
        await _still_relays(http, t.url)


async def test_body_bytes_are_never_counted_as_head_bytes() -> None:
    """Large body pieces, the last one ending the body, on a kept-alive connection: no 431, the next request works."""
    async with home_tunnel(header_timeout=1.0) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        try:
            async with asyncio.timeout(20):
                piece = b"b" * (2 * MAX_REQUEST_HEAD)
                writer.write(b"POST /upload HTTP/1.1\r\nHost: v.test\r\nContent-Length: %d\r\n\r\n" % (3 * len(piece)))
                for _ in range(3):
                    await asyncio.sleep(0.3)  # separate reads, the last one ending the body
                    writer.write(piece)
                    await writer.drain()
                first = await _read_one_response(reader)
                await asyncio.sleep(1.5)  # longer than header_timeout: idle, not a slow head
                writer.write(b"GET /second HTTP/1.1\r\nHost: v.test\r\n\r\n")
                second = await _read_one_response(reader)
        finally:
            writer.close()
        assert first.status == 200 and json.loads(first.body)["size"] == 3 * len(piece)
        assert second.status == 200


# Slow heads (slowloris) and idle connections.


async def _trickle_head(port: int, before: bytes = b"") -> tuple[bytes, float]:
    """Send ``before`` whole, then a request head a byte every 50 ms; return what came back and when."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        if before:
            writer.write(before)
            first = parse_response(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(int(first.header("Content-Length") or 0))
        started = time.monotonic()
        reading = asyncio.create_task(reader.read())
        try:
            head = b"GET /slow HTTP/1.1\r\nHost: v.test\r\nX-Padding: " + b"p" * 200
            async with asyncio.timeout(10):
                for byte in head:
                    if reading.done():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                received = await reading
        finally:
            reading.cancel()
    finally:
        writer.close()
    return received, time.monotonic() - started


async def test_a_slowloris_visitor_gets_408_and_is_cut_off_after_the_header_timeout() -> None:
    """Trickling a head a byte at a time does not hold the connection past header_timeout."""
    async with home_tunnel(header_timeout=1.0) as t:
        received, elapsed = await _trickle_head(t.port)
        assert 0.9 < elapsed < 4, elapsed
        assert parse_response(received).status == 408

        # The same on a kept-alive connection, for the head of its second request.
        received, elapsed = await _trickle_head(t.port, b"GET /first HTTP/1.1\r\nHost: v.test\r\n\r\n")
        assert 0.9 < elapsed < 4, elapsed
        assert parse_response(received).status == 408
        assert [s.raw_path for s in t.home.seen] == ["/first"]

        # Connecting and saying nothing is cut off the same way.
        started = time.monotonic()
        silent = await raw_exchange(t.port, b"", timeout=10)
        assert silent.status == 408
        assert time.monotonic() - started < 4


async def test_a_kept_alive_connection_outlives_the_header_timeout_but_not_the_idle_timeout() -> None:
    """Between requests the idle timeout applies, not the (shorter) header timeout."""
    async with home_tunnel(header_timeout=0.5, idle_timeout=2.0) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        try:
            async with asyncio.timeout(15):
                for path in (b"/one", b"/two"):
                    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: v.test\r\n\r\n")
                    await writer.drain()
                    status_line = await reader.readline()
                    assert b" 200 " in status_line
                    length = 0
                    while (line := await reader.readline()) != b"\r\n":
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await reader.readexactly(length)
                    await asyncio.sleep(1.0)  # idle longer than header_timeout, shorter than idle_timeout
                started = time.monotonic()
                assert await reader.read() == b""  # closed by the idle timeout, without an answer
                assert time.monotonic() - started < 2.5
        finally:
            writer.close()
        assert [s.raw_path for s in t.home.seen] == ["/one", "/two"]


# Request bodies: 413.


async def test_a_body_announced_over_max_body_size_gets_413_before_it_is_sent() -> None:
    """Content-Length over the limit: 413 at once, the body never asked for, the home app never asked."""
    async with home_tunnel(max_body_size=1000) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: v.test\r\nContent-Length: 5000000\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                status_line = await reader.readline()
        finally:
            writer.close()
        assert b" 413 " in status_line
        assert t.home.seen == []
        under = (
            b"POST /upload HTTP/1.1\r\nHost: v.test\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + b"u" * 1000
        )
        response = await raw_exchange(t.port, under)
        assert response.status == 200
        assert json.loads(response.body)["size"] == 1000


async def test_a_chunked_body_growing_over_max_body_size_gets_413_and_its_stream_is_reset() -> None:
    """No length announced: counted while streaming; the stream to the agent is reset when it passes the limit."""
    async with home_tunnel(max_body_size=1000) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: v.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"258\r\n" + b"c" * 600 + b"\r\n")  # 600 bytes: under the limit, relayed
            await writer.drain()
            async with asyncio.timeout(10):
                await _wait_seen(t, "/upload")
                writer.write(b"258\r\n" + b"c" * 600 + b"\r\n")  # 1200: over it
                await writer.drain()
                response = await _read_one_response(reader)
        finally:
            writer.close()
        assert response.status == 413
        assert b"1000 bytes" in response.body
        async with asyncio.timeout(10):
            while any(c.streams for c in t.bridge.registry.connections()):
                await asyncio.sleep(0.02)
        chunked_under = (
            b"POST /upload HTTP/1.1\r\nHost: v.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3e8\r\n" + b"c" * 1000 + b"\r\n0\r\n\r\n"
        )
        response = await raw_exchange(t.port, chunked_under)
        assert response.status == 200
        assert json.loads(response.body)["size"] == 1000


async def _read_one_response(reader: asyncio.StreamReader) -> RawResponse:
    """One response framed by Content-Length (the bridge may keep reading a refused body a while before closing)."""
    head = await reader.readuntil(b"\r\n\r\n")
    response = parse_response(head)
    response.body = await reader.readexactly(int(response.header("Content-Length") or 0))
    return response


async def _wait_seen(t, path: str) -> None:  # type: ignore[no-untyped-def]
    while not any(s.raw_path == path for s in t.home.seen):
        await asyncio.sleep(0.02)


# Concurrent streams: per tunnel, per agent connection.


async def test_a_tunnel_at_max_streams_per_tunnel_answers_503_busy_with_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    """Two hanging requests fill a tunnel limited to two; the third is told the tunnel is busy."""
    async with home_tunnel(max_streams_per_tunnel=2) as t:
        hanging = [asyncio.create_task(http.get(t.url + "/hang")) for _ in range(2)]
        try:
            async with asyncio.timeout(10):
                while sum(s.raw_path == "/hang" for s in t.home.seen) < 2:
                    await asyncio.sleep(0.02)
            async with http.get(t.url + "/third") as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
                text = await response.text()
                assert "busy" in text and "no agent" not in text
        finally:
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
        async with asyncio.timeout(10):
            while any(c.streams for c in t.bridge.registry.connections()):
                await asyncio.sleep(0.02)
        await _still_relays(http, t.url)
        assert not any(s.raw_path == "/third" for s in t.home.seen)


async def test_an_agent_at_its_own_stream_limit_makes_the_bridge_answer_busy_not_no_agent(
    http: aiohttp.ClientSession,
) -> None:
    """A raw agent announcing max_streams=1: the second visitor gets 503 busy, not "no agent is connected"."""
    async with asyncio.timeout(30), running_bridge() as bridge:
        ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
        async with ws_connect(ws_url, additional_headers=agent_headers("home")) as raw:
            await raw.recv()  # the bridge's HELLO
            await raw.send(hello_frame(agent_id="raw-agent", max_streams=1))
            await wait_for_tunnel(bridge, "home", 1)
            first = asyncio.create_task(http.get(bridge.url + "/first"))
            try:
                while not any(f.type is FrameType.OPEN for f in iter_frames(await raw.recv(), 1 << 20)):
                    pass  # the first visitor's stream arrives, and stays unanswered
                async with http.get(bridge.url + "/second") as response:
                    assert response.status == 503
                    assert response.headers["Retry-After"] == "1"
                    assert "busy" in await response.text()
            finally:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)


# Agents: pending handshakes, frames, streams.


async def test_agents_over_max_pending_handshakes_get_503_before_the_upgrade_logged_once(
    caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """Two silent agents fill a limit of two; three more get 503 (one log line); then one can connect again."""
    caplog.set_level(logging.WARNING, "rproxy.bridge")
    async with asyncio.timeout(30), running_bridge(max_pending_handshakes=2) as bridge:
        ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
        silent = [ws_connect(ws_url, additional_headers=agent_headers("home", f"mute-{i}")) for i in range(2)]
        held = [await s.__aenter__() for s in silent]
        try:
            for i in range(3):
                async with http.get(
                    bridge.url + CONNECT,
                    headers={
                        **agent_headers("home", f"late-{i}"),
                        "Connection": "Upgrade",
                        "Upgrade": "websocket",
                        "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    },
                ) as response:
                    assert response.status == 503
                    assert response.headers["Retry-After"] == "5"
            refusals = [r for r in caplog.records if "in their handshake" in r.getMessage()]
            assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
        finally:
            for s in silent:
                await s.__aexit__(None, None, None)
        assert held
        async with asyncio.timeout(10):
            while bridge._agents.handshaking():
                await asyncio.sleep(0.02)
        assert any("backlog cleared; 3 agent(s)" in r.getMessage() for r in caplog.records)
        async with ws_connect(ws_url, additional_headers=agent_headers("home", "on-time")) as raw:
            await raw.recv()
            await raw.send(hello_frame(agent_id="on-time"))
            await wait_for_tunnel(bridge, "home", 1)


def _open_frame(stream_id: int) -> bytes:
    payload = RequestHead(method="GET", target="/", headers=[], kind="http", request_id="x").encode()
    return encode_header(FrameType.OPEN, Flags.FIN, stream_id, len(payload)) + payload


@pytest.mark.parametrize(
    ("attack", "logged"),
    [
        # A WebSocket message over the tunnel's receive limit (4 MiB).
        (lambda: b"\x00" * (5 << 20), "exceeds limit"),
        # One frame claiming more than the 256 KiB frame limit.
        (lambda: encode_header(FrameType.DATA, 0, 1, 300 << 10) + b"d" * (300 << 10), "protocol error by peer"),
        # A stream the bridge never asked for.
        (lambda: _open_frame(2), "opened a stream"),
    ],
    ids=["oversized-message", "oversized-frame", "agent-opened-stream"],
)
async def test_a_misbehaving_agent_is_cut_off_with_a_logged_reason(
    attack,
    logged: str,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    caplog.set_level(logging.WARNING, "rproxy")
    async with asyncio.timeout(30), running_bridge() as bridge:
        ws_url = bridge.url.replace("http", "ws", 1) + CONNECT
        async with ws_connect(ws_url, additional_headers=agent_headers("home"), max_size=None) as raw:
            await raw.recv()
            await raw.send(hello_frame(agent_id="raw-agent"))
            await wait_for_tunnel(bridge, "home", 1)
            with contextlib.suppress(websockets.ConnectionClosed):  # the bridge may hang up mid-message
                await raw.send(attack())
            goaway = await goaway_before_close(raw)
            assert raw.close_code in (1002, 1009), raw.close_code
            if goaway is not None:
                assert goaway[0] != ErrorCode.NO_ERROR
        await wait_for_tunnel(bridge, "home", 0)

        def reasons() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if logged in r.getMessage() and "home/raw-agent" in r.getMessage()
            ]

        async with asyncio.timeout(5):  # the line comes as the agent's handler ends, just after the tunnel is gone
            while not reasons():
                await asyncio.sleep(0.02)
        assert not any(r.exc_info for r in caplog.records)


# The handler class stays the one the bridge installed (private aiohttp hooks still fit).


async def test_visitor_connections_use_the_guarded_protocol() -> None:
    async with running_bridge() as bridge:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        try:
            await asyncio.sleep(0.1)
            server = bridge._runner.server  # type: ignore[union-attr]
            assert server is not None and server.connections
            assert all(isinstance(c, GuardedRequestHandler) for c in server.connections)
        finally:
            writer.close()
        del reader


# Settings: flags, environment, config file; one-line errors.


def _settings(*argv: str, env: dict[str, str] | None = None) -> BridgeConfig:
    args = _build_parser().parse_args(["bridge", "--token", TOKEN, *argv])
    return bridge_settings(args, env or {}).config


def test_limit_settings_come_from_flags_environment_and_file_with_sizes_in_k_and_m(tmp_path: Path) -> None:
    defaults = _settings()
    assert (defaults.max_body_size, defaults.max_streams_per_tunnel) == (None, None)
    assert (defaults.header_timeout, defaults.idle_timeout, defaults.max_pending_handshakes) == (10.0, 75.0, 64)

    config = _settings(
        "--max-body-size",
        "10M",
        "--header-timeout",
        "2.5",
        "--idle-timeout",
        "30",
        "--max-streams-per-tunnel",
        "100",
        "--max-pending-handshakes",
        "8",
    )
    assert config.max_body_size == 10 << 20
    assert (config.header_timeout, config.idle_timeout) == (2.5, 30.0)
    assert (config.max_streams_per_tunnel, config.max_pending_handshakes) == (100, 8)

    assert _settings(env={"RPROXY_MAX_BODY_SIZE": "512K"}).max_body_size == 512 << 10
    assert _settings(env={"RPROXY_MAX_BODY_SIZE": "1000"}).max_body_size == 1000
    file = tmp_path / "bridge.yaml"
    file.write_text("max_body_size: 1G\nmax-streams-per-tunnel: 7\nheader_timeout: 4\n")
    from_file = _settings("--config", str(file), env={"RPROXY_HEADER_TIMEOUT": "3"})
    assert (from_file.max_body_size, from_file.max_streams_per_tunnel) == (1 << 30, 7)
    assert from_file.header_timeout == 3.0  # the environment beats the file


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--max-body-size", "ten megs"], {}, "--max-body-size"),
        (["--max-body-size", "0"], {}, "--max-body-size"),
        ([], {"RPROXY_MAX_STREAMS_PER_TUNNEL": "-3"}, "$RPROXY_MAX_STREAMS_PER_TUNNEL"),
        (["--header-timeout", "0"], {}, "--header-timeout"),
        (["--idle-timeout", "soon"], {}, "--idle-timeout"),
        (["--max-pending-handshakes", "1.5"], {}, "--max-pending-handshakes"),
        (["--max-websockets-per-visitor", "0"], {}, "--max-websockets-per-visitor"),
        ([], {"RPROXY_MAX_REQUESTS_PER_VISITOR": "many"}, "$RPROXY_MAX_REQUESTS_PER_VISITOR"),
        (["--max-pending-handshakes-per-credential", "-1"], {}, "--max-pending-handshakes-per-credential"),
    ],
)
def test_a_bad_limit_is_one_line_naming_its_flag_and_exit_code_2(
    argv: list[str], env: dict[str, str], named: str
) -> None:
    result = rproxy("bridge", "--token", TOKEN, "--check-config", "/dev/null", *argv, env=clean_env(**env))
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"rproxy bridge: error: {named}: ")


def test_every_limit_is_restart_only_on_reload() -> None:
    """A SIGHUP does not apply them (the server was built with them): the reload must say so."""
    from rproxy_core.cli import bridge as bridge_cli

    for key in (
        "max_body_size",
        "header_timeout",
        "idle_timeout",
        "max_streams_per_tunnel",
        "max_pending_handshakes",
        "max_pending_handshakes_per_source",
        "max_pending_handshakes_per_credential",
        "max_requests_per_visitor",
        "max_websockets_per_visitor",
    ):
        assert key in bridge_cli._RESTART_ONLY
        assert key in bridge_cli.BRIDGE_FLAGS and key in bridge_cli.BRIDGE_ENV
