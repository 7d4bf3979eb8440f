"""A hostile agent cannot make the bridge write anything but well-formed responses.

The agent here is our own small one (hostile_agent.py) speaking the tunnel protocol to a real
bridge; the visitor is a raw socket on a keep-alive connection that sends its next request
right behind the first. If a reply's bytes ever leak past the end of its response (a body
after a 204, more than Content-Length), the visitor reads them as the answer to its *next*
request: that is the desync this file guards against.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.conftest import running_bridge

from tests.core.security.hostile_agent import GOAWAY, code_and_reason, data, frame, hostile_agent, reply, until

#: A complete response disguised as body bytes: if a visitor ever reads it, the desync worked.
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nSet-Cookie: stolen=1\r\n\r\nSMUGGLED"
SECOND = b"second-answer"


def answers(first: Any) -> Any:
    """The hostile agent's behaviour: ``first(stream)`` for /first, an honest answer for /second."""

    def answer(stream: int, head: dict[str, Any]) -> bytes:
        if head["t"] == "/first":
            return first(stream)  # type: ignore[no-any-return]
        return reply(stream, 200, [["Content-Length", str(len(SECOND))]]) + data(stream, SECOND, fin=True)

    return answer


async def keep_alive_pair(port: int, method: str = "GET", timeout: float = 10) -> bytes:
    """Two requests pipelined on one keep-alive connection; everything the bridge sent back, to EOF."""
    request = (
        f"{method} /first HTTP/1.1\r\nHost: home.test\r\n\r\n"
        "GET /second HTTP/1.1\r\nHost: home.test\r\nConnection: close\r\n\r\n"
    ).encode()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()


def responses(received: bytes) -> list[bytes]:
    """The status lines in what a visitor received (each response starts with one)."""
    return [line for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.")]


BODYLESS = {
    # (visitor's method, status the agent answers /first with)
    "head": ("HEAD", 200),
    "204": ("GET", 204),
    "304": ("GET", 304),
    "100": ("GET", 100),
    "103": ("GET", 103),
}


@pytest.mark.parametrize(("method", "status"), list(BODYLESS.values()), ids=list(BODYLESS))
async def test_a_body_where_none_may_be_is_never_written_and_cannot_desync_the_connection(
    method: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    # No FIN after the smuggled bytes: the stream stays open, so the bridge's RESET shows.
    answer = answers(lambda s: reply(s, status, [["Content-Length", str(len(SMUGGLED))]]) + data(s, SMUGGLED))
    async with running_bridge() as bridge, hostile_agent(bridge.url, answer) as agent:
        assert bridge.port is not None
        with caplog.at_level(logging.WARNING, "rproxy"):
            received = await keep_alive_pair(bridge.port, method)
        assert SMUGGLED not in received and b"stolen" not in received and b"SMUGGLED" not in received, received
        statuses = responses(received)
        # The first answer is the reply's head (or a 502 for a 1xx), and the second request,
        # if this connection was kept at all, gets its own answer.
        assert statuses, received
        assert not statuses[0].startswith(b"HTTP/1.1 200") or method == "HEAD", received
        assert len(statuses) == 1 or received.endswith(SECOND), received
        code, reason = await agent.wait_reset(agent.stream_for("/first"))
        assert code == 0x01 and ("body" in reason or "unrelayable" in reason), (code, reason)
        logged = [r.getMessage() for r in caplog.records if "stream reset" in r.getMessage()]
        assert len(logged) == 1, logged


async def test_a_body_longer_than_its_content_length_is_cut_and_the_connection_closed() -> None:
    answer = answers(lambda s: reply(s, 200, [["Content-Length", "5"]]) + data(s, b"hello" + SMUGGLED))
    async with running_bridge() as bridge, hostile_agent(bridge.url, answer) as agent:
        assert bridge.port is not None
        received = await keep_alive_pair(bridge.port)
        assert b"SMUGGLED" not in received
        assert received.endswith(b"\r\n\r\nhello"), received
        assert (await agent.wait_reset(agent.stream_for("/first")))[0] == 0x01


async def test_a_body_shorter_than_its_content_length_closes_the_connection() -> None:
    # The agent promises 100 bytes and ends after 5: had the bridge kept the connection, the
    # visitor would take the second answer's bytes as the rest of the first body.
    answer = answers(lambda s: reply(s, 200, [["Content-Length", "100"]]) + data(s, b"short", fin=True))
    async with running_bridge() as bridge, hostile_agent(bridge.url, answer):
        assert bridge.port is not None
        received = await keep_alive_pair(bridge.port)
        assert received.endswith(b"\r\n\r\nshort"), received
        assert len(responses(received)) == 1, received


HEADS = {
    "crlf-in-value": reply(1, 200, [["X-Evil", "a\r\nSet-Cookie: pwned=1"]], fin=True),
    "lf-in-value": reply(1, 200, [["X-Evil", "a\nSet-Cookie: pwned=1"]], fin=True),
    "nul-in-value": reply(1, 200, [["X-Evil", "a\x00pwned"]], fin=True),
    "colon-in-name": reply(1, 200, [["Set-Cookie: pwned=1\r\nX", "y"]], fin=True),
    "space-in-name": reply(1, 200, [["X Evil", "pwned"]], fin=True),
    "crlf-in-reason": reply(1, 200, [], reason="OK\r\nSet-Cookie: pwned=1", fin=True),
    "two-lengths": reply(1, 200, [["Content-Length", "1"], ["Content-Length", "2"]], fin=True),
    "bad-length": reply(1, 200, [["Content-Length", "+5"]], fin=True),
}


@pytest.mark.parametrize("head", list(HEADS.values()), ids=list(HEADS))
async def test_a_reply_head_that_could_split_the_response_gets_502_and_an_access_line(
    head: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bridge(access_log=True) as bridge, hostile_agent(bridge.url, lambda s, h: head):
        assert bridge.port is not None
        with caplog.at_level(logging.INFO, "rproxy"):
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: home.test\r\nConnection: close\r\n\r\n")
                received = await reader.read()
                writer.close()
        assert received.startswith(b"HTTP/1.1 502 "), received
        assert b"pwned" not in received
        access = [r.getMessage() for r in caplog.records if r.name == "rproxy.access"]
        assert len(access) == 1 and " 502 " in access[0], access


async def test_a_goaway_reason_is_logged_escaped(caplog: pytest.LogCaptureFixture) -> None:
    forged = "bye\nrproxy.bridge WARNING: admin logged in\x1b[2J\x1b]0;owned\x07"
    async with running_bridge() as bridge, hostile_agent(bridge.url, lambda s, h: b"") as agent:
        with caplog.at_level(logging.INFO, "rproxy"):
            await agent.send(frame(GOAWAY, 0, code_and_reason(0, forged)))
            await until(lambda: not bridge.registry.tunnels())
            await until(lambda: any("goodbye" in r.getMessage() for r in caplog.records))
    messages = [r.getMessage() for r in caplog.records]
    assert any("admin logged in" in m for m in messages)
    for message in messages:
        assert "\n" not in message and "\x1b" not in message and "\x07" not in message, message
