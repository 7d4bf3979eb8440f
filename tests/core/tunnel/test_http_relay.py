"""HTTP relayed end to end: visitor → bridge → tunnel → agent → home app, and back.

Every test runs a real bridge, a real agent and a real aiohttp home app on 127.0.0.1, and
checks what the home app received as well as what the visitor got.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
from homeapps import HomeApp, home_tunnel, raw_exchange
from yarl import URL


async def _echo(session: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: object) -> dict:
    async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status == 200, await response.text()
        return await response.json()


def _only_request(home: HomeApp):  # type: ignore[no-untyped-def]
    assert len(home.seen) == 1, [s.raw_path for s in home.seen]
    return home.seen[0]


async def test_every_method_arrives_with_its_body_echoed(http: aiohttp.ClientSession) -> None:
    """GET, POST, PUT, PATCH, DELETE and OPTIONS reach the home app with their bodies."""
    async with home_tunnel() as t:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            body = f"{method} body \u00e9 {'x' * 3000}".encode()
            echoed = await _echo(http, method, t.url + "/echo", data=body)
            assert echoed["method"] == method
            assert echoed["body"].encode("latin-1") == body
        assert [s.method for s in t.home.seen] == ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def test_query_strings_and_percent_encoded_paths_arrive_unchanged(http: aiohttp.ClientSession) -> None:
    """The request target reaches the home app byte for byte: no decoding, no re-encoding.

    Only dot segments are removed (RFC 3986 §5.2.4; tests/core/security/test_request_hygiene.py
    has the ones that would climb out of the target and get 400).
    """
    targets = {
        "/search?q=a+b&q=c%20d&empty=&flag": None,
        "/files/a%20b/%2F/%E2%9C%93/x%2Fetc%2Fpasswd": None,
        "/p;matrix=1/%7Euser?x=%26y%3Dz&redirect=http%3A%2F%2Fexample.com%2F": None,
        "/UPPER/Case?Key=Value&key=value": None,
        "/a/./b/../c//d?path=/../x": "/a/c//d?path=/../x",
    }
    async with home_tunnel() as t:
        for target, arrives in targets.items():
            request = f"GET {target} HTTP/1.1\r\nHost: v.test\r\nConnection: close\r\n\r\n".encode()
            response = await raw_exchange(t.port, request)
            assert response.status == 200
            assert json.loads(response.body)["raw_path"] == (arrives or target)
        assert [s.raw_path for s in t.home.seen] == [arrives or target for target, arrives in targets.items()]


async def test_head_gets_the_content_length_but_no_body() -> None:
    """HEAD answers carry the home app's Content-Length and not one byte of body."""
    async with home_tunnel() as t:
        get = await raw_exchange(t.port, b"GET /gzip HTTP/1.1\r\nHost: v.test\r\nConnection: close\r\n\r\n")
        head = await raw_exchange(t.port, b"HEAD /gzip HTTP/1.1\r\nHost: v.test\r\nConnection: close\r\n\r\n")
        assert get.status == head.status == 200
        assert int(get.header("Content-Length") or -1) == len(get.body) > 0
        assert head.header("Content-Length") == get.header("Content-Length")
        assert head.header("Content-Encoding") == "gzip"
        assert head.body == b""
        assert [s.method for s in t.home.seen] == ["GET", "HEAD"]


async def test_204_and_304_answers_have_no_body() -> None:
    """No Content and Not Modified arrive with their headers and without a body."""
    async with home_tunnel() as t:
        for code in (204, 304):
            response = await raw_exchange(
                t.port, f"GET /status/{code} HTTP/1.1\r\nHost: v.test\r\nConnection: close\r\n\r\n".encode()
            )
            assert response.status == code
            assert response.body == b""
            assert response.header("Transfer-Encoding") is None
        assert (await raw_exchange(t.port, b"GET /status/304 HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n")).header(
            "ETag"
        ) == '"v1"'


async def test_chunked_request_body_arrives_whole(http: aiohttp.ClientSession) -> None:
    """An upload of unknown length (chunked) reaches the home app complete and in order."""
    parts = [f"chunk {i:04d} ".encode() * (i + 1) for i in range(200)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0)

    async with home_tunnel() as t:
        echoed = await _echo(http, "POST", t.url + "/echo", data=body())
        assert echoed["body"].encode("latin-1") == b"".join(parts)
        seen = _only_request(t.home)
        assert seen.header_values("Transfer-Encoding") == ["chunked"]  # the agent re-chunked it


async def test_response_without_content_length_arrives_whole(http: aiohttp.ClientSession) -> None:
    """A chunked response from the home app arrives complete, chunked to the visitor too."""
    expected = b"".join(f"part {i:03d};".encode() * 100 for i in range(50))
    async with home_tunnel() as t:
        async with http.get(t.url + "/chunked") as response:
            assert response.status == 200
            assert response.headers.get("Content-Length") is None
            assert response.headers.get("Transfer-Encoding") == "chunked"
            assert await response.read() == expected


