"""The agent endpoint, /_rproxy/connect: authentication, version choice, handshake.

Everything that can be refused is refused with a plain HTTP answer before the WebSocket
upgrade (401 bad token, 426 no common protocol version, 400 bad tunnel name, 403 a name the
token may not serve), so no tunnel
ever exists for an agent that should not have one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import hdrs, web

from ..const import HANDSHAKE_TIMEOUT, HEADER_AGENT_ID, HEADER_PROTOCOL, HEADER_TUNNEL, TUNNEL_MESSAGE_LIMIT
from ..headers import is_tunnel_name
from ..protocol.frames import ErrorCode
from ..protocol.mux import Multiplexer, Role, SUPPORTED_VERSIONS
from ..transport import AiohttpFrameSocket, HandshakeError, TunnelConnection

if TYPE_CHECKING:
    from .app import Bridge

__all__ = ["AgentHandler"]

_LOGGER = logging.getLogger("rproxy.bridge")


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


class AgentHandler:
    """aiohttp handler for agents dialling in."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        self._handshaking: set[TunnelConnection] = set()
        #: The token each connected agent presented, to cut it off when that token is revoked.
        self._tokens: dict[TunnelConnection, tuple[str, str]] = {}
        #: Agents refused for too many pending handshakes since the backlog was last clear
        #: (logged once when the burst starts and once when it is over, not per attempt).
        self._refused_backlog = 0
        self._cutting_off: set[asyncio.Task[None]] = set()

    def handshaking(self) -> list[TunnelConnection]:
        """Connections upgraded but not yet through HELLO (not in the registry yet)."""
        return list(self._handshaking)

    async def revoke(self) -> int:
        """Close the tunnels whose token is no longer accepted for their name; return how many."""
        auth = self._bridge.auth
        revoked = [c for c, (token, name) in self._tokens.items() if not auth.allows(token, name)]
        for connection in revoked:
            _LOGGER.warning("agent %s cut off: its token is no longer accepted", connection.label)
        await asyncio.gather(*(c.close(ErrorCode.NO_ERROR, "agent token revoked") for c in revoked))
        return len(revoked)

    def _cut_off(self, connection: TunnelConnection, reason: str) -> None:
        if connection.closed:
            return
        _LOGGER.warning("agent %s cut off: %s", connection.label, reason)
        task = asyncio.create_task(connection.close(ErrorCode.PROTOCOL_ERROR, f"protocol error: {reason}"))
        self._cutting_off.add(task)
        task.add_done_callback(self._cutting_off.discard)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        bridge = self._bridge
        remote = request.remote or "?"
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        grant = bridge.auth.match(token)
        if grant is None or token is None:
            _LOGGER.warning("refused agent from %s: %s", remote, "invalid token" if token else "no token")
            return _refuse(401, "invalid or missing agent token")
        offered = {v.strip() for v in request.headers.get(HEADER_PROTOCOL, "").split(",")}
        common = [v for v in SUPPORTED_VERSIONS if str(v) in offered]
        if not common:
            _LOGGER.warning("refused agent from %s: protocol versions %s not supported", remote, sorted(offered))
            supported = ",".join(map(str, sorted(SUPPORTED_VERSIONS)))
            return web.Response(
                status=426, text=f"this bridge speaks rproxy protocol {supported}\n", headers={HEADER_PROTOCOL: supported}
            )
        name = request.headers.get(HEADER_TUNNEL, "")
        if not is_tunnel_name(name):
            _LOGGER.warning("refused agent from %s: invalid tunnel name %r", remote, name[:80])
            return _refuse(400, "tunnel name must be a lower-case DNS label (a-z, 0-9, -)")
        if not grant.allows(name):
            _LOGGER.warning("refused agent from %s: its token may not serve tunnel %r", remote, name)
            return _refuse(403, f"this agent token may not serve tunnel {name!r}")
        agent_id = request.headers.get(HEADER_AGENT_ID, "")[:128] or remote
        if not agent_id.isprintable():
            agent_id = remote
        ws = web.WebSocketResponse(max_msg_size=TUNNEL_MESSAGE_LIMIT, compress=False, autoping=True)
        if not ws.can_prepare(request).ok:
            return _refuse(400, "this endpoint is for rproxy agents (WebSocket upgrade required)")
        if bridge.draining:  # on a connection opened before the listener closed
            return web.Response(status=503, text="the bridge is shutting down\n", headers={"Retry-After": "5"})
        limit = bridge.config.max_pending_handshakes
        if len(self._handshaking) >= limit:
            if not self._refused_backlog:
                _LOGGER.warning("%d agents are in their handshake (the limit): refusing more for now", limit)
            self._refused_backlog += 1
            return web.Response(status=503, text="too many agents connecting, try again\n", headers={"Retry-After": "5"})
        await ws.prepare(request)
        label = f"{name}/{agent_id} from {remote}"
        connection = TunnelConnection(
            AiohttpFrameSocket(ws, remote, request.transport),
            Multiplexer(Role.BRIDGE),
            label=label,
            peer_id=agent_id,
            heartbeat_interval=bridge.config.heartbeat_interval,
            dead_after=bridge.config.dead_after,
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
                public_url=bridge.public_url(name, request),
                heartbeat=bridge.config.heartbeat_interval,
            )
        except HandshakeError as err:
            if bridge.stopping:
                _LOGGER.info("agent %s closed during its handshake: bridge shutting down", label)
            else:
                _LOGGER.warning("agent %s failed its handshake: %s", label, err)
            await connection.close(err.error_code, str(err))
            return ws
        finally:
            self._handshaking.discard(connection)
            if self._refused_backlog and len(self._handshaking) <= bridge.config.max_pending_handshakes // 2:
                _LOGGER.warning("handshake backlog cleared; %d agent(s) were refused meanwhile", self._refused_backlog)
                self._refused_backlog = 0
        if bridge.stopping:  # its HELLO came after the tunnels were closed: it would be missed
            await connection.close(ErrorCode.NO_ERROR, "bridge shutting down")
            return ws
        if not bridge.auth.allows(token, name):  # revoked by a reload during the handshake
            await connection.close(ErrorCode.NO_ERROR, "agent token revoked")
            return ws
        self._tokens[connection] = (token, name)
        await bridge.registry.add(name, connection)
        _LOGGER.info(
            "agent %s connected (protocol %s, %d agent(s) now serve %r)",
            label,
            connection.peer_settings.get("version"),
            bridge.registry.tunnels().get(name, 0),
            name,
        )
        try:
            await connection.run()
        finally:
            self._tokens.pop(connection, None)
            await bridge.registry.remove(name, connection)
            # aiohttp ends the WebSocket itself on a message over max_msg_size (or a broken
            # frame) and the tunnel only sees it closed: the cause is the socket's exception.
            broken = ws.exception()
            if broken is not None:
                _LOGGER.warning("agent %s cut off: %s", label, str(broken) or broken.__class__.__name__)
            else:
                _LOGGER.info("agent %s disconnected: %s", label, connection.close_reason or "closed")
        return ws
