"""The agent's side of a TCP stream: one connection to a configured ``host:port``, relayed both ways.

Like the HTTP side, it connects only where it was configured to: the stream names a service,
never an address, and the address of each service comes from the agent's own settings.

Each direction ends on its own (TCP half-close): when the service shuts its sending side the
stream's FIN says so and the visitor may still send; when the visitor's FIN arrives the
service's socket gets ``write_eof`` and may still answer.
"""

from __future__ import annotations

import asyncio
import logging

from ..config import TCP_TARGET_PREFIX as TCP_SCHEME
from ..config import parse_tcp_target
from ..const import TARGET_CONNECT_TIMEOUT, TCP_READ_SIZE
from ..exceptions import StreamResetError
from ..protocol.frames import ErrorCode
from ..protocol.heads import ResponseHead
from ..transport import TunnelStream
from ..transport.sockets import close_socket, relay_socket

__all__ = ["TCP_SCHEME", "TcpService", "parse_tcp_target"]

_LOGGER = logging.getLogger("rproxy.agent")


class TcpService:
    """Serves TCP streams by connecting to ``host:port``.

    Args:
        name: the service's name, for logs.
        host: where the service listens (a LAN address or name, as configured).
        port: its port.
        connect_timeout: seconds the service has to accept before the visitor gets 504.
    """

    def __init__(self, name: str, host: str, port: int, *, connect_timeout: float = TARGET_CONNECT_TIMEOUT) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._connect_timeout = connect_timeout
        self.requests_served = 0

    async def close(self) -> None:
        """Nothing to release: each stream owns its connection (the same interface as Upstream)."""

    async def serve(self, stream: TunnelStream) -> None:
        """Relay one stream to a new connection to the service; never raises."""
        task = asyncio.current_task()
        if task is not None:
            # A reset from the bridge (visitor gone) ends the relay even while both sides are quiet.
            stream.on_abandoned = task.cancel
        writer: asyncio.StreamWriter | None = None
        finished = False
        try:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    reader, writer = await asyncio.open_connection(self.host, self.port, limit=TCP_READ_SIZE)
            except TimeoutError:
                _LOGGER.warning(
                    "service %r: %s:%d did not accept in %gs", self.name, self.host, self.port, self._connect_timeout
                )
                stream.reset(ErrorCode.TARGET_TIMEOUT, "service timed out")
                return
            except OSError as err:
                _LOGGER.warning(
                    "service %r: cannot connect to %s:%d: %s", self.name, self.host, self.port, err.strerror or err
                )
                stream.reset(ErrorCode.TARGET_UNREACHABLE, "service unreachable")
                return
            stream.send_reply(ResponseHead(200, "Connected"))
            await relay_socket(stream, reader, writer)
            finished = True
        except StreamResetError:
            pass  # the visitor went away or the tunnel dropped
        except ConnectionError as err:
            _LOGGER.info("service %r: connection broke: %s", self.name, err.__class__.__name__)
            if not stream.closed:
                stream.reset(ErrorCode.TARGET_ERROR, "service connection broke")
        except Exception:
            _LOGGER.exception("service %r: relay failed in the agent", self.name)
            if not stream.closed:
                stream.reset(ErrorCode.TARGET_ERROR, "agent error")
        finally:
            stream.on_abandoned = None
            self.requests_served += 1
            if writer is not None:
                await close_socket(writer, orderly=finished)
