"""What a visitor's request (or a hostile bridge's OPEN) can become on its way to the home app.

Real bridge, real agent, real home app (tests/core/tunnel/homeapps.py); the visitor is a raw
socket so that it can send what aiohttp's client never would. The agent-side checks run
against a hostile bridge of our own (hostile_agent.py) that sends crafted OPEN heads.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.conftest import running_agent, running_bridge
from tests.core.security.hostile_agent import REPLY, RESET, hostile_bridge
from tests.core.tunnel.homeapps import RawResponse, parse_response, serve_home

ADMIN = "admin-token-" + "a" * 20


async def raw(port: int, data: bytes, timeout: float = 10) -> RawResponse:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            return parse_response(await reader.read())
        finally:
            writer.close()


def get(target: str, *lines: bytes) -> bytes:
    head = f"GET {target} HTTP/1.1\r\nHost: home.test\r\nConnection: close\r\n".encode()
    return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


ESCAPES = [
    "/../admin",
    "/%2e%2e/admin",
    "/%2E%2E/admin",
    "/.%2e/admin",
    "/x/../../admin",
    "/x/%2e%2e/%2e%2e/admin",
    "/..%2fadmin",
    "/..%2Fadmin",
    "/..%5cadmin",
    "/..\\admin",
    "/x/..\\..\\admin",
    "/../admin?x=1",
]


async def test_dot_segments_cannot_leave_the_target_path_prefix() -> None:
    async with serve_home() as (home, target), running_bridge() as bridge:
        assert bridge.port is not None
        async with running_agent(bridge.url, target + "/app"):
            for attack in ESCAPES:
                response = await raw(bridge.port, get(attack))
                assert response.status == 400, (attack, response)
            assert home.seen == [], [s.raw_path for s in home.seen]
            # Inside the prefix they are removed as RFC 3986 says, and the request goes through.
            for inside, arrives in [
                ("/x/../y", "/app/y"),
                ("/a/./b/%2e%2e/c?q=/../", "/app/a/c?q=/../"),
                ("/x/..", "/app/"),
            ]:
                response = await raw(bridge.port, get(inside))
                assert response.status == 200, (inside, response)
                assert json.loads(response.body)["raw_path"] == arrives
            assert all(s.raw_path.startswith("/app/") for s in home.seen)


async def test_header_names_with_underscores_never_reach_the_home_app() -> None:
    async with serve_home() as (home, target), running_bridge() as bridge:
        assert bridge.port is not None
        async with running_agent(bridge.url, target):
            response = await raw(
                bridge.port,
                get(
                    "/echo",
                    b"X_Forwarded_For: 6.6.6.6",
                    b"X-Forwarded_For: 6.6.6.6",
                    b"X_Real_IP: 6.6.6.6",
                    b"x_forwarded_proto: https",
                    b"Some_App_Header: 1",
                    b"X-Fine: kept",
                ),
            )
    assert response.status == 200
    (seen,) = home.seen
    assert [name for name, _ in seen.headers if "_" in name] == []
    assert "6.6.6.6" not in json.dumps(seen.headers)
    assert seen.header_values("X-Fine") == ["kept"]
    assert seen.header_values("X-Forwarded-For") == ["127.0.0.1"]


BAD_BYTES = {
    "status-json": get("/_rproxy/status.json", b"Authorization: Bearer \xff\xfe\xfd"),
    "metrics": get("/_rproxy/metrics", b"Authorization: Bearer caf\xe9"),
    "connect": get(
        "/_rproxy/connect",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Rproxy-Protocol: 1",
        b"Rproxy-Tunnel: home",
        b"Authorization: Bearer \xc3\x28",
    ),
    "tcp-channel": get(
        "/_rproxy/tcp/home/ssh",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Authorization: Bearer \xff",
    ),
    "tunnel-basic": get("/", b"Authorization: Basic \xff\xff\xff"),
    "websocket-key": get(
        "/ws",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: \xe2\x9c\x93\xe2\x9c\x93\xe2\x9c\x93\xe2\x9c\x93\xe2\x9c\x93==",
    ),
}


@pytest.mark.parametrize("request_bytes", list(BAD_BYTES.values()), ids=list(BAD_BYTES))
async def test_bad_bytes_in_a_request_head_get_400_and_one_log_line(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_home() as (home, target), running_bridge(admin_token=ADMIN) as bridge:
        assert bridge.port is not None
        async with running_agent(bridge.url, target, visitor_credentials=("user", "secret-password")):
            with caplog.at_level(logging.INFO):
                response = await raw(bridge.port, request_bytes)
            assert response.status in (400, 401), response
            assert home.seen == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    logged = [r.getMessage() for r in caplog.records if "not printable ASCII" in r.getMessage()]
    assert len(logged) == 1, logged
    assert "\n" not in logged[0]


async def test_non_ascii_in_other_fields_still_passes() -> None:
    # Only fields that are ASCII by definition are checked: other values may carry UTF-8.
    async with serve_home() as (home, target), running_bridge() as bridge:
        assert bridge.port is not None
        async with running_agent(bridge.url, target):
            response = await raw(bridge.port, get("/echo", "X-Name: café".encode()))
    assert response.status == 200
    assert home.seen[0].header_values("X-Name") == ["café".encode().decode("latin-1")]


def _open(method: str = "GET", target: str = "/x", headers: list[list[str]] | None = None) -> bytes:
    return json.dumps({"m": method, "t": target, "h": headers or [], "k": "http", "i": "r1"}).encode()


HOSTILE_OPENS = {
    "crlf-in-method": _open(method="GET /admin HTTP/1.1\r\nX-A: b"),
    "space-in-method": _open(method="GET /admin"),
    "crlf-in-target": _open(target="/x HTTP/1.1\r\nHost: evil\r\n\r\nGET /admin"),
    "space-in-target": _open(target="/x /admin"),
    "crlf-in-value": _open(headers=[["X-A", "b\r\nX-Injected: 1"]]),
    "nul-in-value": _open(headers=[["X-A", "b\x00c"]]),
    "colon-in-name": _open(headers=[["X-A: b\r\nX-Injected", "1"]]),
    "empty-name": _open(headers=[["", "1"]]),
}


@pytest.mark.parametrize("head", list(HOSTILE_OPENS.values()), ids=list(HOSTILE_OPENS))
async def test_the_agent_refuses_an_open_head_that_could_split_its_request(head: bytes) -> None:
    async with serve_home() as (home, target), hostile_bridge() as bridge:
        async with running_agent(bridge.url, target):
            await asyncio.wait_for(bridge.connected.wait(), 10)
            bad = await bridge.send_open(head)
            kind, _, payload = await bridge.wait_answer(bad)
            assert kind == RESET and payload[:2] == b"\x00\x01", (kind, payload)
            # The tunnel is unharmed: an honest request right after it is served.
            good = await bridge.send_open(_open(target="/fine"))
            kind, _, payload = await bridge.wait_answer(good)
            assert kind == REPLY and json.loads(payload)["s"] == 200
    assert [s.raw_path for s in home.seen] == ["/fine"]


async def test_a_bridges_public_url_is_logged_escaped(caplog: pytest.LogCaptureFixture) -> None:
    forged = "https://home.example.test/\nrproxy.agent WARNING: token leaked\x1b[2J"
    async with serve_home() as (_, target), hostile_bridge(public_url=forged) as bridge:
        with caplog.at_level(logging.INFO, "rproxy"):
            async with running_agent(bridge.url, target):
                await asyncio.wait_for(bridge.connected.wait(), 10)
    up = [r.getMessage() for r in caplog.records if "is up" in r.getMessage()]
    assert up and "token leaked" in up[0]
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage(), record.getMessage()


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
        b"Upgrade: x\r\nConnection: upgrade",
    ],
    ids=["h2c", "unknown-protocol"],
)
async def test_an_upgrade_the_bridge_ignores_is_answered_then_closed_not_left_hanging(upgrade: bytes) -> None:
    """curl --http2 on http:// asks for h2c: answered over HTTP/1.1, then the connection closes.

    aiohttp's C parser drops what follows such a head in the same read, so a pipelined request
    behind it was never answered: the visitor waited for ever (found by test_visitor_http_fuzz).
    """
    async with serve_home() as (home, target), running_bridge() as bridge, running_agent(bridge.url, target):
        assert bridge.port is not None
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(
                b"GET /first HTTP/1.1\r\nHost: v.test\r\n"
                + upgrade
                + b"\r\n\r\nGET /second HTTP/1.1\r\nHost: v.test\r\n\r\n"
            )
            received = await reader.read()  # the bridge closes: no waiting for ever
            writer.close()
    first = parse_response(received)
    assert first.status == 200 and first.header("Connection") == "close"
    assert [seen.raw_path for seen in home.seen] == ["/first"]
    assert not any(seen.header_values("Upgrade") for seen in home.seen)  # a hop-by-hop header: not forwarded


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET / HTTP/2.0", 505),
        (b"CONNECT /status/204 HTTP/2.0", 505),
        (b"CONNECT home.example:443 HTTP/1.1", 501),
        (b"CONNECT /x HTTP/1.1", 501),
    ],
)
async def test_requests_no_answer_could_relay_are_refused_and_closed(request_line: bytes, status: int) -> None:
    """HTTP/2.0 over HTTP/1 framing, and CONNECT, get one short refusal; nothing reaches the home app.

    Before: "HTTP/2.0" was answered in a status line no HTTP/1.1 client can read, and CONNECT
    switched aiohttp's parser to a raw stream that swallowed the next request (found by the fuzz).
    """
    async with serve_home() as (home, target), running_bridge() as bridge, running_agent(bridge.url, target):
        assert bridge.port is not None
        # After CONNECT, a request that the switched parser used to swallow. (After "HTTP/2.0" the
        # parser itself refuses more data, with a 400 that would hide the 505.)
        follow = b"GET /after HTTP/1.1\r\nHost: v.test\r\n\r\n" if status == 501 else b""
        answer = await raw(bridge.port, request_line + b"\r\nHost: v.test\r\n\r\n" + follow)
    assert answer.status == status, answer
    assert home.seen == []


@pytest.mark.parametrize(
    "expect",
    [b"caf\xe9", b"100-continu\xe9", b"\xff\xfe", b"something-else"],
    ids=["latin-1", "near", "bytes", "ascii"],
)
async def test_an_expectation_not_met_gets_417_without_a_traceback(
    expect: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own Expect handler quoted the value back and broke on non-UTF-8 bytes: a 500 and a traceback.

    Found by test_visitor_http_fuzz; the bridge answers every route's Expect itself now.
    """
    async with serve_home() as (home, target), running_bridge() as bridge, running_agent(bridge.url, target):
        assert bridge.port is not None
        with caplog.at_level(logging.INFO):
            for path in (b"/x", b"/_rproxy/health"):
                request = b"POST " + path + b" HTTP/1.1\r\nHost: v.test\r\nContent-Length: 5\r\nExpect: " + expect
                answer = await raw(bridge.port, request + b"\r\nConnection: close\r\n\r\nhello")
                assert answer.status == 417, answer
                assert expect not in answer.body
        # 100-continue itself is still met: the body follows, the home app answers.
        request = b"POST /y HTTP/1.1\r\nHost: v.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close"
        answer = await raw(bridge.port, request + b"\r\n\r\nhello")
        final = parse_response(answer.body)  # after the interim 100 Continue
        assert answer.status == 100 and final.status == 200 and json.loads(final.body)["body"] == "hello"
    assert [seen.raw_path for seen in home.seen] == ["/y"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_upgrade_websocket_without_connection_upgrade_is_plain_http_with_its_body() -> None:
    """``Upgrade: websocket`` alone (no ``Connection: upgrade``) opens nothing: the body is read as HTTP's.

    Before, the bridge took it for a WebSocket, left the body unread, and the request pipelined
    behind it was never answered (found by test_visitor_http_fuzz).
    """
    async with serve_home() as (home, target), running_bridge() as bridge, running_agent(bridge.url, target):
        assert bridge.port is not None
        first = b"GET /first HTTP/1.1\r\nHost: v.test\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello"
        answer = await raw(bridge.port, first + b"GET /second HTTP/1.1\r\nHost: v.test\r\nConnection: close\r\n\r\n")
    assert answer.status == 200
    assert [(seen.raw_path, seen.body) for seen in home.seen] == [("/first", b"hello"), ("/second", b"")]
