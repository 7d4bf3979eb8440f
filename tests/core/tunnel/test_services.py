"""Several services on one agent connection: web apps by host name, TCP services through
channels (``/_rproxy/tcp/...``) and extra bridge ports, half-close, and the agent refusing
whatever it was not configured to serve.

Real bridge, real agent, real aiohttp home apps and real TCP servers, all on 127.0.0.1; the
channel client here is aiohttp's WebSocket client speaking the documented contract
(docs/PROTOCOL.md §8); ``rproxy tcp`` itself is tested in tests/core/channels/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_network

import aiohttp
import pytest
from aiohttp import WSMsgType

from rproxy_core import Agent, AgentConfig, ConfigError
from rproxy_core.bridge.auth import TokenGrant
from rproxy_core.bridge.config import TcpPort
from rproxy_core.bridge.routing import resolve_route
from rproxy_core.bridge.visitor_policy import VisitorPolicy
from rproxy_core.exceptions import StreamResetError
from rproxy_core.protocol import ErrorCode
from rproxy_core.protocol.heads import KIND_HTTP, KIND_TCP, KIND_WEBSOCKET, RequestHead
from tests.conftest import TOKEN, running_agent, running_bridge, text_app, wait_for_tunnel

CHANNEL = "/_rproxy/tcp"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def serving(bridge_url: str, bridge: object, target: str, services: dict[str, str]) -> AsyncIterator[Agent]:
    """A real agent offering ``services``, once the bridge lists its tunnel."""
    async with running_agent(bridge_url, target, services=services) as agent:
        await wait_for_tunnel(bridge)  # type: ignore[arg-type]
        yield agent


@dataclass
class TcpServer:
    """A TCP service on 127.0.0.1 that records what each connection did."""

    port: int = 0
    connections: int = 0
    received: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def digest_service() -> AsyncIterator[TcpServer]:
    """Reads to EOF, then answers the SHA-256 of it and the bytes reversed, then closes: a reply
    that can only come after the client's half-close."""
    record = TcpServer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.connections += 1
        data = await reader.read()
        record.received.append(data)
        writer.write(hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1])
        await writer.drain()
        writer.close()

    async with listening(handle, record):
        yield record


@asynccontextmanager
async def listening(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], record: TcpServer
) -> AsyncIterator[None]:
    """Serve ``handle`` on a free loopback port, noted in ``record``."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    record.port = server.sockets[0].getsockname()[1]
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def banner_service() -> AsyncIterator[TcpServer]:
    """Sends a banner and shuts its sending side at once, then reads what the client sends
    until the client's EOF: the other half-close direction."""
    record = TcpServer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.connections += 1
        writer.write(b"banner then silence")
        writer.write_eof()
        record.received.append(await reader.read())
        writer.close()

    async with listening(handle, record):
        yield record


def expected_digest_reply(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1]


async def channel_exchange(base: str, service: str, payload: bytes, *, tunnel: str = "home") -> bytes:
    """Open a channel, send ``payload`` in 64 KiB messages, half-close, read to the end."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{base}{CHANNEL}/{tunnel}/{service}", headers=BEARER, max_msg_size=0) as ws,
    ):
        for offset in range(0, len(payload), 64 << 10):
            await ws.send_bytes(payload[offset : offset + (64 << 10)])
        await ws.send_bytes(b"")
        received = bytearray()
        while True:
            message = await ws.receive(timeout=30)
            if message.type is not WSMsgType.BINARY:
                break
            if not message.data:
                continue  # the service's end of data; the bridge closes next
            received += message.data
        assert message.type is WSMsgType.CLOSE and message.data == 1000, message
        return bytes(received)


async def refusal(base: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """The HTTP status and body a channel upgrade is refused with."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            base + path,
            headers={
                **headers,
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as response,
    ):
        return response.status, await response.text()


def test_routes_name_a_tunnel_and_one_of_its_services() -> None:
    """``<service>.<tunnel>.<domain>``, the main app at ``<tunnel>.<domain>``, aliases first,
    and nothing deeper; without a domain the first or second label names the tunnel."""
    assert resolve_route("home.example.com", "example.com", ["home"]) == ("home", "")
    assert resolve_route("Garden.Home.example.com:443", "example.com", ["home"]) == ("home", "garden")
    assert resolve_route("a.garden.home.example.com", "example.com", ["home"]) is None
    assert resolve_route("example.com", "example.com", ["home"]) is None
    assert resolve_route("garden.example.com", "example.com", ["home"], {"garden.example.com": ("home", "garden")}) == (
        "home",
        "garden",
    )
    assert resolve_route("garden.home.local", None, ["home"]) == ("home", "garden")
    assert resolve_route("home.local", None, ["home", "cabin"]) == ("home", "")
    assert resolve_route("anything", None, ["home"]) == ("home", "")


