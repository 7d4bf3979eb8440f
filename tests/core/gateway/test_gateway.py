"""The standalone gateway end to end: real websockets clients, the gateway on 127.0.0.1, aiohttp backends."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import LOCAL, Backend, Post, connect_url, running_gateway


def callback_of(post: Post) -> str:
    return post.headers["x-ws-proxy-send"]


async def test_echo_text_and_binary_through_post_and_callback(backend: Backend) -> None:
    """Each frame is POSTed with the callback header; a POST to the callback is a frame back."""
    async with running_gateway() as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("hello")
        await ws.send(b"\x00\x01\xff")
        first, second = await backend.wait_posts("/frame", 2)
        assert first.body == b"hello" and first.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert second.body == b"\x00\x01\xff" and second.headers["Content-Type"] == "application/octet-stream"
        callback = callback_of(first)
        assert callback == callback_of(second)
        assert callback.startswith(f"http://127.0.0.1:{gateway.port}/")
        conn_id = callback.rsplit("/", 1)[1]
        assert len(conn_id) == 22 and first.headers["x-ws-proxy-id"] == conn_id  # 16 random bytes, base64url
        assert first.headers["x-ws-proxy-client"] == "127.0.0.1"
        assert await backend.callback(callback, "back to you") == 204
        assert await ws.recv() == "back to you"
        assert await backend.callback(callback, b"\x00bin", "application/octet-stream") == 204
        assert await ws.recv() == b"\x00bin"
        assert await backend.callback(callback, b"no type", "") == 204
        assert await ws.recv() == b"no type"


async def test_disconnect_post_after_the_client_closes(backend: Backend) -> None:
    async with running_gateway() as gateway:
        async with connect(connect_url(gateway, backend)) as ws:
            await ws.send("one")
            (frame,) = await backend.wait_posts("/frame", 1)
        (gone,) = await backend.wait_posts("/disconnect", 1)
        assert callback_of(gone) == callback_of(frame)
        assert json.loads(gone.body) == {
            "id": frame.headers["x-ws-proxy-id"],
            "code": 1000,
            "reason": "",
            "closed_by": "client",
        }
        # The callback of a closed connection is gone: 404, never someone else's.
        assert await backend.callback(callback_of(frame), "late") == 404
        async with running_gateway() as other:
            assert len(other.table) == 0
        await asyncio.wait_for(_until(lambda: len(gateway.table) == 0), 5)


async def test_a_client_that_vanishes_still_gets_its_frames_and_disconnect_delivered(backend: Backend) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request, post: Post) -> None:
        if post.path == "/frame":
            await release.wait()
        return None

    backend.answer = slow
    async with running_gateway() as gateway:
        ws = await connect(connect_url(gateway, backend))
        for number in range(3):
            await ws.send(str(number))
        await asyncio.wait_for(_until(lambda: len(gateway.table) == 1 and len(next(iter(gateway.table)).queue) == 3), 5)
        ws.transport.abort()  # no close frame: the TCP connection is just gone
        release.set()
        (gone,) = await backend.wait_posts("/disconnect", 1)
        assert [p.body for p in backend.on("/frame")] == [b"0", b"1", b"2"]
        assert json.loads(gone.body)["code"] == 1006
        await asyncio.wait_for(_until(lambda: len(gateway.table) == 0), 5)


async def _until(check: object) -> None:
    assert callable(check)
    while not check():
        await asyncio.sleep(0.01)


async def test_order_is_kept_for_ten_thousand_frames_over_fifty_connections(backend: Backend) -> None:
    per_connection, connections = 200, 50
    async with running_gateway(queue_frames=8) as gateway:

        async def client(index: int) -> None:
            async with connect(connect_url(gateway, backend, disconnect=None, frame=f"/frame{index}")) as ws:
                for number in range(per_connection):
                    await ws.send(f"{index}:{number}")
                await backend.wait_posts(f"/frame{index}", per_connection, timeout=60)

        await asyncio.gather(*(client(i) for i in range(connections)))
    for index in range(connections):
        bodies = [p.body.decode() for p in backend.on(f"/frame{index}")]
        assert bodies == [f"{index}:{n}" for n in range(per_connection)]


async def test_a_slow_backend_backpressures_the_client_and_memory_stays_bounded(backend: Backend) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request, post: Post) -> None:
        await release.wait()
        return None

    backend.answer = slow
    async with (
        running_gateway(queue_frames=4, queue_bytes=64 << 10) as gateway,
        connect(connect_url(gateway, backend, disconnect=None), write_limit=1024) as ws,
    ):
        chunk = b"x" * 8192
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(2000):  # 16 MB, far past every buffer on the way
                await ws.send(chunk)
                sent += 1

        flooding = asyncio.create_task(flood())
        await asyncio.sleep(0.5)
        (conn,) = list(gateway.table)
        assert len(conn.queue) <= 4 and conn.queued_bytes <= 64 << 10
        assert not flooding.done() and sent < 2000  # the client is held back, the gateway did not read it all
        release.set()
        await asyncio.wait_for(flooding, 60)
        posts = await backend.wait_posts("/frame", 2000, timeout=60)
        assert all(p.body == chunk for p in posts)


async def test_retries_then_delivered_once_in_order(backend: Backend) -> None:
    failures = {"left": 2}

    async def flaky(request: web.Request, post: Post) -> web.Response | None:
        if post.body == b"first" and failures["left"]:
            failures["left"] -= 1
            return web.Response(status=503)
        return None

    backend.answer = flaky
    async with running_gateway(retries=3) as gateway, connect(connect_url(gateway, backend, disconnect=None)) as ws:
        await ws.send("first")
        await ws.send("second")
        await backend.wait_posts("/frame", 4)
        assert [p.body for p in backend.on("/frame")] == [b"first", b"first", b"first", b"second"]


async def test_a_backend_that_keeps_failing_closes_the_client_with_1011_and_the_disconnect_says_why(
    backend: Backend,
) -> None:
    async def broken(request: web.Request, post: Post) -> web.Response | None:
        return web.Response(status=502) if post.path == "/frame" else None

    backend.answer = broken
    async with running_gateway(retries=2) as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("doomed")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert "after 3 attempts: HTTP 502" in closed.value.rcvd.reason
        (gone,) = await backend.wait_posts("/disconnect", 1)
        report = json.loads(gone.body)
        assert report["code"] == 1011 and report["closed_by"] == "backend" and "HTTP 502" in report["reason"]
        assert len(backend.on("/frame")) == 3


async def test_a_refusing_backend_closes_with_1008_and_a_redirect_is_not_followed(backend: Backend) -> None:
    async def redirect(request: web.Request, post: Post) -> web.Response | None:
        if post.path == "/frame":
            return web.Response(status=307, headers={"Location": backend.url + "/elsewhere"})
        return None

    backend.answer = redirect
    async with running_gateway() as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("where to")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "HTTP 307" in closed.value.rcvd.reason
        await backend.wait_posts("/disconnect", 1)
        assert backend.on("/elsewhere") == [] and len(backend.on("/frame")) == 1


async def test_a_backend_that_never_answers_is_retried_within_the_timeout_then_1011(backend: Backend) -> None:
    wake = asyncio.Event()

    async def hang(request: web.Request, post: Post) -> None:
        if post.path == "/frame":
            await wake.wait()
        return None

    backend.answer = hang
    async with running_gateway(post_timeout=0.3, retries=1) as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("anyone?")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert "no answer in 0.3s" in closed.value.rcvd.reason
        assert len(backend.on("/frame")) == 0  # both attempts still hang there
    wake.set()


async def test_a_huge_answer_from_the_backend_is_not_read(backend: Backend) -> None:
    """The backend's answer body is not used: a 1 GB answer does not stall or fill the gateway."""

    async def huge(request: web.Request, post: Post) -> web.StreamResponse | None:
        if post.path != "/frame":
            return None
        response = web.StreamResponse(headers={"Content-Length": str(1 << 30)})
        await response.prepare(request)
        megabyte = b"y" * (1 << 20)
        try:
            for _ in range(1024):
                await response.write(megabyte)
        except ConnectionError:
            backend.cut_off += 1  # the gateway hung up instead of reading a gigabyte
        return response

    backend.answer = huge
    async with running_gateway() as gateway, connect(connect_url(gateway, backend, disconnect=None)) as ws:
        for number in range(3):
            await ws.send(str(number))
        posts = await backend.wait_posts("/frame", 3, timeout=20)
        assert [p.body for p in posts] == [b"0", b"1", b"2"]
        assert backend.cut_off == 3


