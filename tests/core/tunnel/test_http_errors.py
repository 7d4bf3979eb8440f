"""What visitors get when something is wrong: no agent, bad Host, dead or slow home app, bad requests.

Every error test ends by checking that the bridge is still healthy and still relays.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
import pytest
from homeapps import HomeApp, home_tunnel, raw_exchange, serve_home

from rproxy_core import Bridge
from tests.conftest import free_port, running_agent, running_bridge, wait_for_tunnel


async def assert_healthy(http: aiohttp.ClientSession, bridge: Bridge, tunnels: dict[str, int]) -> None:
    """/_rproxy/health answers 200 and lists exactly ``tunnels``."""
    async with http.get(bridge.url + "/_rproxy/health") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "ok"
    assert {name: info["agents"] for name, info in health["tunnels"].items()} == tunnels


@asynccontextmanager
async def named_homes(bridge: Bridge, *names: str) -> AsyncIterator[dict[str, HomeApp]]:
    """One home app and one agent (``AgentConfig.name``) per name, all connected to ``bridge``."""
    async with AsyncExitStack() as stack:
        homes = {}
        for name in names:
            home, target = await stack.enter_async_context(serve_home())
            await stack.enter_async_context(running_agent(bridge.url, target, name=name))
            await wait_for_tunnel(bridge, name)
            homes[name] = home
        yield homes


async def _path_seen_via(http: aiohttp.ClientSession, bridge: Bridge, host: str, path: str) -> int:
    async with http.get(bridge.url + path, headers={"Host": host}) as response:
        return response.status


# No agent, wrong Host, routing.


async def test_no_agent_connected_gives_503_with_retry_after(http: aiohttp.ClientSession) -> None:
    """With the bridge up and no agent, visitors get a short 503 with Retry-After."""
    async with running_bridge() as bridge:
        for host in ("home.example.com", "127.0.0.1", "anything"):
            async with http.get(bridge.url + "/page", headers={"Host": host}) as response:
                assert response.status == 503
                assert response.headers["Retry-After"].isdigit()
                body = await response.read()
                assert 0 < len(body) < 300
                assert b"Traceback" not in body
        await assert_healthy(http, bridge, {})


async def test_name_without_an_agent_under_the_domain_gives_503(http: aiohttp.ClientSession) -> None:
    """With a domain, a well-formed name whose agent is not connected gets 503, not 404."""
    async with running_bridge(domain="example.test") as bridge, named_homes(bridge, "alpha"):
        async with http.get(bridge.url + "/", headers={"Host": "beta.example.test"}) as response:
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
            assert len(await response.read()) < 300
        await assert_healthy(http, bridge, {"alpha": 1})


async def test_host_outside_the_domain_gives_404(http: aiohttp.ClientSession) -> None:
    """With --domain example.test, a visitor asking for other.test gets 404 (and no agent is asked)."""
    async with running_bridge(domain="example.test") as bridge, named_homes(bridge, "alpha") as homes:
        for host in ("other.test", "alpha.other.test", "example.test.evil", "notexample.test"):
            async with http.get(bridge.url + "/x", headers={"Host": host}) as response:
                assert response.status == 404, host
                assert len(await response.read()) < 300
        assert homes["alpha"].seen == []
        await assert_healthy(http, bridge, {"alpha": 1})


async def test_with_a_domain_each_name_reaches_its_own_home_app(http: aiohttp.ClientSession) -> None:
    """alpha.example.test reaches alpha's home app, beta.example.test:PORT reaches beta's."""
    async with running_bridge(domain="example.test") as bridge, named_homes(bridge, "alpha", "beta") as homes:
        port = bridge.port
        assert await _path_seen_via(http, bridge, "alpha.example.test", "/for-alpha") == 200
        assert await _path_seen_via(http, bridge, f"beta.example.test:{port}", "/for-beta") == 200
        assert await _path_seen_via(http, bridge, "ALPHA.Example.Test.", "/alpha-again") == 200
        # A service beta's agent does not offer: 404, and beta's main app sees nothing of it.
        assert await _path_seen_via(http, bridge, "svc.beta.example.test", "/beta-service") == 404
        assert [s.raw_path for s in homes["alpha"].seen] == ["/for-alpha", "/alpha-again"]
        assert [s.raw_path for s in homes["beta"].seen] == ["/for-beta"]
        assert homes["beta"].seen[0].host == f"beta.example.test:{port}"
        await assert_healthy(http, bridge, {"alpha": 1, "beta": 1})


async def test_without_a_domain_the_first_label_picks_the_tunnel(http: aiohttp.ClientSession) -> None:
    """Without a domain and with two tunnels, the Host's first label chooses; others get 404."""
    async with running_bridge() as bridge, named_homes(bridge, "alpha", "beta") as homes:
        assert await _path_seen_via(http, bridge, "alpha.my-vps.net", "/a") == 200
        assert await _path_seen_via(http, bridge, f"beta:{bridge.port}", "/b") == 200
        assert await _path_seen_via(http, bridge, "gamma.my-vps.net", "/nobody") == 404
        assert await _path_seen_via(http, bridge, "127.0.0.1", "/nobody") == 404
        assert [s.raw_path for s in homes["alpha"].seen] == ["/a"]
        assert [s.raw_path for s in homes["beta"].seen] == ["/b"]
        await assert_healthy(http, bridge, {"alpha": 1, "beta": 1})


