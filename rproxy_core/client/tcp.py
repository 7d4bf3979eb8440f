"""The visitor side of raw TCP channels: one WebSocket to the bridge per TCP connection.

A channel is ``GET /_rproxy/tcp/<tunnel>/<service>`` upgraded to a WebSocket on the bridge's
one port (docs/PROTOCOL.md §8). Binary messages carry the bytes both ways; an empty one says
"no more bytes from me" (``shutdown(SHUT_WR)``) while the other direction keeps flowing. The
bridge closes with 1000 once both directions have ended, or with 1011 when the tunnel side
failed. Closing the WebSocket from here abandons the connection.

Backpressure is end to end: a local read is followed by a send that waits until the bridge's
socket takes the bytes, and a received message is written out and drained before the next one
is read. A channel holds a few messages in memory, whatever the size of the transfer.

The credential is handled as the agent handles its own: sent only to a wss:// bridge that the
system's CAs, a CA file or a pin vouch for, or over plain ws:// to this machine's loopback
(``insecure`` for a bridge on a trusted network); redirects are refused, proxies named in the
environment ignored, and it never appears in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from yarl import URL

from .._version import __version__
from ..const import CONNECT_PATH, DEFAULT_TUNNEL_NAME, TCP_PATH, TCP_READ_SIZE
from ..dial import (
    ChallengeError,
    NoRedirects,
    NoSecretsFilter,
    authorization,
    bridge_connect_url,
    bridge_tls_context,
    check_bridge_access,
    check_credential,
    fetch_nonce,
    pinned_sha256,
    untrusted_message,
)
from ..exceptions import AuthenticationError, ConfigError, RproxyConnectionError
from ..headers import is_tunnel_name
from ..protocol.closecodes import CloseCode
from .localio import PipeSink, Sink, Source, StreamSink, StreamSource, open_fd_sink, open_fd_source

__all__ = [
    "CHANNEL_MESSAGE_LIMIT",
    "ChannelAborted",
    "ChannelDenied",
    "ChannelRefused",
    "PipeSink",
    "Sink",
    "Source",
    "StreamSink",
    "StreamSource",
    "TcpChannel",
    "TcpClient",
    "TcpClientConfig",
    "channel_url",
    "open_fd_sink",
    "open_fd_source",
]

_LOGGER = logging.getLogger("rproxy.tcp")
#: websockets logs handshake headers at DEBUG: the filter masks the Authorization header and
#: drops frame previews (the service's bytes).
_CHANNEL_LOGGER = logging.getLogger("rproxy.tcp.websocket")
_CHANNEL_LOGGER.addFilter(NoSecretsFilter())

#: Largest message accepted from the bridge. Its channel messages are one read of the service
#: (64 KiB); the margin is for a bridge that packs more.
CHANNEL_MESSAGE_LIMIT = 1 << 20
#: Received messages buffered before websockets stops reading the socket: a few reads' worth.
_RECEIVE_QUEUE = 8
#: Seconds the upgrade may take: the bridge answers only once the agent has reached the service
#: (or gives up with 504 after its own connect timeout), so this is well above that.
CHANNEL_OPEN_TIMEOUT = 30.0
#: Pings keep an idle channel (a quiet ssh session) alive through NAT and a reverse proxy's
#: read timeout. No pong deadline: a pong queued behind data the local side is slow to take
#: must not kill a healthy channel.
_PING_INTERVAL = 20.0


def channel_url(bridge: str, tunnel: str, service: str) -> str:
    """The WebSocket URL of a TCP channel to ``service`` of ``tunnel`` at ``bridge``.

    A path the bridge URL carries (a bridge behind a reverse proxy under a prefix) is kept.

    Raises:
        ConfigError: ``bridge`` is not a bridge URL.
    """
    connect = URL(bridge_connect_url(bridge))
    prefix = connect.path[: -len(CONNECT_PATH)]
    return str(connect.with_path(f"{prefix}{TCP_PATH}/{tunnel}/{service}"))


class ChannelRefused(RproxyConnectionError):
    """The channel could not be opened; ``status`` is the bridge's HTTP answer (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ChannelDenied(ChannelRefused, AuthenticationError):
    """The bridge refused the credential (401) or its use for this tunnel (403)."""


