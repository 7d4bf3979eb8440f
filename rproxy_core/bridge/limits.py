"""Limits on visitor connections that aiohttp does not enforce by itself.

aiohttp parses each request head and answers a malformed one with 400, whatever went wrong.
It has an idle timeout (``keepalive_timeout``), but nothing bounds the time a client may take
to send a request head, nor the size of the whole head (only each line and the number of
lines). A visitor trickling a head byte by byte would hold a connection for as long as it
likes (slowloris). The protocol below adds both bounds at the transport level, where the
bytes arrive, and gives over-long lines their own status codes (414, 431).

aiohttp offers no public hook for any of this: the bridge's runner builds its server with
:class:`GuardedServer`, whose connections are :class:`GuardedRequestHandler`. Both lean on a
few of aiohttp's private attributes (named where used); tests in
``tests/core/security/test_limits.py`` catch a change of them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

__all__ = ["HeadLimits", "GuardedRequestHandler", "GuardedServer", "BridgeRunner", "answer_expect"]

_LOGGER = logging.getLogger("rproxy.bridge")


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Bounds on a visitor's request head."""

    #: Longest request line (method, target, version); longer gets 414.
    max_line: int
    #: Longest header line; longer (or too many headers) gets 431.
    max_field: int
    #: Most bytes of head before it is complete; more gets 431.
    max_head: int
    #: Most header fields; more gets 431 (aiohttp before 3.12 parses any number).
    max_headers: int
    #: Seconds a client has to deliver a whole head, from its first byte (or from the
    #: connection's start); None: no limit.
    timeout: float | None


def _short(status: int, message: str) -> str:
    return f"{status} {HTTPStatus(status).phrase}: {message}\n"


