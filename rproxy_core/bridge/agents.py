"""The agent endpoint, /_rproxy/connect: authentication, version choice, handshake.

Everything that can be refused is refused with a plain HTTP answer before the WebSocket
upgrade (401 bad token or key signature, 426 no common protocol version, 400 bad tunnel name,
403 a name the token or key may not serve), so no tunnel ever exists for an agent that should
not have one.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..const import (
    HANDSHAKE_TIMEOUT,
    HEADER_AGENT_ID,
    HEADER_PROTOCOL,
    HEADER_TUNNEL,
    TUNNEL_MESSAGE_LIMIT,
)
from ..exceptions import RemoteProtocolError
from ..headers import is_tunnel_name
from ..protocol.frames import ErrorCode
from ..protocol.hello import AgentHello
from ..protocol.mux import SUPPORTED_VERSIONS, Multiplexer, Role
from ..transport import AiohttpFrameSocket, HandshakeError, TunnelConnection
from ..transport.budget import MemoryBudget
from .context import BridgeContext, Credential
from .routing import host_name, is_loopback_host
from .shares import Shares, address_share
from .visitor_policy import parse_agent_policy

__all__ = ["AgentHandler", "Credential"]

_LOGGER = logging.getLogger("rproxy.bridge")


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


class AgentHandler:
    """aiohttp handler for agents dialling in."""

    def __init__(self, context: BridgeContext) -> None:
        self._context = context
        self._handshaking: set[TunnelConnection] = set()
        #: What each connected agent presented, and its tunnel name, to cut it off when its
        #: token or key is revoked.
        self._credentials: dict[TunnelConnection, tuple[Credential, str]] = {}
        #: Agents refused for too many pending handshakes since the backlog was last clear
        #: (logged once when the burst starts and once when it is over, not per attempt).
        self._refused_backlog = 0
        #: Pending handshakes (reserved before the upgrade) in all, per source address (an IPv6
        #: /64 counts as one) and per credential: one holder cannot take every slot.
        self._pending_total = 0
        self._pending_by_source: Shares[str] = Shares(context.config.max_pending_handshakes_per_source)
        self._pending_by_credential: Shares[str] = Shares(context.config.max_pending_handshakes_per_credential)
        #: Holders whose refusal was logged in their current burst.
        self._noted: set[str] = set()
        self._cutting_off: set[asyncio.Task[None]] = set()
        #: Whether the bridge said that a second tunnel without --domain changes the addresses.
        self._warned_no_domain = False

    def handshaking(self) -> list[TunnelConnection]:
        """Connections upgraded but not yet through HELLO (not in the registry yet)."""
        return list(self._handshaking)

    async def revoke(self) -> int:
        """Close the tunnels whose token or key is no longer accepted for their name; return how many."""
        revoked = {c: cred for c, (cred, name) in self._credentials.items() if not cred.allows(name)}
        for connection, credential in revoked.items():
            _LOGGER.warning("agent %s cut off: its %s is no longer accepted", connection.label, credential.what)
        await asyncio.gather(*(c.close(ErrorCode.NO_ERROR, "agent credential revoked") for c in revoked))
        return len(revoked)

    def _take_pending(self, source: str, credential: str) -> str | None:
        """Reserve a pending-handshake slot (before any await, so concurrent upgrades cannot all
        pass the check); None if reserved, else what was full ("from this address", ...)."""
        config = self._context.config
        if self._pending_total >= config.max_pending_handshakes:
            if not self._refused_backlog:
                _LOGGER.warning(
                    "%d agents are in their handshake (the limit): refusing more for now", config.max_pending_handshakes
                )
            self._refused_backlog += 1
            return "at once"
        if not self._pending_by_source.take(source):
            self._note_refusal(source, f"from {source}", "address", self._pending_by_source.limit)
            return f"from {source}"
        if not self._pending_by_credential.take(credential):
            self._pending_by_source.give_back(source)
            self._note_refusal(credential, "with one credential", "credential", self._pending_by_credential.limit)
            return "with this credential"
        self._pending_total += 1
        return None

    def _note_refusal(self, key: str, holder: str, per: str, limit: int | None) -> None:
        """Log a refusal once per burst and holder (until it holds none), not once per attempt."""
        if key not in self._noted:
            self._noted.add(key)
            _LOGGER.warning(
                "%s agents %s are in their handshake (the limit per %s): refusing more for now", limit, holder, per
            )

    def _give_back_pending(self, source: str, credential: str) -> None:
        self._pending_total -= 1
        for shares, key in ((self._pending_by_source, source), (self._pending_by_credential, credential)):
            shares.give_back(key)
            if not shares.held(key):
                self._noted.discard(key)
        if self._refused_backlog and self._pending_total <= self._context.config.max_pending_handshakes // 2:
            _LOGGER.warning("handshake backlog cleared; %d agent(s) were refused meanwhile", self._refused_backlog)
            self._refused_backlog = 0

    async def _handshake(
        self, request: web.Request, ws: web.WebSocketResponse, name: str, agent_id: str, remote: str
    ) -> TunnelConnection | None:
        """Upgrade and exchange HELLOs; the connection, or None if it failed (closed and logged)."""
        context = self._context
        await ws.prepare(request)
        label = f"{name}/{agent_id} from {remote}"
        connection: TunnelConnection = TunnelConnection(
            AiohttpFrameSocket(ws, remote, request.transport),
            Multiplexer(Role.BRIDGE),
            label=label,
            peer_id=agent_id,
            heartbeat_interval=context.config.heartbeat_interval,
            dead_after=context.config.dead_after,
            budget=MemoryBudget(context.config.tunnel_memory_budget, context.memory),
            # The bridge opens every stream; one opened by an agent is an attack or a broken agent.
            on_stream=lambda stream: self._cut_off(connection, "it opened a stream (only the bridge may)"),
        )
        self._handshaking.add(connection)  # so that a stopping bridge can close it too
        try:
            # Passed explicitly (read at call time, not bound as a default at import) so the
            # limit on agents that upgrade and then stay silent is one module constant.
            await connection.handshake(
                HANDSHAKE_TIMEOUT,
                tunnel=name,
                public_url=context.public_url(name, request),
                heartbeat=context.config.heartbeat_interval,
                **context.service_url_setting(name, request),
            )
        except HandshakeError as err:
            if context.stopping:
                _LOGGER.info("agent %s closed during its handshake: bridge shutting down", label)
            else:
                _LOGGER.warning("agent %s failed its handshake: %s", label, err)
                context.metrics.handshake_failed("hello")
            await connection.close(err.error_code, str(err))
            return None
        finally:
            self._handshaking.discard(connection)
        return connection

    def _warn_second_tunnel(self, name: str, host: str) -> None:
        """Once: a second tunnel on a bridge without a domain means that a bare address (the
        one the first agent was told) reaches no tunnel any more: the Host's first label picks."""
        names = self._context.registry.names()
        if self._context.config.domain is not None or self._warned_no_domain or len(names) < 2:
            return
        self._warned_no_domain = True
        example = (
            "NAME.localhost" if is_loopback_host(host_name(host)) else "a host name whose first label is the tunnel's"
        )
        _LOGGER.warning(
            "a second tunnel (%r) on a bridge without --domain: visitors now reach each tunnel by the first label "
            "of the host name they use (%s, e.g. %s), and an address naming none of %s reaches none; "
            "run the bridge with --domain for a name per tunnel",
            name,
            example,
            host_name(f"{name}.localhost") if example == "NAME.localhost" else f"{name}.example.com",
            ", ".join(repr(n) for n in sorted(names)),
        )

    def _cut_off(self, connection: TunnelConnection, reason: str) -> None:
        if connection.closed:
            return
        _LOGGER.warning("agent %s cut off: %s", connection.label, reason)
        task = asyncio.create_task(connection.close(ErrorCode.PROTOCOL_ERROR, f"protocol error: {reason}"))
        self._cutting_off.add(task)
        task.add_done_callback(self._cutting_off.discard)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        context = self._context
        remote = request.remote or "?"
        name = request.headers.get(HEADER_TUNNEL, "")
        credential = self._context.credential(request, name)
        if isinstance(credential, str):
            _LOGGER.warning("refused agent from %s: %s", remote, credential)
            context.metrics.handshake_failed("credential")
            return _refuse(401, "invalid or missing agent token or key")
        offered = {v.strip() for v in request.headers.get(HEADER_PROTOCOL, "").split(",")}
        common = [v for v in SUPPORTED_VERSIONS if str(v) in offered]
        if not common:
            _LOGGER.warning("refused agent from %s: protocol versions %s not supported", remote, sorted(offered))
            supported = ",".join(map(str, sorted(SUPPORTED_VERSIONS)))
            context.metrics.handshake_failed("protocol_version")
            return web.Response(
                status=426,
                text=f"this bridge speaks rproxy protocol {supported}\n",
                headers={HEADER_PROTOCOL: supported},
            )
        if not is_tunnel_name(name):
            _LOGGER.warning("refused agent from %s: invalid tunnel name %r", remote, name[:80])
            context.metrics.handshake_failed("tunnel_name")
            return _refuse(400, "tunnel name must be a lower-case DNS label (a-z, 0-9, -)")
        if not credential.allows(name):
            _LOGGER.warning("refused agent from %s: its %s may not serve tunnel %r", remote, credential.what, name)
            context.metrics.handshake_failed("name_not_allowed")
            return _refuse(403, f"this agent {credential.what.split()[0]} may not serve tunnel {name!r}")
        agent_id = request.headers.get(HEADER_AGENT_ID, "")[:128] or remote
        if not agent_id.isprintable():
            agent_id = remote
        ws = web.WebSocketResponse(max_msg_size=TUNNEL_MESSAGE_LIMIT, compress=False, autoping=True)
        if not ws.can_prepare(request).ok:
            context.metrics.handshake_failed("not_websocket")
            return _refuse(400, "this endpoint is for rproxy agents (WebSocket upgrade required)")
        if context.draining:  # on a connection opened before the listener closed
            context.metrics.handshake_failed("draining")
            return web.Response(status=503, text="the bridge is shutting down\n", headers={"Retry-After": "5"})
        source = address_share(context.agent_address(request))
        refused = self._take_pending(source, credential.key)
        if refused is not None:
            context.metrics.handshake_failed("too_many_pending")
            return web.Response(
                status=503, text=f"too many agents connecting {refused}, try again\n", headers={"Retry-After": "5"}
            )
        try:
            connection = await self._handshake(request, ws, name, agent_id, remote)
        finally:
            self._give_back_pending(source, credential.key)
        if connection is None:
            return ws
        if context.stopping:  # its HELLO came after the tunnels were closed: it would be missed
            await connection.close(ErrorCode.NO_ERROR, "bridge shutting down")
            return ws
        if not credential.allows(name):  # revoked by a reload during the handshake
            await connection.close(ErrorCode.NO_ERROR, "agent credential revoked")
            return ws
        try:
            hello = AgentHello.decode(connection.peer_settings)
            asked = parse_agent_policy(hello)
        except (RemoteProtocolError, ValueError) as err:
            # The message names the field (services.NAME, visitor_basic...), the agent's text in it quoted.
            _LOGGER.warning("agent %s refused, its HELLO is malformed: %s", connection.label, err)
            context.metrics.handshake_failed("hello")
            await connection.close(ErrorCode.PROTOCOL_ERROR, f"malformed HELLO: {err}")
            return ws
        services = hello.services
        # Set before the tunnel is listed, so no visitor slips in unprotected meanwhile.
        differs = context.visitor_guard.agent_joins(name, connection, asked)
        if differs is not None:
            _LOGGER.warning("agent %s refused: %s", connection.label, differs)
            context.metrics.handshake_failed("visitor_policy")
            await connection.close(ErrorCode.PROTOCOL_ERROR, f"refused: {differs}")
            return ws
        # It stops counting as one of the tunnel's agents when it starts closing, as it leaves
        # the registry's pool (the guard ignores a second leave).
        connection.on_close(lambda closed: context.visitor_guard.agent_leaves(name, closed))
        self._credentials[connection] = (credential, name)
        await context.registry.add(name, connection, services)
        context.metrics.agent_connected(name, connection)
        self._warn_second_tunnel(name, request.host)
        _LOGGER.info(
            "agent %s connected (protocol %s, %d agent(s) now serve %r)",
            connection.label,
            connection.peer_settings.get("version"),
            context.registry.tunnels().get(name, 0),
            name,
        )
        try:
            await connection.run()
        finally:
            self._credentials.pop(connection, None)
            await context.registry.remove(name, connection)
            context.visitor_guard.agent_leaves(name, connection)
            # aiohttp ends the WebSocket itself on a message over max_msg_size (or a broken
            # frame) and the tunnel only sees it closed: the cause is the socket's exception.
            broken = ws.exception()
            if broken is not None:
                _LOGGER.warning("agent %s cut off: %s", connection.label, str(broken) or broken.__class__.__name__)
            else:
                _LOGGER.info("agent %s disconnected: %s", connection.label, connection.close_reason or "closed")
        return ws
