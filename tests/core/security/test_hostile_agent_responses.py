"""A malicious agent cannot write onto a visitor's connection: responses are serialized.

Issue 15, finding 1: for HEAD, 1xx, 204 and 304 the bridge used to write whatever body bytes
the agent sent straight onto the visitor's connection, so a "body" holding a whole response
became the answer to the visitor's *next* request on that keep-alive connection (and behind a
proxy with upstream keep-alive, another tunnel's visitor's). Here a fake agent of our own
(tests/core/security/tunnel_peers.py, the wire protocol of docs/PROTOCOL.md over a real
WebSocket) answers a real bridge with each lie; a raw-socket visitor then asks again on the
same connection and must get its own answer, or a closed connection, never the smuggled one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from rproxy_core.protocol.frames import Flags, FrameType
from tests.conftest import running_bridge
from tests.core.security.tunnel_peers import RawAgent, frame, raw_agent, reply

#: What the agent hides in a body: if a visitor ever reads it, the attack worked.
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nSet-Cookie: stolen=1\r\n\r\nsmuggled!"
SECOND = b"second answer\n"


@dataclass
class Lie:
    method: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes


LIES = {
    "HEAD-with-body": Lie("HEAD", 200, [("Content-Length", str(len(SMUGGLED)))], SMUGGLED),
    "204-with-body": Lie("GET", 204, [], SMUGGLED),
    "304-with-body": Lie("GET", 304, [("ETag", '"x"')], SMUGGLED),
    "100-as-final": Lie("GET", 100, [], SMUGGLED),
    "103-as-final": Lie("GET", 103, [("Link", "</a.css>; rel=preload")], SMUGGLED),
    "longer-than-length": Lie("GET", 200, [("Content-Length", "5")], b"hello" + SMUGGLED),
    "shorter-than-length": Lie("GET", 200, [("Content-Length", "500")], b"hello"),
    "two-lengths": Lie("GET", 200, [("Content-Length", "5"), ("Content-Length", "79")], b"hello" + SMUGGLED),
    "bad-length": Lie("GET", 200, [("Content-Length", "+5")], b"hello" + SMUGGLED),
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool


def parse_answers(data: bytes, first_bodiless: bool) -> list[Answer]:
    """Split what the visitor read into responses, the way an HTTP/1.1 client frames them."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            answers.append(Answer(0, {}, data, False))
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        bodiless = (first_bodiless and not answers) or status in (204, 304) or status < 200
        length = 0 if bodiless else int(headers.get("content-length", "0"))
        answers.append(Answer(status, headers, rest[:length], len(rest) >= length))
        data = rest[length:]
    return answers


async def _answer_second(agent: RawAgent) -> None:
    """If the bridge relays the visitor's second request, answer it honestly."""
    sid, head = await agent.next_open(timeout=10)
    assert head.target == "/second"
    await agent.send(
        reply(sid, 200, [("Content-Length", str(len(SECOND)))]), frame(FrameType.DATA, sid, SECOND, Flags.FIN)
    )


async def _read_to_end(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except (TimeoutError, ConnectionError):
        pass
    return data


@pytest.mark.parametrize("split", [False, True], ids=["with-head", "after-head"])
@pytest.mark.parametrize("lie", list(LIES.values()), ids=list(LIES))
async def test_agent_bytes_never_become_the_next_response(
    lie: Lie, split: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "rproxy.bridge")
    async with running_bridge() as bridge, raw_agent(bridge, "home") as agent:
        port = urlsplit(bridge.url).port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"{lie.method} /first HTTP/1.1\r\nHost: home\r\n\r\n".encode())
            sid, _ = await agent.next_open()
            if split:
                # The body as a frame of its own, after the head (the bridge's streaming path).
                await agent.send(reply(sid, lie.status, lie.headers))
                await asyncio.sleep(0)
                await agent.send(frame(FrameType.DATA, sid, lie.body, Flags.FIN))
            else:
                await agent.send(reply(sid, lie.status, lie.headers) + frame(FrameType.DATA, sid, lie.body, Flags.FIN))
            # The visitor asks again on the same keep-alive connection.
            writer.write(b"GET /second HTTP/1.1\r\nHost: home\r\nConnection: close\r\n\r\n")
            second = asyncio.create_task(_answer_second(agent))
            data = await _read_to_end(reader)
            second.cancel()
        finally:
            writer.close()
    assert b"smuggled" not in data and b"stolen" not in data, data
    answers = parse_answers(data, lie.method == "HEAD")
    assert answers, "the visitor got no answer at all"
    first, later = answers[0], answers[1:]
    # Every lie ends the connection: nothing after the first answer, so nothing of the
    # agent's can be read as the answer to the second request.
    assert later == [], answers
    if lie.body == SMUGGLED or lie.status < 200 or "+5" in str(lie.headers) or len(lie.headers) > 1:
        # Found out before a byte was written: the visitor is told plainly.
        assert first.status == 502, answers
    else:
        assert first.status in (200, 502) and (first.status == 502 or not first.complete or len(first.body) == 5), (
            answers
        )
    # The bridge said why, on one line of its own.
    warnings = [r.getMessage() for r in caplog.records if r.name == "rproxy.bridge" and r.levelno >= logging.WARNING]
    assert any("agent" in m for m in warnings), warnings
    assert all("\n" not in m and "\r" not in m for m in warnings), warnings


#: Response heads no HTTP/1.1 message may carry: each would let the agent write a header
#: (or a response) of its own choosing.
BAD_HEADS = {
    "crlf-in-value": b'{"s":200,"r":"","h":[["X-A","b\\r\\nSet-Cookie: stolen=1"]]}',
    "lf-in-value": b'{"s":200,"r":"","h":[["X-A","b\\nSet-Cookie: stolen=1"]]}',
    "nul-in-value": b'{"s":200,"r":"","h":[["X-A","b\\u0000stolen"]]}',
    "space-in-name": b'{"s":200,"r":"","h":[["Set-Cookie: stolen=1\\r\\nX","v"]]}',
    "colon-in-name": b'{"s":200,"r":"","h":[["X:stolen","v"]]}',
    "crlf-in-reason": b'{"s":200,"r":"OK\\r\\nSet-Cookie: stolen=1","h":[]}',
    "esc-in-reason": b'{"s":200,"r":"OK\\u001b[2Jstolen","h":[]}',
    "bad-subprotocol-not-websocket": b'{"s":200,"r":"","h":[["Content-Length","0"],["Bad Name","v"]]}',
}


@pytest.mark.parametrize("head", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
async def test_invalid_response_heads_get_502_and_one_line(head: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "rproxy.bridge")
    async with running_bridge() as bridge, raw_agent(bridge, "home") as agent:
        port = urlsplit(bridge.url).port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /first HTTP/1.1\r\nHost: home\r\nConnection: close\r\n\r\n")
            sid, _ = await agent.next_open()
            await agent.send(frame(FrameType.REPLY, sid, head, Flags.FIN))
            data = await _read_to_end(reader)
        finally:
            writer.close()
        assert data.startswith(b"HTTP/1.1 502 "), data
        assert b"stolen" not in data, data
        # The tunnel itself is unharmed: the next visitor is served.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /second HTTP/1.1\r\nHost: home\r\nConnection: close\r\n\r\n")
            await _answer_second(agent)
            assert (await _read_to_end(reader)).endswith(SECOND)
        finally:
            writer.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "rproxy.bridge" and r.levelno >= logging.WARNING]
    assert len([m for m in warnings if "invalid answer" in m]) == 1, warnings
    assert all("\n" not in m and "\r" not in m and "\x1b" not in m for m in warnings), warnings
