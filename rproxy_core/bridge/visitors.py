"""Visitor traffic: HTTP requests and WebSockets relayed over a tunnel stream.

The bridge is HTTP-aware (DESIGN.md): it parses each visitor request with aiohttp, picks the
tunnel by Host, sends the request head in an OPEN frame, and streams both bodies without
buffering them whole. Only the response *head* is subject to the request timeout; bodies
may flow for as long as they flow (downloads, Server-Sent Events, long polls).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from typing import TypeVar

from aiohttp import web

from ..const import BUSY_RETRY_AFTER, MAX_WEBSOCKET_MESSAGE
from ..exceptions import NoAgentError, StreamResetError
from ..headers import WEBSOCKET_HOP_HEADERS, is_websocket_upgrade, strip_hop_by_hop
from ..logsafe import printable
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_HTTP, KIND_WEBSOCKET, RequestHead, ResponseHead, is_token
from ..transport import TunnelStream
from ..transport.ws_pieces import PieceWriter
from ..transport.wsrelay import CLOSE_ANSWER_TIMEOUT, WebSocketRelay, aiohttp_message_limit
from .context import BridgeContext
from .metrics import BridgeMetrics
from .pages import error_response
from .registry import NoServiceError, TunnelBusyError
from .routing import resolve_route
from .shares import Shares, address_share

__all__ = ["VisitorHandler"]

_ACCESS = logging.getLogger("rproxy.access")
_LOGGER = logging.getLogger("rproxy.bridge")

#: Visitor-supplied fields the bridge replaces with its own view of the connection.
_FORWARDING_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"})

#: Seconds a visitor may take to accept one chunk of a response before it is cut off.
VISITOR_SEND_TIMEOUT = 60.0


#: Bodies up to this size that arrived whole with their head are sent with the head in one
#: write; larger or still-arriving bodies are streamed.
_ONE_WRITE_BODY = 64 << 10

#: What the visitor sees when the agent reset the stream before answering.
_STATUS_FOR_RESET = {
    ErrorCode.TARGET_UNREACHABLE: (502, "the home app cannot be reached from the agent"),
    ErrorCode.TARGET_TIMEOUT: (504, "the home app did not answer in time"),
    ErrorCode.TARGET_ERROR: (502, "the home app broke off the response"),
    ErrorCode.REQUEST_REJECTED: (400, "the request cannot be forwarded"),
    ErrorCode.REFUSED_STREAM: (503, "the agent is too busy, try again"),
}

#: Reason of the reset that stops an upload over max_body_size (how the reply side tells 413).
_BODY_TOO_LARGE = "request body over the bridge's max_body_size"


class VisitorHandler:
    """aiohttp handler for every path outside /_rproxy/."""

    def __init__(self, context: BridgeContext) -> None:
        self._context = context
        # Request ids: a random prefix per bridge run and a counter; unique without a
        # system call per request.
        self._id_prefix = secrets.token_hex(4)
        self._id_counter = itertools.count(1)
        #: Requests in flight and WebSockets open, per (tunnel, visitor address share).
        self._requests: Shares[tuple[str, str]] = Shares(context.config.max_requests_per_visitor)
        self._websockets: Shares[tuple[str, str]] = Shares(context.config.max_websockets_per_visitor)

    def _next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):08x}"

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        context = self._context
        started = time.monotonic()
        route = resolve_route(request.host, context.config.domain, context.registry.names(), context.config.aliases)
        name, service = route if route is not None else (None, "")
        is_websocket = is_websocket_upgrade(request.method, request.headers)
        head = RequestHead(
            method=request.method,
            target=_request_target(request),
            headers=self._forward_headers(request, is_websocket),
            kind=KIND_WEBSOCKET if is_websocket else KIND_HTTP,
            request_id=self._next_request_id(),
            service=service,
        )
        log = _Access(
            request,
            f"{service}.{name}" if service and name else name,
            head.request_id,
            started,
            context.config.access_log,
            context.metrics,
            name,
        )
        if context.draining:
            return log.done(
                error_response(request, 503, "the bridge is restarting", {"Retry-After": "5", "Connection": "close"})
            )
        if name is None:
            if context.config.domain is None and not context.registry.names():
                # Without a domain any Host reaches the one tunnel, so no tunnel at all means
                # its agent is away (reconnecting): temporary, not "no such page".
                return log.done(error_response(request, 503, "no agent is connected", {"Retry-After": "5"}))
            return log.done(error_response(request, 404, f"no tunnel is named by host {request.host!r}"))
        if service and context.registry.service_kind(name, service) not in (KIND_HTTP, None):
            return log.done(
                error_response(
                    request, 404, f"{service!r} of tunnel {name!r} is a TCP service: reach it with rproxy tcp"
                )
            )
        address = context.visitor_address(request)[0]
        guard = context.visitor_guard
        if guard.protects(name):
            # Before any stream exists: a refused visitor never reaches the agent or the home app.
            refused = await guard.admit(request, name, address)
            if refused is not None:
                return log.done(refused)
        has_body = request.body_exists and not is_websocket
        max_body = context.config.max_body_size
        if max_body is not None and has_body and (request.content_length or 0) > max_body:
            # Refused before anything reaches the agent; the connection closes rather than
            # reading the body it announced.
            return log.done(_body_too_large(request, max_body))
        # A fair share per visitor address and tunnel, taken before a stream slot is: one
        # client (a script opening thousands of idle WebSockets) cannot fill the tunnel.
        share = (name, address_share(address))
        shares = self._websockets if is_websocket else self._requests
        if not shares.take(share):
            what = "WebSockets open" if is_websocket else "requests in flight"
            return log.done(
                error_response(
                    request,
                    429,
                    f"too many {what} at once from your address, close some and try again",
                    {"Retry-After": str(BUSY_RETRY_AFTER)},
                )
            )
        try:
            return await self._relay(request, name, service, head, has_body, is_websocket, log)
        finally:
            shares.give_back(share)

    async def _relay(
        self,
        request: web.Request,
        name: str,
        service: str,
        head: RequestHead,
        has_body: bool,
        is_websocket: bool,
        log: _Access,
    ) -> web.StreamResponse:
        """Open the stream for ``head`` and relay the exchange over it."""
        context = self._context
        try:
            # A WebSocket's half stays open for the visitor's messages; an HTTP request without
            # a body ends with its OPEN frame.
            stream = await context.registry.open_stream(name, head, end_stream=not (has_body or is_websocket))
        except NoAgentError:
            return log.done(error_response(request, 503, f"no agent is connected for {name!r}", {"Retry-After": "5"}))
        except NoServiceError:
            return log.done(error_response(request, 404, f"tunnel {name!r} has no web app named {service!r}"))
        except TunnelBusyError:
            return log.done(
                error_response(
                    request,
                    503,
                    f"tunnel {name!r} is busy (too many requests at once), try again shortly",
                    {"Retry-After": str(BUSY_RETRY_AFTER)},
                )
            )
        try:
            if is_websocket:
                # The head went out with the OPEN; a WebSocket may live for days, and its copy
                # of the visitor's header fields is of no further use here.
                head.headers = []
                return await self._relay_websocket(request, stream, log)
            return await self._relay_http(request, stream, has_body, log)
        except asyncio.CancelledError:
            # The visitor hung up (the bridge runs aiohttp with handler cancellation, so a
            # handler waiting on a slow home app or a quiet event stream learns it at once).
            # After a close handshake the connection ends too: that is no error.
            log.note = log.note or "visitor gone"
            log.done(None)
            raise
        finally:
            if not stream.closed:
                stream.reset(ErrorCode.CANCEL, "visitor gone")

    def _forward_headers(self, request: web.Request, is_websocket: bool) -> list[tuple[str, str]]:
        extra = _FORWARDING_HEADERS | WEBSOCKET_HOP_HEADERS if is_websocket else _FORWARDING_HEADERS
        # Names with an underscore are dropped, all of them (as nginx does by default): CGI
        # and WSGI apps read "X_Forwarded_For" as HTTP_X_FORWARDED_FOR, the bridge's own field.
        headers = [(n, v) for n, v in strip_hop_by_hop(request.headers.items(), extra) if "_" not in n]
        address, scheme = self._context.visitor_address(request)
        # One address, the visitor's: the agent and the home app never have to pick the
        # right entry out of a chain a visitor could have written half of.
        headers.append(("X-Forwarded-For", address))
        headers.append(("X-Forwarded-Proto", scheme))
        headers.append(("X-Forwarded-Host", request.host))
        return headers

    async def _await_reply(
        self, request: web.Request, stream: TunnelStream, log: _Access
    ) -> ResponseHead | web.StreamResponse:
        try:
            async with asyncio.timeout(self._context.config.request_timeout):
                return await stream.reply()
        except TimeoutError:
            stream.reset(ErrorCode.CANCEL, "request timeout")
            return log.done(error_response(request, 504, "the home app did not answer in time"))
        except StreamResetError as err:
            if str(err) == _BODY_TOO_LARGE:
                return log.done(_body_too_large(request, self._context.config.max_body_size or 0))
            if err.code == ErrorCode.PROTOCOL_ERROR:
                # Most often the agent's response head failed validation (protocol/heads.py).
                _LOGGER.warning(
                    "tunnel %s, request %s: invalid answer from the agent, stream reset: %s",
                    printable(log.tunnel or "-"),
                    log.request_id,
                    printable(err),
                )
                log.note = "agent error: invalid response head"
            status, message = _STATUS_FOR_RESET.get(err.code, (502, "the tunnel dropped the request"))  # type: ignore[call-overload]
            return log.done(error_response(request, status, message))

    async def _relay_http(
        self, request: web.Request, stream: TunnelStream, has_body: bool, log: _Access
    ) -> web.StreamResponse:
        upload = None
        if has_body:
            limit = self._context.config.max_body_size
            pump = _pump_request_body(request, stream) if limit is None else _pump_bounded_body(request, stream, limit)
            upload = asyncio.create_task(pump)
        try:
            head = await self._await_reply(request, stream, log)
            if not isinstance(head, ResponseHead):
                return head
            return await self._send_response(request, stream, head, log)
        finally:
            if upload is not None and not upload.done():
                upload.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upload

    async def _send_response(
        self, request: web.Request, stream: TunnelStream, head: ResponseHead, log: _Access
    ) -> web.StreamResponse:
        """Write the agent's answer to the visitor by HTTP's rules, never the agent's bytes as such.

        The head was validated when it was decoded (protocol/heads.py). The body's extent is
        decided here: none for HEAD, 1xx, 204 and 304; exactly Content-Length bytes when the
        agent declared one; chunked otherwise. An agent that breaks this (a body where none
        may be, more or fewer bytes than it declared) gets its stream reset and one log line,
        and the visitor's connection is closed rather than reused: bytes of its choosing can
        never become the start of the next response on that connection.
        """
        if head.status < 200:
            # 101 only ends a WebSocket upgrade (handled by the caller); an interim answer is
            # the home side's to handle, never the visitor's final response.
            return self._agent_broke(request, stream, log, f"status {head.status} as a final response")
        try:
            length = _declared_length(head.headers)
        except ValueError as err:
            return self._agent_broke(request, stream, log, str(err))
        bodiless = request.method == "HEAD" or head.status in (204, 304)
        if bodiless:
            return await self._send_bodiless(request, stream, head, log)
        if length is not None:
            body = stream.take_complete_body(_ONE_WRITE_BODY)
            if body is not None and len(body) == length:
                # The whole (small) body came with the head: answer with one write.
                whole = web.Response(status=head.status, reason=head.reason or None, body=body)
                for name, value in strip_hop_by_hop(head.headers):
                    if name.lower() != "content-length":
                        whole.headers.add(name, value)
                log.status, log.bytes = head.status, len(body)
                return log.done(whole)
            if body is not None:
                # Complete, and not what the head declared; nothing is written yet.
                return self._agent_broke(request, stream, log, f"{len(body)} body bytes for Content-Length {length}")
        response = web.StreamResponse(status=head.status, reason=head.reason or None)
        for name, value in strip_hop_by_hop(head.headers):
            if name.lower() != "content-length":
                response.headers.add(name, value)
        if length is not None:
            response.content_length = length
        log.status = head.status
        try:
            await response.prepare(request)
            while chunk := await stream.read():
                if length is not None and log.bytes + len(chunk) > length:
                    # Not one byte past the declared end: what follows would be read by the
                    # visitor (or a proxy in front) as the next response.
                    chunk = chunk[: length - log.bytes]
                    overrun = True
                else:
                    overrun = False
                try:
                    # As nginx's send_timeout: a visitor that takes no chunk for this long has
                    # stopped reading; its stream would otherwise hold a window for good.
                    async with asyncio.timeout(VISITOR_SEND_TIMEOUT):
                        await response.write(chunk)
                except TimeoutError:
                    log.note = f"visitor stopped reading for {VISITOR_SEND_TIMEOUT:g}s"
                    stream.reset(ErrorCode.CANCEL, "visitor stopped reading")
                    _close(request)
                    return log.done(response)
                log.bytes += len(chunk)
                if overrun:
                    self._reset_and_log(stream, log, f"more body than its Content-Length {length}")
                    _close(request)
                    return log.done(response)
            if length is not None and log.bytes != length:
                self._reset_and_log(stream, log, f"{log.bytes} body bytes for Content-Length {length}")
                _close(request)
                return log.done(response)
            await response.write_eof()
        except StreamResetError as err:
            # Headers are out: the only honest signal left is to cut the connection.
            log.note = f"aborted: {printable(err)}"
            _close(request)
        except (ConnectionError, RuntimeError) as err:
            log.note = f"visitor gone: {err.__class__.__name__}"
            stream.reset(ErrorCode.CANCEL, "visitor gone")
        return log.done(response)

    async def _send_bodiless(
        self, request: web.Request, stream: TunnelStream, head: ResponseHead, log: _Access
    ) -> web.StreamResponse:
        """HEAD, 204 and 304: the head alone, once the agent has ended its side without a body."""
        if not stream.at_eof:
            try:
                async with asyncio.timeout(self._context.config.request_timeout):
                    extra = await stream.read()
            except TimeoutError:
                stream.reset(ErrorCode.CANCEL, "request timeout")
                return log.done(error_response(request, 504, "the home app did not end its answer in time"))
            except StreamResetError as err:
                log.note = f"aborted: {printable(err)}"
                dropped = error_response(request, 502, "the tunnel dropped the request")
                dropped.force_close()
                return log.done(dropped)
            if extra:
                what = "a HEAD request" if request.method == "HEAD" else f"status {head.status}"
                return self._agent_broke(request, stream, log, f"body bytes in an answer to {what}")
        response = web.Response(status=head.status, reason=head.reason or None)
        for name, value in strip_hop_by_hop(head.headers):
            if name.lower() == "content-length" and head.status in (204, 304):
                continue  # no length for what has none (a 304's would describe another message)
            response.headers.add(name, value)
        log.status = head.status
        return log.done(response)

    def _reset_and_log(self, stream: TunnelStream, log: _Access, what: str) -> None:
        """One warning naming the tunnel and request; the agent's stream is reset."""
        _LOGGER.warning(
            "tunnel %s, request %s: the agent sent %s; stream reset, visitor connection closed",
            printable(log.tunnel or "-"),
            log.request_id,
            what,
        )
        log.note = f"agent error: {what}"
        if not stream.closed:
            stream.reset(ErrorCode.PROTOCOL_ERROR, what)

    def _agent_broke(self, request: web.Request, stream: TunnelStream, log: _Access, what: str) -> web.Response:
        """Before anything was written: 502, and the visitor's connection is not reused."""
        self._reset_and_log(stream, log, what)
        response = error_response(request, 502, "the home side sent an invalid response")
        response.force_close()
        return log.done(response)

    async def _relay_websocket(self, request: web.Request, stream: TunnelStream, log: _Access) -> web.StreamResponse:
        head = await self._await_reply(request, stream, log)
        if not isinstance(head, ResponseHead):
            return head
        if head.status != 101:  # the home app refused the upgrade: relay its answer
            return await self._send_response(request, stream, head, log)
        protocol = next((v for k, v in head.headers if k.lower() == "sec-websocket-protocol"), None)
        if protocol is not None and not is_token(protocol):
            # One subprotocol, a token (RFC 6455 §4.2.2); it goes into the visitor's 101 head.
            return self._agent_broke(request, stream, log, "a subprotocol that is not a token")
        config = self._context.config
        ws = web.WebSocketResponse(
            protocols=(protocol,) if protocol else (),
            # Pings and closes are the home app's to answer: the relay passes them on.
            autoping=False,
            autoclose=False,
            timeout=CLOSE_ANSWER_TIMEOUT,
            # A visitor's message is assembled whole by aiohttp before it can be relayed: the
            # limit bounds that (1009 beyond it), and is small, as what browsers send is.
            max_msg_size=aiohttp_message_limit(config.max_websocket_message),
            # No permessage-deflate with visitors: ~0.5 MB of deflate inflates to 600 MiB
            # (issue 15, finding 10), and each deflating socket costs zlib state on the bridge.
            compress=False,
            # Idle visitors are pinged; one that neither sends nor answers within half the
            # interval more is closed (its stream slot and buffers are freed).
            heartbeat=config.websocket_idle_timeout,
        )
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError):
            return log.done(ws)
        log.status = 101
        relay = WebSocketRelay(
            ws,
            stream,
            max_message=MAX_WEBSOCKET_MESSAGE,
            message_rate=config.websocket_message_rate,
            # Big messages from the home app go on piece by piece, never assembled here.
            pieces=PieceWriter.of(ws),
            what="visitor",
        )
        try:
            await relay.run()
        finally:
            # Also when the visitor hangs up right after the close handshake (the handler is
            # then cancelled): the line says how the exchange ended.
            log.bytes += relay.bytes_to_peer
            log.note = log.note or relay.note
        return log.done(ws)