async def test_one_connection_serves_the_main_app_web_services_and_a_tcp_service(http: aiohttp.ClientSession) -> None:
    """Web services by host name, the main app where it was, a TCP service through a channel,
    all over the agent's one tunnel; a wrong name or kind gets 404 with a reason."""
    async with (
        text_app(lambda r: "main app") as main,
        text_app(lambda r: f"garden app saw {r.host}") as garden,
        digest_service() as ssh,
        running_bridge(domain="example.com", aliases={"sprinkler.example.org": ("home", "garden")}) as bridge,
        serving(bridge.url, bridge, main, {"garden": garden, "ssh": f"tcp://127.0.0.1:{ssh.port}"}) as agent,
    ):
        assert len(bridge.registry.connections()) == 1
        connection = agent.connection

        async def text(host: str) -> tuple[int, str]:
            async with http.get(bridge.url + "/", headers={"Host": host}) as response:
                return response.status, await response.text()

        assert await text("home.example.com") == (200, "main app")
        assert await text("garden.home.example.com") == (200, "garden app saw garden.home.example.com")
        assert await text("sprinkler.example.org") == (200, "garden app saw sprinkler.example.org")
        status, body = await text("lights.home.example.com")
        assert status == 404 and "no web app named 'lights'" in body
        status, body = await text("ssh.home.example.com")
        assert status == 404 and "TCP service" in body
        assert ssh.connections == 0
        payload = os.urandom(300_000)
        assert await channel_exchange(bridge.url, "ssh", payload) == expected_digest_reply(payload)
        assert ssh.received == [payload]
        assert agent.connection is connection  # one connection throughout


async def test_half_close_both_ways_through_a_channel() -> None:
    """The service answers only after the client's half-close (digest), and a service that
    shuts its side first still receives everything the client sends afterwards (banner)."""
    async with (
        digest_service() as digest,
        banner_service() as banner,
        running_bridge() as bridge,
        serving(
            bridge.url,
            bridge,
            "",
            {"digest": f"tcp://127.0.0.1:{digest.port}", "banner": f"tcp://127.0.0.1:{banner.port}"},
        ),
    ):
        assert await channel_exchange(bridge.url, "digest", b"hello") == expected_digest_reply(b"hello")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{bridge.url}{CHANNEL}/home/banner", headers=BEARER) as ws,
        ):
            first = await ws.receive(timeout=10)
            assert first.data == b"banner then silence"
            assert (await ws.receive(timeout=10)).data == b""  # the service's half-close
            await ws.send_bytes(b"still ")
            await ws.send_bytes(b"talking")
            await ws.send_bytes(b"")
            closing = await ws.receive(timeout=10)
            assert closing.type is WSMsgType.CLOSE and closing.data == 1000
        async with asyncio.timeout(10):
            while not banner.received:
                await asyncio.sleep(0.02)
        assert banner.received == [b"still talking"]


