"""The gateway's bookkeeping without I/O: settings, allowlist, connection table, queues, signing.

Everything here is plain data and arithmetic so it can be reasoned about (and tested) without
sockets: what a connection holds, what bounds it, when it has been idle or alive too long,
which URL a client may name, which frame a callback body becomes. The server (``server.py``)
does the reading and writing around it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from yarl import URL

__all__ = [
    "Allowlist",
    "ConnectionState",
    "ConnectionTable",
    "GatewayConfig",
    "SIGNATURE_HEADER",
    "SEND_HEADER",
    "callback_frame",
    "is_private_address",
    "shown",
    "sign",
]

#: The header naming the callback URL on every POST to the backend (the seed's name).
SEND_HEADER = "x-ws-proxy-send"
#: The connection's id alone (the callback URL's last segment), as Pushpin's Connection-Id.
ID_HEADER = "x-ws-proxy-id"
#: The client's address as the gateway saw it.
CLIENT_HEADER = "x-ws-proxy-client"
#: ``t=UNIX_SECONDS,sha256=HEX``: HMAC-SHA256 with the configured secret over
#: ``"{t}.{callback URL}."`` followed by the body (docs/GATEWAY.md, "Signatures").
SIGNATURE_HEADER = "x-ws-proxy-signature"

TEXT = 1
BINARY = 2

#: Longest frame, disconnect or connect URL a client may give (a URL is the allowlist's
#: input: a regex over megabytes of query string would cost CPU for nothing).
MAX_URL = 2048


@dataclass(slots=True)
class GatewayConfig:
    """Settings of a gateway, standalone (``rproxy gateway``) or in a bridge (``gateway:``).

    The defaults follow AWS API Gateway's WebSocket APIs: 128 KiB messages, 10 minutes idle,
    2 hours at most.
    """

    #: Public base of the callback URLs: a callback is ``{base_url}/{id}``.
    base_url: str = "http://127.0.0.1:8080"
    #: Regexes a frame, disconnect or connect URL must match as a WHOLE (re.fullmatch).
    #: Empty: every connection is refused.
    allowlist: tuple[str, ...] = ()
    #: HMAC key for the signature header on every POST; None: POSTs are not signed.
    secret: bytes | None = field(default=None, repr=False)
    #: Handshake header fields replayed on every POST to the backend (lower case).
    forward_headers: tuple[str, ...] = ("origin", "user-agent")
    #: Largest message either way, bytes (a client's larger message: close 1009; a
    #: callback's larger body: 413).
    max_message_size: int = 128 << 10
    #: Seconds without a frame either way before the connection is closed (1001).
    idle_timeout: float = 600.0
    #: Seconds a connection may live at most (1001 after).
    max_lifetime: float = 7200.0
    #: Connections at once, and from one address.
    max_connections: int = 10_000
    max_connections_per_address: int = 100
    #: Callback POSTs per second per connection (a token bucket of as many).
    callback_rate: float = 100.0
    #: Frames from a client waiting for their POST, by count and bytes; when either is
    #: reached the gateway stops reading from that client until the backend catches up.
    queue_frames: int = 32
    queue_bytes: int = 1 << 20
    #: Seconds one POST to the backend may take (connect to answer head).
    post_timeout: float = 10.0
    #: Further attempts after a connection error, a timeout or a 5xx; then close 1011.
    retries: int = 3
    #: Seconds before the first retry, doubling each time (capped at 5 s).
    retry_backoff: float = 0.25
    #: Callback POSTs waiting for a client's socket at once, per connection (more: 503).
    max_pending_sends: int = 8
    #: Seconds a callback waits for a client that does not read before it gets 504.
    send_timeout: float = 10.0
    #: Seconds a stopping gateway gives the disconnect POSTs.
    shutdown_grace: float = 5.0
    #: In a bridge: the host name the gateway answers on (every other host is the bridge's).
    host: str | None = None
    #: One log line per connection when it ends.
    access_log: bool = True
    #: Standalone: opens /_rproxy/metrics and /_rproxy/status.json to ``Authorization: Bearer``
    #: with this token (or its ``sha256:`` hash); None: they do not exist. (In a bridge, the
    #: bridge's own endpoints count the gateway.)
    admin_token: str | None = field(default=None, repr=False)

    @property
    def callback_base(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def callback_path(self) -> str:
        """The path under which callback ids live (``/`` or the base URL's own path + ``/``)."""
        return URL(self.base_url).path.rstrip("/") + "/"


def shown(text: str | bytes, limit: int = 120) -> str:
    """Peer text for a log line: cut to ``limit`` characters and escaped (repr), never raw."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    cut = text[:limit]
    return repr(cut) + ("…" if len(text) > limit else "")


def is_private_address(address: IPv4Address | IPv6Address) -> bool:
    """Loopback, private, link-local, multicast, reserved, unspecified: not a public target."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


#: ``://HOST`` at the start of a pattern once its escapes are undone (``127\.0\.0\.1`` → 127.0.0.1).
_LITERAL_HOST = re.compile(r"^[a-z][a-z0-9+.-]*\??://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?=[:/]|$)")


_NUMERIC_HOST = re.compile(r"[0-9a-fx.]*[0-9][0-9a-fx.]*")


class Allowlist:
    """Regexes a target URL must match as a whole (``re.fullmatch``, never ``re.match``).

    An unanchored ``https://good\\.example\\.com/.*`` therefore admits
    ``https://good.example.com/x`` and not ``https://good.example.com.evil.test/``.
    A pattern whose host is written literally (``http://127\\.0\\.0\\.1:8000/.*``,
    ``http://nas\\.lan/.*``) names that host explicitly: only such hosts may be loopback,
    private or link-local targets (SSRF rule).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = [re.compile(p) for p in self.patterns]
        hosts: set[str] = set()
        for pattern in self.patterns:
            literal = _LITERAL_HOST.match(re.sub(r"\\(.)", r"\1", pattern).lower())
            if literal:
                hosts.add(literal.group(1).strip("[]"))
        #: Hosts written literally in a pattern.
        self.explicit_hosts = frozenset(hosts)

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def admits(self, url: str) -> bool:
        return any(regex.fullmatch(url) for regex in self._compiled)

    def check(self, url: str) -> str | None:
        """None if ``url`` may be a target; else why not (for the client's 403, no URL in it)."""
        if len(url) > MAX_URL:
            return f"longer than {MAX_URL} characters"
        try:
            parsed = URL(url)
        except ValueError:
            return "not a URL"
        if parsed.scheme not in ("http", "https") or not parsed.host:
            return "not an http:// or https:// URL with a host"
        if parsed.user is not None or parsed.password is not None:
            return "a URL with credentials in it"
        if not self.admits(url):
            return "not on the gateway's allowlist"
        host = parsed.host.lower().rstrip(".")
        try:
            address = ip_address(host.strip("[]"))
        except ValueError:
            if _NUMERIC_HOST.fullmatch(host):  # 2130706433, 0x7f.1, 127.1: an address in disguise
                return "a numeric host that is not a dotted IPv4 address"
            return None  # a name: checked again where it is resolved (delivery.py's resolver)
        if is_private_address(address) and str(address) not in self.explicit_hosts and host not in self.explicit_hosts:
            return "a private, loopback or link-local address the allowlist does not name"
        return None


def sign(secret: bytes, callback: str, body: bytes, now: float | None = None) -> str:
    """The signature header's value for a POST of ``body`` on behalf of ``callback``."""
    stamp = int(time.time() if now is None else now)
    digest = hmac.new(secret, f"{stamp}.{callback}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},sha256={digest}"


def callback_frame(content_type: str, charset: str | None, body: bytes) -> tuple[int, bytes] | tuple[None, str]:
    """What a callback POST's body becomes: (TEXT or BINARY, payload), or (None, why not).

    ``text/*`` is a text frame and must be UTF-8 (no charset, ``utf-8`` or ``us-ascii``);
    anything else, or no type, is a binary frame.
    """
    if content_type.startswith("text/"):
        if charset is not None and charset.lower() not in ("utf-8", "utf8", "us-ascii", "ascii"):
            return None, "a text/* body must be UTF-8"
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return None, "the text/* body is not valid UTF-8"
        return TEXT, body
    return BINARY, body


class ConnectionState:
    """One client connection: where its frames go, its queue and counters (no socket here)."""

    __slots__ = (
        "id",
        "callback",
        "address",
        "frame_url",
        "disconnect_url",
        "headers",
        "since",
        "last_active",
        "frames_in",
        "frames_out",
        "bytes_in",
        "bytes_out",
        "queue",
        "queued_bytes",
        "open",
        "pending_sends",
        "tokens",
        "tokens_at",
        "close_code",
        "close_reason",
        "closed_by",
    )

    def __init__(
        self,
        conn_id: str,
        callback: str,
        address: str,
        frame_url: str,
        disconnect_url: str | None,
        headers: tuple[tuple[str, str], ...],
        now: float,
        rate: float,
    ) -> None:
        self.id = conn_id
        self.callback = callback
        self.address = address
        self.frame_url = frame_url
        self.disconnect_url = disconnect_url
        #: Handshake fields replayed on every POST (bounded by the server's request-head limits).
        self.headers = headers
        self.since = now
        self.last_active = now
        #: From the client to the backend (in) and from callbacks to the client (out).
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0
        #: Client frames waiting for their POST; bounded by queue_frames and queue_bytes.
        self.queue: deque[tuple[int, bytes]] = deque()
        self.queued_bytes = 0
        #: False once the client's side has ended: callbacks then get 404.
        self.open = True
        self.pending_sends = 0
        self.tokens = rate
        self.tokens_at = now
        self.close_code: int | None = None
        self.close_reason = ""
        #: "client", "gateway" or "backend": who ended it (for the disconnect POST).
        self.closed_by = ""

    def has_room(self, config: GatewayConfig) -> bool:
        return len(self.queue) < config.queue_frames and self.queued_bytes < config.queue_bytes

    def enqueue(self, kind: int, data: bytes, now: float) -> None:
        """A frame from the client; the caller waits for ``has_room`` before reading the next."""
        self.queue.append((kind, data))
        self.queued_bytes += len(data)
        self.frames_in += 1
        self.bytes_in += len(data)
        self.last_active = now

    def delivered(self) -> None:
        _, data = self.queue.popleft()
        self.queued_bytes -= len(data)

    def drop_queue(self) -> int:
        dropped = len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        return dropped

    def sent(self, size: int, now: float) -> None:
        self.frames_out += 1
        self.bytes_out += size
        self.last_active = now

    def allow_callback(self, rate: float, now: float) -> bool:
        """Token bucket: ``rate`` callbacks per second, bursts of as many."""
        self.tokens = min(rate, self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def ended(self, code: int, reason: str, by: str) -> None:
        """Record the first reason the connection ends; later ones do not overwrite it."""
        if self.close_code is None:
            self.close_code, self.close_reason, self.closed_by = code, reason, by

    def status(self, now: float, wall: float) -> dict[str, object]:
        """The callback GET's answer."""
        return {
            "id": self.id,
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall - (now - self.since))),
            "address": self.address,
            "idle_seconds": round(now - self.last_active, 3),
            "from_client": {"frames": self.frames_in, "bytes": self.bytes_in},
            "to_client": {"frames": self.frames_out, "bytes": self.bytes_out},
            "queued": {"frames": len(self.queue), "bytes": self.queued_bytes},
        }


class ConnectionTable:
    """Live connections by id, with the limits on how many (in all and per address)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._by_id: dict[str, ConnectionState] = {}
        self._per_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[ConnectionState]:
        return iter(list(self._by_id.values()))

    def refusal(self, address: str) -> tuple[int, str] | None:
        """(status, why) if a new connection from ``address`` is over a limit, else None."""
        if len(self._by_id) >= self.config.max_connections:
            return 503, "the gateway is at its connection limit, try again later"
        if self._per_address.get(address, 0) >= self.config.max_connections_per_address:
            return 429, "too many connections from your address"
        return None

    def add(
        self, address: str, frame_url: str, disconnect_url: str | None, headers: tuple[tuple[str, str], ...], now: float
    ) -> ConnectionState:
        """A new connection under a fresh id of 128 random bits."""
        conn_id = secrets.token_urlsafe(16)
        while conn_id in self._by_id:  # 2**-128: never, but cheap to be sure
            conn_id = secrets.token_urlsafe(16)
        conn = ConnectionState(
            conn_id,
            f"{self.config.callback_base}/{conn_id}",
            address,
            frame_url,
            disconnect_url,
            headers,
            now,
            self.config.callback_rate,
        )
        self._by_id[conn_id] = conn
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return conn

    def get(self, conn_id: str) -> ConnectionState | None:
        return self._by_id.get(conn_id)

    def remove(self, conn: ConnectionState) -> None:
        if self._by_id.get(conn.id) is not conn:
            return
        del self._by_id[conn.id]
        left = self._per_address[conn.address] - 1
        if left:
            self._per_address[conn.address] = left
        else:
            del self._per_address[conn.address]

    def expired(self, now: float) -> list[tuple[ConnectionState, str]]:
        """Open connections idle or alive too long, each with the reason."""
        config = self.config
        found = []
        for conn in self._by_id.values():
            if not conn.open:
                continue
            if now - conn.since >= config.max_lifetime:
                found.append((conn, "maximum connection time reached"))
            elif now - conn.last_active >= config.idle_timeout and not conn.queue:
                found.append((conn, "idle timeout"))
        return found