async def test_signature_checked_by_the_backend_as_the_docs_show(backend: Backend) -> None:
    secret = b"shared-secret"
    async with running_gateway(secret=secret) as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("signed")
        (post,) = await backend.wait_posts("/frame", 1)
    # The three lines of docs/GATEWAY.md:
    fields = dict(part.split("=", 1) for part in post.headers["x-ws-proxy-signature"].split(","))
    expected = hmac.new(
        secret, f"{fields['t']}.{post.headers['x-ws-proxy-send']}.".encode() + post.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(fields["sha256"], expected) and abs(time.time() - int(fields["t"])) < 300
    forged = hmac.new(
        b"wrong", f"{fields['t']}.{post.headers['x-ws-proxy-send']}.".encode() + post.body, hashlib.sha256
    ).hexdigest()
    assert not hmac.compare_digest(fields["sha256"], forged)
    (gone,) = await backend.wait_posts("/disconnect", 1)
    assert "x-ws-proxy-signature" in gone.headers


async def test_connect_url_sees_the_handshake_and_can_refuse_it(backend: Backend) -> None:
    async def gatekeeper(request: web.Request, post: Post) -> web.Response | None:
        if post.path == "/connect-check":
            info = json.loads(post.body)
            allowed = any(name.lower() == "x-let-me-in" for name, _ in info["headers"])
            return web.Response(status=200 if allowed else 401)
        return None

    backend.answer = gatekeeper
    async with running_gateway() as gateway:
        url = connect_url(gateway, backend, extra=f"&c={backend.url}/connect-check")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 401
        assert len(gateway.table) == 0
        async with connect(url, additional_headers={"X-Let-Me-In": "yes", "Origin": "https://app.example"}) as ws:
            await ws.send("in")
            (frame,) = await backend.wait_posts("/frame", 1)
        check = backend.on("/connect-check")[-1]
        info = json.loads(check.body)
        assert info["id"] == frame.headers["x-ws-proxy-id"] and info["address"] == "127.0.0.1"
        assert check.headers["x-ws-proxy-send"] == callback_of(frame)
        assert frame.headers["Origin"] == "https://app.example"  # handshake fields replayed


async def test_the_callback_api_status_close_and_bad_input(backend: Backend) -> None:
    async with running_gateway(max_message_size=1024) as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("hi")
        (frame,) = await backend.wait_posts("/frame", 1)
        callback = callback_of(frame)
        assert backend.session is not None
        session = backend.session
        async with session.get(callback) as response:
            state = await response.json()
        assert state["id"] == frame.headers["x-ws-proxy-id"] and state["address"] == "127.0.0.1"
        assert state["from_client"] == {"frames": 1, "bytes": 2}
        assert state["to_client"] == {"frames": 0, "bytes": 0}
        async with session.post(callback, data=b"z" * 1025) as response:
            assert response.status == 413
        async with session.post(callback, data=b"\xff\xfe", headers={"Content-Type": "text/plain"}) as response:
            assert response.status == 400 and "UTF-8" in await response.text()
        async with session.put(callback, data=b"x") as response:
            assert response.status == 405
        async with session.delete(callback + "?code=99") as response:
            assert response.status == 400
        async with session.post(
            callback, data="code=4000&reason=bye", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ) as response:
            assert response.status == 204
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
        (gone,) = await backend.wait_posts("/disconnect", 1)
        assert json.loads(gone.body)["closed_by"] == "callback"
        async with session.delete(callback) as response:
            assert response.status == 404


async def test_delete_closes_with_1000(backend: Backend) -> None:
    async with running_gateway() as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("hi")
        (frame,) = await backend.wait_posts("/frame", 1)
        assert backend.session is not None
        async with backend.session.delete(callback_of(frame)) as response:
            assert response.status == 204
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


async def test_a_guessed_or_foreign_id_reaches_nothing(backend: Backend) -> None:
    async with (
        running_gateway() as gateway,
        connect(connect_url(gateway, backend)) as one,
        connect(connect_url(gateway, backend)) as two,
    ):
        await one.send("1")
        await two.send("2")
        posts = await backend.wait_posts("/frame", 2)
        ids = {p.headers["x-ws-proxy-id"] for p in posts}
        assert len(ids) == 2
        base = f"http://127.0.0.1:{gateway.port}/"
        known = next(iter(ids))
        for guess in [
            "A" * 22,
            known[:-1] + ("x" if known[-1] != "x" else "y"),
            known.swapcase(),
            "connect2",
            "",
            known + "/",
            known + "A",
        ]:
            if guess in ids:
                continue
            assert await backend.callback(base + guess, "hijack") == 404
        by_body = {p.body: callback_of(p) for p in posts}
        assert await backend.callback(by_body[b"2"], "for two") == 204
        assert await two.recv() == "for two"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(one.recv(), 0.2)


async def test_callback_rate_and_pending_limits(backend: Backend) -> None:
    async with running_gateway(callback_rate=5) as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("hi")
        (frame,) = await backend.wait_posts("/frame", 1)
        statuses = [await backend.callback(callback_of(frame), str(n)) for n in range(8)]
        assert statuses[:5] == [204] * 5 and 429 in statuses[5:]
        for _ in range(5):
            await ws.recv()


async def test_idle_and_lifetime_limits_close_with_1001(backend: Backend) -> None:
    async with running_gateway(idle_timeout=0.3) as gateway, connect(connect_url(gateway, backend)) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "idle timeout")
        (gone,) = await backend.wait_posts("/disconnect", 1)
        assert json.loads(gone.body)["reason"] == "idle timeout"
    async with running_gateway(max_lifetime=0.5) as gateway, connect(connect_url(gateway, backend)) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # busy, never idle: the lifetime ends it anyway
                await ws.send("busy")
                await asyncio.sleep(0.05)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "maximum connection time reached")