async def test_channel_refusals_are_plain_http_answers(caplog: pytest.LogCaptureFixture) -> None:
    """401 without a credential, 403 for a token bound to another tunnel, 404 for an unknown
    or web service, 502 when the service refuses, 503 without an agent; the token is never logged."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    cabin_only = "cabin-token-" + "c" * 20
    caplog.set_level(logging.DEBUG)
    async with (
        text_app(lambda r: "web") as web_app,
        running_bridge(tokens=[TOKEN, TokenGrant(cabin_only, frozenset({"cabin"}))]) as bridge,
    ):
        assert (await refusal(bridge.url, f"{CHANNEL}/home/ssh", BEARER))[0] == 503
        async with serving(bridge.url, bridge, web_app, {"ssh": f"tcp://127.0.0.1:{dead_port}"}):
            assert (await refusal(bridge.url, f"{CHANNEL}/home/ssh", {}))[0] == 401
            assert (await refusal(bridge.url, f"{CHANNEL}/home/ssh", {"Authorization": "Bearer nope-" + "n" * 20}))[
                0
            ] == 401
            status, body = await refusal(bridge.url, f"{CHANNEL}/home/ssh", {"Authorization": f"Bearer {cabin_only}"})
            assert status == 403 and "may not reach tunnel 'home'" in body
            status, body = await refusal(bridge.url, f"{CHANNEL}/home/mqtt", BEARER)
            assert status == 404 and "no TCP service 'mqtt'" in body
            assert (await refusal(bridge.url, f"{CHANNEL}/home/Bad_Name", BEARER))[0] == 404
            status, body = await refusal(bridge.url, f"{CHANNEL}/home/ssh", BEARER)
            assert status == 502 and "cannot connect to the service" in body
            assert (await refusal(bridge.url, f"{CHANNEL}/home/ssh", BEARER))[0] == 502
    assert TOKEN not in caplog.text and cabin_only not in caplog.text


async def test_the_agent_serves_only_its_configured_services_whatever_the_bridge_asks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bridge's side of the tunnel opens streams the registry would never open: unknown
    services, a TCP stream to a web app, a web request to a TCP service, a target naming
    another host. Each is reset with REQUEST_REJECTED and nothing is connected to."""
    bait = TcpServer()

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bait.connections += 1
        writer.close()

    async with listening(count, bait):
        asks = [
            RequestHead("CONNECT", "", [], KIND_TCP, "1", service="bait"),
            RequestHead("CONNECT", f"127.0.0.1:{bait.port}", [], KIND_TCP, "2", service=""),
            RequestHead("CONNECT", f"127.0.0.1:{bait.port}", [], KIND_TCP, "3", service="garden"),
            RequestHead("GET", "/", [], KIND_HTTP, "4", service="ssh"),
            RequestHead("GET", "/", [], KIND_WEBSOCKET, "5", service="ssh"),
            RequestHead("GET", "/", [], KIND_HTTP, "6", service=f"127.0.0.1:{bait.port}"),
            RequestHead("GET", f"http://127.0.0.1:{bait.port}/", [], KIND_HTTP, "7", service="garden"),
        ]
        async with (
            text_app(lambda r: "web") as web_app,
            digest_service() as ssh,
            running_bridge() as bridge,
            serving(bridge.url, bridge, web_app, {"garden": web_app, "ssh": f"tcp://127.0.0.1:{ssh.port}"}),
        ):
            (connection,) = bridge.registry.connections()
            for head in asks:
                stream = connection.open_stream(head, end_stream=head.kind == KIND_HTTP)
                with pytest.raises(StreamResetError) as refused:
                    async with asyncio.timeout(10):
                        await stream.reply()
                assert refused.value.code == ErrorCode.REQUEST_REJECTED, head
            assert bait.connections == 0 and ssh.connections == 0
            assert "refused a tcp stream for service 'bait': not offered by this agent" in caplog.text


async def test_two_services_under_load_at_once(http: aiohttp.ClientSession) -> None:
    """300 requests to two web apps and 12 TCP channels of 1 MiB each, all at once over one
    connection: every answer is the right one."""
    async with (
        text_app(lambda r: "main:" + r.path) as main,
        text_app(lambda r: "garden:" + r.path) as garden,
        digest_service() as digest,
        running_bridge(domain="example.com") as bridge,
        serving(bridge.url, bridge, main, {"garden": garden, "tcp": f"tcp://127.0.0.1:{digest.port}"}),
    ):

        async def web(index: int) -> None:
            host = "garden.home.example.com" if index % 2 else "home.example.com"
            async with http.get(f"{bridge.url}/n/{index}", headers={"Host": host}) as response:
                assert response.status == 200
                assert await response.text() == f"{'garden' if index % 2 else 'main'}:/n/{index}"

        async def tcp(index: int) -> None:
            payload = os.urandom(1 << 20) + str(index).encode()
            assert await channel_exchange(bridge.url, "tcp", payload) == expected_digest_reply(payload)

        limit = asyncio.Semaphore(32)

        async def bounded(job: asyncio.Future[None] | object) -> None:
            async with limit:
                await job  # type: ignore[misc]

        async with asyncio.timeout(120):
            await asyncio.gather(*(bounded(web(i)) for i in range(300)), *(tcp(i) for i in range(12)))
        assert digest.connections == 12


