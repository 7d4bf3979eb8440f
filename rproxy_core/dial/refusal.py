"""What a bridge's refusal or a failed connection means for the agent, in one line a user can act on."""

from __future__ import annotations

import ssl

import aiohttp
from websockets.exceptions import InvalidMessage

from ..const import CONNECT_PATH
from ..exceptions import AuthenticationError, RproxyConnectionError

__all__ = ["NOT_A_BRIDGE", "FatalRefusal", "describe_error", "refusal_error"]


class FatalRefusal(RproxyConnectionError):
    """The bridge refused in a way retrying cannot fix (protocol version, tunnel name)."""


#: Said when what answers is likely no rproxy bridge at all (a web server, an SSH server, ...).
NOT_A_BRIDGE = "not an rproxy bridge at that address? check the URL's host and port"


def refusal_error(status: int, raw_body: bytes, *, key: bool = False) -> RproxyConnectionError:
    # Peer text, shown in one log line: control characters (newlines, terminal escapes) become ?.
    body = "".join(c if c.isprintable() else "?" for c in raw_body.decode("utf-8", "replace").strip()[:200])
    if status == 401:
        if key:
            return AuthenticationError("the bridge refused the agent key (401): its signed challenge was not accepted")
        return AuthenticationError("the bridge refused the agent token (401): check the token")
    if status == 403:
        return AuthenticationError(
            f"the bridge refused the agent (403): {body or 'not allowed'}: check the token and the tunnel name"
        )
    if status == 426:
        return FatalRefusal(f"the bridge does not speak this agent's protocol: {body or status}")
    if status == 400:
        return FatalRefusal(f"the bridge refused the agent: {body or status}")
    # A bridge answers its connect path with 101, 4xx refusals handled above, or 503 (busy);
    # another 4xx (404 above all) comes from some other web server.
    hint = f"; {NOT_A_BRIDGE} (nothing serves {CONNECT_PATH} there)" if status < 500 else ""
    return RproxyConnectionError(f"the bridge answered HTTP {status}" + (f": {body}" if body else "") + hint)


def describe_error(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out connecting to the bridge"
    if isinstance(err, aiohttp.ClientConnectorError):
        err = err.os_error
    if isinstance(err, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(err):
        # The answer to our TLS hello was not TLS: most often plain HTTP.
        return (
            "cannot connect to the bridge: its answer is not TLS (SSL: WRONG_VERSION_NUMBER): no TLS on that "
            "port? a bridge without --tls-cert takes ws:// (or put TLS in front of it)"
        )
    if isinstance(err, InvalidMessage) and isinstance(err.__cause__, EOFError):
        return "cannot connect to the bridge: it closed the connection before answering"
    if isinstance(err, InvalidMessage | aiohttp.ClientResponseError):
        return f"cannot connect to the bridge: did not receive a valid HTTP response: {NOT_A_BRIDGE}"
    if isinstance(err, OSError) and err.strerror:
        return f"cannot connect to the bridge: {err.strerror}"
    return f"cannot connect to the bridge: {err}"
