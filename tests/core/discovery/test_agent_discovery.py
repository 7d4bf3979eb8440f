"""Web apps found over mDNS: ``rproxy agent --discover``, ``--target zeroconf:NAME``, the demo's announcement.

Everything is real python-zeroconf: the test announces apps with its own ``AsyncZeroconf`` on
loopback, and ``rproxy`` processes browse with their defaults (every IPv4 interface), which
hear loopback multicast on this host. mDNS is host-wide, so every app a test announces has a
name of its own, and apps are told apart by name or port, never by "the only one there".
Only the "nothing announced" case needs a LAN of its own: it runs in a private network
namespace (``ip netns``, so root or CAP_SYS_ADMIN and CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from rproxy_core.agent.discovery import ZEROCONF_HTTP_TYPE, ZEROCONF_TYPE, AppBrowser, DiscoveredApp
from rproxy_core.exceptions import ConfigError
from tests.conftest import (
    ROOT,
    TOKEN,
    Proc,
    free_port,
    running_agent,
    running_bridge,
    start_app,
    wait_http,
    wait_listed,
)

#: Names rproxy reads from the environment: a developer's own settings must not leak in.
_SETTINGS_PREFIXES = ("RPROXY_",)
_SEED_NAMES = ("PORT", "REMOTE_URL", "LOCAL_URL", "AGENT_ID")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_SETTINGS_PREFIXES) and k not in _SEED_NAMES}


def unique(label: str) -> str:
    """An mDNS name no other test (or helper running tests on this host) uses."""
    return f"{label} {uuid.uuid4().hex[:8]}"


def service(
    name: str,
    port: int,
    *,
    address: str = "127.0.0.1",
    service_type: str = ZEROCONF_TYPE,
    properties: dict[str, str] | None = None,
) -> AsyncServiceInfo:
    """The announcement of a web app at ``address:port``, with a host name of its own."""
    host = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return AsyncServiceInfo(
        service_type,
        f"{name}.{service_type}",
        addresses=[socket.inet_aton(address)],
        port=port,
        properties=properties if properties is not None else {"path": "/"},
        server=f"{host}.local.",
    )


@asynccontextmanager
async def lan() -> AsyncIterator[AsyncZeroconf]:
    """An mDNS responder on loopback; closing it says goodbye for whatever it still announces."""
    aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"])
    try:
        yield aiozc
    finally:
        await aiozc.async_close()


async def announce(aiozc: AsyncZeroconf, *infos: AsyncServiceInfo) -> None:
    """Register ``infos`` and wait until each has been probed and announced."""
    registrations = [await aiozc.async_register_service(info) for info in infos]
    await asyncio.gather(*registrations)


async def rproxy(*args: str, netns: str | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run ``python -m rproxy_core ARGS`` to completion (in network namespace ``netns``).

    Asynchronous on purpose: the test's own mDNS responder runs on this event loop and must keep
    answering while the command browses.
    """
    prefix = ["ip", "netns", "exec", netns] if netns else []
    process = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-m",
        "rproxy_core",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=clean_env(),
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def table_row(output: str, name: str) -> list[str]:
    """The cells of the ``--discover`` row of app ``name`` (cells are two or more spaces apart)."""
    rows = [line for line in output.splitlines() if line.startswith(name + "  ")]
    assert len(rows) == 1, output
    return [name, *re.split(r" {2,}", rows[0][len(name) :].strip())]


async def text_at(url: str, host: str | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Host": host} if host else None) as response,
    ):
        return response.status, await response.text()


async def wait_for_text(url: str, text: str, timeout: float = 20, host: str | None = None) -> None:
    """Poll ``url`` (with ``Host: host``) until it answers 200 with ``text``."""
    async with asyncio.timeout(timeout):
        while await text_at(url, host) != (200, text):
            await asyncio.sleep(0.1)