async def test_duplicate_response_headers_both_arrive(http: aiohttp.ClientSession) -> None:
    """Two Set-Cookie headers from the home app reach the visitor as two headers."""
    async with home_tunnel() as t:
        async with http.get(t.url + "/cookies/set") as response:
            assert response.status == 200
            assert response.headers.getall("Set-Cookie") == ["session=visitor-a; Path=/", "theme=dark; Path=/"]


async def test_many_requests_reuse_one_visitor_connection() -> None:
    """Keep-alive works on the visitor's side: 20 requests, one TCP connection to the bridge."""
    created: list[object] = []
    reused: list[object] = []

    async def on_create(session: object, ctx: object, params: object) -> None:
        created.append(params)

    async def on_reuse(session: object, ctx: object, params: object) -> None:
        reused.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    trace.on_connection_reuseconn.append(on_reuse)
    async with home_tunnel() as t:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            for i in range(20):
                echoed = await _echo(session, "POST" if i % 2 else "GET", t.url + f"/keepalive/{i}", data=b"x" * i)
                assert echoed["raw_path"] == f"/keepalive/{i}"
        assert len(created) == 1
        assert len(reused) == 19
        assert [s.raw_path for s in t.home.seen] == [f"/keepalive/{i}" for i in range(20)]


async def test_hop_by_hop_headers_from_the_visitor_do_not_reach_the_home_app() -> None:
    """Connection, the headers it names, Keep-Alive, TE, Upgrade and friends stop at the bridge."""
    request = (
        b"GET /hop HTTP/1.1\r\n"
        b"Host: visitor.test\r\n"
        b"Connection: close, X-Custom, x-other\r\n"
        b"X-Custom: secret-to-this-hop\r\n"
        b"X-Other: also\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n"
    )
    async with home_tunnel() as t:
        response = await raw_exchange(t.port, request)
        assert response.status == 200
        seen = _only_request(t.home)
        names = {name.lower() for name, _ in seen.headers}
        for dropped in (
            "connection",
            "x-custom",
            "x-other",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-connection",
            "trailer",
        ):
            assert dropped not in names, seen.headers
        assert seen.header_values("X-End-To-End") == ["kept"]


