"""The "home" demo app: lights and sprinklers switchable from a phone, pushed live.

Everything (page, REST API, WebSocket, Server-Sent Events) is self-contained and
uses only relative URLs, so it keeps working when a reverse proxy or the tunnel
serves it under a path prefix, and needs no internet access.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from html import escape
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

# A browser answers a close frame instantly; don't let a dead peer stall shutdown.
_WS_CLOSE_TIMEOUT = 2.0
# aiohttp does not cancel handlers on disconnect, so SSE polls its transport.
_SSE_POLL = 1.0
# Comment lines keep idle SSE streams alive through proxies that drop quiet ones.
_SSE_KEEPALIVE = 15.0


@dataclass
class HomeState:
    """Per-app mutable state: devices plus everything listening for changes."""

    devices: dict[str, dict[str, Any]]
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    sse_queues: set[asyncio.Queue[list[dict[str, Any]] | None]] = field(default_factory=set)
    stopping: bool = False

    def snapshot(self) -> list[dict[str, Any]]:
        """Return copies so later changes never mutate already-queued messages."""
        return [dict(d) for d in self.devices.values()]


HOME_STATE = web.AppKey("home_state", HomeState)


def _default_devices() -> dict[str, dict[str, Any]]:
    specs = [
        ("living-room", "Living room", "light"),
        ("kitchen", "Kitchen", "light"),
        ("porch", "Porch", "light"),
        ("front-lawn", "Front lawn", "sprinkler"),
        ("garden", "Garden", "sprinkler"),
    ]
    return {i: {"id": i, "name": n, "kind": k, "on": False} for i, n, k in specs}


def _offer(queue: asyncio.Queue[Any], item: Any) -> None:
    """Put without blocking; a slow SSE reader only needs the latest state."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


async def _broadcast(state: HomeState) -> None:
    devices = state.snapshot()
    for queue in state.sse_queues:
        _offer(queue, devices)
    msg = {"type": "state", "devices": devices}
    # gather: one slow phone must not delay the others; failures mean "closing".
    sends = [ws.send_json(msg) for ws in list(state.sockets)]
    await asyncio.gather(*sends, return_exceptions=True)


async def _change(state: HomeState, device_id: str, on: bool | None) -> dict[str, Any]:
    """Set (or toggle when ``on`` is None) a device and notify everyone; KeyError if unknown."""
    device = state.devices[device_id]
    device["on"] = (not device["on"]) if on is None else on
    await _broadcast(state)
    return dict(device)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _get_state(request: web.Request) -> web.Response:
    return web.json_response({"devices": request.app[HOME_STATE].snapshot()})


async def _post_device(request: web.Request) -> web.Response:
    state = request.app[HOME_STATE]
    device_id = request.match_info["id"]
    if device_id not in state.devices:
        return _error(404, f"unknown device {device_id!r}")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "body must be JSON")
    if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
        return _error(400, 'body must be {"on": true|false}')
    return web.json_response(await _change(state, device_id, body["on"]))


async def _toggle_device(request: web.Request) -> web.Response:
    try:
        device = await _change(request.app[HOME_STATE], request.match_info["id"], None)
    except KeyError:
        return _error(404, f"unknown device {request.match_info['id']!r}")
    return web.json_response(device)


async def _handle_ws_message(state: HomeState, data: str) -> str | None:
    """Apply one client message; return an error text, or None on success."""
    try:
        msg = json.loads(data)
    except ValueError:
        return "message must be JSON"
    if not isinstance(msg, dict) or msg.get("type") not in ("set", "toggle"):
        return 'expected {"type": "set"|"toggle", ...}'
    if msg.get("id") not in state.devices:
        return f"unknown device {msg.get('id')!r}"
    if msg["type"] == "set" and not isinstance(msg.get("on"), bool):
        return '"set" needs "on": true|false'
    await _change(state, msg["id"], msg.get("on") if msg["type"] == "set" else None)
    return None


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[HOME_STATE]
    ws = web.WebSocketResponse(heartbeat=30.0, timeout=_WS_CLOSE_TIMEOUT)
    await ws.prepare(request)
    if state.stopping:  # raced with shutdown: on_shutdown will never see this socket
        await ws.close(code=WSCloseCode.GOING_AWAY)
        return ws
    state.sockets.add(ws)
    try:
        await ws.send_json({"type": "state", "devices": state.snapshot()})
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                problem = await _handle_ws_message(state, msg.data)
            else:
                problem = "only JSON text messages are accepted"
            if problem is not None:
                await ws.send_json({"type": "error", "message": problem})
    except ConnectionError:
        pass  # peer vanished mid-send; the finally clause tidies up
    finally:
        state.sockets.discard(ws)
    return ws


def _sse_event(devices: list[dict[str, Any]]) -> bytes:
    return f"event: state\ndata: {json.dumps({'devices': devices})}\n\n".encode()


async def _events(request: web.Request) -> web.StreamResponse:
    state = request.app[HOME_STATE]
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # stop nginx-style proxies buffering the stream
        }
    )
    await resp.prepare(request)
    queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue(maxsize=1)
    state.sse_queues.add(queue)
    try:
        await resp.write(_sse_event(state.snapshot()))
        idle = 0.0
        while not state.stopping:
            try:
                devices = await asyncio.wait_for(queue.get(), timeout=_SSE_POLL)
            except TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # client went away
                idle += _SSE_POLL
                if idle >= _SSE_KEEPALIVE:
                    idle = 0.0
                    await resp.write(b": keepalive\n\n")
                continue
            if devices is None:  # shutdown sentinel
                break
            idle = 0.0
            await resp.write(_sse_event(devices))
    except ConnectionError:
        pass  # write to a closed client; nothing left to do
    finally:
        state.sse_queues.discard(queue)
    return resp


