"""Request and response heads carried by OPEN and REPLY frames (docs/PROTOCOL.md §4).

Heads travel as compact JSON. The peer is not trusted: ``decode`` checks every field's
type *and its bytes* and raises RemoteProtocolError rather than letting a malformed head reach
a handler. What decodes here can be written into an HTTP/1.1 message as it is: a method and
header names are RFC 9110 tokens, a target has no space or control character, header values
and reasons have no CR, LF, NUL or other control character but tab. So no peer can put a line
break, and with it a header or a whole response of its own, into what the other side writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Self

from ..exceptions import RemoteProtocolError
from ..typing import Headers

__all__ = [
    "RequestHead",
    "ResponseHead",
    "KIND_HTTP",
    "KIND_TCP",
    "KIND_WEBSOCKET",
    "SERVICE_KINDS",
    "is_token",
    "is_field_value",
]

KIND_HTTP = "http"
KIND_WEBSOCKET = "websocket"
#: A raw TCP connection to one of the agent's TCP services (docs/PROTOCOL.md §8).
KIND_TCP = "tcp"
_KINDS = frozenset({KIND_HTTP, KIND_WEBSOCKET, KIND_TCP})
#: What an agent's service can be: a web app (HTTP and WebSocket streams) or a TCP service.
SERVICE_KINDS = frozenset({KIND_HTTP, KIND_TCP})

#: RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: What may not appear in a field value or a reason phrase (RFC 9110 §5.5): CR, LF, NUL and
#: every other control character except horizontal tab.
_NOT_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: What may not appear in a request target: space and control characters (RFC 9112 §3.2).
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")


def is_token(text: str) -> bool:
    """Whether ``text`` is an RFC 9110 token (a method, a header name, a subprotocol)."""
    return _TOKEN.fullmatch(text) is not None


def is_field_value(text: str) -> bool:
    """Whether ``text`` may be written as a header value or reason phrase as it is."""
    return _NOT_IN_VALUE.search(text) is None


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _load(payload: bytes | memoryview) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise RemoteProtocolError(f"head is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("head is not a JSON object")
    return obj


def _headers(obj: dict[str, Any]) -> Headers:
    raw = obj.get("h", [])
    if not isinstance(raw, list):
        raise RemoteProtocolError("head field 'h' is not a list")
    out: Headers = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], str):
            raise RemoteProtocolError("head header is not a [name, value] pair of strings")
        if _TOKEN.fullmatch(item[0]) is None:
            raise RemoteProtocolError(f"head header name {item[0][:64]!r} is not a token")
        if _NOT_IN_VALUE.search(item[1]) is not None:
            raise RemoteProtocolError(f"head header {item[0]!r} has a control character in its value")
        out.append((item[0], item[1]))
    return out


def _str(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"head field {key!r} is missing or not a string")
    return value


@dataclass(slots=True)
class RequestHead:
    """What the bridge tells the agent about a visitor's request.

    ``target`` is the request target in origin form (path and query, as the visitor sent
    them); the agent joins it to its own configured base URL and nothing else. ``service``
    names which of the agent's services the stream is for ("" is the tunnel's main web app);
    the agent serves only services it was configured with.
    """

    method: str
    target: str
    headers: Headers = field(default_factory=list)
    kind: str = KIND_HTTP
    request_id: str = ""
    service: str = ""

    def encode(self) -> bytes:
        """Serialize for an OPEN frame."""
        head = {"m": self.method, "t": self.target, "h": self.headers, "k": self.kind, "i": self.request_id}
        if self.service:
            head["v"] = self.service
        return _dumps(head).encode()

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        """Parse an OPEN frame's payload.

        Raises:
            RemoteProtocolError: if the payload is not a valid request head.
        """
        obj = _load(payload)
        kind = _str(obj, "k", KIND_HTTP)
        if kind not in _KINDS:
            raise RemoteProtocolError(f"unknown stream kind {kind!r}")
        method = _str(obj, "m")
        if _TOKEN.fullmatch(method) is None:
            raise RemoteProtocolError(f"request method {method[:32]!r} is not a token")
        target = _str(obj, "t")
        if _NOT_IN_TARGET.search(target) is not None:
            raise RemoteProtocolError("request target has a space or control character")
        return cls(
            method=method,
            target=target,
            headers=_headers(obj),
            kind=kind,
            request_id=_str(obj, "i", ""),
            service=_str(obj, "v", ""),
        )


@dataclass(slots=True)
class ResponseHead:
    """What the agent answers: status line and header fields."""

    status: int
    reason: str = ""
    headers: Headers = field(default_factory=list)

    def encode(self) -> bytes:
        """Serialize for a REPLY frame."""
        return _dumps({"s": self.status, "r": self.reason, "h": self.headers}).encode()

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        """Parse a REPLY frame's payload.

        Raises:
            RemoteProtocolError: if the payload is not a valid response head.
        """
        obj = _load(payload)
        status = obj.get("s")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise RemoteProtocolError(f"invalid status {status!r}")
        reason = _str(obj, "r", "")
        if _NOT_IN_VALUE.search(reason) is not None:
            raise RemoteProtocolError("reason phrase has a control character")
        return cls(status=status, reason=reason, headers=_headers(obj))
