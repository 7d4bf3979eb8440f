"""Big bodies through the tunnel: intact, streamed (never buffered whole), and flow-controlled.

Bodies are a deterministic pseudo-random pattern generated chunk by chunk on both sides, so
no test holds hundreds of megabytes. Memory is measured on a bridge run as its own process,
as users run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from homeapps import HomeApp, home_tunnel, pattern_chunks, pattern_sha256, serve_home

from tests.conftest import TOKEN, Proc, free_port, running_agent, wait_http

MB = 1 << 20
#: Allowed growth of the bridge's resident memory while it relays bulk data. The stream window
#: is 1 MiB and the tunnel's write high-water mark 1 MiB, so a healthy bridge grows by a few MB.
RSS_GROWTH_LIMIT_KIB = 64 * 1024


async def _download_sha256(response: aiohttp.ClientResponse) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    async for chunk in response.content.iter_chunked(256 << 10):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


async def test_a_200_mb_download_arrives_intact(http: aiohttp.ClientSession) -> None:
    """200 MB streamed by the home app reach the visitor with the right length and SHA-256."""
    size = 200 * MB
    async with home_tunnel() as t:
        async with asyncio.timeout(120):
            async with http.get(t.url + f"/download/{size}") as response:
                assert response.status == 200
                assert response.content_length == size
                digest, received = await _download_sha256(response)
        assert received == size
        assert digest == pattern_sha256(size)
        assert t.home.handler_outcome == "finished"


async def test_a_100_mb_chunked_upload_arrives_intact(http: aiohttp.ClientSession) -> None:
    """A 100 MB upload of unknown length reaches the home app whole (it returns the SHA-256)."""
    size = 100 * MB
    async with home_tunnel() as t:
        async with asyncio.timeout(120):
            async with http.post(t.url + "/upload", data=pattern_chunks(size)) as response:
                assert response.status == 200
                result = await response.json()
        assert result == {"sha256": pattern_sha256(size), "size": size}
        assert t.home.seen[0].header_values("Transfer-Encoding") == ["chunked"]


# The bridge as a separate process, to measure its memory.


@dataclass
class ProcTunnel:
    bridge: Proc
    url: str
    home: HomeApp

    def rss_kib(self) -> int:
        return self.bridge.rss_kib()


@asynccontextmanager
async def bridge_process(procs: Callable[..., Proc]) -> AsyncIterator[ProcTunnel]:
    """A bridge process, an in-process agent connected to it, and a home app."""
    port = free_port()
    bridge = procs("bridge", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--no-access-log")
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/_rproxy/health")
    async with serve_home() as (home, target), running_agent(url, target):
        yield ProcTunnel(bridge, url, home)
    assert bridge.popen.poll() is None, bridge.output()


async def _warm_up(http: aiohttp.ClientSession, url: str) -> None:
    """Let the bridge allocate what any relaying needs (buffers, first streams) before measuring."""
    for _ in range(3):
        async with http.get(url + f"/download/{8 * MB}") as response:
            assert response.status == 200
            await _download_sha256(response)
    for i in range(20):
        async with http.get(url + f"/id/{i}") as response:
            assert response.status == 200


async def test_bridge_memory_stays_bounded_during_a_200_mb_download(
    http: aiohttp.ClientSession, procs: Callable[..., Proc]
) -> None:
    """The bridge process relays 200 MB while its RSS grows by far less than the body."""
    size = 200 * MB
    async with bridge_process(procs) as t:
        await _warm_up(http, t.url)
        before = t.rss_kib()
        peak = before
        digest = hashlib.sha256()
        received = 0
        async with asyncio.timeout(120):
            async with http.get(t.url + f"/download/{size}") as response:
                assert response.status == 200
                async for chunk in response.content.iter_chunked(256 << 10):
                    digest.update(chunk)
                    received += len(chunk)
                    if received % (8 * MB) < len(chunk):
                        peak = max(peak, t.rss_kib())
        after = t.rss_kib()
        assert received == size
        assert digest.hexdigest() == pattern_sha256(size)
        assert max(peak, after) - before < RSS_GROWTH_LIMIT_KIB, (before, peak, after)


async def test_a_stalled_visitor_holds_back_only_its_own_download(
    http: aiohttp.ClientSession, procs: Callable[..., Proc]
) -> None:
    """A visitor that stops reading a 1 GB download stalls only that stream; others flow, memory stays flat."""
    size = 1024 * MB
    async with bridge_process(procs) as t:
        await _warm_up(http, t.url)
        before = t.rss_kib()
        port = int(t.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /download/{size} HTTP/1.1\r\nHost: slow.test\r\n\r\n".encode())
            await writer.drain()
            received = 0
            async with asyncio.timeout(30):
                while received < MB:  # the slow visitor reads the first MB, then nothing more
                    chunk = await reader.read(64 << 10)
                    assert chunk, "download ended early"
                    received += len(chunk)

            async def small(i: int) -> str:
                async with http.get(t.url + f"/id/{i}?q=while-stalled") as response:
                    assert response.status == 200
                    return (await response.json())["n"]

            async with asyncio.timeout(10):
                answers = await asyncio.gather(*(small(i) for i in range(50)))
            assert answers == [str(i) for i in range(50)]

            # Backpressure reaches the home app: its writes stop long before the 1 GB is out
            # (what is written by then sits in socket buffers, which loopback autotuning can
            # grow to tens of MB each, hence the loose bound).
            async with asyncio.timeout(30):
                written = -1
                while written != t.home.bytes_written:
                    written = t.home.bytes_written
                    await asyncio.sleep(1.0)
            assert written < 256 * MB, written
            assert t.rss_kib() - before < RSS_GROWTH_LIMIT_KIB, (before, t.rss_kib())
            assert not t.home.handler_gone.is_set()
        finally:
            writer.close()  # unread data pending: the kernel answers with a reset
        # The visitor's departure travels back: bridge → tunnel reset → agent → home app.
        async with asyncio.timeout(15):
            await t.home.handler_gone.wait()
        assert t.home.handler_outcome.startswith(("write failed", "cancelled")), t.home.handler_outcome
        assert t.home.bytes_written < size
        # And the tunnel still works afterwards.
        async with http.get(t.url + "/id/after") as response:
            assert (await response.json())["n"] == "after"


async def test_a_frozen_bridge_stops_the_agent_from_reading_the_home_app(
    http: aiohttp.ClientSession, procs: Callable[..., Proc]
) -> None:
    """With the bridge frozen mid-transfer, the agent's output backs up and it stops pulling from the home app.

    Sixteen downloads at once hold more credit than loopback's socket buffers absorb, so the
    agent's tunnel socket fills and its writes must wait; when the bridge resumes, every
    download completes byte-exact.
    """
    size, count = 32 * MB, 16
    async with bridge_process(procs) as t:

        async def download() -> str:
            async with http.get(t.url + f"/download/{size}") as response:
                assert response.status == 200
                digest, received = await _download_sha256(response)
                assert received == size
                return digest

        async with asyncio.timeout(120):
            downloads = [asyncio.create_task(download()) for _ in range(count)]
            while t.home.bytes_written < 4 * MB:  # transfers under way
                await asyncio.sleep(0.01)
            os.kill(t.bridge.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)
                stalled_at = t.home.bytes_written
                await asyncio.sleep(1.5)
                assert t.home.bytes_written == stalled_at, "the agent kept reading the home app"
                assert stalled_at < count * size
            finally:
                os.kill(t.bridge.pid, signal.SIGCONT)
            digests = await asyncio.gather(*downloads)
        assert digests == [pattern_sha256(size)] * count