class ChannelAborted(RproxyConnectionError):
    """An open channel failed: the bridge closed it with an error, or the connection to it broke."""


@dataclass(slots=True)
class TcpClientConfig:
    """Settings of ``rproxy tcp``; the CLI fills it from flags and environment."""

    bridge: str
    #: The TCP service's name, as the agent offers it (``--service NAME=tcp://host:port``).
    service: str
    tunnel: str = DEFAULT_TUNNEL_NAME
    #: An agent token the bridge accepts for ``tunnel`` ...
    token: str = field(default="", repr=False)
    #: ... or an agent key, proven by signing a fresh challenge.
    key: Ed25519PrivateKey | None = field(default=None, repr=False)
    #: PEM file of the CAs that may vouch for a wss:// bridge, instead of the system's.
    ca_file: str | None = None
    #: SHA-256 fingerprints of the wss:// bridge's certificate; one matching is enough.
    pins: tuple[str, ...] = ()
    #: Allow plain ws:// to a bridge that is not on this machine.
    insecure: bool = False

    def validate(self) -> None:
        """Raises ConfigError naming the first bad setting."""
        check_bridge_access(self.bridge, self.ca_file, self.pins, self.insecure, "the credential")
        if not is_tunnel_name(self.tunnel):
            raise ConfigError(f"--tunnel {self.tunnel!r}: a tunnel name is a lower-case DNS label (a-z, 0-9, -)")
        if not is_tunnel_name(self.service):
            raise ConfigError(f"--service {self.service!r}: a service name is a lower-case DNS label (a-z, 0-9, -)")
        check_credential(self.token, self.key, "--token: a credential is required (--token, --token-file or --key)")

    def pinned_sha256(self) -> frozenset[str]:
        """``pins`` as lower-case hex without colons (ConfigError names a malformed one)."""
        return pinned_sha256(self.pins)


# The local ends of a channel: where its bytes come from and go to.


class TcpChannel:
    """One open channel: carries one TCP connection's bytes between a local side and the service."""

    def __init__(self, ws: ClientConnection, label: str) -> None:
        self._ws = ws
        self.label = label
        self.bytes_sent = 0
        self.bytes_received = 0

    async def relay(self, source: Source, sink: Sink) -> None:
        """Carry bytes both ways until both directions have ended and the bridge closed the channel.

        Cancelling abandons the channel (the WebSocket is closed) and aborts ``sink``.

        Raises:
            ChannelAborted: the bridge closed the channel with an error, or the connection broke;
                ``sink`` is aborted.
            OSError: the local side failed; the channel is abandoned.
        """
        sending = asyncio.create_task(self._send(source))
        receiving = asyncio.create_task(self._receive(sink))
        finished = False
        try:
            await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and sending.exception() is None:
                # Our half is done (EOF sent): the rest of the service's bytes still come.
                await asyncio.wait({receiving})
            # The bridge's side first: when it broke, a local error is only a consequence.
            for task in (receiving, sending):
                error = task.exception() if task.done() else None
                if error is not None:
                    raise error
            # The bridge closed normally; local bytes not yet read have nowhere to go.
            finished = True
        finally:
            for task in (sending, receiving):
                task.cancel()
            await asyncio.gather(sending, receiving, return_exceptions=True)
            if not finished:
                await self.abandon()
                sink.abort()

    async def abandon(self) -> None:
        """Close the WebSocket, which tells the bridge to drop the connection to the service."""
        with contextlib.suppress(Exception):
            await self._ws.close(CloseCode.GOING_AWAY, "abandoned")

    async def _send(self, source: Source) -> None:
        ws = self._ws
        while True:
            data = await source.read(TCP_READ_SIZE)
            try:
                await ws.send(data)  # b"" at the end: the half-close
            except ConnectionClosed:
                return  # the receiving side reports why
            if not data:
                return
            self.bytes_sent += len(data)

    async def _receive(self, sink: Sink) -> None:
        ws = self._ws
        ended = False
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:
                break
            if isinstance(message, str):
                await ws.close(CloseCode.UNSUPPORTED_DATA, "text messages are not allowed on a TCP channel")
                raise ChannelAborted("the bridge sent a text message on the channel")
            if ended:
                if message:
                    await ws.close(CloseCode.PROTOCOL_ERROR, "bytes after the end of the stream")
                    raise ChannelAborted("the bridge sent bytes after ending the stream")
                continue
            if not message:
                ended = True
                await sink.end()
                continue
            self.bytes_received += len(message)
            await sink.write(message)
        code, reason = ws.close_code, ws.close_reason
        if code != 1000:
            if code is None or code == 1006:
                raise ChannelAborted("the connection to the bridge was lost")
            raise ChannelAborted(
                f"the bridge aborted the channel ({code}" + (f": {_one_line(reason)})" if reason else ")")
            )
        if not ended:
            await sink.end()