async def test_a_gateway_restart_closes_clients_with_1001_and_sends_the_disconnects(backend: Backend) -> None:
    async with running_gateway() as gateway:
        clients = [await connect(connect_url(gateway, backend)) for _ in range(5)]
        for ws in clients:
            await ws.send("here")
        await backend.wait_posts("/frame", 5)
    # stop() returned: every disconnect was POSTed before it did.
    gone = backend.on("/disconnect")
    assert len(gone) == 5 and all(json.loads(p.body)["code"] == 1001 for p in gone)
    for ws in clients:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_not_a_websocket_and_unknown_paths_get_a_clear_answer(backend: Backend) -> None:
    async with running_gateway() as gateway, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{gateway.port}/connect?f={backend.url}/frame") as response:
            assert response.status == 426 and "WebSocket" in await response.text()
        async with session.get(f"http://127.0.0.1:{gateway.port}/some/where") as response:
            assert response.status == 404 and "/connect?f=" in await response.text()


async def test_base_url_with_a_path_puts_the_callbacks_under_it(backend: Backend) -> None:
    from tests.conftest import free_port

    port = free_port()
    from rproxy_core.gateway import Gateway, GatewayConfig

    gateway = Gateway(GatewayConfig(base_url=f"http://127.0.0.1:{port}/ws/", allowlist=(LOCAL,), access_log=False))
    await gateway.serve("127.0.0.1", port)
    try:
        async with connect(f"ws://127.0.0.1:{port}/ws/connect?f={backend.url}/frame") as ws:
            await ws.send("x")
            (frame,) = await backend.wait_posts("/frame", 1)
            assert callback_of(frame).startswith(f"http://127.0.0.1:{port}/ws/")
            assert await backend.callback(callback_of(frame), "y") == 204
            assert await ws.recv() == "y"
    finally:
        await gateway.stop()


