"""``rproxy demo``: bridge, agent and home app in one process, used through its public address."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import aiohttp

from tests.conftest import Proc, free_port, wait_http

DEVICE_IDS = ["living-room", "kitchen", "porch", "front-lawn", "garden"]


async def public_url(demo: Proc, timeout: float = 30) -> str:
    """Wait for the demo to print its public address; return it."""
    async with asyncio.timeout(timeout):
        while True:
            found = re.search(r"Public address, through the tunnel: (\S+)", demo.output())
            if found:
                return found.group(1)
            assert demo.popen.poll() is None, demo.output()
            await asyncio.sleep(0.05)


async def test_the_demo_serves_the_home_app_through_its_tunnel_and_stops_on_sigterm(
    procs: Callable[..., Proc], http: aiohttp.ClientSession
) -> None:
    """The printed address serves the page, a toggle through it flips the light and is pushed; SIGTERM exits 0."""
    port = free_port()
    demo = procs("demo", "--listen", f"127.0.0.1:{port}")
    url = await public_url(demo)
    assert url == f"http://127.0.0.1:{port}/"
    # The banner follows the agent's side of the handshake; the bridge may route a moment later.
    await wait_http(url + "api/state")

    async with asyncio.timeout(30):
        async with http.get(url) as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            page = await response.text()
        for device in DEVICE_IDS:
            assert f'id="device-{device}"' in page
        assert 'id="device-porch" class="dev" data-id="porch" data-kind="light" aria-pressed="false"' in page

        async with http.ws_connect(url.replace("http", "ws", 1) + "api/ws") as ws:
            first = json.loads((await ws.receive()).data)
            assert first["type"] == "state"
            assert {d["id"]: d["on"] for d in first["devices"]}["porch"] is False

            async with http.post(url + "api/devices/porch/toggle") as response:
                assert response.status == 200
                assert (await response.json()) == {"id": "porch", "name": "Porch", "kind": "light", "on": True}

            pushed = json.loads((await ws.receive()).data)
            assert pushed["type"] == "state"
            assert {d["id"]: d["on"] for d in pushed["devices"]} == {d: d == "porch" for d in DEVICE_IDS}

        async with http.get(url + "api/state") as response:
            porch = next(d for d in (await response.json())["devices"] if d["id"] == "porch")
            assert porch["on"] is True
        async with http.get(url) as response:
            assert 'data-id="porch" data-kind="light" aria-pressed="true"' in await response.text()

    assert await asyncio.to_thread(demo.stop) == 0
    assert "Traceback" not in demo.log_path.read_text()


async def test_the_demo_on_a_port_already_in_use_exits_1(procs: Callable[..., Proc]) -> None:
    """A demo whose public port is taken says so and exits 1 instead of hanging."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        demo = procs("demo", "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
        code = await asyncio.to_thread(demo.popen.wait, 30)
    assert code == 1
    output = demo.output()
    assert "in use" in output and "Traceback" not in output