def _close(request: web.Request) -> None:
    """End the visitor's connection now: nothing more is written on it, nothing read as next."""
    if request.transport is not None:
        request.transport.abort()


def _declared_length(headers: list[tuple[str, str]]) -> int | None:
    """The response's Content-Length, or None if it has none.

    Raises:
        ValueError: several that differ, or one that is not a plain decimal number.
    """
    length = None
    for name, value in headers:
        if name.lower() == "content-length":
            text = value.strip(" \t")
            if (
                not text.isdigit()
                or not text.isascii()
                or len(text) > 18
                or (length is not None and int(text) != length)
            ):
                raise ValueError(f"a bad Content-Length {printable(value, 40)!r}")
            length = int(text)
    return length


def _request_target(request: web.Request) -> str:
    """Path and query to forward, as the visitor wrote them.

    A server must accept the absolute form ``GET http://host/path`` (RFC 9112 §3.2.2): its
    authority already picked the tunnel, so only the path and query go on. Anything else that
    does not start with "/" is passed as is, for the agent to refuse.
    """
    target = request.raw_path
    if target.startswith("/") or "://" not in target:
        return target
    return request.rel_url.raw_path_qs or "/"


async def _pump_request_body(request: web.Request, stream: TunnelStream) -> None:
    """Visitor's request body → stream, chunk by chunk, as fast as the agent takes it."""
    content = request.content
    try:
        while chunk := await content.readany():
            await stream.write(chunk)
        await stream.end()
    except StreamResetError:
        pass  # the response side reports it
    except Exception as err:  # visitor went away mid-upload, or sent a broken body
        _LOGGER.debug("upload of %s failed: %r", stream.head.request_id, err)
        stream.reset(ErrorCode.CANCEL, "visitor upload failed")


