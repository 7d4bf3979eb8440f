"""Files Home Assistant serves from disk, through a tunnel to Home Assistant itself.

Home Assistant answers its frontend (``/frontend_latest/...``), ``/local/`` (the ``www``
folder), images and backup downloads with aiohttp's ``FileResponse``, which calls
``loop.sendfile()`` on the connection's transport. Before the in-process transport supported
it, every such response reached the visitor with its headers and no body.

Everything is real: Home Assistant's HTTP server and its static resources (registered the way
its ``frontend`` integration registers ``/local``, with and without cache headers), the
integration's agent, a real bridge on 127.0.0.1 (``proxied_bridge``: visitors are believed to
be at the address they claim) and aiohttp visitors. Files live in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from homeassistant.components.http import StaticPathConfig
from homeassistant.core import HomeAssistant

from rproxy_core import Bridge

from .common import claim, homeassistant_tunnel

MB = 1 << 20
VISITOR = "203.0.113.60"
#: Large enough to cross every buffer many times over (the core suite sends 100 MB in-process).
BIG_SIZE = 40 * MB + 4321
#: Bytes Home Assistant may have read from a file beyond what the visitor received when the
#: visitor stops reading: every buffer on the way is bounded (the in-process transport's
#: 64 KiB, the agent's read buffer, the tunnel stream's 1 MiB window, the bridge's and the
#: visitor's socket buffers).
READ_AHEAD_BOUND = 16 * MB
#: aiohttp's client asks for gzip by default; a .gz beside a file is then served instead.
IDENTITY = {"Accept-Encoding": "identity"}


@dataclass
class Served:
    """Where the files are, and the bridge's URL."""

    www: Path
    url: str
    big_sha256: str


def write_pattern(path: Path, size: int) -> str:
    """Write ``size`` bytes that differ block by block; return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for index in range(0, size, MB):
            block = hashlib.shake_256(index.to_bytes(8, "big")).digest(min(MB, size - index))
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


async def settled_position(path: Path, timeout: float = 15) -> int:
    """Where the reading of ``path`` stopped: its position once unchanged for half a second."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = read_position(path)
    while True:
        await asyncio.sleep(0.5)
        now = read_position(path)
        if now is not None and now == last:
            return now
        assert asyncio.get_running_loop().time() < deadline, f"the file was still being read after {timeout} s ({now})"
        last = now


def read_position(path: Path) -> int | None:
    """How far this process has read ``path`` through an open descriptor (Linux's fdinfo)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
                for line in info:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            continue  # closed meanwhile
    return None


async def serve_files(hass: HomeAssistant, tmp_path: Path) -> Served:
    """Files under ``/local`` (with the frontend's cache headers) and ``/nocache``."""
    www = tmp_path / "www"
    www.mkdir()
    big_sha256 = await hass.async_add_executor_job(write_pattern, www / "big.bin", BIG_SIZE)
    script = b"".join(b"console.log(%d);\n" % i for i in range(5000))
    (www / "app.js").write_bytes(script)
    (www / "app.js.gz").write_bytes(gzip.compress(script, mtime=0))
    (www / "icon.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    await hass.http.async_register_static_paths(
        [StaticPathConfig("/local", str(www), True), StaticPathConfig("/nocache", str(www), False)]
    )
    return Served(www, "", big_sha256)


@pytest.mark.timeout(120)
async def test_a_40_mb_file_crosses_the_tunnel_whole_and_only_as_fast_as_the_visitor_reads(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """/local/big.bin (40 MB): the bytes and the hash match; a visitor who stops reading stops
    Home Assistant reading the file, a bounded distance ahead."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        served = await serve_files(hass, tmp_path)
        digest = hashlib.sha256()
        received = 0
        async with visitor.get(f"{proxied_bridge.url}/local/big.bin", headers=claim(VISITOR)) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Length"] == str(BIG_SIZE)
            assert response.headers["Cache-Control"].startswith("public, max-age=")  # the cache headers
            chunk = await response.content.readany()
            digest.update(chunk)
            received += len(chunk)
            # The visitor stops reading: Home Assistant stops reading the file soon after.
            position = await settled_position(served.www / "big.bin")
            assert position - received < READ_AHEAD_BOUND, f"{position - received} bytes read ahead"
            async for chunk in response.content.iter_chunked(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        assert received == BIG_SIZE
        assert digest.hexdigest() == served.big_sha256


async def test_ranges_head_and_conditional_requests_of_local_files(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Range (206, 416), HEAD and If-None-Match / If-Modified-Since (304) answer through the
    tunnel as Home Assistant answers them; precompressed files keep their encoding."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        served = await serve_files(hass, tmp_path)
        url = proxied_bridge.url
        headers = {**claim(VISITOR), **IDENTITY}
        script = (served.www / "app.js").read_bytes()
        icon = (served.www / "icon.png").read_bytes()

        for path in ("/local/app.js", "/nocache/app.js"):
            async with visitor.get(url + path, headers={**headers, "Range": "bytes=100-199"}) as response:
                assert response.status == 206, path
                assert response.headers["Content-Range"] == f"bytes 100-199/{len(script)}"
                assert await response.read() == script[100:200]
            async with visitor.get(url + path, headers={**headers, "Range": "bytes=-10"}) as response:
                assert (response.status, await response.read()) == (206, script[-10:])
            async with visitor.get(url + path, headers={**headers, "Range": f"bytes={len(script)}-"}) as response:
                assert response.status == 416
                await response.read()

            async with visitor.head(url + path, headers=headers) as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(len(script))
                assert response.headers["Content-Type"].startswith(("text/javascript", "application/javascript"))
                etag, modified = response.headers["ETag"], response.headers["Last-Modified"]
            async with visitor.get(url + path, headers={**headers, "If-None-Match": etag}) as response:
                assert response.status == 304
                assert await response.read() == b""
            async with visitor.get(url + path, headers={**headers, "If-Modified-Since": modified}) as response:
                assert response.status == 304

        async with visitor.get(url + "/local/icon.png", headers=headers) as response:
            assert response.headers["Content-Type"] == "image/png"
            assert await response.read() == icon
        # A browser asks for gzip: it gets the .gz beside the file, as it is.
        async with visitor.get(
            url + "/local/app.js", headers={**claim(VISITOR), "Accept-Encoding": "gzip"}, auto_decompress=False
        ) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == (served.www / "app.js.gz").read_bytes()
        async with visitor.get(url + "/local/missing.js", headers=headers) as response:
            assert response.status == 404


async def test_many_files_at_once_as_a_browser_loads_a_page(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Thirty file responses in parallel (a page load) all arrive whole."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        served = await serve_files(hass, tmp_path)
        expected = {}
        for index in range(30):
            body = hashlib.shake_256(b"%d" % index).digest(1000 + 37_000 * index)
            (served.www / f"chunk.{index}.js").write_bytes(body)
            expected[f"/local/chunk.{index}.js"] = body

        async def fetch(path: str) -> bytes:
            async with visitor.get(proxied_bridge.url + path, headers={**claim(VISITOR), **IDENTITY}) as response:
                assert response.status == 200, path
                return await response.read()

        bodies = await asyncio.gather(*(fetch(path) for path in expected))
        assert dict(zip(expected, bodies, strict=True)) == expected
