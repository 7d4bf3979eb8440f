"""Request smuggling through the relay: ambiguous message framing is refused at the bridge.

The bridge parses each visitor request and sends the agent a head plus a body of known
extent; a request whose length two parsers could read differently (Content-Length against
Transfer-Encoding, two lengths, a disguised "chunked") must be answered 400 and never reach
the home app, neither the outer request nor the one hidden in its body.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.core.tunnel.homeapps import home_tunnel, raw_exchange

#: The request hidden in each attack's body: if the home app ever sees it, smuggling worked.
HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: v.test\r\n\r\n"


def _post(*header_lines: bytes, body: bytes) -> bytes:
    return (
        b"POST /outer HTTP/1.1\r\nHost: v.test\r\n" + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n" + body
    )


ATTACKS = {
    "length-and-chunked": _post(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + HIDDEN),
    "chunked-and-length": _post(b"Transfer-Encoding: chunked", b"Content-Length: 6", body=b"0\r\n\r\n" + HIDDEN),
    "two-lengths": _post(b"Content-Length: 5", b"Content-Length: 46", body=b"hello" + HIDDEN),
    "length-list": _post(b"Content-Length: 5, 46", body=b"hello" + HIDDEN),
    "signed-length": _post(b"Content-Length: +5", body=b"hello" + HIDDEN),
    "chunked-then-identity": _post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + HIDDEN),
    "xchunked": _post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + HIDDEN),
    "two-encodings": _post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", body=b"0\r\n\r\n" + HIDDEN),
    "space-before-colon": _post(b"Transfer-Encoding : chunked", b"Content-Length: 5", body=b"0\r\n\r\n" + HIDDEN),
    "folded-encoding": _post(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n" + HIDDEN),
}


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
async def test_ambiguous_framing_is_refused_with_400_and_never_relayed(
    attack: bytes, http: aiohttp.ClientSession
) -> None:
    async with home_tunnel() as t:
        response = await raw_exchange(t.port, attack)
        assert response.status == 400, response
        assert t.home.seen == []
        # The bridge and the tunnel are unharmed: an honest chunked upload goes through.
        honest = _post(b"Transfer-Encoding: chunked", b"Connection: close", body=b"5\r\nhello\r\n0\r\n\r\n")
        assert (await raw_exchange(t.port, honest)).status == 200
        assert [s.raw_path for s in t.home.seen] == ["/outer"]
        assert t.home.seen[0].body == b"hello"