async def _pump_bounded_body(request: web.Request, stream: TunnelStream, limit: int) -> None:
    """As _pump_request_body, but a body over ``limit`` bytes resets the stream (the visitor gets 413).

    The check is on what arrives: a chunked body announces no length.
    """
    content = request.content
    received = 0
    try:
        while chunk := await content.readany():
            received += len(chunk)
            if received > limit:
                _LOGGER.info("request %s: body over %d bytes, stream reset", stream.head.request_id, limit)
                stream.reset(ErrorCode.CANCEL, _BODY_TOO_LARGE)
                return
            await stream.write(chunk)
        await stream.end()
    except StreamResetError:
        pass
    except Exception as err:
        _LOGGER.debug("upload of %s failed: %r", stream.head.request_id, err)
        stream.reset(ErrorCode.CANCEL, "visitor upload failed")


def _body_too_large(request: web.Request, limit: int) -> web.Response:
    response = error_response(request, 413, f"the request body is larger than this bridge accepts ({limit} bytes)")
    # The rest of the body is not wanted: aiohttp reads it away for a moment (so the visitor
    # sees this answer, not a reset), then closes instead of parsing it as the next request.
    response.force_close()
    return response


_R = TypeVar("_R", bound=web.StreamResponse | None)


class _Access:
    """One access-log line per visitor request, written when the response is done."""

    __slots__ = (
        "request",
        "tunnel",
        "request_id",
        "started",
        "enabled",
        "status",
        "bytes",
        "note",
        "metrics",
        "tunnel_name",
        "finished",
    )

    def __init__(
        self,
        request: web.Request,
        tunnel: str | None,
        request_id: str,
        started: float,
        enabled: bool,
        metrics: BridgeMetrics,
        tunnel_name: str | None,
    ) -> None:
        self.request = request
        self.tunnel = tunnel
        self.request_id = request_id
        self.started = started
        self.enabled = enabled
        self.status = 0
        self.bytes = 0
        self.note = ""
        self.metrics = metrics
        self.tunnel_name = tunnel_name
        self.finished = False

    def done(self, response: _R) -> _R:
        """Count the request and log its line (once); return ``response``. None means the
        visitor left (499)."""
        if self.finished:
            return response
        self.finished = True
        status = self.status or (response.status if response is not None else 499)
        self.metrics.request_done(self.tunnel_name, status, time.monotonic() - self.started)
        if self.enabled:
            request = self.request
            if isinstance(response, web.Response) and response.body is not None:
                self.bytes = self.bytes or len(response.body)  # type: ignore[arg-type]
            _ACCESS.info(
                '%s "%s %s HTTP/%d.%d" %d %d %.3fs tunnel=%s id=%s%s',
                request.remote,
                request.method,
                printable(request.raw_path, 2048),
                request.version.major,
                request.version.minor,
                status,
                self.bytes,
                time.monotonic() - self.started,
                self.tunnel or "-",
                self.request_id,
                f" ({self.note})" if self.note else "",
            )
        return response
