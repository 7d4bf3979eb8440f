"""Fuzzing the visitor-facing HTTP path: whatever a visitor's script sends, every answer is sound HTTP.

Real bridge, real agent, real aiohttp home app on 127.0.0.1; the visitor is a raw socket sending
generated requests: odd methods, targets that climb (`..`, `%2e`, `%2f`), absolute and huge targets,
header names and values with bad bytes, folded and colon-less lines, body framing of every kind
(length, chunked with extensions and trailers, both at once, broken lengths), upgrades, pipelining.
h11 — an HTTP/1.1 parser independent of aiohttp's — reads what comes back.

Properties, per connection: every byte the bridge writes parses as HTTP/1.1 responses, one per
request in order, none truncated; no 500, and no 503/504 (the tunnel is idle, so those would be a
lie); a request answered 4xx by the bridge or agent never reached the home app; the bridge closes the
connection once asked (no hang). After the run: nothing logged at ERROR or with a traceback, and every
byte the memory budget counted is released.

Seeded and bounded like test_tunnel_fuzz.py: RPROXY_FUZZ_SEED picks the run, RPROXY_FUZZ_ROUNDS sets
the size (default 12, here 16 connections per round, a few seconds); docs/RELEASING.md has the long run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
from dataclasses import dataclass

import h11
import pytest

from tests.core.tunnel.homeapps import home_tunnel

SEED = int(os.environ.get("RPROXY_FUZZ_SEED", "1515"))
ROUNDS = int(os.environ.get("RPROXY_FUZZ_ROUNDS", "12"))
CONNECTIONS = ROUNDS * 16

CLEAN_METHODS = [b"GET"] * 6 + [b"POST"] * 3 + [b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]
ODD_METHODS = [b"TRACE", b"CONNECT", b"PROPFIND", b"BREW", b"get", b"G\x00T", b"GE(T", b"", b"\xc3\xa9"]
CLEAN_TARGETS = [b"/", b"/a/b?c=d", b"/id/7", b"/status/204", b"/status/304", b"/status/418", b"/x/./y/../z"]
ODD_TARGETS = [
    b"/../etc/passwd",
    b"/%2e%2e/admin",
    b"/x/%2F..%2F..%2Fy",
    b"/x/..%5c..%5cy",
    b"/x\\..\\..\\y",
    b"//double//slash",
    b"*",
    b"http://other.example/absolute",
    b"/" + b"a" * 9000,
    b"/sp ace",
    b"/%zz%",
    b"/\xc3\xa9t\xc3\xa9",
    b"/\x7f",
    b"/\x00nul",
    b"/?" + b"q=" * 2000,
    b"/_rproxy/health",
    b"/_rproxy/../x",
    b"/_rproxy/status.json",
    b"",
]
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/0.9", b"http/1.1", b"HTTP/1.10"]
NAMES = [
    b"Accept",
    b"Cookie",
    b"User-Agent",
    b"X-Forwarded-For",
    b"Forwarded",
    b"X-Real-IP",
    b"Connection",
    b"Upgrade",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"Sec-WebSocket-Protocol",
    b"Authorization",
    b"Expect",
    b"TE",
    b"Trailer",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"Range",
    b"Accept-Encoding",
]
ODD_NAMES = [b"X_Forwarded_For", b"X-Forwarded_Proto", b"X_Real_IP", b"Proxy-Authorization", b"X-" + b"L" * 5000]
CLEAN_VALUES = [
    b"",
    b"x",
    b"a, b",
    b"keep-alive",
    b"close",
    b"upgrade",
    b"Upgrade, keep-alive",
    b"websocket",
    b"13",
    b"dGhlIHNhbXBsZSBub25jZQ==",
    b"100-continue",
    b"Basic Zm9vOmJhcg==",
    b"trailers",
    b"1.2.3.4",
    b"for=1.2.3.4;proto=https",
    b"bytes=0-0,-1",
    b"gzip, br, zstd",
]
ODD_VALUES = [b"Bearer \xff\xfe", b"a\x00b", b"\x1b[31mred", b"caf\xe9", b"x" * 9000, b"\t leading", b"trailing \t"]
BAD_LINES = [b"NoColon", b" folded continuation", b":empty-name", b"Na me: v", b"N\x00me: v", b"X-\xff: v"]


@dataclass
class Sent:
    """One generated request: its id, the method h11 must assume when reading the answer, its bytes."""

    fuzz_id: str
    head_method: bool
    upgrade: bool
    data: bytes


def _body_and_framing(rng: random.Random, odd: bool) -> tuple[list[bytes], bytes]:
    body = rng.randbytes(rng.choice([0, 1, 5, 100, 5000]))
    choice = rng.randrange(4, 8) if odd else rng.randrange(4)
    if choice == 0:
        return [], b""
    if choice == 1:
        return [b"Content-Length: %d" % len(body)], body
    if choice in (2, 3):
        chunks, rest = [], body
        while rest:
            size = rng.randrange(1, len(rest) + 1)
            extension = rng.choice([b"", b";a=b", b';name="q"'])
            chunks.append(b"%x%s\r\n%s\r\n" % (size, extension, rest[:size]))
            rest = rest[size:]
        trailer = rng.choice([b"", b"X-Trailer: t\r\n"])
        return [b"Transfer-Encoding: chunked"], b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"
    if choice == 4:  # both framings at once: two parsers could read different lengths
        return [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"], body
    if choice == 5:
        bad = rng.choice([b"+5", b"-1", b"5, 5", b"abc", b"0x10", b"99999999999999999999", b" 5 5"])
        return [b"Content-Length: " + bad], body
    if choice == 6:
        coding = rng.choice([b"chunked, identity", b"xchunked", b"identity", b"gzip", b"chunked\x00"])
        return [b"Transfer-Encoding: " + coding], b"0\r\n\r\n"
    return [b"Content-Length: 0", b"Content-Length: 0"], b""


def generate(rng: random.Random, fuzz_id: str) -> Sent:
    """A plausible request, and in about half of them one or two parts made hostile."""
    odd = set(rng.sample(["method", "target", "version", "host", "name", "value", "line", "framing"], 2))
    if rng.random() < 0.5:
        odd.clear()
    method = rng.choice(ODD_METHODS if "method" in odd else CLEAN_METHODS)
    target = rng.choice(ODD_TARGETS if "target" in odd else CLEAN_TARGETS)
    version = rng.choice(ODD_VERSIONS) if "version" in odd else b"HTTP/1.1"
    lines = [method + b" " + target + b" " + version]
    if "host" in odd:
        lines += rng.choice([[], [b"Host: v.test", b"Host: w.test"], [b"Host: \xff"], [b"Host: a b"]])
    else:
        lines.append(b"Host: v.test")
    lines.append(b"X-Fuzz-Id: " + fuzz_id.encode())
    names: list[bytes] = []
    for i in range(rng.randrange(0, 6)):
        name = rng.choice(ODD_NAMES) if "name" in odd and i == 0 else rng.choice(NAMES)
        value = rng.choice(ODD_VALUES) if "value" in odd and i == 0 else rng.choice(CLEAN_VALUES)
        names.append(name.lower())
        lines.append(name + b": " + value)
    if "line" in odd:
        lines.append(rng.choice(BAD_LINES))
    framing, body = _body_and_framing(rng, "framing" in odd)
    lines += framing
    headers = lines[1:]
    rng.shuffle(headers)  # header order is free; the request line stays first
    data = b"\r\n".join([lines[0], *headers]) + b"\r\n\r\n" + body
    return Sent(fuzz_id, method == b"HEAD", b"upgrade" in names, data)


def _closing_request(fuzz_id: str) -> Sent:
    data = b"GET /id/%s HTTP/1.1\r\nHost: v.test\r\nX-Fuzz-Id: %s\r\nConnection: close\r\n\r\n" % (
        (fuzz_id.encode(),) * 2
    )
    return Sent(fuzz_id, False, False, data)


@dataclass
class Answer:
    status: int
    body: bytes


def read_answers(sent: list[Sent], received: bytes) -> list[Answer]:
    """Parse ``received`` as the responses to ``sent``, in order, with h11; raise if any is malformed."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(received)
    client.receive_data(b"")
    answers: list[Answer] = []
    for request in sent:
        if client.our_state is not h11.IDLE:
            break
        method = b"HEAD" if request.head_method else b"GET"
        client.send(h11.Request(method=method, target="/", headers=[("Host", "v.test")]))
        client.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:  # a WebSocket took over: what follows is not HTTP
                    return [*answers, Answer(101, b"")]
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answers.append(Answer(status, body))
                break
            elif isinstance(event, h11.ConnectionClosed):
                return answers
            elif event is h11.NEED_DATA:
                raise AssertionError(f"a response was cut short after {len(answers)} whole ones")
            else:
                raise AssertionError(f"unexpected {event!r}")
        if client.their_state is h11.MUST_CLOSE:
            break
        client.start_next_cycle()
    return answers