async def wait_for_output(proc: Proc, pattern: str, timeout: float = 20) -> re.Match[str]:
    async with asyncio.timeout(timeout):
        while not (found := re.search(pattern, proc.output())):
            assert proc.popen.poll() is None, proc.output()
            await asyncio.sleep(0.05)
    return found


wait_tunnel = wait_listed


@asynccontextmanager
async def home_app(text: str, address: str = "127.0.0.1") -> AsyncIterator[int]:
    """A home app on ``address`` answering every GET with ``text``; yields its port."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address, 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def start_bridge(procs: Callable[..., Proc], *extra: str) -> tuple[Proc, str]:
    port = free_port()
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, *extra)
    base = f"http://127.0.0.1:{port}"
    await wait_http(base + "/_rproxy/health")
    return bridge, base


# --discover


async def test_discover_lists_announced_apps_and_leaves_out_plain_web_servers() -> None:
    """An rproxy app and an ``_http._tcp`` one marked ``rproxy`` are listed with host, port, path and URL;
    an ``_http._tcp`` service without the marker (a printer's page, say) is not."""
    lights, blinds, printer = unique("Lights"), unique("Blinds"), unique("Printer")
    lights_port, blinds_port, printer_port = free_port(), free_port(), free_port()
    async with lan() as aiozc:
        await announce(
            aiozc,
            service(lights, lights_port, properties={"path": "/lights", "id": lights + "-id"}),
            service(
                unique("blinds-instance"),
                blinds_port,
                service_type=ZEROCONF_HTTP_TYPE,
                properties={"rproxy": "1", "name": blinds},
            ),
            service(printer, printer_port, service_type=ZEROCONF_HTTP_TYPE, properties={"path": "/printer"}),
        )
        code, out, err = await rproxy("agent", "--discover")

    assert code == 0, err
    assert "Traceback" not in err
    assert out.splitlines()[0].split() == ["NAME", "HOST", "PORT", "PATH", "URL"]
    assert table_row(out, lights) == [
        lights,
        "127.0.0.1",
        str(lights_port),
        "/lights",
        f"http://127.0.0.1:{lights_port}/lights",
    ]
    # Its TXT name, not its instance name, is what lists show.
    assert table_row(out, blinds) == [blinds, "127.0.0.1", str(blinds_port), "/", f"http://127.0.0.1:{blinds_port}/"]
    assert printer not in out
    assert str(printer_port) not in out


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace with only its loopback up: a LAN where nothing is announced."""
    name = f"rproxy-mdns-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.fail(
            f"this test needs its own network namespace (root, or CAP_SYS_ADMIN and CAP_NET_ADMIN): "
            f"ip netns add: {made.stderr.strip()}"
        )
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=30)


async def test_discover_with_nothing_announced_says_so_in_one_line_and_exits_0(netns: str) -> None:
    """On a LAN where nothing is announced, --discover prints one line saying so and exits 0; once the
    demo runs on that LAN, the same command lists it (so the empty answer was not mDNS failing)."""
    code, out, err = await rproxy("agent", "--discover", "--discover-timeout", "1", netns=netns)
    assert code == 0, err
    assert out.splitlines() == [
        "No web apps announced on the LAN (browsed 1 s for _rproxy-app._tcp.local., "
        "and _http._tcp.local. with an 'rproxy' property)."
    ]
    assert err == ""

    demo = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        netns,
        sys.executable,
        "-m",
        "rproxy_core",
        "demo",
        "--listen",
        "127.0.0.1:0",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=clean_env(),
    )
    try:
        assert demo.stderr is not None
        async with asyncio.timeout(30):
            while b"announced over mDNS" not in (line := await demo.stderr.readline()):
                assert line, "the demo ended before announcing its home app"
        # The default time: the demo has just announced itself and stays quiet for a second.
        code, out, err = await rproxy("agent", "--discover", netns=netns)
    finally:
        demo.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await demo.communicate()
    assert code == 0, err
    assert out.splitlines()[1].startswith("rproxy demo home app  127.0.0.1  "), out


@pytest.mark.parametrize("seconds", ["0", "61", "soon", "nan"])
async def test_a_bad_discover_timeout_exits_2_naming_the_flag(seconds: str) -> None:
    code, out, err = await rproxy("agent", "--discover", "--discover-timeout", seconds)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "--discover-timeout" in err


# --target zeroconf:NAME


async def test_agent_follows_an_app_by_name_when_it_moves_without_reconnecting(procs: Callable[..., Proc]) -> None:
    """``--target zeroconf:NAME`` serves the announced app; when it moves to another address and port
    the next visitors reach it there over the same tunnel; when it stops being announced, the
    agent keeps its last address."""
    name = unique("Sprinklers")
    bridge, base = await start_bridge(procs)
    async with lan() as aiozc, home_app("old place") as old_port, home_app("new place", "127.0.0.2") as new_port:
        await announce(aiozc, service(name, old_port))
        agent = procs(
            "agent", "--bridge", base, "--token", TOKEN, "--target", f"zeroconf:{name}", "--agent-id", "follower"
        )
        await wait_tunnel(base)
        await wait_for_text(base + "/", "old place")
        await wait_for_output(agent, re.escape(f"found {name!r} on the LAN at http://127.0.0.1:{old_port}/"))

        moved = service(name, new_port, address="127.0.0.2")
        await (await aiozc.async_update_service(moved))
        await wait_for_text(base + "/", "new place")
        await wait_for_output(
            agent, re.escape(f"{name!r} moved from http://127.0.0.1:{old_port}/ to http://127.0.0.2:{new_port}/")
        )

        await (await aiozc.async_unregister_service(moved))
        await wait_for_output(agent, re.escape(f"{name!r} is no longer announced on the LAN"))
        assert await text_at(base + "/") == (200, "new place")

    # One connection all along: the bridge saw the agent connect once and never leave.
    bridge_log = bridge.output()
    assert len(re.findall(r"agent home/follower from \S+ connected", bridge_log)) == 1, bridge_log
    assert "disconnected" not in bridge_log
    assert "Traceback" not in agent.output()


async def test_an_app_not_announced_yet_gets_502_until_it_appears(procs: Callable[..., Proc]) -> None:
    """The tunnel comes up at once; visitors get 502 "the home app cannot be reached" and the agent says,
    once, what it waits for; as soon as the app is announced it is served."""
    name = unique("Garage door")
    bridge, base = await start_bridge(procs)
    agent = procs("agent", "--bridge", base, "--token", TOKEN, "--target", f"zeroconf:{name}", "--agent-id", "patient")
    await wait_tunnel(base)
    assert await text_at(base + "/") == (502, "502 Bad Gateway: the home app cannot be reached from the agent\n")
    waiting = re.escape(f"tunnel 'home': waiting for a web app announced on the LAN as {name!r}")
    await wait_for_output(agent, waiting)
    for _ in range(3):
        assert (await text_at(base + "/door"))[0] == 502

    async with lan() as aiozc, home_app("door closed") as port:
        await announce(aiozc, service(name, port))
        await wait_for_text(base + "/door", "door closed")
        await wait_for_output(agent, re.escape(f"found {name!r} on the LAN at http://127.0.0.1:{port}/"))

    assert len(re.findall(waiting, agent.output())) == 1, agent.output()
    assert len(re.findall(r"agent home/patient from \S+ connected", bridge.output())) == 1


async def test_a_config_file_follows_an_announced_app_per_service(procs: Callable[..., Proc], tmp_path: Path) -> None:
    """``target: zeroconf:NAME`` in a config file, for the main app and for a service of the same
    tunnel: each serves its own app (matched by TXT name for one, by mDNS instance name for the other)."""
    lights, garden = unique("Lights"), unique("Garden")
    _, base = await start_bridge(procs, "--domain", "example.test")
    async with lan() as aiozc, home_app("lights app") as lights_port, home_app("garden app") as garden_port:
        await announce(
            aiozc,
            service(unique("lights-instance"), lights_port, properties={"name": lights}),
            service(garden, garden_port, service_type=ZEROCONF_HTTP_TYPE, properties={"rproxy": ""}),
        )
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"bridge: {base}\ntoken: {TOKEN}\ntarget: 'zeroconf:{lights}'\nname: house\n"
            f"services:\n  - name: garden\n    target: 'ZEROCONF:{garden.upper()}'\n"
        )
        procs("agent", "--config", str(config))
        await wait_for_text(base + "/", "lights app", host="house.example.test")
        await wait_for_text(base + "/", "garden app", host="garden.house.example.test")


async def test_set_target_moves_the_next_requests_and_lets_those_under_way_finish() -> None:
    """``Agent.set_target``: requests already sent finish at the old app, the next ones go to the new
    one, on the same tunnel connection; a URL --target would refuse is refused."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="old app, slow")

    old = web.Application()
    old.router.add_get("/slow", slow)

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="new app")

    new = web.Application()
    new.router.add_get("/{tail:.*}", fast)
    old_runner, old_url = await start_app(old)
    new_runner, new_url = await start_app(new)
    try:
        async with (
            running_bridge() as bridge,
            running_agent(bridge.url, old_url) as agent,
            aiohttp.ClientSession() as visitor,
        ):
            connection = agent.connection
            under_way = asyncio.create_task(text_of(visitor, bridge.url + "/slow"))
            async with asyncio.timeout(10):
                while agent.active_streams == 0:
                    await asyncio.sleep(0.01)
            agent.set_target(new_url + "/")
            assert agent.target == new_url + "/"
            assert await text_of(visitor, bridge.url + "/slow") == "new app"
            release.set()
            assert await under_way == "old app, slow"
            assert agent.connection is connection
            assert agent.reconnects == 0
            with pytest.raises(ConfigError, match="--target"):
                agent.set_target("ftp://127.0.0.1/")
            assert agent.target == new_url + "/"
    finally:
        release.set()
        await old_runner.cleanup()
        await new_runner.cleanup()