async def test_a_single_tunnel_serves_any_host(http: aiohttp.ClientSession) -> None:
    """With one tunnel and no domain, every Host reaches it (the one-home case)."""
    async with running_bridge() as bridge, named_homes(bridge, "alpha") as homes:
        hosts = ["127.0.0.1", "my-vps.example.net", "beta.somewhere", f"localhost:{bridge.port}"]
        for i, host in enumerate(hosts):
            assert await _path_seen_via(http, bridge, host, f"/any/{i}") == 200
        assert [s.host for s in homes["alpha"].seen] == hosts
        await assert_healthy(http, bridge, {"alpha": 1})


# A broken or slow home app.


async def test_nothing_listening_on_the_target_gives_502(http: aiohttp.ClientSession) -> None:
    """When the agent's target port is closed, the visitor gets 502 quickly and the tunnel stays up."""
    async with running_bridge() as bridge, running_agent(bridge.url, f"http://127.0.0.1:{free_port()}"):
        async with asyncio.timeout(15):
            for _ in range(3):
                async with http.get(bridge.url + "/anything", data=b"a body too") as response:
                    assert response.status == 502
                    assert len(await response.read()) < 300
        await assert_healthy(http, bridge, {"home": 1})


async def test_home_app_closing_without_answering_gives_502(http: aiohttp.ClientSession) -> None:
    """A home app that drops the connection instead of answering makes a 502, not a hang."""
    async with home_tunnel() as t:
        async with asyncio.timeout(15):
            async with http.get(t.url + "/drop") as response:
                assert response.status == 502
                assert len(await response.read()) < 300
            echoed = await raw_exchange(t.port, b"GET /still-fine HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n")
            assert echoed.status == 200
        await assert_healthy(http, t.bridge, {"home": 1})


async def test_slow_home_app_gives_504_and_the_agent_abandons_the_request(http: aiohttp.ClientSession) -> None:
    """No response head within request_timeout: 504, and the home app sees its request closed."""
    async with home_tunnel(request_timeout=1.0) as t:
        async with asyncio.timeout(15):
            async with http.get(t.url + "/hang") as response:
                assert response.status == 504
                assert len(await response.read()) < 300
            assert t.home.handler_started.is_set()
            await t.home.handler_gone.wait()  # the agent closed its request to the home app
        assert t.home.handler_outcome in ("cancelled", "connection closed")
        async with asyncio.timeout(5):
            while t.agent.active_streams:
                await asyncio.sleep(0.02)
        await assert_healthy(http, t.bridge, {"home": 1})