async def test_forwarding_headers_are_the_bridges_own_and_visitor_values_are_replaced() -> None:
    """X-Forwarded-* describe the visitor's connection; spoofed ones never reach the home app."""
    request = (
        b"GET /fwd HTTP/1.1\r\n"
        b"Host: Visitor.Example:8443\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"Forwarded: for=6.6.6.6;proto=https\r\n"
        b"X-Real-IP: 6.6.6.6\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )
    async with home_tunnel() as t:
        assert (await raw_exchange(t.port, request)).status == 200
        seen = _only_request(t.home)
        assert seen.header_values("X-Forwarded-For") == ["127.0.0.1"]
        assert seen.header_values("X-Forwarded-Proto") == ["http"]
        assert seen.header_values("X-Forwarded-Host") == ["Visitor.Example:8443"]
        assert seen.header_values("Forwarded") == []
        assert seen.header_values("X-Real-IP") == []
        assert all("6.6.6.6" not in value for _, value in seen.headers)


async def test_host_header_is_preserved(http: aiohttp.ClientSession) -> None:
    """The home app sees the Host the visitor used, not the agent's target address."""
    async with home_tunnel() as t:
        for host in ("home.example.com", "home.example.com:8080", "[::1]:9"):
            echoed = await _echo(http, "GET", t.url + "/host", headers={"Host": host})
            assert echoed["host"] == host
        assert [s.header_values("Host") for s in t.home.seen] == [
            ["home.example.com"],
            ["home.example.com:8080"],
            ["[::1]:9"],
        ]


async def test_gzip_response_passes_through_byte_identical(http: aiohttp.ClientSession) -> None:
    """A compressed body is relayed as is, with its Content-Encoding: nobody decompresses it."""
    expected = gzip.compress(HomeApp.GZIP_PLAIN, mtime=0)
    async with home_tunnel() as t:
        async with http.get(t.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Length"] == str(len(expected))
            assert await response.read() == expected
        assert _only_request(t.home).header_values("Accept-Encoding") == ["gzip"]


async def test_the_agent_never_follows_a_redirect(http: aiohttp.ClientSession) -> None:
    """A 302 from the home app reaches the visitor as a 302 with its Location."""
    async with home_tunnel() as t:
        async with http.get(t.url + "/redirect", allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == "/redirected-here"
        assert [s.raw_path for s in t.home.seen] == ["/redirect"]


async def test_the_agent_keeps_no_cookies_between_visitors() -> None:
    """A cookie the home app set for visitor A never travels with visitor B's request."""
    async with home_tunnel() as t:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as visitor_a:
            async with visitor_a.get(t.url + "/cookies/set") as response:
                assert len(response.headers.getall("Set-Cookie")) == 2
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as visitor_b:
            echoed = await _echo(visitor_b, "GET", t.url + "/who-am-i")
        assert not any(name.lower() == "cookie" for name, _ in echoed["headers"])
        assert t.home.seen[-1].header_values("Cookie") == []
        # And a cookie the visitor does send is relayed as sent.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as visitor_c:
            echoed = await _echo(visitor_c, "GET", t.url + "/mine", headers={"Cookie": "session=c"})
        assert t.home.seen[-1].header_values("Cookie") == ["session=c"]


async def test_request_targets_cannot_steer_the_agent_away_from_its_target() -> None:
    """Network-path and absolute-form targets still land on the home app, as a path."""
    async with home_tunnel() as t:
        cases = [
            (b"GET //evil.example/x HTTP/1.1\r\nHost: v.test\r\n", "//evil.example/x"),
            (b"GET //127.0.0.1:1/y?z=1 HTTP/1.1\r\nHost: v.test\r\n", "//127.0.0.1:1/y?z=1"),
            (b"GET http://evil.example/abs?q=1 HTTP/1.1\r\nHost: v.test\r\n", "/abs?q=1"),
            (b"GET http://127.0.0.1:1/port HTTP/1.1\r\nHost: v.test\r\n", "/port"),
        ]
        for request, seen_path in cases:
            response = await raw_exchange(t.port, request + b"Connection: close\r\n\r\n")
            assert response.status == 200, (request, response)
            echoed = json.loads(response.body)
            assert echoed["raw_path"] == seen_path
            assert t.home.seen[-1].raw_path == seen_path
            # The request really came from the agent, over a connection to the home app's port.
            assert t.home.seen[-1].peer is not None and t.home.seen[-1].peer[0] == "127.0.0.1"
        assert len(t.home.seen) == len(cases)
        assert t.agent.requests_served == len(cases)


async def test_200_concurrent_requests_are_all_answered_correctly(http: aiohttp.ClientSession) -> None:
    """200 requests in flight at once through one agent each get their own answer."""
    async with home_tunnel() as t:

        async def one(i: int) -> SimpleNamespace:
            if i % 3 == 0:
                async with http.post(t.url + f"/echo/{i}", data=f"body {i}".encode() * (i + 1)) as response:
                    data = await response.json()
                    return SimpleNamespace(
                        status=response.status,
                        ok=data["body"] == f"body {i}" * (i + 1) and data["raw_path"] == f"/echo/{i}",
                    )
            async with http.get(t.url + f"/id/{i}?q=query-{i}") as response:
                data = await response.json()
                return SimpleNamespace(status=response.status, ok=data == {"n": str(i), "q": f"query-{i}"})

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one(i) for i in range(200)))
        assert [r.status for r in results] == [200] * 200
        assert all(r.ok for r in results)


async def test_server_sent_events_arrive_one_by_one(http: aiohttp.ClientSession) -> None:
    """Each SSE event reaches the visitor before the home app may send the next: no buffering."""
    async with home_tunnel() as t:
        events = t.home.sse_go
        async with asyncio.timeout(20):
            async with http.get(t.url + "/sse", headers={"Accept": "text/event-stream"}) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "text/event-stream"
                events[0].set()
                for i in range(len(events)):
                    block = b""
                    while not block.endswith(b"\n\n"):
                        line = await response.content.readline()
                        assert line, f"stream ended before event {i}"
                        block += line
                    assert block == f"id: {i}\ndata: event {i}\n\n".encode()
                    if i + 1 < len(events):
                        assert not events[i + 1].is_set()
                        events[i + 1].set()  # only now may the home app write the next event
                assert await response.content.read() == b""


async def test_long_poll_answered_after_two_seconds_arrives(http: aiohttp.ClientSession) -> None:
    """A response head that comes after 2 s, within the request timeout, is relayed."""
    async with home_tunnel(request_timeout=10.0) as t:
        async with asyncio.timeout(15):
            async with http.get(t.url + "/longpoll") as response:
                assert response.status == 200
                assert await response.text() == "long poll answered"


async def test_a_visitor_leaving_an_idle_event_stream_ends_the_home_apps_request(http: aiohttp.ClientSession) -> None:
    """When the visitor drops an SSE stream between events, the agent closes its request at once."""
    async with home_tunnel() as t:
        t.home.sse_go[0].set()
        async with asyncio.timeout(15):
            async with http.get(t.url + "/sse") as response:
                assert await response.content.readuntil(b"\n\n") == b"id: 0\ndata: event 0\n\n"
                response.close()  # leaves while the home app waits for its next event
            await t.home.handler_gone.wait()
            assert t.home.handler_outcome == "connection closed"
            while t.agent.active_streams or t.bridge.registry.connections()[0].streams:
                await asyncio.sleep(0.02)
