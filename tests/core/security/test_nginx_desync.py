"""Behind nginx with upstream keep-alive, one home's agent cannot answer another home's visitors.

Issue 15, finding 1 as it was reproduced: our own contrib/nginx/rproxy.conf keeps idle
connections to the bridge and hands them to whichever visitor comes next, for any tunnel. An
agent that hid a whole response in the "body" of a 204 desynchronised such a connection: the
next visitor on it, of another tunnel, read the attacker's response, and the attacker's next
request was answered with that visitor's page. Here the real nginx runs the shipped config in
front of a real bridge; tunnel ``evil`` is a fake agent of our own telling that lie on every
request, tunnel ``home`` a real agent in front of a real home app. Visitors of both take turns.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from ipaddress import ip_network
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from yarl import URL

from rproxy_core.protocol.frames import Flags, FrameType
from tests.conftest import running_agent, running_bridge, start_app
from tests.core.security.tunnel_peers import RawAgent, frame, raw_agent, reply
from tests.core.shipping.test_contrib import (
    Certificate,
    ExampleDomainResolver,
    Proxy,
    nginx_in_front,
    wait_listening,
)

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nSet-Cookie: stolen=1\r\n\r\nsmuggled!"
HOME_PAGE = b"the home page, for the home's own visitor"
SECRET_COOKIE = "session=home-visitors-secret"
ROUNDS = 12


def make_certificate(where: Path) -> Certificate:
    ca = trustme.CA()
    issued = ca.issue_cert("bridge.example.com", "*.example.com")
    cert, key = where / "fullchain.pem", where / "privkey.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return Certificate(ca, cert, key)


async def lie_on_every_request(agent: RawAgent, seen: list[str], delay: float) -> None:
    """Answer each request with a 204 whose "body" is a whole response of the attacker's.

    With a ``delay``, the body follows the head a moment later: by then nginx has passed the
    204 on and sent the next visitor's request down the same upstream connection.
    """
    pending: set[asyncio.Task[None]] = set()

    async def smuggle(sid: int) -> None:
        await asyncio.sleep(delay)
        await agent.send(frame(FrameType.DATA, sid, SMUGGLED, Flags.FIN))

    while True:
        sid, head = await agent.next_open(timeout=3600)
        seen.append(repr(head))
        if not delay:
            await agent.send(reply(sid, 204), frame(FrameType.DATA, sid, SMUGGLED, Flags.FIN))
            continue
        await agent.send(reply(sid, 204))
        task = asyncio.create_task(smuggle(sid))
        pending.add(task)
        task.add_done_callback(pending.discard)


@asynccontextmanager
async def home_app() -> AsyncIterator[str]:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=HOME_PAGE, headers={"Set-Cookie": "session=fresh"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner, url = await start_app(app)
    try:
        yield url
    finally:
        await runner.cleanup()


async def visit(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, bytes, str]:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, await response.read(), response.headers.get("Set-Cookie", "")


@pytest.mark.parametrize("delay", [0, 0.05], ids=["body-with-head", "body-a-moment-later"])
async def test_a_lying_agent_cannot_answer_another_tunnels_visitors_through_nginx(tmp_path: Path, delay: float) -> None:
    certificate = make_certificate(tmp_path)
    seen_by_attacker: list[str] = []
    async with (
        home_app() as home_url,
        running_bridge(trusted_proxies=[ip_network("127.0.0.1/32")], domain="example.com") as bridge,
        running_agent(bridge.url, home_url, name="home"),
        raw_agent(bridge, "evil") as attacker,
    ):
        liar = asyncio.create_task(lie_on_every_request(attacker, seen_by_attacker, delay))
        bridge_port = URL(bridge.url).port
        assert bridge_port
        try:
            with nginx_in_front(bridge_port, certificate, tmp_path / "nginx") as proxy:
                await wait_listening(proxy)
                await take_turns(proxy, certificate)
        finally:
            liar.cancel()
            with suppress(asyncio.CancelledError):
                await liar
    # No request of the home's visitors ever reached the attacker's agent.
    assert not any("home.example.com" in head or SECRET_COOKIE in head for head in seen_by_attacker), seen_by_attacker


async def take_turns(proxy: Proxy, certificate: Certificate) -> None:
    connector = aiohttp.TCPConnector(resolver=ExampleDomainResolver(), ssl=certificate.client_context())
    evil = f"https://evil.example.com:{proxy.https_port}/"
    home = f"https://home.example.com:{proxy.https_port}/"
    async with asyncio.timeout(60), aiohttp.ClientSession(connector=connector) as session:
        for turn in range(ROUNDS):
            # One at a time, so nginx hands the connection the attacker's answer came on to the
            # next visitor; then both at once, so several pooled connections are in play.
            status, body, _ = await visit(session, evil + f"lie/{turn}")
            assert status in (204, 502) and b"smuggled" not in body, (status, body)
            status, body, cookie = await visit(session, home + f"page/{turn}", headers={"Cookie": SECRET_COOKIE})
            assert (status, body, cookie) == (200, HOME_PAGE, "session=fresh"), (turn, status, body, cookie)
            answers = await asyncio.gather(
                visit(session, evil + f"again/{turn}"),
                visit(session, home + f"both/{turn}", headers={"Cookie": SECRET_COOKIE}),
                visit(session, evil + f"third/{turn}"),
            )
            (s1, b1, _), (s2, b2, c2), (s3, b3, _) = answers
            assert s1 in (204, 502) and s3 in (204, 502) and b"smuggled" not in b1 + b3, answers
            assert (s2, b2, c2) == (200, HOME_PAGE, "session=fresh"), answers
