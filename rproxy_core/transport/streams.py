"""TunnelStream: one stream as awaitable reads and writes (docs/PROTOCOL.md §5).

Received data waits in a per-stream queue that flow control bounds to the stream window:
credit goes back to the peer only when the application has *consumed* a chunk, which is when
it asks for the next one (the bridge's write of that chunk to the visitor has returned, so
the chunk is no longer held anywhere). A visitor who stops reading thus stops the sender of
that stream and nothing else, and what the stream holds, queued or in the application's
hands, never exceeds the window. Everything held is charged to the connection's memory
budget (see ``budget``). Writes wait for credit, and for the connection's output queue to
fall below its high-water mark.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..exceptions import StreamResetError, TunnelClosedError
from ..protocol.frames import ErrorCode, Flags, MessageKind
from ..protocol.heads import KIND_WEBSOCKET, RequestHead, ResponseHead
from ..protocol.mux import Multiplexer
from .budget import MemoryBudget

__all__ = ["StreamCarrier", "TunnelStream"]


#: MORE as a plain int: ``int & IntFlag`` runs enum's Python-level operator, per fragment.
_MORE = int(Flags.MORE)


class StreamCarrier(Protocol):
    """What a :class:`TunnelStream` uses of the connection that carries it.

    :class:`~rproxy_core.transport.connection.TunnelConnection` is the one carrier today; a
    link between bridge nodes that splices streams onto another node's tunnel would be the
    next. Writing the seam down keeps a stream from reaching for more of its connection.
    """

    loop: asyncio.AbstractEventLoop
    mux: Multiplexer
    budget: MemoryBudget
    #: Backlog from which a stream is throttled while the budget is spent.
    quarter_window: int
    #: Queued output above which writers wait in :meth:`drain`.
    write_high_water: int
    close_reason: str

    @property
    def writing(self) -> bool:
        """Whether output is being written, so that :meth:`drain` can end."""
        ...

    def schedule_flush(self) -> None:
        """Send what the mux has queued, now or soon."""
        ...

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The stream's reader consumed ``size`` bytes: return credit when due."""
        ...

    def forget(self, stream_id: int) -> None:
        """The stream has finished: drop it from the carrier's table."""
        ...

    async def drain(self) -> None:
        """Wait until queued output falls below :attr:`write_high_water`."""
        ...


_EMPTY = memoryview(b"")
#: Shared by streams that have received nothing yet: an empty deque still costs about 600
#: bytes, which an idle visitor WebSocket would carry for as long as it lives.
_NO_CHUNKS: deque[tuple[memoryview, int]] = deque()