async def _on_shutdown(app: web.Application) -> None:
    """Close long-lived streams so the server's graceful shutdown need not time out."""
    state = app[HOME_STATE]
    state.stopping = True
    for queue in state.sse_queues:
        _offer(queue, None)
    # Close concurrently so shutdown time doesn't grow with the number of phones.
    closes = [ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in list(state.sockets)]
    await asyncio.gather(*closes, return_exceptions=True)


def _label(device: dict[str, Any]) -> str:
    if not device["on"]:
        return "Off"
    return "Running" if device["kind"] == "sprinkler" else "On"


async def _index(request: web.Request) -> web.Response:
    buttons: dict[str, list[str]] = {"light": [], "sprinkler": []}
    for d in request.app[HOME_STATE].devices.values():
        buttons[d["kind"]].append(
            f'<button id="device-{escape(d["id"])}" class="dev" data-id="{escape(d["id"])}" '
            f'data-kind="{d["kind"]}" aria-pressed="{"true" if d["on"] else "false"}">'
            f'<span class="name">{escape(d["name"])}</span>'
            f'<span class="st">{_label(d)}</span></button>'
        )
    html = _PAGE.replace("{lights}", "".join(buttons["light"]))
    html = html.replace("{sprinklers}", "".join(buttons["sprinkler"]))
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})


def create_home_app() -> web.Application:
    """Build the home-automation demo app.

    Each call returns an independent app with all devices off; state lives on the
    app under ``HOME_STATE``, never in module globals.

    Returns:
        An ``aiohttp.web.Application`` serving ``/``, ``/api/state``,
        ``/api/devices/{id}``, ``/api/devices/{id}/toggle``, ``/api/ws`` and
        ``/api/events``. Its ``on_shutdown`` hook closes open WebSockets
        (code 1001) and ends SSE streams.
    """
    app = web.Application()
    app[HOME_STATE] = HomeState(devices=_default_devices())
    app.router.add_get("/", _index)
    app.router.add_get("/api/state", _get_state)
    app.router.add_post("/api/devices/{id}", _post_device)
    app.router.add_post("/api/devices/{id}/toggle", _toggle_device)
    app.router.add_get("/api/ws", _websocket)
    app.router.add_get("/api/events", _events)
    app.on_shutdown.append(_on_shutdown)
    return app


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Home</title>
<style>
:root{--bg:#f4f5f7;--card:#fff;--fg:#1d2330;--mute:#6b7280;--on:#f5b301;--water:#2f80ed}
@media (prefers-color-scheme:dark){:root{--bg:#11141a;--card:#1c212b;--fg:#e8eaf0;--mute:#9aa3b2}}
*{box-sizing:border-box}
body{margin:0;font:16px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--fg)}
main{max-width:32rem;margin:0 auto;padding:1rem}
h1{font-size:1.5rem;margin:.5rem 0}h2{font-size:1rem;color:var(--mute);margin:1.5rem 0 .5rem}
#connection{font-size:.9rem;color:var(--mute)}#connection.live{color:#1f9d55}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(9rem,1fr));gap:.75rem}
.dev{display:flex;flex-direction:column;align-items:flex-start;gap:.25rem;min-height:5.5rem;padding:1rem;
 border:2px solid transparent;border-radius:1rem;background:var(--card);color:inherit;font:inherit;text-align:left;
 cursor:pointer;box-shadow:0 1px 3px #0002;-webkit-tap-highlight-color:transparent}
.dev .name{font-weight:600;font-size:1.1rem}.dev .st{color:var(--mute)}
.dev[aria-pressed=true][data-kind=light]{border-color:var(--on);background:color-mix(in srgb,var(--on) 18%,var(--card))}
.dev[aria-pressed=true][data-kind=sprinkler]{border-color:var(--water);
 background:color-mix(in srgb,var(--water) 18%,var(--card))}
.dev:active{transform:scale(.97)}
</style></head><body><main>
<h1>Home</h1><div id="connection" role="status">reconnecting…</div>
<h2>Lights</h2><div class="grid" id="lights">{lights}</div>
<h2>Sprinklers</h2><div class="grid" id="sprinklers">{sprinklers}</div>
</main><script>
"use strict";
let ws = null, delay = 1000;
const status = document.getElementById("connection");
function render(d) {
  const b = document.getElementById("device-" + d.id);
  if (!b) return;
  b.setAttribute("aria-pressed", d.on ? "true" : "false");
  b.querySelector(".st").textContent = d.on ? (d.kind === "sprinkler" ? "Running" : "On") : "Off";
}
function setLive(live) { status.textContent = live ? "live" : "reconnecting…"; status.className = live ? "live" : ""; }
function connect() {
  const url = new URL("api/ws", location.href);  // relative: works under any path prefix
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(url.href);
  ws.onopen = () => { delay = 1000; setLive(true); };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "state") msg.devices.forEach(render);
    else if (msg.type === "error") console.warn(msg.message);
  };
  ws.onclose = () => { setLive(false); setTimeout(connect, delay); delay = Math.min(delay * 2, 10000); };
}
async function setDevice(id, on) {
  if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({type: "set", id, on})); return; }
  try {  // socket down: fall back to REST so the tap still works
    const r = await fetch("api/devices/" + encodeURIComponent(id), {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({on})});
    if (r.ok) render(await r.json());
  } catch (e) { console.warn(e); }
}
document.querySelectorAll(".dev").forEach((b) => b.addEventListener("click",
  () => setDevice(b.dataset.id, b.getAttribute("aria-pressed") !== "true")));
document.querySelectorAll(".dev").forEach((b) => render({id: b.dataset.id, kind: b.dataset.kind,
  on: b.getAttribute("aria-pressed") === "true"}));
connect();
</script></body></html>
"""
