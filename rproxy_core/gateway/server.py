"""The WebSocket-to-POST gateway's I/O: client sockets, POSTs to the backend, the callback API.

Per connection: one task reads the client (the aiohttp handler), at most one task delivers its
queued frames (started when a frame arrives, gone when the queue is empty), so an idle
connection costs its socket and a few small objects. The reader stops reading while the queue
is full: a slow backend slows the client down through TCP, never grows memory.

Frames from callbacks reach the client through one writer per connection, the only coroutine
that waits for the client's socket to drain. aiohttp keeps one drain future per socket and
hands it to every writer that waits; a callback that timed out inside it would cancel that
future for all the others (they would see CancelledError and drop their HTTP connections) and
leave it cancelled for the next. And a frame is written before the drain is awaited, so
callbacks that each wrote and then gave up would pile frames into the socket buffer without
bound. With one writer, a callback that times out while its frame still waits in the outbox
takes it back unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import WSMsgType, web

from ..protocol.closecodes import CloseCode
from .core import (
    BINARY,
    CLIENT_HEADER,
    ID_HEADER,
    SEND_HEADER,
    SIGNATURE_HEADER,
    TEXT,
    Allowlist,
    ConnectionState,
    ConnectionTable,
    GatewayConfig,
    callback_frame,
    shown,
    sign,
)
from .delivery import Delivery, HttpDelivery, deliver

__all__ = ["Gateway"]

_LOGGER = logging.getLogger("rproxy.gateway")
_ACCESS = logging.getLogger("rproxy.gateway.access")

_CONTENT_TYPES = {TEXT: "text/plain; charset=utf-8", BINARY: "application/octet-stream"}
_CLOSE_FORM = "application/x-www-form-urlencoded"
#: A client may name these three targets in the connect URL's query.
_TARGET_KEYS = ("f", "d", "c")
#: Close codes an application may send (RFC 6455 §7.4.2).
_SENDABLE = frozenset({int(CloseCode.NORMAL)}) | frozenset(range(3000, 5000))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    reason = HTTPStatus(status).phrase
    return web.Response(
        status=status, text=f"{status} {reason}: {message}\n", headers={"Cache-Control": "no-store", **(headers or {})}
    )


def _close_reason(reason: str) -> bytes:
    """At most 123 bytes of UTF-8 (a close frame's limit), cut on a character boundary."""
    return reason.encode()[:123].decode("utf-8", "ignore").encode()


class _Link:
    """A connection's live parts beside its state: the socket and the tasks that serve it."""

    __slots__ = ("conn", "ws", "room", "task", "outbox", "writer")

    def __init__(self, conn: ConnectionState, ws: web.WebSocketResponse) -> None:
        self.conn = conn
        self.ws = ws
        #: Set while the reader waits for the queue to have room.
        self.room: asyncio.Future[None] | None = None
        #: The delivery task while frames are queued.
        self.task: asyncio.Task[None] | None = None
        #: Callback frames waiting for the writer, each with the future its callback awaits.
        self.outbox: deque[tuple[bytes, WSMsgType, asyncio.Future[None]]] = deque()
        #: The writer task while the outbox has frames.
        self.writer: asyncio.Task[None] | None = None


class Gateway:
    """Accept WebSocket clients on ``/connect``, POST their frames, serve the callback API.

    Standalone: ``await gateway.serve(host, port)``. In a bridge: ``front()`` wraps the
    bridge's catch-all handler and the bridge calls ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        delivery: Delivery | None = None,
        address_of: Callable[[web.BaseRequest], str] | None = None,
    ) -> None:
        self.config = config
        self.allowlist = Allowlist(config.allowlist)
        self.table = ConnectionTable(config)
        # One POST at most per connection, so the pool never needs more sockets than connections;
        # a smaller one would make frames wait for a slot and time out on a busy gateway.
        self.delivery: Delivery = (
            delivery if delivery is not None else HttpDelivery(self.allowlist, max_connections=config.max_connections)
        )
        self._address_of = address_of or (lambda request: request.remote or "?")
        self._links: dict[str, _Link] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._callback_path = config.callback_path
        self._host = config.host.lower().rstrip(".") if config.host else None
        self.stopping = False
        self.port: int | None = None
        self.stats = {
            "accepted": 0,
            "refused": 0,
            "frames_in": 0,
            "frames_out": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "delivery_failures": 0,
            "callbacks_refused": 0,
        }

    # Life cycle.

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        if not self.allowlist:
            _LOGGER.warning("gateway: no allowlist, so every client connection is refused")

    async def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on its own port (``rproxy gateway``); OSError before anything is left running."""
        app = web.Application(handler_args={"max_field_size": 8190, "max_line_size": 8190, "max_headers": 100})
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        await self.start()

    async def stop(self) -> None:
        """Close every client with 1001, send their disconnect POSTs (within the grace), stop."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        links = list(self._links.values())
        if links:
            _LOGGER.info("gateway stopping: closing %d client connection(s)", len(links))
        await asyncio.gather(
            *(self._close(link, CloseCode.GOING_AWAY, "gateway shutting down", "gateway") for link in links),
            return_exceptions=True,
        )
        if self._finishing:
            _, late = await asyncio.wait(set(self._finishing), timeout=self.config.shutdown_grace)
            for task in late:
                task.cancel()
            if late:
                _LOGGER.warning(
                    "gateway stopping: %d disconnect POST(s) cut off after %gs", len(late), self.config.shutdown_grace
                )
                await asyncio.gather(*late, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.delivery.close()

    def front(
        self, fallback: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A handler serving the gateway's host name and passing every other host to ``fallback``."""
        host = self._host

        async def handler(request: web.Request) -> web.StreamResponse:
            name = request.host.lower()
            if not name.startswith("[") and name.count(":") == 1:
                name = name.rsplit(":", 1)[0]
            if name.rstrip(".") == host:
                return await self.handle(request)
            return await fallback(request)

        return handler

    # Requests.

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in ("/_rproxy/metrics", "/_rproxy/status.json"):
            return self._admin(request, path.endswith(".json"))
        if path == "/connect" or path == self._callback_path + "connect":
            return await self._connect(request)
        if path.startswith(self._callback_path):
            conn_id = path[len(self._callback_path) :]
            if conn_id and "/" not in conn_id and len(conn_id) <= 64:
                return await self._callback(request, conn_id)
        return _error(404, "no such gateway endpoint; clients connect to /connect?f=FRAME_URL&d=DISCONNECT_URL")

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        if request.method != "GET" or request.headers.get("Upgrade", "").lower() != "websocket":
            return _error(426, "connect with a WebSocket client", {"Upgrade": "websocket", "Connection": "Upgrade"})
        if self.stopping:
            return self._refuse(503, "the gateway is restarting", {"Retry-After": "5"})
        if not self.allowlist:
            return self._refuse(403, "this gateway has no allowlist: every connection is refused")
        targets: dict[str, str] = {}
        for key in _TARGET_KEYS:
            values = request.query.getall(key, [])
            if len(values) > 1:
                return self._refuse(400, f"{key}= is given more than once")
            if values:
                problem = self.allowlist.check(values[0])
                if problem is not None:
                    return self._refuse(403, f"{key}= is {problem}")
                targets[key] = values[0]
        if "f" not in targets:
            return self._refuse(
                400, "f= (the URL each frame is POSTed to) is required: /connect?f=FRAME_URL&d=DISCONNECT_URL"
            )
        address = self._address_of(request)
        refusal = self.table.refusal(address)
        if refusal is not None:
            return self._refuse(*refusal)
        replayed = tuple((name, value) for name in config.forward_headers if (value := request.headers.get(name)))
        loop = asyncio.get_running_loop()
        conn = self.table.add(address, targets["f"], targets.get("d"), replayed, loop.time())
        conn.headers = ((SEND_HEADER, conn.callback), (ID_HEADER, conn.id), (CLIENT_HEADER, address), *replayed)
        try:
            if "c" in targets:
                refused = await self._ask_backend(conn, request, targets["c"])
                if refused is not None:
                    self.table.remove(conn)
                    return refused
            # aiohttp refuses a message of exactly max_msg_size; the limit here is inclusive.
            ws = web.WebSocketResponse(max_msg_size=config.max_message_size + 1, compress=False, autoping=True)
            await ws.prepare(request)
        except BaseException:
            self.table.remove(conn)
            raise
        self.stats["accepted"] += 1
        link = self._links[conn.id] = _Link(conn, ws)
        try:
            await self._read(link)
        finally:
            conn.open = False
            task = asyncio.get_running_loop().create_task(self._finish(link))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        return ws

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        self.stats["refused"] += 1
        return _error(status, message, headers)

    async def _ask_backend(self, conn: ConnectionState, request: web.Request, url: str) -> web.Response | None:
        """The optional connect URL: POST the handshake; a non-2xx answer refuses the upgrade."""
        body = json.dumps(
            {
                "id": conn.id,
                "address": conn.address,
                "path": request.path_qs,
                "headers": [[name, value] for name, value in request.headers.items()],
            }
        ).encode()
        headers = self._post_headers(conn, "application/json", body)
        config = self.config
        outcome = await deliver(
            self.delivery,
            url,
            headers,
            body,
            timeout=config.post_timeout,
            retries=config.retries,
            backoff=config.retry_backoff,
            what="connect",
        )
        if outcome.ok:
            return None
        _LOGGER.info("gateway: connection from %s refused by the connect URL: %s", conn.address, outcome.reason)
        if outcome.status is not None and 400 <= outcome.status <= 599:
            return self._refuse(outcome.status, "the backend refused the connection")
        return self._refuse(502, "the backend's connect URL did not accept the connection")

    async def _read(self, link: _Link) -> None:
        """Client frames → queue, pausing while the queue is full."""
        conn, ws, config = link.conn, link.ws, self.config
        loop = asyncio.get_running_loop()
        while True:
            if not conn.has_room(config):
                link.room = loop.create_future()
                try:
                    await link.room
                finally:
                    link.room = None
                continue
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                data: bytes = msg.data.encode()
                kind = TEXT
            elif msg.type is WSMsgType.BINARY:
                data, kind = msg.data, BINARY
            elif msg.type is WSMsgType.CLOSE:
                conn.ended(int(msg.data or CloseCode.NO_STATUS), str(msg.extra or ""), "client")
                return
            elif msg.type is WSMsgType.ERROR:
                error = ws.exception()
                too_big = getattr(error, "code", None) == CloseCode.MESSAGE_TOO_BIG
                conn.ended(
                    CloseCode.MESSAGE_TOO_BIG if too_big else CloseCode.PROTOCOL_ERROR,
                    "message too big" if too_big else "protocol error",
                    "gateway",
                )
                _LOGGER.info("gateway: client %s: %s", conn.address, shown(str(error)))
                return
            elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                conn.ended(CloseCode.ABNORMAL, "connection lost", "client")
                return
            else:
                continue
            conn.enqueue(kind, data, loop.time())
            self.stats["frames_in"] += 1
            self.stats["bytes_in"] += len(data)
            if link.task is None:
                link.task = loop.create_task(self._deliver(link))

    async def _deliver(self, link: _Link) -> None:
        """Queued frames → POSTs, one at a time (order kept), until the queue is empty."""
        conn, config = link.conn, self.config
        loop = asyncio.get_running_loop()
        try:
            while conn.queue:
                kind, data = conn.queue[0]
                outcome = await deliver(
                    self.delivery,
                    conn.frame_url,
                    self._post_headers(conn, _CONTENT_TYPES[kind], data),
                    data,
                    timeout=config.post_timeout,
                    retries=config.retries,
                    backoff=config.retry_backoff,
                )
                if not outcome.ok:
                    dropped = conn.drop_queue()
                    self.stats["delivery_failures"] += 1
                    _LOGGER.warning(
                        "gateway: connection %s… from %s: %s; closing it with %d (%d frame(s) dropped)",
                        conn.id[:6],
                        conn.address,
                        outcome.reason,
                        outcome.code,
                        dropped,
                    )
                    self._wake(link)
                    await self._close(link, outcome.code, outcome.reason, "backend")
                    return
                conn.delivered()
                conn.last_active = loop.time()
                self._wake(link)
        finally:
            link.task = None

    @staticmethod
    async def _write(link: _Link) -> None:
        """The outbox's frames → the client, one at a time, until the outbox is empty."""
        outbox = link.outbox
        try:
            while outbox:
                payload, msg_type, sent = outbox.popleft()
                if sent.done():
                    continue  # its callback went away
                try:
                    await link.ws.send_frame(payload, msg_type)
                except (ConnectionError, RuntimeError) as error:
                    if not sent.done():
                        sent.set_exception(error)
                    while outbox:
                        _, _, waiting = outbox.popleft()
                        if not waiting.done():
                            waiting.set_exception(ConnectionResetError("the client's connection closed"))
                    return
                if not sent.done():
                    sent.set_result(None)
        finally:
            link.writer = None

    @staticmethod
    def _wake(link: _Link) -> None:
        if link.room is not None and not link.room.done():
            link.room.set_result(None)

    def _post_headers(self, conn: ConnectionState, content_type: str, body: bytes) -> list[tuple[str, str]]:
        # conn.headers holds the x-ws-proxy-* fields and the replayed ones, built once per connection.
        headers = [("Content-Type", content_type), *conn.headers]
        if self.config.secret is not None:
            headers.append((SIGNATURE_HEADER, sign(self.config.secret, conn.callback, body)))
        return headers

    async def _close(self, link: _Link, code: int, reason: str, by: str) -> None:
        link.conn.ended(code, reason, by)
        if not link.ws.closed:
            with contextlib.suppress(Exception):
                await link.ws.close(code=code, message=_close_reason(reason))

    async def _finish(self, link: _Link) -> None:
        """After the client's side ended: the frames left, then the disconnect POST, then gone."""
        conn, config = link.conn, self.config
        try:
            if not link.ws.closed:
                with contextlib.suppress(Exception):
                    await link.ws.close(
                        code=conn.close_code or CloseCode.NORMAL, message=_close_reason(conn.close_reason)
                    )
            if link.task is not None:
                await asyncio.shield(link.task)
            if conn.disconnect_url is not None:
                body = json.dumps(
                    {"id": conn.id, "code": conn.close_code, "reason": conn.close_reason, "closed_by": conn.closed_by}
                ).encode()
                outcome = await deliver(
                    self.delivery,
                    conn.disconnect_url,
                    self._post_headers(conn, "application/json", body),
                    body,
                    timeout=config.post_timeout,
                    retries=config.retries,
                    backoff=config.retry_backoff,
                    what="disconnect",
                )
                if not outcome.ok:
                    _LOGGER.warning("gateway: connection %s… disconnect POST: %s", conn.id[:6], outcome.reason)
        finally:
            if link.task is not None:
                link.task.cancel()
            if link.writer is not None:
                link.writer.cancel()  # the socket is closed by now: nobody else waits on its drain
            self.table.remove(conn)
            self._links.pop(conn.id, None)
            if config.access_log:
                now = asyncio.get_running_loop().time()
                _ACCESS.info(
                    "%s gateway id=%s… %s %s by=%s in=%d/%dB out=%d/%dB %.1fs",
                    conn.address,
                    conn.id[:6],
                    conn.close_code,
                    shown(conn.close_reason),
                    conn.closed_by or "-",
                    conn.frames_in,
                    conn.bytes_in,
                    conn.frames_out,
                    conn.bytes_out,
                    now - conn.since,
                )

    async def _callback(self, request: web.Request, conn_id: str) -> web.StreamResponse:
        link = self._links.get(conn_id)
        if link is None or not link.conn.open:
            self.stats["callbacks_refused"] += 1
            return _error(404, "no such connection (it closed, or never existed)")
        conn, config = link.conn, self.config
        loop = asyncio.get_running_loop()
        if request.method in ("GET", "HEAD"):
            return web.json_response(conn.status(loop.time(), time.time()), headers={"Cache-Control": "no-store"})
        if request.method == "DELETE":
            code, reason = _close_args(request.query.get("code"), request.query.get("reason"))
            if code is None:
                return _error(400, reason)
            await self._close(link, code, reason, "callback")
            return web.Response(status=204)
        if request.method != "POST":
            return _error(
                405,
                "the callback takes POST (a frame), GET (status) and DELETE (close)",
                {"Allow": "GET, HEAD, POST, DELETE"},
            )
        if not conn.allow_callback(config.callback_rate, loop.time()):
            self.stats["callbacks_refused"] += 1
            return _error(429, f"more than {config.callback_rate:g} callbacks per second", {"Retry-After": "1"})
        if conn.pending_sends >= config.max_pending_sends:
            self.stats["callbacks_refused"] += 1
            return _error(503, "the client is not taking frames as fast as they come", {"Retry-After": "1"})
        body = await _read_bounded(request, config.max_message_size)
        if body is None:
            response = _error(413, f"a frame is at most {config.max_message_size} bytes")
            response.force_close()
            return response
        if request.content_type == _CLOSE_FORM:
            form = _parse_form(body)
            code, reason = _close_args(form.get("code"), form.get("reason"))
            if code is None:
                return _error(400, reason)
            await self._close(link, code, reason, "callback")
            return web.Response(status=204)
        kind, payload = callback_frame(request.content_type, request.charset, body)
        if kind is None:
            return _error(400, str(payload))
        assert isinstance(payload, bytes)
        sent = loop.create_future()
        entry = (payload, WSMsgType.TEXT if kind == TEXT else WSMsgType.BINARY, sent)
        link.outbox.append(entry)
        if link.writer is None:
            link.writer = loop.create_task(self._write(link))
        conn.pending_sends += 1
        try:
            async with asyncio.timeout(config.send_timeout):
                await sent
        except TimeoutError:
            with contextlib.suppress(ValueError):
                link.outbox.remove(entry)  # still waiting: it is never sent
            return _error(504, "the client did not take the frame in time")
        except (ConnectionError, RuntimeError):
            return _error(404, "no such connection (it closed, or never existed)")
        finally:
            conn.pending_sends -= 1
        conn.sent(len(payload), loop.time())
        self.stats["frames_out"] += 1
        self.stats["bytes_out"] += len(payload)
        return web.Response(status=204)

    async def _sweep(self) -> None:
        """Close connections idle or alive too long; one task for all (no timer per connection)."""
        config = self.config
        interval = max(0.05, min(30.0, config.idle_timeout / 4, config.max_lifetime / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            for conn, reason in self.table.expired(loop.time()):
                link = self._links.get(conn.id)
                if link is not None:
                    conn.open = False
                    task = loop.create_task(self._close(link, CloseCode.GOING_AWAY, reason, "gateway"))
                    self._finishing.add(task)
                    task.add_done_callback(self._finishing.discard)

    def snapshot(self) -> dict[str, Any]:
        return {"open": len(self.table), **self.stats}

    def _admin(self, request: web.Request, as_json: bool) -> web.Response:
        """The counts, as Prometheus text or JSON, for the admin token only (404 without one)."""
        expected = self.config.admin_token
        if expected is None:
            return _error(404, "no such gateway endpoint (set an admin token to enable it)")
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if expected.startswith("sha256:"):
            given, expected = hashlib.sha256(given.encode()).hexdigest(), expected[7:]
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            _LOGGER.warning(
                "gateway: refused %s from %s: %s admin token", request.path, request.remote, "wrong" if auth else "no"
            )
            return _error(401, "the admin token is required", {"WWW-Authenticate": 'Bearer realm="rproxy"'})
        snapshot = self.snapshot()
        if as_json:
            return web.json_response(snapshot, headers={"Cache-Control": "no-store"})
        lines = ["# TYPE rproxy_gateway_connections gauge", f"rproxy_gateway_connections {snapshot.pop('open')}"]
        for key, value in snapshot.items():
            lines += [f"# TYPE rproxy_gateway_{key} counter", f"rproxy_gateway_{key}_total {value}"]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", headers={"Cache-Control": "no-store"}
        )


async def _read_bounded(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes (nothing more is read)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    total = 0
    while chunk := await request.content.readany():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_form(body: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    try:
        return dict(parse_qsl(body.decode("ascii"), max_num_fields=4))
    except (UnicodeDecodeError, ValueError):
        return {}


def _close_args(code_text: str | None, reason: str | None) -> tuple[int | None, str]:
    """A close code and reason from a callback; (None, why) for a bad one."""
    code: int = CloseCode.NORMAL
    if code_text is not None:
        if not code_text.isdigit() or int(code_text) not in _SENDABLE:
            return None, "code must be 1000 or 3000-4999"
        code = int(code_text)
    reason = reason or ""
    if len(reason.encode()) > 123:
        return None, "reason is at most 123 bytes of UTF-8"
    return code, reason