async def test_a_client_that_does_not_read_gets_callbacks_refused_not_piled_up(backend: Backend) -> None:
    """Callbacks for a client that stops reading: at most eight wait (503 beyond), each at most send_timeout (504)."""
    async with (
        running_gateway(send_timeout=1.0, callback_rate=10_000) as gateway,
        connect(connect_url(gateway, backend), max_queue=1, max_size=None, close_timeout=0.2) as ws,
    ):
        await ws.send("hi")
        (frame,) = await backend.wait_posts("/frame", 1)
        callback = callback_of(frame)
        big = b"z" * (128 << 10)

        async def burst(count: int) -> list[int]:
            return await asyncio.gather(
                *(backend.callback(callback, big, "application/octet-stream") for _ in range(count))
            )

        statuses = await burst(100)
        assert 503 in statuses, statuses
        # Eight at a time (the pending limit), until the kernel's socket buffers (up to 36 MB on
        # loopback) are full: then frames wait send_timeout and get 504. 60 rounds are 60 MB.
        for _ in range(60):
            statuses = await burst(8)
            if 504 in statuses:
                break
        assert 504 in statuses and 503 not in statuses
        # Callbacks that gave up took their frames back: the socket's buffer holds the frame or two
        # being written (about 260 KiB here), not the 24 refused since.
        for _ in range(3):
            assert set(await burst(8)) == {504}
        (conn,) = list(gateway.table)
        transport = gateway._links[conn.id].ws._req.transport  # type: ignore[union-attr]
        assert transport is not None and transport.get_write_buffer_size() <= 3 * len(big)
        assert conn.pending_sends == 0
        assert ws.state.name == "OPEN"  # the client is slow, not gone


