"""The agent's side of a stream: one request to the home app, relayed back.

The agent forwards to its configured target and nowhere else: the bridge supplies only the
request target (path and query), which is joined to the target's origin and checked again
after joining, so no request head can steer the agent to another host.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ..const import MAX_WEBSOCKET_MESSAGE, TARGET_CONNECT_TIMEOUT
from ..exceptions import StreamResetError
from ..headers import WEBSOCKET_HOP_HEADERS, strip_hop_by_hop
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_WEBSOCKET, ResponseHead, is_token
from ..protocol.mux import DEFAULT_MAX_STREAMS
from ..transport import TunnelStream
from ..transport.wsrelay import CLOSE_ANSWER_TIMEOUT, WebSocketRelay, aiohttp_message_limit
from ..typing import Headers
from . import homehttp
from .homehttp import HomeClient, HomeError, HomeUnreachable
from .inprocess import VISITOR_ADDRESS

__all__ = ["FORWARDED_HEADERS", "Upstream", "create_upstream_session", "visitor_address"]

_LOGGER = logging.getLogger("rproxy.agent")

_R = TypeVar("_R")

#: The headers the bridge adds about the visitor; by default all reach the home app.
FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")

#: Headers aiohttp's client adds on its own unless told not to; a relay adds none the visitor
#: did not send.
_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class RedirectRefused(Exception):
    """The home app redirected a request the agent must not follow."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response.status)
        self.response = response


async def refuse_redirect(
    session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestRedirectParams
) -> None:
    # aiohttp's ws_connect always follows redirects; raising here stops it before it connects
    # anywhere else (aiohttp closes the redirect response on the way out).
    raise RedirectRefused(params.response)


