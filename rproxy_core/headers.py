"""HTTP header handling shared by the bridge and the agent (RFC 9110 §7.6)."""

from __future__ import annotations

from collections.abc import Iterable
import re

from .typing import Headers

__all__ = ["HOP_BY_HOP", "strip_hop_by_hop", "TUNNEL_NAME_RE", "is_tunnel_name"]

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
WEBSOCKET_HOP_HEADERS = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"})


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], extra: frozenset[str] = frozenset()) -> Headers:
    """Return ``headers`` without hop-by-hop fields, including those named in ``Connection``."""
    pairs = list(headers)
    drop = set(HOP_BY_HOP) | extra
    for name, value in pairs:
        if name.lower() == "connection":
            drop.update(token.strip().lower() for token in value.split(","))
    return [(name, value) for name, value in pairs if name.lower() not in drop]


#: A tunnel name is one DNS label, so that ``<name>.<domain>`` is a valid host name.
TUNNEL_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def is_tunnel_name(name: str) -> bool:
    """Whether ``name`` may name a tunnel (lower-case DNS label)."""
    return bool(TUNNEL_NAME_RE.match(name))
