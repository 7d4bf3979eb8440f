"""The one key-challenge fetch and Authorization value the agent, ``rproxy tcp`` and ``rproxy status`` share.

The challenge is fetched from a real aiohttp server on 127.0.0.1 that answers as a bridge
might, well or badly.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from rproxy_core.const import CHALLENGE_PATH, CONNECT_PATH, TCP_PATH
from rproxy_core.dial import ChallengeError, authorization, bridge_http_url, fetch_nonce
from rproxy_core.exceptions import RproxyConnectionError
from rproxy_core.identity import AUTH_SCHEME, signed_message, verify_signature


def test_bridge_http_url_keeps_the_prefix_and_speaks_http() -> None:
    assert bridge_http_url(f"wss://b.example/rp{CONNECT_PATH}", CONNECT_PATH, CHALLENGE_PATH) == URL(
        f"https://b.example/rp{CHALLENGE_PATH}"
    )
    assert bridge_http_url(f"ws://127.0.0.1:8/x{TCP_PATH}/home/ssh?a=1", TCP_PATH, CHALLENGE_PATH) == URL(
        f"http://127.0.0.1:8/x{CHALLENGE_PATH}"
    )
    # Without the endpoint in it, the URL is the bridge's base (rproxy status takes that form).
    assert bridge_http_url("https://b.example/base/", "/nowhere", "/status") == URL("https://b.example/base/status")


def test_authorization_signs_with_a_key_and_else_sends_the_token() -> None:
    key = Ed25519PrivateKey.generate()
    signed = authorization(key=key, nonce="n0nce", token="", name="home", host="bridge.example")
    scheme, public, nonce, signature = signed.split(" ")
    assert (scheme, nonce) == (AUTH_SCHEME, "n0nce")
    raw = base64.b64decode(public)
    assert verify_signature(raw, signature, signed_message("n0nce", "home", "bridge.example"))
    assert not verify_signature(raw, signature, signed_message("n0nce", "other", "bridge.example"))
    assert authorization(key=None, nonce=None, token="t", name="home", host="h") == "Bearer t"
    basic = authorization(key=None, nonce=None, token="u:p", name="home", host="h", basic=True)
    assert basic == "Basic " + base64.b64encode(b"u:p").decode()


@pytest.fixture
async def bridge_answers() -> AsyncIterator[tuple[str, dict[str, web.Response]]]:
    """A server whose challenge answer each test sets; yields its connect URL and the answer slot."""
    answer: dict[str, web.Response] = {}

    async def challenge(request: web.Request) -> web.Response:
        return answer["now"]

    app = web.Application()
    app.router.add_get(CHALLENGE_PATH, challenge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"ws://127.0.0.1:{port}{CONNECT_PATH}", answer
    finally:
        await runner.cleanup()


async def _nonce(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        return await fetch_nonce(session, url, CONNECT_PATH, None)


async def test_fetch_nonce_returns_a_good_nonce(bridge_answers: tuple[str, dict[str, web.Response]]) -> None:
    url, answer = bridge_answers
    answer["now"] = web.json_response({"nonce": "abc-123_XYZ"})
    assert await _nonce(url) == "abc-123_XYZ"


@pytest.mark.parametrize(
    ("response", "status", "says"),
    [
        (lambda: web.Response(status=404), 404, "does not accept agent keys"),
        (lambda: web.Response(status=503), 503, "answered HTTP 503 to the key challenge"),
        (lambda: web.json_response({"nonce": "two words"}), None, "malformed"),
        (lambda: web.json_response({"nonce": "line\nbreak"}), None, "malformed"),
        (lambda: web.json_response(["nonce"]), None, "malformed"),
        (lambda: web.json_response({"nonce": 7}), None, "malformed"),
    ],
)
async def test_fetch_nonce_names_what_is_wrong(
    bridge_answers: tuple[str, dict[str, web.Response]], response: object, status: int | None, says: str
) -> None:
    url, answer = bridge_answers
    answer["now"] = response()  # type: ignore[operator]
    with pytest.raises(ChallengeError, match=says) as caught:
        await _nonce(url)
    assert caught.value.status == status


async def test_fetch_nonce_not_json_is_a_connection_error(bridge_answers: tuple[str, dict[str, web.Response]]) -> None:
    url, answer = bridge_answers
    answer["now"] = web.Response(text="<html>hello</html>")
    with pytest.raises(RproxyConnectionError, match=r"^key challenge at http://127\.0\.0\.1:"):
        await _nonce(url)
