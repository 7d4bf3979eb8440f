"""The rough edges a newcomer hit in a fresh-clone trial, each with the fix's test: what the
bridge and the agent say when something is off, and what they log when nothing is."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import Agent, AgentConfig
from rproxy_core.agent import AgentState
from tests.conftest import TOKEN, Proc, running_agent, running_bridge, start_app, wait_http
from tests.core.tunnel.test_cli import clean_env, one_error_line, rproxy
from tests.core.tunnel.test_demo import public_url


@pytest.fixture
async def ws_app() -> AsyncIterator[str]:
    """A home app: ``/ws/echo`` echoes, ``/ws/bye`` closes with 4001 after one message; yields its URL."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                if request.path.endswith("/bye"):
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws/{name}", echo)
    runner, url = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


async def _access_lines(caplog: pytest.LogCaptureFixture, path: str, timeout: float = 10) -> list[str]:
    async with asyncio.timeout(timeout):
        while True:
            lines = [
                r.getMessage() for r in caplog.records if r.name == "rproxy.access" and f" {path} " in r.getMessage()
            ]
            if lines:
                return lines
            await asyncio.sleep(0.02)


async def test_a_normal_websocket_close_is_logged_with_its_code_not_as_visitor_gone(
    caplog: pytest.LogCaptureFixture, ws_app: str
) -> None:
    """A visitor closing its WebSocket normally reads ``(closed with 1000)`` in the access log,
    not ``(visitor gone)``, which reads like an error; a close by the home app says its code too."""
    caplog.set_level(logging.INFO, logger="rproxy.access")
    async with running_bridge(access_log=True) as bridge, running_agent(bridge.url, ws_app):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(bridge.url.replace("http", "ws", 1) + "/ws/echo") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=10)).data == "hello"
                await ws.close()
            (line,) = await _access_lines(caplog, "/ws/echo")
            assert line.endswith("(closed with 1000)"), line
            async with session.ws_connect(bridge.url.replace("http", "ws", 1) + "/ws/bye") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.CLOSE
                assert ws.close_code == 4001
            (line,) = await _access_lines(caplog, "/ws/bye")
            assert line.endswith("(closed with 4001)"), line


async def test_a_second_tunnel_without_a_domain_is_warned_about_and_told_an_address_that_reaches_it(
    caplog: pytest.LogCaptureFixture, ws_app: str
) -> None:
    """Two tunnels, no --domain: the bridge warns once; the second agent is told
    ``http://echo.localhost:PORT/``, and that Host reaches its tunnel (a bare address reaches none)."""
    caplog.set_level(logging.INFO)
    async with running_bridge() as bridge, running_agent(bridge.url, ws_app, name="home") as home:
        assert home.public_url == f"{bridge.url}/"
        async with (
            running_agent(bridge.url, ws_app, name="echo") as echo,
            running_agent(bridge.url, ws_app, name="third"),
        ):
            port = bridge.url.rsplit(":", 1)[1]
            assert echo.public_url == f"http://echo.localhost:{port}/"
            warnings = [r.getMessage() for r in caplog.records if "without --domain" in r.getMessage()]
            assert len(warnings) == 1, warnings
            assert "'echo'" in warnings[0] and "echo.localhost" in warnings[0]
            async with aiohttp.ClientSession() as session:
                for host, status in (
                    (f"echo.localhost:{port}", 404),
                    (f"home.localhost:{port}", 404),
                    (f"127.0.0.1:{port}", 404),
                ):
                    # The app has only /ws/...: 404 from the home app itself tells reaching it
                    # from the bridge's own "no such tunnel" 404 by its body.
                    async with session.get(bridge.url + "/nothing", headers={"Host": host}) as response:
                        body = await response.text()
                        assert response.status == status
                        reached = "no tunnel" not in body.lower() and "rproxy" not in body.lower()
                        assert reached == (not host.startswith("127.")), (host, body)


async def _garbage_server(answer: bytes) -> asyncio.Server:
    """Something that is not a bridge: it answers every connection with ``answer`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(1024)
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _first_error(agent: Agent, timeout: float = 15) -> str:
    async with asyncio.timeout(timeout):
        while agent.reconnects < 2:  # it keeps retrying
            await asyncio.sleep(0.02)
    assert agent.state in (AgentState.WAITING, AgentState.CONNECTING)
    assert agent.last_error is not None
    return agent.last_error


@pytest.mark.parametrize(
    ("scheme", "answer", "hint"),
    [
        ("ws", b"SSH-2.0-OpenSSH_9.2\r\n", "not an rproxy bridge"),
        (
            "ws",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\n\r\nno such page\x1b[31m!\r\n",
            "not an rproxy bridge",
        ),
        ("wss", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "no TLS on that port"),
    ],
    ids=["ssh-server", "web-server-404", "wss-to-plain-port"],
)
async def test_an_agent_pointed_at_something_else_says_what_is_likely_wrong_and_keeps_retrying(
    scheme: str, answer: bytes, hint: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = await _garbage_server(answer)
    port = server.sockets[0].getsockname()[1]
    agent = Agent(
        AgentConfig(
            bridge=f"{scheme}://127.0.0.1:{port}",
            token="t" * 24,
            target="http://127.0.0.1:9",
            backoff_initial=0.05,
            backoff_max=0.1,
        )
    )
    await agent.start()
    try:
        error = await _first_error(agent)
    finally:
        await agent.stop()
        server.close()
        await server.wait_closed()
    assert hint in error, error
    assert "\x1b" not in error and "\n" not in error
    lines = [r.getMessage() for r in caplog.records if r.name == "rproxy.agent" and "retrying" in r.getMessage()]
    assert lines and all(hint in line and "\n" not in line for line in lines)


@contextlib.contextmanager
def _taken(port: int = 0) -> Iterator[tuple[socket.socket | None, int]]:
    """A listening socket on 127.0.0.1:``port`` (None when someone else already has it)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        yield None, port  # taken already: by another program, which serves the test as well
        return
    sock.listen()
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("command", ["bridge", "demo"])
def test_a_taken_port_names_the_address_and_the_flag_in_one_line(command: str) -> None:
    """Not ``error: error while attempting to bind...``: which address, and --listen."""
    with _taken() as (_sock, port):
        extra = ["--token", TOKEN] if command == "bridge" else []
        result = rproxy(command, "--listen", f"127.0.0.1:{port}", *extra)
    assert result.returncode == 1
    line = one_error_line(result)
    assert line == (
        f"rproxy {command}: error: cannot listen on 127.0.0.1:{port}: it is already in use (another "
        "program, or another rproxy, listens there); pick another with --listen HOST:PORT"
    )


async def test_the_demo_without_listen_takes_the_next_free_port_when_8080_is_taken(
    procs: Callable[..., Proc],
) -> None:
    with _taken(8080):
        demo = procs("demo", base_env=clean_env())
        url = await public_url(demo)
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert port != 8080
    assert f"127.0.0.1:8080 is in use; the demo listens on 127.0.0.1:{port} instead" in demo.output()
    await wait_http(url + "api/state")