class TunnelStream:
    """One visitor request or WebSocket carried by a tunnel.

    The opener (the bridge) writes the request body and reads the reply; the other side (the
    agent) reads the request body and sends the reply. ``head`` is the request head.
    """

    __slots__ = (
        "id",
        "head",
        "_conn",
        "_chunks",
        "_eof",
        "_error",
        "_reply",
        "_read_waiter",
        "_credit_waiter",
        "_local_done",
        "_queued",
        "_taken",
        "_withheld",
        "bytes_received",
        "bytes_sent",
        "on_abandoned",
    )

    def __init__(self, conn: StreamCarrier, stream_id: int, head: RequestHead, *, remote_done: bool) -> None:
        self.id = stream_id
        self.head = head
        self._conn = conn
        self._chunks = _NO_CHUNKS
        #: The peer ended its half (FIN); chunks may still wait to be read.
        self._eof = remote_done
        self._error: StreamResetError | None = None
        self._reply: asyncio.Future[ResponseHead] = conn.loop.create_future()
        self._read_waiter: asyncio.Future[None] | None = None
        self._credit_waiter: asyncio.Future[None] | None = None
        self._local_done = False
        #: Bytes queued in _chunks; the last chunk handed out (held until the next read);
        #: consumed bytes whose credit is not returned yet (throttled while over budget).
        self._queued = 0
        self._taken = 0
        self._withheld = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        #: Called once if the peer resets the stream or the tunnel closes under it (not when
        #: this side resets it): whoever serves the stream can stop at once, even while it
        #: waits on something else, such as the home app thinking.
        self.on_abandoned: Callable[[], object] | None = None

    # Reading.

    async def reply(self) -> ResponseHead:
        """Wait for the response head.

        Raises:
            StreamResetError: the stream was reset (``code`` says why) or the tunnel closed.
        """
        return await self._reply

    @property
    def at_eof(self) -> bool:
        """Whether the peer ended its half and every chunk has been read."""
        return self._eof and not self._chunks

    async def read(self) -> memoryview:
        """Return the next chunk of body bytes, or an empty view once the peer ended.

        Raises:
            StreamResetError: the stream was reset or the tunnel closed.
        """
        while True:
            item = await self._next_chunk()
            if item is None:
                return _EMPTY
            if item[0]:
                return item[0]

    async def read_fragment(self) -> tuple[MessageKind, memoryview, bool] | None:
        """Return the next piece of a WebSocket message as it came: (kind, bytes, more follow).

        None once the peer ended. Nothing is assembled: a piece (and its credit) is held only
        until the next read, so a relay that writes each piece on holds at most the window.
        The kind is that of the message's first piece.

        Raises:
            StreamResetError: the stream was reset or the tunnel closed.
        """
        item = await self._next_chunk()
        if item is None:
            return None
        chunk, flags = item
        return MessageKind.from_flags(flags), chunk, bool(flags & _MORE)

    async def read_message(self, max_size: int) -> tuple[MessageKind, bytes] | None:
        """Return the next WebSocket message (fragments joined), or None once the peer ended.

        Raises:
            StreamResetError: the stream was reset, the tunnel closed, or a message grew past
                ``max_size`` (the stream is then reset with MESSAGE_TOO_BIG).
        """
        item = await self._next_chunk()
        if item is None:
            return None
        chunk, flags = item
        kind = MessageKind.from_flags(flags)
        if not flags & _MORE:
            return kind, bytes(chunk)
        return kind, await self.read_rest(chunk, max_size)

    async def read_rest(self, first: memoryview, max_size: int) -> bytes:
        """The rest of a message whose first piece is ``first`` (more follow), joined to it.

        Raises:
            StreamResetError: as ``read_message``.
        """
        parts = bytearray(first)
        # The message being assembled is held too: charged to the budget until it is returned.
        budget = self._conn.budget
        budget.charge(len(first))
        try:
            more = True
            while more:
                chunk, more = await self.read_continuation(len(parts), max_size)
                parts += chunk
                budget.charge(len(chunk))
            return bytes(parts)
        finally:
            budget.release(len(parts))

    async def read_continuation(self, received: int, max_size: int) -> tuple[memoryview, bool]:
        """The next piece of a message of which ``received`` bytes came so far: (bytes, more follow).

        Raises:
            StreamResetError: as ``read_message``; also when the stream ends inside the message.
        """
        item = await self._next_chunk()
        if item is None:
            raise StreamResetError(ErrorCode.PROTOCOL_ERROR, "stream ended inside a message")
        chunk, flags = item
        if received + len(chunk) > max_size:
            self.reset(ErrorCode.MESSAGE_TOO_BIG, "message too big")
            raise StreamResetError(ErrorCode.MESSAGE_TOO_BIG, "message too big")
        return chunk, bool(flags & _MORE)

    async def _next_chunk(self) -> tuple[memoryview, int] | None:
        """The next received (payload, flags), or None once the peer ended its half.

        Asking for the next chunk is what says the previous one is consumed: its bytes leave
        the budget and its credit goes back to the peer (unless throttled, see _settle).
        """
        self._settle()
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            if self._withheld:
                self._return_credit()  # nothing left queued: never wait with credit held back
            self._read_waiter = self._conn.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._error is not None:
            raise self._error
        chunk, flags = self._chunks.popleft()
        size = len(chunk)
        self._queued -= size
        self._taken = size
        return chunk, flags

    def _settle(self) -> None:
        """The chunk handed out last is consumed: release it, and return credit unless throttled."""
        taken = self._taken
        if taken:
            self._taken = 0
            self._conn.budget.release(taken)
            self._withheld += taken
        # Over budget, a stream with a backlog of a quarter window or more gets no credit until
        # it has read that backlog: the biggest holders stop growing, small moving ones go on.
        if self._withheld and not (self._queued >= self._conn.quarter_window and self._conn.budget.exhausted):
            self._return_credit()

    def _return_credit(self) -> None:
        withheld, self._withheld = self._withheld, 0
        self._conn.acknowledge(self.id, withheld)

    @property
    def held(self) -> int:
        """Bytes received on this stream and not consumed yet (queued, or the chunk in hand)."""
        return self._queued + self._taken

    # Writing.

    def send_reply(self, head: ResponseHead, *, end_stream: bool = False, flush: bool = True) -> None:
        """Queue the response head (agent side).

        Args:
            flush: send it now. Pass False when body bytes are about to be written in the
                same turn: head and body then leave in one message, one write.
        """
        self._raise_if_reset()
        self._conn.mux.send_reply(self.id, head, end_stream=end_stream)
        if end_stream:
            self._end_local()
        if flush or end_stream:
            self._conn.schedule_flush()

    async def write(self, data: bytes | bytearray | memoryview, *, end_stream: bool = False) -> None:
        """Send body bytes, waiting for credit and socket room as needed.

        Args:
            end_stream: also end this side's half, on the same frame as the last bytes.

        Raises:
            StreamResetError: the stream was reset or the tunnel closed.
        """
        if data:
            await self._send(data, 0, fragmented=False, end_stream=end_stream)
        elif end_stream:
            await self.end()

    def take_complete_body(self, max_size: int) -> bytes | None:
        """The whole body at once, if the peer has already sent all of it and it is small.

        Small responses usually arrive in one message with their head, so the bridge can
        answer them with one write instead of streaming. Returns None, consuming nothing,
        when the body is still coming, bigger than ``max_size``, or not plain bytes.
        """
        if not self._eof or self._error is not None:
            return None
        total = 0
        for chunk, flags in self._chunks:
            total += len(chunk)
            if flags or total > max_size:
                return None
        body = b"".join([chunk for chunk, _ in self._chunks])
        self._chunks.clear()
        self._queued = 0
        self._conn.budget.release(total)
        return body

    async def wait_for_credit(self) -> int:
        """Wait until the peer grants credit; return how many bytes may be sent now.

        A relay reads its source only up to this much, so that what it holds beyond the
        window is never more than one read.

        Raises:
            StreamResetError: the stream was reset or the tunnel closed.
        """
        mux = self._conn.mux
        while True:
            self._raise_if_reset()
            room = mux.send_window(self.id)
            if room > 0:
                return min(room, mux.peer_max_frame_size)
            self._credit_waiter = self._conn.loop.create_future()
            self._conn.schedule_flush()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None

    async def send_message(self, kind: MessageKind, data: bytes | bytearray | memoryview) -> None:
        """Send one WebSocket message of ``kind`` (split into MORE fragments when needed)."""
        await self._send(data, kind.flag_bits, fragmented=True)

    async def end(self) -> None:
        """End this side's half (FIN); nothing to do if it already ended."""
        if self._local_done:
            return
        self._raise_if_reset()
        self._conn.mux.end_stream(self.id)
        self._end_local()
        self._conn.schedule_flush()

    def reset(self, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abandon the stream; pending and later reads and writes raise StreamResetError."""
        if self._error is not None:
            return
        self._conn.mux.reset_stream(self.id, code, reason)
        self._conn.schedule_flush()
        self._fail(StreamResetError(code, reason or "reset locally"), local=True)

    @property
    def closed(self) -> bool:
        """Whether the stream can no longer carry anything."""
        return self._error is not None or (self._local_done and self._eof)

    async def _send(
        self, data: bytes | bytearray | memoryview, flag_bits: int, *, fragmented: bool, end_stream: bool = False
    ) -> None:
        conn = self._conn
        mux = conn.mux
        view = memoryview(data)
        total = len(view)
        offset = 0
        while True:
            self._raise_if_reset()
            # Before queueing a frame, not after: with hundreds of writers each adding one
            # frame before waiting, the queue (and a new stream's first bytes behind it) would
            # grow by a frame per writer. Woken writers re-check one by one.
            while mux.pending_bytes > conn.write_high_water and conn.writing:
                conn.schedule_flush()
                await conn.drain()
                self._raise_if_reset()
            remaining = total - offset
            size = min(mux.send_window(self.id), remaining, mux.peer_max_frame_size)
            if size <= 0 and remaining:
                self._credit_waiter = conn.loop.create_future()
                conn.schedule_flush()
                try:
                    await self._credit_waiter
                finally:
                    self._credit_waiter = None
                continue
            offset += size
            last = offset >= total
            flags = flag_bits | (Flags.MORE if fragmented and not last else 0)
            mux.send_data(self.id, view[offset - size : offset], flags=flags, end_stream=end_stream and last)
            self.bytes_sent += size
            if last:
                break
        if end_stream:
            self._end_local()
        conn.schedule_flush()

    def _raise_if_reset(self) -> None:
        if self._error is not None:
            raise self._error
        if self._conn.mux.closed:  # GOAWAY sent or received: teardown will fail us shortly
            raise TunnelClosedError(self._conn.close_reason or "tunnel closing")

    def _end_local(self) -> None:
        self._local_done = True
        if self._eof:
            self._conn.forget(self.id)

    # Called by the connection when events arrive.

    def _on_reply(self, head: ResponseHead, end_stream: bool) -> None:
        if not self._reply.done():
            self._reply.set_result(head)
        if end_stream:
            self._on_end()

    def _on_data(self, data: memoryview, flags: int) -> None:
        if not data and self.head.kind != KIND_WEBSOCKET:
            # An empty frame means nothing in a body; queued, a flood of them would make the
            # reader spin through them without ever yielding to the loop.
            return
        size = len(data)
        if size and size < len(data.obj) // 4:  # type: ignore[arg-type]
            # A small piece of a big tunnel message: a view would keep the whole message (up
            # to 4 MiB) alive for as long as this chunk waits, so it gets its own copy.
            data = memoryview(bytes(data))
        if self._chunks is _NO_CHUNKS:
            self._chunks = deque()
        self._chunks.append((data, flags))
        self._queued += size
        self._conn.budget.charge(size)
        self.bytes_received += size
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_end(self) -> None:
        self._eof = True
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._local_done:
            self._conn.forget(self.id)

    def __del__(self) -> None:
        # Chunks may still be read after both halves ended (and the stream left the table);
        # one its reader abandons unread leaves the budget with the stream object.
        if self._queued or self._taken:
            self._release_held()

    def _release_held(self) -> None:
        """The stream is over: whatever it still held leaves the budget."""
        held = self._queued + self._taken
        self._queued = self._taken = self._withheld = 0
        if held:
            self._conn.budget.release(held)

    def _on_credit(self) -> None:
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: StreamResetError, *, local: bool = False) -> None:
        first = self._error is None
        if first:
            self._error = error
        self._chunks.clear()
        self._release_held()
        if not self._reply.done():
            self._reply.set_exception(error)
            self._reply.exception()  # retrieved here: nobody may ever await the reply
        for waiter in (self._read_waiter, self._credit_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._conn.forget(self.id)
        callback, self.on_abandoned = self.on_abandoned, None
        if first and not local and callback is not None:
            callback()