def create_upstream_session(limit: int = DEFAULT_MAX_STREAMS) -> aiohttp.ClientSession:
    """A client session fit for relaying.

    Its connection pool is as large as the number of streams a tunnel may carry: a visitor's
    WebSocket, event stream or long poll holds its connection to the home app for as long as
    it lives, and a smaller pool would make the next visitor wait for a free slot (and get a
    504) while the tunnel itself still had room.

    Bodies pass through untouched (no decompression), cookies are never stored (visitors
    must not share a jar), and no proxy settings from the environment are used. Redirects
    are not followed either: plain requests pass ``allow_redirects=False`` and WebSocket
    upgrades go through a guarded session (``Upstream._upgrade_session``).
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, enable_cleanup_closed=False),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        # What the agent reads ahead of a visitor: the response reader pauses the home app's
        # socket at twice this, so a visitor who stops reading leaves at most ~0.5 MiB here
        # (beside the window in flight), for reads big enough that bulk transfers cost few frames.
        read_bufsize=128 << 10,
    )


class Upstream:
    """Serves tunnel streams by talking to the home app at ``target``.

    Args:
        target: base URL of the home app, e.g. ``http://127.0.0.1:8123`` (a path prefix is kept);
            None while it is not known yet (visitors get 502, see :meth:`set_target`).
        session: the client session to use (see :func:`create_upstream_session`).
        request_timeout: seconds the home app has for its response head (None: no limit
            here, the bridge's own timeout still applies).
        forward_headers: which of the bridge's X-Forwarded-* headers reach the home app.
        visitor_credentials: ``(user, password)`` visitors must give with HTTP basic auth.
        in_process: the session reaches a server in this process (see ``inprocess``): the
            visitor's address becomes the connection's peer, so forwarding headers are dropped.
        admit: called with the visitor's address; a string it returns refuses the request
            with 403 and that text.
        lean: serve plain requests to an ``http://`` target with the agent's own keep-alive
            client (``homehttp``) when ``httptools`` is installed; False keeps aiohttp for all.
            None (the default): lean unless ``$RPROXY_HOME_CLIENT`` is ``aiohttp``.
    """

    def __init__(
        self,
        target: str | URL | None,
        session: aiohttp.ClientSession,
        *,
        request_timeout: float | None = None,
        forward_headers: Iterable[str] = FORWARDED_HEADERS,
        visitor_credentials: tuple[str, str] | None = None,
        in_process: bool = False,
        admit: Callable[[str], str | None] | None = None,
        lean: bool | None = None,
    ) -> None:
        if lean is None:
            lean = os.environ.get("RPROXY_HOME_CLIENT", "") != "aiohttp"
        self._lean = lean and homehttp.available() and not in_process
        self._home: HomeClient | None = None
        self.target: URL | None = None
        self._origin: URL | None = None
        self._prefix = ""
        self.set_target(target)
        self._session = session
        self._ws_session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=TARGET_CONNECT_TIMEOUT, sock_connect=TARGET_CONNECT_TIMEOUT
        )
        self._request_timeout = request_timeout
        forwarded = {name.lower() for name in forward_headers}
        drop = {name for name in (h.lower() for h in FORWARDED_HEADERS) if in_process or name not in forwarded}
        self._expected_authorization: bytes | None = None
        if visitor_credentials is not None:
            user, password = visitor_credentials
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._expected_authorization = f"Basic {token}".encode()
            drop.add("authorization")  # the tunnel's password is not the home app's business
        self._drop = frozenset(drop)
        self._in_process = in_process
        self._admit = admit
        self.requests_served = 0

    def set_target(self, target: str | URL | None) -> None:
        """Serve the next requests from ``target``; requests under way finish where they started.

        None: no home app for now, each visitor gets 502 (the home app cannot be reached).
        """
        # Derived once here, not per request.
        if self._home is not None:
            self._home.close_idle()  # requests under way finish on their connections
            self._home = None
        self.target = None if target is None else URL(target)
        self._origin = None if self.target is None else self.target.origin()
        self._prefix = "" if self.target is None else self.target.raw_path.rstrip("/")

    def _upgrade_session(self) -> aiohttp.ClientSession:
        """A session for WebSocket upgrades that refuses redirects, sharing the connection pool.

        aiohttp's ws_connect always follows redirects; a trace hook stops it. The hook lives
        on a session of its own because trace hooks make every request on a session build
        trace objects, a cost plain requests (which never follow redirects) need not pay.
        """
        if self._ws_session is None:
            no_redirects = aiohttp.TraceConfig()
            no_redirects.on_request_redirect.append(refuse_redirect)
            self._ws_session = aiohttp.ClientSession(
                connector=self._session.connector,
                connector_owner=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                trace_configs=[no_redirects],
            )
        return self._ws_session

    def _home_client(self) -> HomeClient | None:
        """The lean client for a plain ``http://`` target; None when aiohttp serves."""
        client = self._home
        origin = self._origin
        if client is None and self._lean and origin is not None and origin.scheme == "http" and origin.raw_host:
            host, port = origin.raw_host, origin.port or 80
            authority = f"[{host}]" if ":" in host else host
            client = self._home = HomeClient(
                host,
                port,
                host_header=authority if port == 80 else f"{authority}:{port}",
                connect_timeout=TARGET_CONNECT_TIMEOUT,
            )
        return client

    async def close(self) -> None:
        """Release the upgrade session and the lean client (the main session belongs to the caller)."""
        if self._home is not None:
            self._home.close()
            self._home = None
        if self._ws_session is not None:
            await self._ws_session.close()
            self._ws_session = None

    def url_for(self, request_target: str) -> URL | None:
        """The URL at the target for a visitor's request target, or None if it is not one.

        Dot segments are removed before the target's path prefix is joined (RFC 3986
        §5.2.4), so ``/../admin`` cannot climb out of ``--target http://host/app``; a target
        that would climb above its root, or that hides a dot segment behind an encoded slash
        or a backslash, is refused (the visitor gets 400).
        """
        origin = self._origin
        if origin is None or not request_target.startswith("/") or any(c in request_target for c in "\r\n\t #"):
            return None
        normalized = remove_dot_segments(request_target)
        if normalized is None:
            return None
        try:
            url = URL(str(origin) + self._prefix + normalized, encoded=True)
        except ValueError:
            return None
        if url.origin() != origin:
            return None
        return url

    async def serve(self, stream: TunnelStream) -> None:
        """Answer one stream; never raises (failures become a RESET the bridge turns into 5xx)."""
        url = self.url_for(stream.head.target)
        if url is None:
            if self._origin is None:
                stream.reset(ErrorCode.TARGET_UNREACHABLE, "no home app found yet")
            else:
                stream.reset(ErrorCode.REQUEST_REJECTED, "request target not allowed")
            return
        # The agent touches the stream only when the home app gives it something, so a reset
        # (visitor gone, the bridge's 504) would go unnoticed while the home app thinks or
        # between two events of a stream. Cancelling this task then closes the request to the
        # home app at once.
        task = asyncio.current_task()
        if task is not None:
            stream.on_abandoned = task.cancel
        try:
            if not await self._admitted(stream):
                return
            if stream.head.kind == KIND_WEBSOCKET:
                await self._serve_websocket(stream, url)
            elif stream.head.method != "HEAD" and (home := self._home_client()) is not None:
                await self._serve_http_lean(stream, url, home)
            else:
                await self._serve_http(stream, url)
        except StreamResetError:
            pass  # the bridge cancelled (visitor gone, timeout) or the tunnel dropped
        except HomeUnreachable as err:
            _LOGGER.warning("cannot reach %s: %s", url.origin(), err.os_error or err)
            stream.reset(ErrorCode.TARGET_UNREACHABLE, "target unreachable")
        except HomeError as err:
            _LOGGER.info("request %s to the home app failed: %s", stream.head.request_id, err)
            stream.reset(ErrorCode.TARGET_ERROR, "target failed")
        except aiohttp.ClientConnectorError as err:
            _LOGGER.warning("cannot reach %s: %s", url.origin(), err.os_error or err)
            stream.reset(ErrorCode.TARGET_UNREACHABLE, "target unreachable")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            stream.reset(ErrorCode.TARGET_TIMEOUT, "target timed out")
        except (aiohttp.ClientError, ConnectionError) as err:
            _LOGGER.info("request %s to the home app failed: %r", stream.head.request_id, err)
            stream.reset(ErrorCode.TARGET_ERROR, "target failed")
        except (ValueError, UnicodeError) as err:  # e.g. a header value aiohttp will not encode
            _LOGGER.info("request %s rejected: %s", stream.head.request_id, err)
            stream.reset(ErrorCode.REQUEST_REJECTED, "request cannot be forwarded")
        except RedirectRefused as refused:
            # Only a WebSocket upgrade can get here (plain requests never follow redirects):
            # the visitor gets the redirect itself, to follow or not.
            response = refused.response
            # Its body is not relayed, so neither is its length: the bridge holds a head to
            # the body that actually follows it.
            headers = [(k, v) for k, v in strip_hop_by_hop(response.headers.items()) if k.lower() != "content-length"]
            stream.send_reply(ResponseHead(response.status, response.reason or "", headers), end_stream=True)
        except Exception:  # a bug, or an embedding's session failing in its own way
            # Logged once with its traceback for whoever runs the agent; the visitor gets a
            # prompt 502 rather than waiting out the bridge's timeout.
            _LOGGER.exception("request %s failed in the agent", stream.head.request_id)
            if not stream.closed:
                stream.reset(ErrorCode.TARGET_ERROR, "agent error")
        finally:
            stream.on_abandoned = None
            self.requests_served += 1

    async def _admitted(self, stream: TunnelStream) -> bool:
        """Apply the visitor checks; answer the visitor and return False when one fails."""
        if self._in_process or self._admit is not None:
            address = visitor_address(stream.head.headers)
            if self._admit is not None and (refusal := self._admit(address)):
                await _answer(stream, 403, "Forbidden", refusal)
                return False
            if self._in_process:
                # Read by the in-process connector when it opens this request's connection.
                VISITOR_ADDRESS.set(address)
        if self._expected_authorization is not None:
            given = next((v for k, v in stream.head.headers if k.lower() == "authorization"), "")
            # surrogateescape: bytes that were not UTF-8 compare (unequal) instead of raising.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._expected_authorization):
                await _answer(
                    stream,
                    401,
                    "Unauthorized",
                    "this site needs a user name and password",
                    [("WWW-Authenticate", 'Basic realm="rproxy", charset="UTF-8"')],
                )
                return False
        return True

    def _forwarded_headers(self, stream: TunnelStream, extra_drop: frozenset[str] = frozenset()) -> Headers:
        """The visitor's headers as the home app gets them (both clients send these)."""
        drop = extra_drop | self._drop if extra_drop else self._drop  # no new set per plain request
        request_id = stream.head.request_id
        # Names with an underscore never reach the home app (the bridge drops them too; this
        # holds for an older or a hostile bridge): a WSGI app would read X_Real_IP as X-Real-IP.
        headers = [
            (n, v)
            for n, v in strip_hop_by_hop(stream.head.headers, drop)
            if "_" not in n and not (request_id and n.lower() == "x-request-id")
        ]
        if request_id:
            # The bridge's id (replacing any the visitor sent), so that the home app's log, the
            # agent's and the bridge's access log name the same request the same way.
            headers.append(("X-Request-Id", request_id))
        return headers

    def _request_headers(
        self, stream: TunnelStream, extra_drop: frozenset[str] = frozenset()
    ) -> tuple[CIMultiDict[str], list[str]]:
        """``_forwarded_headers`` for aiohttp's client, with the headers it must not add itself."""
        headers = CIMultiDict(self._forwarded_headers(stream, extra_drop))
        skip = [name for name in _AUTO_HEADERS if name not in headers]
        return headers, skip

    async def _answer_head(self, sending: Awaitable[_R]) -> _R:
        """The home app's answer head, within ``request_timeout`` when one is set."""
        if self._request_timeout is None:  # the common case pays for no timer
            return await sending
        async with asyncio.timeout(self._request_timeout):
            return await sending

    async def _serve_http(self, stream: TunnelStream, url: URL) -> None:
        head = stream.head
        headers, skip = self._request_headers(stream)
        body = None if stream.at_eof else _request_body(stream)
        sending = self._session.request(
            head.method,
            url,
            headers=headers,
            skip_auto_headers=skip,
            data=body,
            allow_redirects=False,
            timeout=self._timeout,
        )
        response = await self._answer_head(sending)
        async with response:
            if _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("request %s: %s %s → %d", head.request_id, head.method, url.path, response.status)
            content = response.content
            reply = ResponseHead(response.status, response.reason or "", strip_hop_by_hop(response.headers.items()))
            await _relay_answer(stream, reply, content.read, content.at_eof, content.total_bytes)

    async def _serve_http_lean(self, stream: TunnelStream, url: URL, client: HomeClient) -> None:
        head = stream.head
        body = None if stream.at_eof else _request_body(stream)
        sending = client.request(head.method, url.raw_path_qs, self._forwarded_headers(stream), body)
        response = await self._answer_head(sending)
        try:
            if _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("request %s: %s %s → %d", head.request_id, head.method, url.path, response.status)
            reply = ResponseHead(response.status, response.reason, strip_hop_by_hop(response.headers))
            await _relay_answer(stream, reply, response.read, lambda: response.at_eof, response.buffered)
        finally:
            response.close()

    async def _serve_websocket(self, stream: TunnelStream, url: URL) -> None:
        headers, _ = self._request_headers(stream, WEBSOCKET_HOP_HEADERS | {"sec-websocket-protocol"})
        offered = [
            p.strip()
            for k, v in stream.head.headers
            if k.lower() == "sec-websocket-protocol"
            for p in v.split(",")
            if p.strip()
        ]
        if not all(is_token(p) for p in offered):
            # Subprotocols are tokens (RFC 6455 §4.1); anything else would go into the home
            # app's handshake as the bridge wrote it.
            stream.reset(ErrorCode.REQUEST_REJECTED, "subprotocol is not a token")
            return
        try:
            ws = await self._upgrade_session().ws_connect(
                url,
                protocols=offered,
                headers=headers,
                # Pings and closes are the visitor's to answer (the relay passes them on).
                autoping=False,
                autoclose=False,
                max_msg_size=aiohttp_message_limit(MAX_WEBSOCKET_MESSAGE),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_ANSWER_TIMEOUT),
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as err:
            # The home app answered the upgrade with an ordinary response (401, 404, ...); its
            # headers (WWW-Authenticate, Location) matter to the visitor, its body is gone.
            refusal = strip_hop_by_hop(err.headers.items()) if err.headers else []
            refusal = [(k, v) for k, v in refusal if k.lower() != "content-length"]
            stream.send_reply(ResponseHead(err.status or 502, err.message or "", refusal), end_stream=True)
            return
        async with ws:
            reply_headers = [("Sec-WebSocket-Protocol", ws.protocol)] if ws.protocol else []
            stream.send_reply(ResponseHead(101, "Switching Protocols", reply_headers))
            await WebSocketRelay(ws, stream, max_message=MAX_WEBSOCKET_MESSAGE, what="home app").run()


#: How a dot segment can be spelled (RFC 3986 §2.3: %2E is "." and must be treated as one).
_DOT_SEGMENTS = frozenset(
    {".", "..", "%2e", "%2E", ".%2e", ".%2E", "%2e.", "%2E.", "%2e%2e", "%2E%2E", "%2e%2E", "%2E%2e"}
)
#: Separators a home server may see in a segment even though RFC 3986 does not: an encoded
#: slash (decoded before routing by some) and a backslash (a separator on Windows servers).
_HIDDEN_SEPARATORS = re.compile(r"\\|%2[fF]|%5[cC]")


def remove_dot_segments(target: str) -> str | None:
    """``target`` (path and query) with its path's dot segments removed; None if it would leave its root.

    ``/a/./b/../c?q`` becomes ``/a/c?q``; ``/../x``, ``/%2e%2e/x`` and ``/x/../../y`` are None,
    and so is any path whose segments, split also at encoded slashes and backslashes, hold a
    dot segment (``/..%2fadmin``, ``/..\\admin``): no honest client needs those, and the home
    server might read them as a way up. The query is kept as it is.
    """
    path, mark, query = target.partition("?")
    if "." not in path and "%" not in path and "\\" not in path:
        return target  # the common case: nothing to remove
    out: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment in _DOT_SEGMENTS:
            if segment.replace("%2e", ".").replace("%2E", ".") == "..":
                if not out:
                    return None
                out.pop()
            if index == len(segments) - 1:
                out.append("")  # "/a/.." is "/a/", a directory
            continue
        if _HIDDEN_SEPARATORS.search(segment) and any(
            part in _DOT_SEGMENTS for part in _HIDDEN_SEPARATORS.split(segment)
        ):
            return None
        out.append(segment)
    return "/" + "/".join(out) + mark + query


def visitor_address(headers: Iterable[tuple[str, str]]) -> str:
    """The visitor's address as the bridge reported it (it sends exactly one)."""
    for name, value in headers:
        if name.lower() == "x-forwarded-for":
            return value.split(",")[-1].strip()
    return ""


async def _answer(
    stream: TunnelStream, status: int, reason: str, text: str, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Answer the visitor from the agent itself, with a short plain-text body."""
    body = (text + "\n").encode()
    head_headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers]
    stream.send_reply(ResponseHead(status, reason, head_headers), flush=False)
    await stream.write(body, end_stream=True)


async def _relay_answer(
    stream: TunnelStream,
    reply: ResponseHead,
    read: Callable[[int], Awaitable[bytes]],
    at_eof: Callable[[], bool],
    buffered: int,
) -> None:
    """The home app's answer to the visitor: ``reply``, then the body as ``read`` gives it."""
    if at_eof():
        stream.send_reply(reply, end_stream=True)
        return
    # When body bytes came with the head (``buffered``), the first write carries the head too.
    stream.send_reply(reply, flush=buffered == 0)
    while True:
        # Read only what the credit lets out at once: a visitor who stops reading then leaves
        # the body in the home app's socket, not in the agent's memory.
        chunk = await read(await stream.wait_for_credit())
        if not chunk:
            break
        # FIN rides on the last chunk: small responses cross the tunnel as one message.
        last = at_eof()
        await stream.write(chunk, end_stream=last)
        if last:
            break
    await stream.end()


async def _request_body(stream: TunnelStream) -> AsyncIterator[bytes | memoryview]:
    while chunk := await stream.read():
        yield chunk
