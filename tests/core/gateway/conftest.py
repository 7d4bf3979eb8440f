"""A real gateway on 127.0.0.1, a real aiohttp backend that records what it gets, websockets clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from rproxy_core.gateway import Gateway, GatewayConfig
from tests.conftest import free_port, start_app

#: Admits the test backends (127.0.0.1 named literally, so the SSRF rule lets it through).
LOCAL = r"http://127\.0\.0\.1:\d+/.*"


@dataclass
class Post:
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Backend:
    """An aiohttp backend: records each POST; ``answer`` decides the reply (default 200)."""

    url: str = ""
    posts: list[Post] = field(default_factory=list)
    answer: Callable[[web.Request, Post], Awaitable[web.StreamResponse | None]] | None = None
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    session: aiohttp.ClientSession | None = None
    cut_off: int = 0

    def on(self, path: str) -> list[Post]:
        return [p for p in self.posts if p.path == path]

    async def wait(self, check: Callable[[Backend], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: check(self))

    async def wait_posts(self, path: str, count: int, timeout: float = 10) -> list[Post]:
        await self.wait(lambda b: len(b.on(path)) >= count, timeout)
        return self.on(path)

    async def callback(self, url: str, data: bytes | str, content_type: str = "text/plain") -> int:
        assert self.session is not None
        async with self.session.post(url, data=data, headers={"Content-Type": content_type}) as response:
            return response.status

    def frame_url(self, path: str = "/frame") -> str:
        return self.url + path


async def _record(backend: Backend, request: web.Request) -> web.StreamResponse:
    post = Post(request.path, CIMultiDict(request.headers), await request.read())
    answer = await backend.answer(request, post) if backend.answer is not None else None
    async with backend.arrived:
        backend.posts.append(post)
        backend.arrived.notify_all()
    return answer if answer is not None else web.Response(text="ok")


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    state = Backend()
    app = web.Application(client_max_size=1 << 30)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _record(state, request)

    app.router.add_route("*", "/{tail:.*}", handle)
    runner, state.url = await start_app(app)
    async with aiohttp.ClientSession() as session:
        state.session = session
        try:
            yield state
        finally:
            await runner.cleanup()


@asynccontextmanager
async def running_gateway(**overrides: Any) -> AsyncIterator[Gateway]:
    port = free_port()
    config = GatewayConfig(
        base_url=f"http://127.0.0.1:{port}",
        allowlist=(LOCAL,),
        access_log=False,
        retry_backoff=0.02,
        post_timeout=3,
        shutdown_grace=3,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    gateway = Gateway(config)
    await gateway.serve("127.0.0.1", port)
    try:
        yield gateway
    finally:
        await gateway.stop()


def connect_url(
    gateway: Gateway, backend: Backend, frame: str = "/frame", disconnect: str | None = "/disconnect", extra: str = ""
) -> str:
    url = f"ws://127.0.0.1:{gateway.port}/connect?f={backend.url}{frame}"
    if disconnect is not None:
        url += f"&d={backend.url}{disconnect}"
    return url + extra