async def test_home_app_breaking_off_a_body_cuts_the_visitors_response(http: aiohttp.ClientSession) -> None:
    """A body the home app breaks off never looks complete: the visitor's response is cut too."""
    async with home_tunnel() as t:
        for framing in ("length", "chunked"):
            async with asyncio.timeout(15), http.get(t.url + f"/break/{framing}") as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        await _still_relays(http, t)


async def test_a_visitor_who_gives_up_waiting_ends_the_home_apps_request(http: aiohttp.ClientSession) -> None:
    """A visitor that hangs up before the home app answered makes the agent close that request."""
    async with home_tunnel() as t:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                async with http.get(t.url + "/hang") as response:
                    await response.read()
        assert t.home.handler_started.is_set()
        async with asyncio.timeout(15):
            await t.home.handler_gone.wait()
            while t.agent.active_streams or t.bridge.registry.connections()[0].streams:
                await asyncio.sleep(0.02)
        assert t.home.handler_outcome == "connection closed"
        await _still_relays(http, t)


async def test_errors_are_json_when_the_visitor_accepts_json(http: aiohttp.ClientSession) -> None:
    """Accept: application/json gets a JSON error body with the status in it."""
    async with running_bridge(domain="example.test") as bridge:
        for host, status in (("home.example.test", 503), ("other.test", 404)):
            async with http.get(bridge.url + "/api", headers={"Host": host, "Accept": "application/json"}) as response:
                assert response.status == status
                assert response.content_type == "application/json"
                body = await response.json()
                assert body["status"] == status
                assert isinstance(body["error"], str) and body["error"]
    async with home_tunnel(request_timeout=1.0) as t:
        async with http.get(t.url + "/hang", headers={"Accept": "application/json"}) as response:
            assert response.status == 504
            assert (await response.json())["status"] == 504


# Garbage and oversized requests from visitors, over a raw socket.


async def test_garbage_request_line_gets_400_and_the_bridge_lives_on(http: aiohttp.ClientSession) -> None:
    """A request line that is not HTTP is answered 400; the tunnel keeps serving others."""
    async with home_tunnel() as t:
        for garbage in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"HELLO THERE\r\n\r\n",
            b"GET\r\n\r\n",
        ):
            response = await raw_exchange(t.port, garbage)
            assert response.status == 400
        assert t.home.seen == []
        await _still_relays(http, t)


async def test_oversized_header_line_gets_431_and_the_bridge_lives_on(http: aiohttp.ClientSession) -> None:
    """A 100 KB header line is refused with 431, a 100 KB request target with 414, before anything reaches the agent."""
    async with home_tunnel() as t:
        request = b"GET /big HTTP/1.1\r\nHost: v.test\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        response = await raw_exchange(t.port, request)
        assert response.status == 431
        assert b"a request header field is too large" in response.body
        long_target = b"GET /" + b"b" * 100_000 + b" HTTP/1.1\r\nHost: v.test\r\n\r\n"
        response = await raw_exchange(t.port, long_target)
        assert response.status == 414
        assert t.home.seen == []
        await _still_relays(http, t)


async def test_content_length_with_chunked_encoding_is_refused_with_400(http: aiohttp.ClientSession) -> None:
    """Both Content-Length and Transfer-Encoding (a smuggling attempt) get 400, never relayed."""
    async with home_tunnel() as t:
        request = (
            b"POST /smuggle HTTP/1.1\r\nHost: v.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: v.test\r\n\r\n"
        )
        response = await raw_exchange(t.port, request)
        assert response.status == 400
        assert t.home.seen == []
        await _still_relays(http, t)


async def _still_relays(http: aiohttp.ClientSession, t) -> None:  # type: ignore[no-untyped-def]
    async with http.post(t.url + "/after", data=b"normal") as response:
        assert response.status == 200
        assert json.loads(await response.read())["body"] == "normal"
    await assert_healthy(http, t.bridge, {"home": 1})
