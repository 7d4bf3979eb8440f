"""Asking a bridge over plain HTTP(S), and what an agent presents: the key challenge, the status
JSON, the ``Authorization`` value. Written once for the agent, ``rproxy tcp`` and ``rproxy status``."""

from __future__ import annotations

import base64
import ssl
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from ..const import CHALLENGE_PATH, HANDSHAKE_TIMEOUT
from ..exceptions import RproxyConnectionError
from ..identity import sign
from .refusal import describe_error

__all__ = ["ChallengeError", "authorization", "bridge_http_url", "fetch_nonce", "get_json"]


class ChallengeError(RproxyConnectionError):
    """The bridge gave no usable key challenge; ``status`` is its HTTP answer (None: none, or not JSON)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def bridge_http_url(url: str | URL, endpoint: str, path: str) -> URL:
    """``path`` on the bridge that serves ``endpoint`` in ``url``, over http(s) even from a ws(s) URL.

    A bridge may sit under a path prefix behind a reverse proxy; everything before ``endpoint``
    is that prefix, and the other endpoint is under it too.
    """
    parsed = URL(url)
    prefix = parsed.path[: parsed.path.rindex(endpoint)] if endpoint in parsed.path else parsed.path.rstrip("/")
    scheme = {"ws": "http", "wss": "https"}.get(parsed.scheme, parsed.scheme)
    return parsed.with_scheme(scheme).with_path(prefix + path).with_query(None)


async def get_json(
    session: aiohttp.ClientSession,
    url: URL,
    *,
    tls: ssl.SSLContext | None,
    timeout: float,
    what: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """GET ``url`` (no redirects, no proxy): the status and, for 200, the JSON body (None otherwise).

    Raises:
        ssl.SSLCertVerificationError: the bridge's certificate is not trusted (or not the pinned
            one); the caller says so in its own words (``untrusted_message``).
        RproxyConnectionError: the bridge could not be reached, timed out, or sent no JSON; the
            message starts with ``what``.
    """
    try:
        async with session.get(
            url,
            headers=headers,
            allow_redirects=False,
            proxy=None,
            ssl=tls if tls is not None else True,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if response.status != 200:
                return response.status, None
            return 200, await response.json(content_type=None)
    except aiohttp.ClientConnectorCertificateError as err:
        cause = err.certificate_error
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise cause from None
        raise RproxyConnectionError(f"{what} at {url.origin()}: {describe_error(err)}") from None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
        raise RproxyConnectionError(f"{what} at {url.origin()}: {describe_error(err)}") from None


async def fetch_nonce(session: aiohttp.ClientSession, url: str | URL, endpoint: str, tls: ssl.SSLContext | None) -> str:
    """A fresh challenge from the bridge whose ``endpoint`` is in ``url``, for a key to sign.

    Raises:
        ChallengeError: the bridge answered but gave no nonce (``status`` 404: it takes no keys).
        ssl.SSLCertVerificationError, RproxyConnectionError: as ``get_json``.
    """
    status, data = await get_json(
        session,
        bridge_http_url(url, endpoint, CHALLENGE_PATH),
        tls=tls,
        timeout=HANDSHAKE_TIMEOUT,
        what="key challenge",
    )
    if status == 404:
        raise ChallengeError("the bridge does not accept agent keys (no challenge endpoint): use --token", status)
    if status != 200:
        raise ChallengeError(f"the bridge answered HTTP {status} to the key challenge", status)
    nonce = data.get("nonce") if isinstance(data, dict) else None
    # It goes into a header and a signed message: printable ASCII without spaces, or nothing.
    if not isinstance(nonce, str) or not nonce.isascii() or not nonce.isprintable() or " " in nonce:
        raise ChallengeError("the bridge's key challenge is malformed")
    return nonce


def authorization(
    *,
    key: Ed25519PrivateKey | None,
    nonce: str | None,
    token: str,
    name: str,
    host: str,
    basic: bool = False,
) -> str:
    """The ``Authorization`` value: the key's signature of ``nonce`` if there is a key, else the token
    (``Basic`` for a bridge that expects it as a basic-auth pair, else ``Bearer``)."""
    if key is not None and nonce is not None:
        return sign(key, nonce, name, host)
    if basic:
        return "Basic " + base64.b64encode(token.encode()).decode("ascii")
    return f"Bearer {token}"
