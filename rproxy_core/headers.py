"""HTTP header handling shared by the bridge and the agent (RFC 9110 §7.6)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from .typing import Headers

__all__ = [
    "HOP_BY_HOP",
    "strip_hop_by_hop",
    "is_websocket_upgrade",
    "TUNNEL_NAME_RE",
    "is_tunnel_name",
    "ASCII_ONLY",
    "non_ascii_field",
]

#: Connection-specific fields a proxy must not forward (RFC 9110 §7.6.1), plus ``Trailer``
#: (trailers are not relayed) and ``Expect`` (each hop answers 100-continue itself).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

#: Fields of the WebSocket opening handshake that belong to one hop (RFC 6455 §4); the
#: subprotocol list (Sec-WebSocket-Protocol) is end to end and is kept.
WEBSOCKET_HOP_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"}
)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], extra: frozenset[str] = frozenset()) -> Headers:
    """Return ``headers`` without hop-by-hop fields, including those named in ``Connection``."""
    pairs = list(headers)
    drop = HOP_BY_HOP | extra if extra else HOP_BY_HOP
    named: set[str] | None = None  # the fields Connection names, rarely more than keep-alive
    for name, value in pairs:
        if name.lower() == "connection":
            if named is None:
                named = set()
            named.update(token.strip().lower() for token in value.split(","))
    if named is not None and not named <= drop:
        drop = drop | named
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def is_websocket_upgrade(method: str, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> bool:
    """Whether a request opens a WebSocket: GET, ``Upgrade: websocket`` and ``upgrade`` in ``Connection``.

    ``Upgrade`` alone is not enough (RFC 9110 section 7.8: it is ignored unless ``Connection``
    names it); a request carrying only that is plain HTTP, and its body is read as such.
    """
    if method != "GET":
        return False
    if isinstance(headers, (CIMultiDict, CIMultiDictProxy)):
        if "upgrade" not in headers:  # case-insensitive: the usual request needs no walk
            return False
        pairs: Iterable[tuple[str, str]] = headers.items()
    elif isinstance(headers, Mapping):
        pairs = headers.items()
    else:
        pairs = headers
    upgrade, connection = "", set[str]()
    for name, value in pairs:
        lowered = name.lower()
        if lowered == "upgrade":
            upgrade = value.strip().lower()
        elif lowered == "connection":
            connection.update(token.strip().lower() for token in value.split(","))
    return upgrade == "websocket" and "upgrade" in connection


#: A tunnel name is one DNS label, so that ``<name>.<domain>`` is a valid host name.
TUNNEL_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def is_tunnel_name(name: str) -> bool:
    """Whether ``name`` may name a tunnel (lower-case DNS label)."""
    return bool(TUNNEL_NAME_RE.match(name))


#: Fields whose values are ASCII by definition (credentials are token68 or quoted ASCII, the
#: WebSocket handshake fields are base64 and tokens). A visitor's bytes that are not ASCII here
#: are refused with 400 before any handler parses them: a parser that expects ASCII (base64,
#: str.encode) would otherwise fail with a 500.
ASCII_ONLY = (
    "Authorization",
    "Proxy-Authorization",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Extensions",
)


def non_ascii_field(headers: Mapping[str, str]) -> str | None:
    """The name of the first ASCII-only field in ``headers`` whose value is not printable ASCII, or None."""
    for name in ASCII_ONLY:
        value = headers.get(name)
        if value is not None and not (value.isascii() and (value.isprintable() or not value)):
            return name
    return None
