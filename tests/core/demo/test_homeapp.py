"""Tests for the built-in home demo app, against a real server on a real socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web

from rproxy_core.demo import create_home_app
from rproxy_core.demo.homeapp import HOME_STATE

DEVICE_IDS = ["living-room", "kitchen", "porch", "front-lawn", "garden"]


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[tuple[web.AppRunner, str]]:
    """Run ``app`` on an ephemeral localhost port; yield the runner and base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield runner, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def app() -> web.Application:
    return create_home_app()


@pytest.fixture
async def base(app: web.Application) -> AsyncIterator[str]:
    async with serve(app) as (_, url):
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def read_sse_event(resp: aiohttp.ClientResponse) -> tuple[str, Any]:
    """Read one SSE event (skipping keepalive comments); return (event, parsed data)."""
    event, data = "message", []
    async with asyncio.timeout(5):
        while True:
            line = (await resp.content.readline()).decode()
            if not line:
                raise EOFError("stream ended")
            line = line.rstrip("\r\n")
            if line == "":
                if data:
                    return event, json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "event":
                event = value.strip()
            elif field == "data":
                data.append(value[1:] if value.startswith(" ") else value)


def on_of(devices: list[dict[str, Any]], device_id: str) -> bool:
    return next(d["on"] for d in devices if d["id"] == device_id)


async def test_page_contains_device_buttons(base: str, http: aiohttp.ClientSession) -> None:
    """GET / serves self-contained HTML with one toggle button per device."""
    async with http.get(base + "/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
    for device_id in DEVICE_IDS:
        assert f'id="device-{device_id}"' in html
    assert 'id="connection"' in html and 'aria-pressed="false"' in html
    assert 'name="viewport"' in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


async def test_state_and_rest_set(base: str, http: aiohttp.ClientSession) -> None:
    """POST /api/devices/{id} sets the state and /api/state reflects it."""
    async with http.get(base + "/api/state") as resp:
        devices = (await resp.json())["devices"]
    assert [d["id"] for d in devices] == DEVICE_IDS
    assert {d["kind"] for d in devices} == {"light", "sprinkler"}
    assert not any(d["on"] for d in devices)

    async with http.post(base + "/api/devices/kitchen", json={"on": True}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"id": "kitchen", "name": "Kitchen", "kind": "light", "on": True}
    async with http.get(base + "/api/state") as resp:
        assert on_of((await resp.json())["devices"], "kitchen") is True


async def test_rest_toggle(base: str, http: aiohttp.ClientSession) -> None:
    """POST /api/devices/{id}/toggle flips the device each time."""
    for expected in (True, False):
        async with http.post(base + "/api/devices/garden/toggle") as resp:
            assert resp.status == 200
            assert (await resp.json())["on"] is expected


async def test_rest_unknown_device_is_404(base: str, http: aiohttp.ClientSession) -> None:
    """Unknown device ids give a 404 JSON error for both set and toggle."""
    async with http.post(base + "/api/devices/garage", json={"on": True}) as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
    async with http.post(base + "/api/devices/garage/toggle") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"on": "yes"}', b"{}"])
async def test_rest_malformed_body_is_400(base: str, http: aiohttp.ClientSession, body: bytes) -> None:
    """Malformed bodies give a 400 JSON error, not a traceback."""
    async with http.post(base + "/api/devices/porch", data=body) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()


async def test_ws_initial_state_and_push_from_rest(base: str, http: aiohttp.ClientSession) -> None:
    """A WebSocket gets the state on connect and a push when another client uses REST."""
    async with http.ws_connect(base + "/api/ws") as ws:
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "state" and len(msg["devices"]) == 5
        async with aiohttp.ClientSession() as other:
            async with other.post(base + "/api/devices/porch/toggle") as resp:
                assert resp.status == 200
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "state" and on_of(msg["devices"], "porch") is True


async def test_two_ws_clients_both_receive_change(base: str, http: aiohttp.ClientSession) -> None:
    """A change sent over one WebSocket is pushed to every open WebSocket."""
    async with http.ws_connect(base + "/api/ws") as ws1, http.ws_connect(base + "/api/ws") as ws2:
        await ws1.receive_json(timeout=5)
        await ws2.receive_json(timeout=5)
        await ws1.send_json({"type": "set", "id": "front-lawn", "on": True})
        for ws in (ws1, ws2):
            msg = await ws.receive_json(timeout=5)
            assert msg["type"] == "state" and on_of(msg["devices"], "front-lawn") is True
        await ws2.send_json({"type": "toggle", "id": "front-lawn"})
        for ws in (ws1, ws2):
            assert on_of((await ws.receive_json(timeout=5))["devices"], "front-lawn") is False


async def test_ws_bad_message_gets_error_and_stays_open(base: str, http: aiohttp.ClientSession) -> None:
    """Bad WebSocket messages get an error reply and the socket remains usable."""
    async with http.ws_connect(base + "/api/ws") as ws:
        await ws.receive_json(timeout=5)
        bad: list[Any] = [
            "not json",
            json.dumps([1, 2]),
            json.dumps({"type": "explode"}),
            json.dumps({"type": "set", "id": "nope", "on": True}),
            json.dumps({"type": "set", "id": "kitchen", "on": "yes"}),
        ]
        for text in bad:
            await ws.send_str(text)
            msg = await ws.receive_json(timeout=5)
            assert msg["type"] == "error" and msg["message"]
        await ws.send_bytes(b"\x00")
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        await ws.send_json({"type": "set", "id": "kitchen", "on": True})
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "state" and on_of(msg["devices"], "kitchen") is True
        assert not ws.closed


async def test_sse_initial_and_change_events(base: str, http: aiohttp.ClientSession) -> None:
    """/api/events streams the state immediately and again after a change."""
    async with http.get(base + "/api/events") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        event, data = await read_sse_event(resp)
        assert event == "state" and not on_of(data["devices"], "living-room")
        async with http.post(base + "/api/devices/living-room", json={"on": True}) as r:
            assert r.status == 200
        event, data = await read_sse_event(resp)
        assert event == "state" and on_of(data["devices"], "living-room") is True


async def test_sse_ends_when_client_disconnects(app: web.Application, base: str) -> None:
    """The SSE handler notices a vanished client and unsubscribes."""
    async with aiohttp.ClientSession() as session:
        resp = await session.get(base + "/api/events")
        await read_sse_event(resp)
        assert len(app[HOME_STATE].sse_queues) == 1
        resp.close()
    async with asyncio.timeout(5):
        while app[HOME_STATE].sse_queues:
            await asyncio.sleep(0.05)


async def test_shutdown_with_open_ws_and_sse_is_prompt() -> None:
    """Cleaning up the runner closes WebSockets with 1001 and ends SSE, within seconds."""
    app = create_home_app()
    async with aiohttp.ClientSession() as session:
        async with serve(app) as (runner, base):
            ws = await session.ws_connect(base + "/api/ws")
            await ws.receive_json(timeout=5)
            sse = await session.get(base + "/api/events")
            await read_sse_event(sse)

            async def drain_ws() -> aiohttp.WSMessage:
                # Keep reading like a browser would, so the close handshake is answered.
                while True:
                    msg = await ws.receive()
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                        return msg

            reader = asyncio.create_task(drain_ws())
            async with asyncio.timeout(5):
                await runner.cleanup()
                msg = await reader
                with pytest.raises(EOFError):
                    await read_sse_event(sse)
            assert msg.type is WSMsgType.CLOSE and msg.data == WSCloseCode.GOING_AWAY
            assert ws.closed and ws.close_code == WSCloseCode.GOING_AWAY
            sse.close()