async def exchange(port: int, requests: list[Sent], timeout: float = 20) -> bytes:
    """Send every request at once (pipelined), then read until the bridge closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(r.data for r in requests))
        await writer.drain()
        async with asyncio.timeout(timeout):  # the last request asks to close: waiting longer is a hang
            return await reader.read()
    except ConnectionResetError:
        return b""  # closed while unread bytes remained: what it wrote before is lost to us, not wrong
    finally:
        writer.close()


@pytest.mark.timeout(300)
async def test_generated_visitor_requests_get_sound_answers_and_harm_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(SEED)
    caplog.set_level(logging.INFO)
    statuses: dict[int, int] = {}
    async with home_tunnel() as tunnel:
        for connection in range(CONNECTIONS):
            sent = [generate(rng, f"{connection}-{i}") for i in range(rng.choice([1, 1, 1, 2, 3]))]
            sent.append(_closing_request(f"{connection}-end"))
            try:
                received = await exchange(tunnel.port, sent)
            except TimeoutError:
                raise AssertionError(f"connection {connection}: no close within 20 s after {sent!r}") from None
            seen_before = {value for s in tunnel.home.seen for value in s.header_values("X-Fuzz-Id")}
            try:
                answers = read_answers(sent, received)
            except (h11.RemoteProtocolError, AssertionError) as error:
                raise AssertionError(
                    f"connection {connection}: {error}; sent {sent!r}; got {received[:600]!r}"
                ) from error
            for request, answer in zip(sent, answers, strict=False):
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
                context = f"connection {connection}: {answer.status} {answer.body[:200]!r} for {request.data[:300]!r}"
                assert answer.status not in (500, 503, 504), context
                if answer.status == 502:
                    # The home app answers a WebSocket upgrade with a plain page: a bad gateway indeed.
                    assert request.upgrade, context
                from_home = request.fuzz_id in seen_before
                if 400 <= answer.status < 500 and answer.status != 418 and b"/status/4" not in request.data[:40]:
                    assert not from_home, context
        # The bridge is unharmed: its own page and the tunnel answer as before.
        probe = await exchange(tunnel.port, [_closing_request("probe")])
        assert [a.status for a in read_answers([_closing_request("probe")], probe)] == [200]
        assert statuses.get(200, 0) > CONNECTIONS / 4, statuses  # most connections got through the tunnel
        assert any(400 <= status < 500 for status in statuses), statuses
    gc.collect()
    assert tunnel.bridge.memory.used == 0
    problems = [r.getMessage() for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert not problems, problems
    logging.getLogger(__name__).info("visitor fuzz, %d connections: %s", CONNECTIONS, sorted(statuses.items()))