async def text_of(session: aiohttp.ClientSession, url: str) -> str:
    async with asyncio.timeout(20), session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.text()


# rproxy demo


async def test_the_demo_announces_its_home_app_and_says_goodbye_when_stopped(procs: Callable[..., Proc]) -> None:
    """``rproxy demo``'s home app is listed by ``--discover`` in another process, and a browser that saw
    it drops it as soon as the demo stops (the goodbye, not a cache timeout of an hour)."""
    demo = procs("demo", "--listen", f"127.0.0.1:{free_port()}")
    found = await wait_for_output(demo, r"The home app itself \(as if behind NAT\): http://127\.0\.0\.1:(\d+)/", 30)
    home_port = int(found.group(1))
    instance = (await wait_for_output(demo, r"announced over mDNS on this machine as '([^']+)'", 30)).group(1)
    assert instance.startswith("rproxy demo home app")

    code, out, err = await rproxy("agent", "--discover")
    assert code == 0, err
    assert table_row(out, instance) == [
        instance,
        "127.0.0.1",
        str(home_port),
        "/",
        f"http://127.0.0.1:{home_port}/",
    ]

    async with AppBrowser(interfaces=["127.0.0.1"]) as browser:
        async with asyncio.timeout(10):
            while not _ports(browser.apps, instance):
                await asyncio.sleep(0.05)
        assert _ports(browser.apps, instance) == [home_port]
        assert await asyncio.to_thread(demo.stop) == 0
        async with asyncio.timeout(5):
            while _ports(browser.apps, instance):
                await asyncio.sleep(0.05)
    assert "Traceback" not in demo.output()


def _ports(apps: Sequence[DiscoveredApp], instance: str) -> list[int]:
    return [app.port for app in apps if app.name == instance]
