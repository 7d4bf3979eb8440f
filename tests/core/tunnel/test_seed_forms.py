"""The seeds' own command lines, run as their documents write them (only host names and ports
changed): real ``rproxy`` processes, a real aiohttp home app, a visitor through the bridge.

Seed 0, node-rproxy::

    node bridgeproxy.js 8080 username:password
    node autoconnectproxy.js ws://username:password@my.public.websocket:8080 ws://localhost:8080

Seed 1, NAT Web Reverse Proxy: a ``.env`` file with AGENT_ID, REMOTE_URL and LOCAL_URL next to
the client, and a server with no configuration at all.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from rproxy_core import AgentConfig
from tests.conftest import Proc, free_port, start_app, wait_http, wait_listed
from tests.core.tunnel.test_cli import clean_env, one_error_line, rproxy

PASSWORD = "s3cret-pass-phrase"


@pytest.fixture
async def websocket_app() -> AsyncIterator[int]:
    """node-rproxy's home app is a WebSocket app: a page and an echo socket; yields its port."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"rpi-webapp {request.path}")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo: " + message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/{tail:.*}", page)
    runner, url = await start_app(app)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        await runner.cleanup()


async def visit(base: str) -> tuple[int, str, str]:
    """A visitor: one page and one WebSocket message through the bridge at ``base``."""
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/lights") as response:
            status, text = response.status, await response.text()
        async with session.ws_connect(base.replace("http", "ws", 1) + "/ws") as ws:
            await ws.send_str("hello")
            echoed = await asyncio.wait_for(ws.receive_str(), 10)
    return status, text, echoed


async def test_node_rproxys_command_lines_serve_the_home_app(
    procs: Callable[..., Proc], websocket_app: int
) -> None:
    """``rproxy bridge 8080 username:password`` and ``rproxy agent ws://username:password@HOST:8080
    ws://localhost:8080``: a page and a WebSocket reach the home app; the password is in no log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    agent = procs(
        "agent", f"ws://username:{PASSWORD}@localhost:{port}", f"ws://localhost:{websocket_app}", base_env=clean_env()
    )
    await wait_listed(base, "home")
    assert await visit(base) == (200, "rpi-webapp /lights", "echo: hello")
    bridge.stop(), agent.stop()
    for proc in (bridge, agent):
        assert PASSWORD not in proc.output()
        assert base64.b64encode(f"username:{PASSWORD}".encode()).decode() not in proc.output()
        assert "Traceback" not in proc.output()


async def test_a_wrong_password_in_the_bridge_url_is_refused_for_good(procs: Callable[..., Proc]) -> None:
    """The bridge's USER:PASS accepts exactly that credential: another password exits 3 with one line."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    wrong = await asyncio.to_thread(
        rproxy, "agent", f"ws://username:not-{PASSWORD}@127.0.0.1:{port}", "http://127.0.0.1:9"
    )
    assert wrong.returncode == 3
    assert "refused the agent token (401)" in one_error_line(wrong)
    assert "not-" + PASSWORD not in wrong.stderr + bridge.output()


async def test_the_bridge_reads_a_basic_credential_strictly(procs: Callable[..., Proc]) -> None:
    """A fake agent's Basic headers: malformed base64, no colon, the right user with a wrong
    password: each 401 with a logged reason; the right one gets past authentication."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")

    def basic(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    cases = {
        "Basic !!!not-base64": 401,
        basic("username" + PASSWORD): 401,  # no colon
        basic(f"username:{PASSWORD}x"): 401,
        "Basic " + base64.b64encode(b"username:\xff\xfe").decode(): 401,  # not UTF-8
        f"Bearer username:{PASSWORD}": 426,  # the same credential as a token: past auth (no protocol offered)
        basic(f"username:{PASSWORD}"): 426,
    }
    async with aiohttp.ClientSession() as session:
        for header, status in cases.items():
            async with session.get(base + "/_rproxy/connect", headers={"Authorization": header}) as response:
                assert response.status == status, header
    assert "malformed basic credential" in bridge.output()
    assert PASSWORD not in bridge.output()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["agent", "ws://127.0.0.1:1", "--bridge", "ws://127.0.0.1:1", "--token", "t"], "BRIDGE_URL and --bridge"),
        (["agent", "ws://127.0.0.1:1", "http://127.0.0.1:2", "--target", "http://127.0.0.1:2", "--token", "t"],
         "TARGET_URL and --target"),
        (["agent", f"ws://u:{PASSWORD}@127.0.0.1:1", "http://127.0.0.1:2", "--token", "t"],
         "--token and user:password@ in --bridge: two credentials"),
        (["bridge", "8080", "--listen", "127.0.0.1:8080"], "PORT and --listen"),
        (["bridge", "8080", f"u:{PASSWORD}", "--token", "t"], "USER:PASS and --token"),
        (["bridge", "8080", PASSWORD], "USER:PASS: expected a user, a colon and a password"),
        (["bridge", "http"], "PORT: expected a port number"),
        (["agent", f"ftp://u:{PASSWORD}@127.0.0.1:1", "http://127.0.0.1:2"], "--bridge: expected"),
        (["agent", f"ws://:{PASSWORD}@127.0.0.1:1", "http://127.0.0.1:2"], "needs a user"),
    ],
    ids=["bridge-twice", "target-twice", "two-credentials", "port-twice", "userpass-and-token", "userpass-no-colon",
         "port-not-a-number", "bad-scheme-with-password", "password-without-user"],
)
def test_a_positional_beside_its_flag_or_a_bad_one_is_a_one_line_error(args: list[str], expected: str) -> None:
    """Mixing a positional and its flag, or a malformed one: exit 2, one line naming both, no password."""
    result = rproxy(*args)
    assert result.returncode == 2, result
    line = one_error_line(result)
    assert expected in line
    assert PASSWORD not in line


async def test_the_password_from_the_environment_counts_as_the_credential(
    procs: Callable[..., Proc], websocket_app: int
) -> None:
    """$REMOTE_URL with user:password@ is the same credential as on the command line."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs("bridge", str(port), f"username:{PASSWORD}", base_env=clean_env())
    await wait_http(base + "/_rproxy/health")
    procs("agent", base_env=clean_env(REMOTE_URL=f"http://username:{PASSWORD}@127.0.0.1:{port}",
                                      LOCAL_URL=f"ws://localhost:{websocket_app}"))
    await wait_listed(base, "home")
    assert (await visit(base))[0] == 200


def test_the_agent_config_never_shows_its_token() -> None:
    """repr() of an AgentConfig (a log line, a traceback's locals) leaves the credential out."""
    config = AgentConfig(bridge="ws://127.0.0.1:1", token=f"username:{PASSWORD}", target="http://x", basic_auth=True)
    assert PASSWORD not in repr(config)
    assert "basic_auth=True" in repr(config)


def test_agent_help_shows_the_seed_forms_and_the_warning() -> None:
    result = rproxy("agent", "--help")
    assert result.returncode == 0
    assert "BRIDGE_URL [TARGET_URL]" in result.stdout
    assert "rproxy bridge 8080 user:password" in result.stdout
    assert "ps" in result.stdout and ".env" in result.stdout