async def test_replayed_handshake_fields_are_only_the_chosen_ones(backend: Backend) -> None:
    headers = {"Cookie": "session=1", "X-Tenant": "garden", "Origin": "https://app.example"}
    async with running_gateway() as gateway, connect(connect_url(gateway, backend), additional_headers=headers) as ws:
        await ws.send("default")
        (post,) = await backend.wait_posts("/frame", 1)
    assert post.headers["Origin"] == "https://app.example" and "Cookie" not in post.headers
    assert "X-Tenant" not in post.headers
    async with (
        running_gateway(forward_headers=("cookie", "x-tenant")) as gateway,
        connect(connect_url(gateway, backend), additional_headers=headers) as ws,
    ):
        await ws.send("chosen")
        posts = await backend.wait_posts("/frame", 2)
    assert posts[1].headers["Cookie"] == "session=1" and posts[1].headers["X-Tenant"] == "garden"
    assert "Origin" not in posts[1].headers


async def test_a_connect_url_that_does_not_answer_is_502_and_its_post_is_signed(backend: Backend) -> None:
    async with running_gateway(retries=0, secret=b"k") as gateway:
        dead = "http://127.0.0.1:9/connect-check"  # the discard port: nothing listens there
        with pytest.raises(InvalidStatus) as refused:
            async with connect(connect_url(gateway, backend, extra=f"&c={dead}")):
                pass
        assert refused.value.response.status_code == 502
        async with connect(connect_url(gateway, backend, extra=f"&c={backend.url}/check")) as ws:
            await ws.send("x")
            await backend.wait_posts("/frame", 1)
        (check,) = backend.on("/check")
        assert check.headers["x-ws-proxy-signature"].startswith("t=")
        assert len(gateway.table) == 1


async def test_status_after_traffic_both_ways(backend: Backend) -> None:
    async with running_gateway() as gateway, connect(connect_url(gateway, backend)) as ws:
        await ws.send("abc")
        await ws.send(b"defg")
        (frame, _) = await backend.wait_posts("/frame", 2)
        assert await backend.callback(callback_of(frame), "12345") == 204
        await ws.recv()
        assert backend.session is not None
        async with backend.session.get(callback_of(frame)) as response:
            state = await response.json()
        assert state["from_client"] == {"frames": 2, "bytes": 7} and state["to_client"] == {"frames": 1, "bytes": 5}
        assert state["queued"] == {"frames": 0, "bytes": 0}
        async with backend.session.head(callback_of(frame)) as response:
            assert response.status == 200


async def test_metrics_and_status_only_with_the_admin_token(backend: Backend) -> None:
    import hashlib

    async with running_gateway() as gateway, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{gateway.port}/_rproxy/metrics") as response:
            assert response.status == 404
    hashed = "sha256:" + hashlib.sha256(b"the-admin-token").hexdigest()
    for round_number, configured in enumerate(("the-admin-token", hashed), 1):
        async with (
            running_gateway(admin_token=configured) as gateway,
            aiohttp.ClientSession() as session,
            connect(connect_url(gateway, backend)) as ws,
        ):
            await ws.send("count")
            await backend.wait_posts("/frame", round_number)
            base = f"http://127.0.0.1:{gateway.port}/_rproxy"
            for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {hashed}"}):
                async with session.get(base + "/metrics", headers=wrong) as response:
                    assert response.status == 401, (configured, wrong)
            good = {"Authorization": "Bearer the-admin-token"}
            async with session.get(base + "/metrics", headers=good) as response:
                text = await response.text()
            assert "rproxy_gateway_connections 1\n" in text and "rproxy_gateway_frames_in_total 1\n" in text
            async with session.get(base + "/status.json", headers=good) as response:
                status = await response.json()
            assert status["open"] == 1 and status["accepted"] == 1