def _plain_answer(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for when no request object exists."""
    body = _short(status, message).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def answer_expect(request: web.Request) -> None:
    """The ``Expect`` answer for every route: 100 Continue, or a 417 that quotes nothing back.

    aiohttp's own handler runs before any middleware and puts the header's value into its 417
    text, which fails with a 500 (and a traceback) when those bytes are not UTF-8.
    """
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no expectations to meet (RFC 9110 section 10.1.1)
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.isascii() and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after the interim one
        return
    raise web.HTTPExpectationFailed(text=_short(417, "the only expectation met here is 100-continue"))


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol, plus a deadline and a size bound for each request head."""

    # The private state used here (aiohttp 3.x): ``_messages`` (parsed requests not yet
    # handled, as (message or _ErrInfo, body) pairs), ``_upgraded`` (``_upgrade`` before aiohttp
    # 3.12) and ``_payload_parser`` (the connection became a WebSocket),
    # ``_request_in_progress`` (a handler is running).

    def __init__(self, manager: GuardedServer, *, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        #: Body of the newest parsed request: while it is still arriving, bytes are body, not head.
        self._last_body: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        # Bytes that end a body (and possibly begin the next head) are not counted as head.
        in_body = self._last_body is not None and not self._last_body.is_eof()
        super().data_received(data)
        if len(self._messages) > queued:
            # Before the protocol-switch check: CONNECT and upgrade requests switch the parser too.
            self._refuse_what_cannot_be_relayed(queued)
            self._close_after_other_upgrades(queued)
        if self._switched_protocol() or self._payload_parser is not None or self.transport is None:
            self._disarm_head_timer()
            return
        if len(self._messages) > queued:
            # A head may have arrived whole, in one read: measure what was parsed.
            self._refuse_oversized_heads(queued, measure=self._head_bytes + len(data) > self._limits.max_head)
            self._last_body = self._messages[-1][1]
            self._disarm_head_timer()
            self._head_bytes = 0
            return
        if in_body or not data or (self._last_body is not None and not self._last_body.is_eof()):
            return
        # A head is on its way: bound its size and the time it takes.
        self._head_bytes += len(data)
        if self._head_bytes > self._limits.max_head:
            _LOGGER.info("request head from %s over %d bytes: answered 431", self._peer(), self._limits.max_head)
            self._answer_and_close(431, "request header fields too large")
            return
        if self._head_timer is None:
            self._arm_head_timer()

    def _switched_protocol(self) -> bool:
        """Whether the connection became a WebSocket (``_upgraded`` from aiohttp 3.12 on, ``_upgrade`` before)."""
        return bool(getattr(self, "_upgraded", None) or getattr(self, "_upgrade", False))

    def _refuse_what_cannot_be_relayed(self, first: int) -> None:
        """HTTP/1.0 and 1.1 only (the parser lets "HTTP/2.0" through); no CONNECT (no tunnel is a proxy)."""
        messages = self._messages
        for index in range(first, len(messages)):
            message = messages[index][0]
            if not isinstance(message, RawRequestMessage):
                continue
            if tuple(message.version) not in ((1, 0), (1, 1)):
                major, minor = message.version
                error = BadHttpMessage(f"HTTP/{major}.{minor}")
                answer = _ErrInfo(505, error, _short(505, "this server speaks HTTP/1.0 and HTTP/1.1"))
            elif message.method == "CONNECT":
                error = BadHttpMessage("CONNECT")
                answer = _ErrInfo(501, error, _short(501, "CONNECT is not offered: a tunnel is not a proxy"))
            else:
                continue
            messages[index] = (answer, EMPTY_PAYLOAD)
            # What follows is not HTTP/1.x framing we can trust: the answer closes.
            while len(messages) > index + 1:
                messages.pop()
            return

    def _close_after_other_upgrades(self, first: int) -> None:
        """A request asking to upgrade to anything but a WebSocket (h2c, say) is answered, then closed.

        The bridge ignores such an upgrade, as RFC 9110 allows, but aiohttp's C parser stops at
        the head of any upgrade request and drops the rest of that read: a request pipelined
        behind it would never be answered. Closing after the answer tells the client so.
        """
        messages = self._messages
        for index in range(first, len(messages)):
            message, payload = messages[index]
            if not isinstance(message, RawRequestMessage) or not message.upgrade or message.should_close:
                continue
            if message.method == "GET" and message.headers.get("Upgrade", "").lower() == "websocket":
                continue
            messages[index] = (message._replace(should_close=True), payload)

    def _refuse_oversized_heads(self, first: int, *, measure: bool) -> None:
        messages = self._messages
        for index in range(first, len(messages)):
            message = messages[index][0]
            if not isinstance(message, RawRequestMessage):
                continue
            if len(message.raw_headers) > self._limits.max_headers:
                error = BadHttpMessage(f"{len(message.raw_headers)} header fields")
                answer = _short(431, "too many request header fields")
            elif (
                measure
                and (
                    size := len(message.method)
                    + len(message.path)
                    + sum(len(k) + len(v) + 4 for k, v in message.raw_headers)
                )
                > self._limits.max_head
            ):
                _LOGGER.info("request head from %s over %d bytes: answered 431", self._peer(), self._limits.max_head)
                error = BadHttpMessage(f"request head of {size} bytes")
                answer = _short(431, "the request header fields are too large")
            else:
                continue
            messages[index] = (_ErrInfo(431, error, answer), EMPTY_PAYLOAD)
            # Whatever follows would be parsed as a request of its own: the answer closes.
            while len(messages) > index + 1:
                messages.pop()
            return

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400 and isinstance(exc, BadHttpMessage):
            # aiohttp says 400 for every parse error; a line too long is a size problem, which
            # has its own answer. Which line: the two limits differ (see const.py). The parser's
            # own text (quoting the visitor's bytes back) gives way to a short one.
            if isinstance(exc, LineTooLong):
                if exc.args[1] == self._limits.max_line:
                    status, message = 414, _short(414, "the request target is too long")
                else:
                    status, message = 431, _short(431, "a request header field is too large")
            elif exc.message == "Too many headers received":
                status, message = 431, _short(431, "too many request header fields")
        return super().handle_error(request, status, exc, message)

    def _arm_head_timer(self) -> None:
        timeout = self._limits.timeout
        if timeout is not None and self._head_timer is None:
            self._head_timer = self._loop.call_later(timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._messages or self._switched_protocol():
            return
        if self._request_in_progress:
            # A pipelined head behind a long response: look again later rather than cut the
            # response short; the client gains nothing, it still holds only this one connection.
            self._arm_head_timer()
            return
        _LOGGER.info(
            "visitor %s took over %gs to send a request head: answered 408", self._peer(), self._limits.timeout
        )
        self._answer_and_close(408, "the request head took too long")

    def _answer_and_close(self, status: int, message: str) -> None:
        self._disarm_head_timer()
        transport = self.transport
        if transport is not None and not self._request_in_progress:
            transport.write(_plain_answer(status, message))
        self.force_close()

    def _peer(self) -> str:
        # From the transport: RequestHandler.peername exists only from aiohttp 3.12 on.
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "?"


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedRequestHandler` connections."""

    def __init__(self, plain: web.Server, limits: HeadLimits) -> None:
        # Takes over what the application's own server was built with (``_kwargs``: the
        # handler_args and runner options, e.g. keepalive_timeout, logger).
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class BridgeRunner(web.AppRunner):
    """AppRunner whose server is a :class:`GuardedServer`."""

    def __init__(self, app: web.Application, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._limits)
