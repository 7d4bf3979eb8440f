"""Hostile clients and targets: allowlist bypasses, SSRF, huge frames, too many connections, log injection."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rproxy_core.gateway import Allowlist

from .conftest import Backend, connect_url, running_gateway


async def refused_status(url: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    response = refused.value.response
    return response.status_code, response.body.decode() if response.body else ""


def test_patterns_match_the_whole_url() -> None:
    allow = Allowlist([r"https://good\.example\.com/.*"])
    assert allow.check("https://good.example.com/frame") is None
    for bad in [
        "https://good.example.com.evil.test/",
        "https://good.example.com.evil.test/frame",
        "xhttps://good.example.com/",
        "https://good.example.com@evil.test/",
        "https://user:pw@good.example.com/x",
        "ftp://good.example.com/",
        "https://goodXexample.com/",
    ]:
        assert allow.check(bad) is not None, bad
    assert allow.check("https://good.example.com/" + "a" * 3000) is not None  # too long to try
    bare = Allowlist([r"https://good\.example\.com", r"http://.*\.good\.example"])
    assert bare.check("https://good.example.com") is None
    for bad in ["https://good.example.com.evil.test/", "https://good.example.com/", "http://x.good.example.evil/"]:
        assert bare.check(bad) is not None, bad  # re.match would admit each of them


def test_only_hosts_written_in_a_pattern_may_be_private() -> None:
    allow = Allowlist([r"http://127\.0\.0\.1:\d+/.*", r"https?://nas\.lan/.*", r"http://.*"])
    assert allow.explicit_hosts == {"127.0.0.1", "nas.lan"}
    assert allow.check("http://127.0.0.1:8000/f") is None
    for private in [
        "http://10.0.0.1/f",
        "http://[::1]/f",
        "http://169.254.169.254/latest",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
        "http://192.168.1.1/",
        "http://[fe80::1]/",
    ]:
        assert allow.check(private) == "a private, loopback or link-local address the allowlist does not name", private
    assert allow.check("http://93.184.215.14/f") is None


async def test_without_an_allowlist_every_connection_is_refused(backend: Backend) -> None:
    async with running_gateway(allowlist=()) as gateway:
        status, body = await refused_status(connect_url(gateway, backend))
        assert status == 403 and "no allowlist" in body
    assert backend.posts == []


async def test_a_host_suffix_does_not_slip_through_an_unanchored_pattern(backend: Backend) -> None:
    port = backend.url.rsplit(":", 1)[1]
    # 127.0.0.1.nip.io-like names: the pattern's host followed by more labels.
    async with running_gateway(allowlist=(rf"http://127\.0\.0\.1:{port}/frame",)) as gateway:
        base = f"ws://127.0.0.1:{gateway.port}/connect?f="
        for sneaky in [
            f"http://127.0.0.1:{port}/frame/../admin",
            f"http://127.0.0.1:{port}/frameX",
            f"http://127.0.0.1:{port}/frame%3Fx",
            f"http://127.0.0.1:{port}.evil.test/frame",
        ]:
            status, _ = await refused_status(base + sneaky)
            assert status == 403, sneaky
        status, body = await refused_status(base + f"http://127.0.0.1:{port}/frame&d=http://evil.test/")
        assert status == 403 and "d= is not on the gateway's allowlist" in body
        status, body = await refused_status(base + f"http://127.0.0.1:{port}/frame&f=http://evil.test/")
        assert status == 400 and "more than once" in body
        status, body = await refused_status(f"ws://127.0.0.1:{gateway.port}/connect?d={backend.url}/frame")
        assert status == 400 and "f= " in body
    assert backend.posts == []


async def test_ssrf_private_targets_need_to_be_named(backend: Backend) -> None:
    port = backend.url.rsplit(":", 1)[1]
    async with running_gateway(allowlist=(r"http://.*",)) as gateway:
        base = f"ws://127.0.0.1:{gateway.port}/connect?f="
        for literal in [
            f"http://127.0.0.1:{port}/frame",
            f"http://[::1]:{port}/frame",
            "http://169.254.169.254/",
            f"http://0.0.0.0:{port}/frame",
            "http://10.1.2.3/frame",
            f"http://2130706433:{port}/frame",
            "http://0x7f.1/frame",
            "http://127.1/",
        ]:
            status, body = await refused_status(base + literal)
            assert status == 403 and ("private" in body or "numeric" in body), literal
        # Names are checked where they are resolved (at every resolution: DNS rebinding).
        for name in [f"http://localhost:{port}/frame"]:
            async with connect(base + name) as ws:
                await ws.send("to the metadata service")
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, name
            assert "private" in closed.value.rcvd.reason
    assert backend.posts == []


async def test_a_frame_over_the_limit_closes_with_1009_and_others_go_on(backend: Backend) -> None:
    async with (
        running_gateway(max_message_size=4096) as gateway,
        connect(connect_url(gateway, backend)) as big,
        connect(connect_url(gateway, backend)) as fine,
    ):
        await big.send(b"x" * 4097)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(big.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        (gone,) = await backend.wait_posts("/disconnect", 1)
        assert json.loads(gone.body)["code"] == 1009
        await fine.send(b"y" * 4096)
        (post,) = await backend.wait_posts("/frame", 1)
        assert post.body == b"y" * 4096


async def test_connections_per_address_and_in_all_are_bounded(backend: Backend) -> None:
    async with running_gateway(max_connections_per_address=3) as gateway:
        held = [await connect(connect_url(gateway, backend)) for _ in range(3)]
        status, body = await refused_status(connect_url(gateway, backend))
        assert status == 429 and "too many connections" in body
        await held.pop().close()
        await backend.wait_posts("/disconnect", 1)
        async with asyncio.timeout(5):
            while len(gateway.table) > 2:
                await asyncio.sleep(0.01)
        async with connect(connect_url(gateway, backend)) as again:
            await again.send("room again")
            await backend.wait_posts("/frame", 1)
        for ws in held:
            await ws.close()
    async with running_gateway(max_connections=1) as gateway, connect(connect_url(gateway, backend)):
        status, body = await refused_status(connect_url(gateway, backend))
        assert status == 503 and "connection limit" in body


async def test_peer_text_is_escaped_in_the_log_lines(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rproxy.gateway")
    async with running_gateway(access_log=True) as gateway:
        async with connect(connect_url(gateway, backend)) as ws:
            await ws.send("x")
            await backend.wait_posts("/frame", 1)
            await ws.close(4000, "\x1b[31mfake\nERROR line")
        await backend.wait_posts("/disconnect", 1)
        async with asyncio.timeout(5):
            while not any("gateway id=" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rproxy.gateway")]
    assert any("\\x1b[31mfake\\nERROR line" in line for line in lines)
    assert not any("\x1b" in line or "\n" in line for line in lines)
    # The full id is a capability (whoever has it may send frames): only its start is logged.
    conn_id = backend.on("/frame")[0].headers["x-ws-proxy-id"]
    assert not any(conn_id in line for line in lines)