class TcpClient:
    """Opens TCP channels to one service of one tunnel.

    Usage::

        client = TcpClient(TcpClientConfig(bridge="wss://bridge.example.com", service="ssh", token="..."))
        channel = await client.open_channel()
        await channel.relay(source, sink)

    or ``await client.serve("127.0.0.1", 2222)`` to carry every connection to a local port.

    Raises:
        ConfigError: a bad setting (from ``TcpClientConfig.validate``, or an unreadable CA file).
    """

    def __init__(self, config: TcpClientConfig) -> None:
        config.validate()
        self.config = config
        self.url = channel_url(config.bridge, config.tunnel, config.service)
        self._tls = bridge_tls_context(config.ca_file.strip() if config.ca_file else None, config.pinned_sha256())
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def origin(self) -> str:
        """The bridge as ``scheme://host:port``, for messages."""
        return str(URL(self.url).origin())

    async def open_channel(self) -> TcpChannel:
        """Open a channel; returns once the agent has connected to the service.

        Raises:
            ChannelDenied: the credential was refused (401) or is not allowed for the tunnel (403).
            ChannelRefused: any other refusal (404, 502, 503, 504...), an untrusted certificate, or
                the bridge could not be reached.
        """
        nonce = await self._fetch_nonce() if self.config.key is not None else None
        tls: dict[str, Any] = {"ssl": self._tls} if self._tls is not None else {}
        try:
            ws = await NoRedirects(
                self.url,
                **tls,
                additional_headers={"Authorization": self._authorization(nonce)},
                user_agent_header=f"rproxy-tcp/{__version__}",
                max_size=CHANNEL_MESSAGE_LIMIT,
                max_queue=_RECEIVE_QUEUE,
                ping_interval=_PING_INTERVAL,
                ping_timeout=None,
                compression=None,
                open_timeout=CHANNEL_OPEN_TIMEOUT,
                close_timeout=2,
                proxy=None,
                logger=_CHANNEL_LOGGER,
            )
        except InvalidStatus as err:
            response = err.response
            refusal = self._refusal(
                response.status_code, bytes(response.body or b""), response.headers.get("Retry-After")
            )
            raise refusal from None
        except ssl.SSLCertVerificationError as err:
            raise ChannelRefused(self._untrusted(err)) from None
        except TimeoutError:
            raise ChannelRefused(f"timed out opening the channel at {self.origin}") from None
        except OSError as err:
            raise ChannelRefused(f"cannot connect to the bridge at {self.origin}: {err.strerror or err}") from None
        except (InvalidHandshake, InvalidURI) as err:
            raise ChannelRefused(f"the bridge at {self.origin} did not open the channel: {err}") from None
        return TcpChannel(ws, f"service {self.config.service!r} of tunnel {self.config.tunnel!r}")

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port``; each accepted connection is carried over a channel of its own.

        Returns the server (its sockets tell the port bound when ``port`` is 0); ``close`` stops it.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._serve_connection, host, port, limit=TCP_READ_SIZE)
        return self._server

    async def close(self) -> None:
        """Stop listening and abandon every channel still open."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = _address(writer.get_extra_info("peername"))
        try:
            try:
                channel = await self.open_channel()
            except RproxyConnectionError as err:
                _LOGGER.warning("connection from %s closed: %s", peer, err)
                return
            _LOGGER.debug("connection from %s: channel open to %s", peer, channel.label)
            try:
                await channel.relay(StreamSource(reader), StreamSink(writer))
            except ChannelAborted as err:
                _LOGGER.warning("connection from %s: %s", peer, err)
            except OSError as err:
                _LOGGER.info("connection from %s: dropped (%s)", peer, err.strerror or err)
            else:
                _LOGGER.debug(
                    "connection from %s ended: %d bytes sent, %d received",
                    peer,
                    channel.bytes_sent,
                    channel.bytes_received,
                )
        except asyncio.CancelledError:
            # The listener is stopping. Ending quietly: on Python 3.11 start_server reports a
            # handler task that ends cancelled as an error, with a traceback.
            pass
        except Exception:  # a bug: say so here rather than as asyncio's unhandled-exception dump
            _LOGGER.exception("connection from %s: unexpected failure", peer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    def _authorization(self, nonce: str | None) -> str:
        config = self.config
        return authorization(
            key=config.key, nonce=nonce, token=config.token, name=config.tunnel, host=URL(self.url).host or ""
        )

    async def _fetch_nonce(self) -> str:
        """A fresh challenge from the bridge, for the key to sign."""
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False) as session:
                return await fetch_nonce(session, self.url, TCP_PATH, self._tls)
        except ssl.SSLCertVerificationError as err:
            raise ChannelRefused(self._untrusted(err)) from None
        except ChallengeError as err:
            raise ChannelRefused(str(err), err.status) from None
        except RproxyConnectionError as err:
            raise ChannelRefused(str(err)) from None

    def _refusal(self, status: int, raw_body: bytes, retry_after: str | None = None) -> ChannelRefused:
        service, tunnel = self.config.service, self.config.tunnel
        body = _one_line(raw_body.decode("utf-8", "replace"))
        detail = f": {body}" if body else ""
        if status == 401:
            what = "key (its signed challenge)" if self.config.key is not None else "token"
            return ChannelDenied(f"the bridge refused the {what} (401){detail}", status)
        if status == 403:
            return ChannelDenied(f"the credential is not allowed for tunnel {tunnel!r} (403){detail}", status)
        if status == 404:
            return ChannelRefused(f"no such service {service!r} in tunnel {tunnel!r} (404){detail}", status)
        if status == 502:
            return ChannelRefused(f"the agent could not connect to service {service!r} (502){detail}", status)
        if status == 503:
            later = f" (retry after {retry_after} s)" if retry_after and retry_after.isdigit() else ""
            return ChannelRefused(f"tunnel {tunnel!r} is unavailable (503){detail}{later}", status)
        if status == 504:
            return ChannelRefused(f"service {service!r} did not accept the connection in time (504){detail}", status)
        if 300 <= status < 400:
            return ChannelRefused(f"the bridge redirected the channel (HTTP {status}); not followed", status)
        return ChannelRefused(f"the bridge answered HTTP {status}{detail}", status)

    def _untrusted(self, err: ssl.SSLCertVerificationError) -> str:
        return untrusted_message(err, self.config.ca_file)


def _one_line(text: str, limit: int = 200) -> str:
    """The first line of a peer's text, printable and cut short: it goes into our one-line errors."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c if c.isprintable() else "?" for c in line)[:limit]


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)
