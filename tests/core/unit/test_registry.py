"""The registry's pool choice: which agent of a tunnel's pool a new stream goes to, and why none."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from rproxy_core.bridge.registry import MAIN_SERVICE, MemoryRegistry, NoServiceError, TunnelBusyError
from rproxy_core.exceptions import NoAgentError
from rproxy_core.protocol import Multiplexer, Role
from rproxy_core.protocol.heads import KIND_HTTP, KIND_TCP, RequestHead

from .framesockets import Tunnel, running_tunnel

HTTP = RequestHead("GET", "/")
TCP = RequestHead("CONNECT", "/", kind=KIND_TCP, service="ssh")
WEB_SERVICE = RequestHead("GET", "/", service="grafana")


@asynccontextmanager
async def pool(*offers: Mapping[str, str], max_streams: int | None = None) -> AsyncIterator[list[Tunnel]]:
    """Running tunnels, one per entry of ``offers`` (the services each agent announced)."""
    async with AsyncExitStack() as stack:
        tunnels = []
        for _ in offers:
            mux = Multiplexer(Role.AGENT, max_streams=max_streams) if max_streams else None
            tunnels.append(await stack.enter_async_context(running_tunnel(agent_mux=mux)))
        yield tunnels


async def owner(tunnels: list[Tunnel], registry: MemoryRegistry, head: RequestHead) -> int:
    """The index in ``tunnels`` of the agent the registry opened a stream to."""
    stream = await registry.open_stream("home", head, end_stream=True)
    (index,) = [i for i, t in enumerate(tunnels) if t.bridge.streams.get(stream.id) is stream]
    return index


async def test_streams_go_round_robin_over_the_pool() -> None:
    """Three agents of one tunnel take new streams in turn."""
    async with pool(MAIN_SERVICE, MAIN_SERVICE, MAIN_SERVICE) as tunnels:
        registry = MemoryRegistry()
        for tunnel in tunnels:
            await registry.add("home", tunnel.bridge)
        assert [await owner(tunnels, registry, HTTP) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
        assert registry.tunnels() == {"home": 3}


# (the services each of three agents offers, the stream's head, the agents that may take it)
CHOICES = [
    pytest.param([{"": KIND_HTTP}, {"ssh": KIND_TCP}, {"": KIND_HTTP}], HTTP, {0, 2}, id="main-app-skips-tcp-only"),
    pytest.param([{"": KIND_HTTP}, {"ssh": KIND_TCP}, {"": KIND_HTTP}], TCP, {1}, id="tcp-only-where-offered"),
    pytest.param([{"ssh": KIND_HTTP}, {"ssh": KIND_TCP}, {}], TCP, {1}, id="service-must-match-kind"),
    pytest.param(
        [{"": KIND_HTTP, "grafana": KIND_HTTP}, {"": KIND_HTTP}, {"grafana": KIND_HTTP}],
        WEB_SERVICE,
        {0, 2},
        id="named-web-service",
    ),
]


@pytest.mark.parametrize(("offers", "head", "allowed"), CHOICES)
async def test_a_stream_goes_only_to_agents_offering_its_service(
    offers: list[Mapping[str, str]], head: RequestHead, allowed: set[int]
) -> None:
    """Over many streams, each goes to an agent offering the service as that kind, and all those get some."""
    async with pool(*offers) as tunnels:
        registry = MemoryRegistry()
        for tunnel, offer in zip(tunnels, offers, strict=True):
            await registry.add("home", tunnel.bridge, offer)
        chosen = {await owner(tunnels, registry, head) for _ in range(6)}
        assert chosen == allowed


async def test_no_agent_offering_the_service_is_no_service() -> None:
    """Live agents, none with the service: NoServiceError, not NoAgentError (the visitor's answer differs)."""
    async with pool(MAIN_SERVICE) as tunnels:
        registry = MemoryRegistry()
        await registry.add("home", tunnels[0].bridge)
        with pytest.raises(NoServiceError, match="no tcp service 'ssh'"):
            await registry.open_stream("home", TCP, end_stream=True)
        assert registry.service_kind("home", "") == KIND_HTTP
        assert registry.service_kind("home", "ssh") is None


async def test_an_unknown_tunnel_has_no_agent() -> None:
    """A name nobody registered: NoAgentError."""
    with pytest.raises(NoAgentError):
        await MemoryRegistry().open_stream("nobody", HTTP, end_stream=True)


async def test_a_closing_agent_leaves_the_pool_at_once() -> None:
    """An agent whose tunnel starts closing gets no more streams; the last one gone takes the name along."""
    async with pool(MAIN_SERVICE, MAIN_SERVICE) as tunnels:
        registry = MemoryRegistry()
        for tunnel in tunnels:
            await registry.add("home", tunnel.bridge)
        await tunnels[0].bridge.close()
        assert {await owner(tunnels, registry, HTTP) for _ in range(4)} == {1}
        assert registry.connections_by_tunnel() == {"home": [tunnels[1].bridge]}
        await registry.remove("home", tunnels[1].bridge)
        assert "home" not in registry.names()
        with pytest.raises(NoAgentError):
            await registry.open_stream("home", HTTP, end_stream=True)
        await registry.remove("home", tunnels[1].bridge)  # twice: nothing happens


async def test_agents_at_their_stream_limit_make_the_tunnel_busy() -> None:
    """Every agent full (their announced limit): TunnelBusyError; one with room still takes the stream."""
    async with pool(MAIN_SERVICE, MAIN_SERVICE, max_streams=1) as tunnels:
        registry = MemoryRegistry()
        for tunnel in tunnels:
            await registry.add("home", tunnel.bridge)
        assert {await owner(tunnels, registry, HTTP) for _ in range(2)} == {0, 1}
        with pytest.raises(TunnelBusyError, match="every agent"):
            await registry.open_stream("home", HTTP, end_stream=True)


@pytest.mark.parametrize("limit", [1, 3])
async def test_the_tunnels_own_stream_limit_counts_over_all_agents(limit: int) -> None:
    """max_streams_per_tunnel caps the streams of the whole pool, whichever agents hold them."""
    async with pool(MAIN_SERVICE, MAIN_SERVICE) as tunnels:
        registry = MemoryRegistry(max_streams_per_tunnel=limit)
        for tunnel in tunnels:
            await registry.add("home", tunnel.bridge)
        for _ in range(limit):
            await registry.open_stream("home", HTTP, end_stream=True)
        with pytest.raises(TunnelBusyError, match=f"limit of {limit} streams"):
            await registry.open_stream("home", HTTP, end_stream=True)
        assert sum(len(t.bridge.streams) for t in tunnels) == limit