async def test_an_extra_port_carries_its_service_with_half_close_and_refuses_unlisted_clients() -> None:
    """A ``tcp_ports`` entry: raw TCP in, the service's bytes out, the client's shutdown(SHUT_WR)
    passed on; a port whose allow list leaves out the client never reaches the agent."""
    async with (
        digest_service() as digest,
        running_bridge(
            tcp_ports=[
                TcpPort("127.0.0.1", 0, "home", "digest", (ip_network("127.0.0.0/8"),)),
                TcpPort("127.0.0.1", 0, "home", "digest", (ip_network("10.0.0.0/8"),)),
            ]
        ) as bridge,
        serving(bridge.url, bridge, "", {"digest": f"tcp://127.0.0.1:{digest.port}"}),
    ):
        open_port, closed_port = (server.port for server in bridge.tcp_ports)
        payload = os.urandom(2 << 20)
        reader, writer = await asyncio.open_connection("127.0.0.1", open_port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(30):
            assert await reader.read() == expected_digest_reply(payload)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", closed_port)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        assert digest.connections == 1


def test_agent_settings_name_the_bad_service() -> None:
    """Bad service names and targets are refused before anything connects."""
    base = {"bridge": "ws://127.0.0.1:1", "token": TOKEN, "target": ""}
    for services, message in [
        ({}, "--target: the home app's URL is required"),
        ({"Bad": "tcp://h:22"}, "--service 'Bad'"),
        ({"ssh": "tcp://h"}, "expected tcp://HOST:PORT"),
        ({"ssh": "tcp://fd00::5:22"}, "IPv6 address in brackets"),
        ({"ssh": "ftp://h"}, "expected an http(s):// URL, zeroconf:NAME or tcp://HOST:PORT"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            AgentConfig(**base, services=services).validate()  # type: ignore[arg-type]
    AgentConfig(**base, services={"ssh": "tcp://[fd00::5]:22", "web": "zeroconf:Garden"}).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no web service 'ssh'"):
        Agent(AgentConfig(**base, services={"ssh": "tcp://127.0.0.1:22"})).set_target("http://x", "ssh")  # type: ignore[arg-type]


async def test_an_agent_announcing_malformed_services_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A HELLO whose services are not DNS labels of a known kind gets the agent cut off, logged."""
    async with text_app(lambda r: "x") as app, running_bridge() as bridge:
        agent = Agent(AgentConfig(bridge=bridge.url, token=TOKEN, target=app, backoff_initial=5))
        agent._kinds["Evil Name"] = "tcp"  # what a broken or hostile agent would announce
        await agent.start()
        try:
            async with asyncio.timeout(10):
                while "its HELLO is malformed: HELLO field 'services.Evil Name'" not in caplog.text:
                    await asyncio.sleep(0.02)
            assert not bridge.registry.connections()
        finally:
            await agent.stop()


async def test_a_tunnels_visitor_allow_list_holds_for_its_tcp_services() -> None:
    """``tunnels: home: allow:`` on the bridge keeps other addresses from its TCP services too."""
    async with digest_service() as digest:
        for allow, status in [("10.0.0.0/8", 403), ("127.0.0.0/8", None)]:
            policies = {"home": VisitorPolicy(allow=(ip_network(allow),))}
            async with (
                running_bridge(visitor_policies=policies) as bridge,
                serving(bridge.url, bridge, "", {"digest": f"tcp://127.0.0.1:{digest.port}"}),
            ):
                if status is None:
                    assert await channel_exchange(bridge.url, "digest", b"ok") == expected_digest_reply(b"ok")
                else:
                    answer = await refusal(bridge.url, f"{CHANNEL}/home/digest", BEARER)
                    assert answer == (403, "this address may not reach this tunnel\n")
        assert digest.connections == 1


async def test_stopping_the_bridge_with_an_extra_port_connection_open_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection still open on an extra port is cut when the bridge stops, without asyncio's
    'Exception in callback' dump."""
    async with digest_service() as digest:
        bridge_cm = running_bridge(tcp_ports=[TcpPort("127.0.0.1", 0, "home", "digest", (ip_network("127.0.0.0/8"),))])
        bridge = await bridge_cm.__aenter__()
        try:
            async with serving(bridge.url, bridge, "", {"digest": f"tcp://127.0.0.1:{digest.port}"}):
                reader, writer = await asyncio.open_connection("127.0.0.1", bridge.tcp_ports[0].port)
                writer.write(b"unfinished")
                async with asyncio.timeout(10):
                    while not digest.connections:
                        await asyncio.sleep(0.02)
                await bridge.stop()
                async with asyncio.timeout(10):
                    assert await reader.read() == b""
                writer.close()
        finally:
            await bridge_cm.__aexit__(None, None, None)
    assert "Exception in callback" not in caplog.text and "Traceback" not in caplog.text


async def test_a_channel_whose_client_vanished_is_closed_by_its_heartbeat() -> None:
    """A client that stops answering pings (gone without a goodbye) loses its channel: the
    stream ends and the service's connection is closed, instead of staying open forever."""
    ended = asyncio.Event()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        ended.set()
        writer.close()

    record = TcpServer()
    async with (
        listening(service, record),
        running_bridge(heartbeat_interval=0.2, dead_after=5) as bridge,
        serving(bridge.url, bridge, "", {"quiet": f"tcp://127.0.0.1:{record.port}"}),
        aiohttp.ClientSession() as session,
    ):
        # autoping off and nothing read: pings from the bridge go unanswered, as from a dead peer.
        ws = await session.ws_connect(f"{bridge.url}{CHANNEL}/home/quiet", headers=BEARER, autoping=False)
        try:
            async with asyncio.timeout(10):
                await ended.wait()
            async with asyncio.timeout(5):
                while sum(len(c.streams) for c in bridge.registry.connections()):
                    await asyncio.sleep(0.05)
        finally:
            await ws.close()
