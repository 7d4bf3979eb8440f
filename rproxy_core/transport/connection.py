"""TunnelConnection: drives a Multiplexer over a FrameSocket (docs/PROTOCOL.md §6-7).

Three activities per tunnel: this connection's reader (``run``) feeds every message to the
mux and hands events to streams; a writer task sends whatever the mux queued as one message
per turn, so frames from many streams share a write; a heartbeat task pings and declares the
peer dead after ``dead_after`` seconds of silence. ``run`` returns when the tunnel is over,
having failed every stream and stopped both tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from ..const import (
    CHEAP_FRAME_RATE,
    DEAD_AFTER,
    FRAMES_PER_TURN,
    HANDSHAKE_TIMEOUT,
    HEARTBEAT_INTERVAL,
    MAX_TUNNEL_MESSAGE,
    WRITE_HIGH_WATER,
)
from ..exceptions import RemoteProtocolError, StreamResetError, TunnelClosedError
from ..logsafe import printable
from ..protocol import events as ev
from ..protocol.closecodes import CloseCode
from ..protocol.frames import ErrorCode
from ..protocol.heads import RequestHead
from ..protocol.mux import Multiplexer
from .budget import DEFAULT_TUNNEL_BUDGET, PROCESS_BUDGET, MemoryBudget
from .streams import TunnelStream
from .websocket import FrameSocket

__all__ = ["TunnelConnection", "HandshakeError"]

_LOGGER = logging.getLogger("rproxy.tunnel")
_PING = struct.Struct("!d")
#: Events about one existing stream: _dispatch looks the stream up once for them.
_STREAM_EVENTS = frozenset({ev.DataReceived, ev.WindowUpdated, ev.StreamEnded, ev.ReplyReceived, ev.StreamReset})


class HandshakeError(RemoteProtocolError):
    """The peer did not complete the HELLO exchange."""


class TunnelConnection:
    """One live tunnel: a mux, its socket, and the streams on it.

    Args:
        socket: the WebSocket.
        mux: a fresh Multiplexer for this side.
        label: how logs name this tunnel (e.g. ``home/agent-1 from 203.0.113.5``).
        peer_id: the peer's identity (on the bridge: the agent id it presented).
        on_stream: called with each stream the peer opens (the agent serves them).
        heartbeat_interval: seconds between PINGs.
        dead_after: seconds of silence after which the peer is considered dead.
        budget: what this tunnel's streams may hold (received, not consumed) before new
            streams are refused and the biggest holders throttled; by default 512 MiB inside
            the process's ``budget.PROCESS_BUDGET``.
    """

    #: Seconds a goodbye waits to send what is queued, and again for the close handshake.
    goodbye_timeout: float = 2.0

    def __init__(
        self,
        socket: FrameSocket,
        mux: Multiplexer,
        *,
        label: str,
        peer_id: str = "",
        on_stream: Callable[[TunnelStream], None] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        dead_after: float = DEAD_AFTER,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.budget = budget if budget is not None else MemoryBudget(DEFAULT_TUNNEL_BUDGET, PROCESS_BUDGET)
        #: Backlog from which a stream is throttled while the budget is spent.
        self.quarter_window = mux.stream_window // 4
        self.socket = socket
        self.mux = mux
        self.label = label
        self.peer_id = peer_id
        self.streams: dict[int, TunnelStream] = {}
        self.write_high_water = WRITE_HIGH_WATER
        self.peer_settings: dict[str, Any] = {}
        #: Round-trip time of the last PING, in seconds.
        self.rtt: float | None = None
        self.connected_at = time.time()
        self.close_reason = ""
        self._on_stream = on_stream
        self._heartbeat_interval = heartbeat_interval
        self._dead_after = dead_after
        self._last_received = self.loop.time()
        self._flush_wanted = asyncio.Event()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._sending = False
        #: A message taken from the mux that send_nowait refused; it goes out before anything else.
        self._unsent: list[bytes | bytearray | memoryview] | None = None
        self._close_callbacks: list[Callable[[TunnelConnection], object]] = []
        self._done = asyncio.Event()
        #: The cheap-frame budget (see _check_frame_budget): per second, counted from here.
        self.cheap_frame_rate = CHEAP_FRAME_RATE
        self._budget_since = self.loop.time()
        self._budget_mark = 0
        #: Tuned credit of this tunnel counted in the budget (see _reserve_tuned).
        self._reserved = 0

    # Lifecycle.

    async def handshake(self, timeout: float = HANDSHAKE_TIMEOUT, **settings: Any) -> dict[str, Any]:
        """Send our HELLO and wait for the peer's; return the peer's settings.

        Raises:
            HandshakeError: the peer closed, sent something else first, or took too long.
        """
        self.mux.send_hello(**settings)
        try:
            await self._send_pending()
        except Exception as err:  # the peer hung up before our HELLO went out (aiohttp, websockets)
            raise HandshakeError(f"closed before HELLO ({type(err).__name__})") from None
        try:
            async with asyncio.timeout(timeout):
                while self.mux.peer_settings is None:
                    try:
                        message = await self.socket.receive()
                    except RemoteProtocolError as err:  # e.g. a text message: not our protocol
                        self.mux.fail(err)
                        raise HandshakeError(str(err), err.error_code) from None
                    if message is None:
                        raise HandshakeError("closed before HELLO")
                    self.mux.receive_data(message)
                    for event in self.mux.events_received():
                        if isinstance(event, ev.ConnectionTerminated):
                            raise HandshakeError(event.reason or "closed during handshake", event.code)
        except TimeoutError:
            raise HandshakeError(f"no HELLO within {timeout:g}s") from None
        self.peer_settings = self.mux.peer_settings
        self._last_received = self.loop.time()
        return self.peer_settings

    async def run(self) -> None:
        """Serve the tunnel until it closes; never raises for network or peer faults."""
        self._writer = asyncio.create_task(self._write_loop(), name=f"rproxy-writer {self.label}")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name=f"rproxy-heartbeat {self.label}")
        self._reader = asyncio.create_task(self._read_loop(), name=f"rproxy-reader {self.label}")
        try:
            await asyncio.wait({self._reader})
        finally:
            if not self._reader.done():
                self._reader.cancel()
                self.close_reason = self.close_reason or "stopped"
                # Stopped on purpose (our task was cancelled, e.g. Agent.stop()): say GOAWAY as
                # PROTOCOL.md §6 asks, so the peer stops routing streams here at once instead of
                # until it notices the closed socket. _teardown sends it.
                self.mux.goaway(ErrorCode.NO_ERROR, self.close_reason)
            # Teardown runs in its own task: it awaits the cancelled helper tasks and suppresses
            # their CancelledError, which would otherwise also swallow a cancellation of *this*
            # task arriving meanwhile (Agent.stop() during the bridge's goodbye then never returned).
            teardown = asyncio.ensure_future(self._teardown())
            try:
                await asyncio.shield(teardown)
            except asyncio.CancelledError:
                await teardown  # bounded by its own timeouts; then pass the cancellation on
                raise

    async def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closing") -> None:
        """Say GOAWAY, close the socket and wait until ``run`` has finished."""
        if not self._closing:
            self._mark_closing()
            self.close_reason = self.close_reason or reason
            self.mux.goaway(code, reason)
            await self._goodbye(1000 if code == ErrorCode.NO_ERROR else 1002, reason)
        if self._writer is not None:  # run() is active: it ends now that the socket is closed
            await self._done.wait()

    def on_close(self, callback: Callable[[TunnelConnection], object]) -> None:
        """Call ``callback(self)`` once, as soon as the tunnel starts closing for any reason.

        That is earlier than ``run`` returning, which waits for close handshakes: a registry
        uses it to stop routing visitors here at once.
        """
        if self._closing:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def _mark_closing(self) -> None:
        if self._closing:
            return
        self._closing = True
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                _LOGGER.exception("tunnel %s: close callback failed", self.label)

    @property
    def closed(self) -> bool:
        """Whether no new stream may be opened."""
        return self._closing or self.mux.closed

    # Streams.

    def open_stream(self, head: RequestHead, *, end_stream: bool = False) -> TunnelStream:
        """Open a stream to the peer.

        Raises:
            TunnelClosedError: the tunnel is closing or the peer's stream limit is reached.
        """
        if self.closed:
            raise TunnelClosedError("tunnel is closing")
        if not self.mux.can_open_stream():
            raise TunnelClosedError("too many streams on this tunnel")
        if self.budget.exhausted:
            raise TunnelClosedError("this tunnel's memory budget is spent (streams hold unread data)")
        stream_id = self.mux.open_stream(head, end_stream=end_stream)
        stream = TunnelStream(self, stream_id, head, remote_done=False)
        if end_stream:
            stream._local_done = True
        self.streams[stream_id] = stream
        self.schedule_flush()
        return stream

    def acknowledge(self, stream_id: int, size: int) -> None:
        """A stream's reader consumed ``size`` bytes: return credit when due."""
        mux = self.mux
        before = mux.pending_bytes
        mux.acknowledge_received_data(stream_id, size, now=self.loop.time(), growth_room=self.budget.growth_room)
        if mux.tuned_bytes != self._reserved:
            self._reserve_tuned()
        if mux.pending_bytes != before:
            self.schedule_flush()

    def forget(self, stream_id: int) -> None:
        """Drop a finished stream from the table."""
        self.streams.pop(stream_id, None)
        if self.mux.tuned_bytes != self._reserved:
            self._reserve_tuned()

    def _reserve_tuned(self) -> None:
        """Keep the budget's count of tuned credit (beyond the fixed windows) equal to the mux's."""
        tuned = 0 if self._done.is_set() else self.mux.tuned_bytes
        self.budget.reserve(tuned - self._reserved)
        self._reserved = tuned

    # Output.

    def schedule_flush(self) -> None:
        """Send what the mux has queued: at once when the socket can take it, else soon.

        Writing at once, rather than leaving every frame of this event-loop turn to the
        writer task, lets the peer start on the first requests of a burst while this side
        still works through the rest: bridge and agent then overlap on two cores instead of
        taking turns. (Measured: 64 connections 5,900-6,100 → 7,300-7,400 req/s; 1 GiB
        download 384 → 725 MB/s.) The writer task remains for when the socket is full.
        """
        if not self._sending and not self._flush_wanted.is_set() and self._writer is not None:
            mux = self.mux
            while mux.pending_bytes:
                buffers = mux.data_to_send(MAX_TUNNEL_MESSAGE)
                if not self.socket.send_nowait(buffers):
                    self._unsent = buffers  # the writer sends it first, waiting as needed
                    break
            else:
                return
        self._flush_wanted.set()

    @property
    def writing(self) -> bool:
        """Whether the writer task runs (so that waiting in :meth:`drain` can end)."""
        return self._writer is not None and not self._writer.done()

    async def drain(self) -> None:
        """Wait until queued output falls below the high-water mark."""
        if self.mux.pending_bytes <= self.write_high_water or self._writer is None:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        self.schedule_flush()
        await waiter
        if self.closed and self.mux.pending_bytes:
            raise TunnelClosedError(self.close_reason or "tunnel closed")

    async def _send_pending(self) -> None:
        mux = self.mux
        send = self.socket.send
        self._sending = True
        try:
            while self._unsent is not None or mux.pending_bytes:
                buffers, self._unsent = self._unsent, None
                if buffers is None:
                    buffers = mux.data_to_send(MAX_TUNNEL_MESSAGE)
                await send(b"".join(buffers))
                if self._drain_waiters and mux.pending_bytes <= self.write_high_water:
                    self._wake_drainers()
        finally:
            self._sending = False

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _write_loop(self) -> None:
        flush_wanted = self._flush_wanted
        try:
            while True:
                await flush_wanted.wait()
                flush_wanted.clear()
                await self._send_pending()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the socket broke: reading will notice too
            _LOGGER.debug("tunnel %s: write failed: %r", self.label, err)
            self.close_reason = self.close_reason or f"write failed: {err!r}"
            with contextlib.suppress(Exception):
                await self.socket.close(CloseCode.INTERNAL_ERROR, "write failed")
        finally:
            self._wake_drainers()

    # Input.

    async def _read_loop(self) -> None:
        try:
            await self._read_messages()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug here must not leave the tunnel half alive
            _LOGGER.exception("tunnel %s failed", self.label)
            self.close_reason = self.close_reason or f"internal error: {err!r}"
        finally:
            # Nothing more can arrive: refuse new streams now, not only once run() gets to its
            # teardown a loop turn later (a visitor routed here meanwhile would get a 502 even
            # though another agent of the pool could serve it).
            self._mark_closing()

    async def _read_messages(self) -> None:
        receive = self.socket.receive
        mux = self.mux
        dispatch = self._dispatch
        while True:
            try:
                message = await receive()
            except RemoteProtocolError as err:
                mux.fail(err)
                dispatch(mux.events_received())
                await self._flush_before_close()
                return
            except Exception as err:  # connection reset, TLS failure ...
                self.close_reason = self.close_reason or f"connection lost: {err!r}"
                return
            if message is None:
                self.close_reason = self.close_reason or "connection closed by peer"
                return
            self._last_received = self.loop.time()
            # A message is processed FRAMES_PER_TURN frames at a time with the loop let run in
            # between: one message can hold 400,000 empty frames, and every visitor of every
            # tunnel (and /_rproxy/health) waits while one is processed.
            done = mux.receive_data(message, max_frames=FRAMES_PER_TURN)
            while True:
                dispatch(mux.events_received())
                if not mux.closed:
                    self._check_frame_budget()
                if mux.closed:
                    dispatch(mux.events_received())
                    await self._flush_before_close()
                    return
                if mux.pending_bytes:
                    self._flush_wanted.set()
                if done:
                    break
                await asyncio.sleep(0)
                done = mux.resume_receiving(FRAMES_PER_TURN)

    def _check_frame_budget(self) -> None:
        """Cut off a peer sending more cheap frames (PING, WINDOW, empty/tiny DATA ...) than the budget.

        Such frames cost this side a loop iteration each and use little or no credit, so flow
        control does not slow a flood of them; a real peer sends a few per second, plus one
        WINDOW per quarter window of data consumed.
        """
        mux = self.mux
        now = self.loop.time()
        if now - self._budget_since >= 1.0:
            self._budget_since = now
            self._budget_mark = mux.cheap_frames_received
        elif mux.cheap_frames_received - self._budget_mark > self.cheap_frame_rate:
            mux.fail(
                RemoteProtocolError(
                    f"more than {self.cheap_frame_rate} cheap frames (PING, WINDOW, empty or tiny DATA) in a second",
                    error_code=ErrorCode.EXCESSIVE_LOAD,
                )
            )

    async def _flush_before_close(self) -> None:
        """The mux ended the connection: let its GOAWAY out, then close the socket."""
        await self._goodbye(1000 if self.mux.error is None else 1002, self.close_reason)

    async def _goodbye(self, ws_code: int, reason: str) -> None:
        """Send what is queued (a GOAWAY above all), then close the socket; never raises.

        Each step waits at most ``goodbye_timeout`` seconds: a peer that stopped reading
        (full TCP window) cannot hold a closing tunnel, and with it its streams' failures
        and the registry's view of it, open.
        """
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.goodbye_timeout):
                await self._send_pending()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.goodbye_timeout):
                await self.socket.close(ws_code, reason[:100])

    def _dispatch(self, events: list[ev.Event]) -> None:
        streams = self.streams
        stream_events = _STREAM_EVENTS
        for event in events:
            kind = type(event)
            if kind in stream_events:
                # One lookup per event; a stream already gone (reset, finished) ignores it.
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]  # all of _STREAM_EVENTS have one
                if stream is None:
                    continue
                if type(event) is ev.DataReceived:
                    stream._on_data(event.data, event.flags)
                elif type(event) is ev.WindowUpdated:
                    stream._on_credit()
                elif type(event) is ev.StreamEnded:
                    stream._on_end()
                elif type(event) is ev.ReplyReceived:
                    stream._on_reply(event.head, event.end_stream)
                elif type(event) is ev.StreamReset:
                    stream._fail(StreamResetError(event.code, event.reason or f"reset by peer (code {event.code})"))
            elif type(event) is ev.StreamOpened:
                self._on_stream_opened(event)
            elif type(event) is ev.PongReceived:
                if len(event.payload) == _PING.size:
                    now = self.loop.time()
                    self.rtt = max(0.0, now - _PING.unpack(event.payload)[0])
                    self.mux.observe_rtt(self.rtt, now)
            elif type(event) is ev.ConnectionTerminated:
                if event.remote:
                    # The reason is the peer's text: escaped before it can reach a log line.
                    self.close_reason = f"peer said goodbye: {printable(event.reason or event.code, 200)}"
                else:
                    self.close_reason = f"protocol error by peer: {printable(event.reason, 200)}"
                    _LOGGER.warning("tunnel %s: %s", self.label, self.close_reason)

    def _on_stream_opened(self, event: ev.StreamOpened) -> None:
        stream = TunnelStream(self, event.stream_id, event.head, remote_done=event.end_stream)
        if self.budget.exhausted:
            self.mux.refuse_stream(event.stream_id, ErrorCode.REFUSED_STREAM, "memory budget spent")
            return
        if self._on_stream is None:
            # As a reply the peer must read: an agent flooding OPENs cannot queue RESETs forever.
            self.mux.refuse_stream(event.stream_id, ErrorCode.REFUSED_STREAM, "this side does not accept streams")
            return
        self.streams[event.stream_id] = stream
        self._on_stream(stream)

    async def _heartbeat_loop(self) -> None:
        tick = self._heartbeat_interval / 2
        # The first PING goes at once: the round-trip time is known from the start, not only
        # one interval later.
        self.mux.ping(_PING.pack(self.loop.time()))
        self.schedule_flush()
        next_ping = self.loop.time() + self._heartbeat_interval
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            silent = now - self._last_received
            if silent >= self._dead_after:
                self.close_reason = f"peer silent for {silent:.0f}s"
                _LOGGER.warning("tunnel %s: %s, closing", self.label, self.close_reason)
                if self._reader is not None:
                    self._reader.cancel()
                return
            if now >= next_ping:
                next_ping = now + self._heartbeat_interval
                self.mux.ping(_PING.pack(now))
                self.schedule_flush()

    async def _teardown(self) -> None:
        self._mark_closing()
        tasks = [t for t in (self._heartbeat, self._writer, self._reader) if t is not None]
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._goodbye(1001, "tunnel closed")  # sends a GOAWAY queued by run() or left by the writer
        self.socket.abort()
        error = TunnelClosedError(self.close_reason or "tunnel closed")
        for stream in list(self.streams.values()):
            stream._fail(error)
        self.streams.clear()
        self._wake_drainers()
        self._done.set()
        self._reserve_tuned()  # nothing more can arrive: the tunnel's tuned credit leaves the budget
