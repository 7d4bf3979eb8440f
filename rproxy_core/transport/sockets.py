"""A TCP connection carried by a stream: the agent's side of a TCP service and the bridge's
extra TCP ports do the same thing, each from its end.

Each direction ends on its own (TCP half-close): the socket's EOF becomes the stream's FIN,
and the stream's FIN becomes ``write_eof`` on the socket, while the other direction keeps
flowing. Backpressure holds both ways: a read from the socket waits for stream credit before
the next, and a chunk from the stream is drained into the socket before the next is taken.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..const import TCP_READ_SIZE
from ..exceptions import StreamResetError
from .streams import TunnelStream

__all__ = ["close_socket", "relay_socket"]


async def relay_socket(stream: TunnelStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Carry bytes between the socket and ``stream`` until both directions have ended.

    Raises:
        StreamResetError: the stream was reset (the peer gave up, or the tunnel closed).
        ConnectionError: the socket broke.
    """
    to_socket = asyncio.create_task(_stream_to_socket(stream, writer))
    try:
        while chunk := await reader.read(TCP_READ_SIZE):
            await stream.write(chunk)
        await stream.end()
        await to_socket
    finally:
        if not to_socket.done():
            to_socket.cancel()
        with contextlib.suppress(asyncio.CancelledError, StreamResetError, ConnectionError):
            await to_socket


async def _stream_to_socket(stream: TunnelStream, writer: asyncio.StreamWriter) -> None:
    while chunk := await stream.read():
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def close_socket(writer: asyncio.StreamWriter, *, orderly: bool) -> None:
    """Close after a relay: orderly (FIN) when it finished, else abort (the peer sees a reset,
    not an end that would pass for a complete transfer)."""
    if orderly:
        writer.close()
    else:
        writer.transport.abort()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
