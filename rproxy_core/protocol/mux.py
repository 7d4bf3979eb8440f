"""The sans-I/O multiplexer: bytes and calls in, events and bytes out (docs/PROTOCOL.md).

A ``Multiplexer`` is one end of one tunnel. The transport feeds it every WebSocket message
with :meth:`receive_data`, acts on :meth:`events_received`, and sends what
:meth:`data_to_send` returns as ONE WebSocket message. Methods such as :meth:`open_stream`
and :meth:`send_data` only queue frames.

Peer violations never raise out of :meth:`receive_data`. A fault confined to one stream
resets that stream (a ``StreamReset`` event with ``remote=False``); anything else queues a
GOAWAY, reports ``ConnectionTerminated`` and stops parsing; the transport then closes.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from ..exceptions import FlowControlError, LocalProtocolError, RemoteProtocolError
from . import events as ev
from .frames import (
    HEADER_SIZE,
    ErrorCode,
    Flags,
    Frame,
    FrameType,
    decode_code,
    decode_u32,
    encode_code,
    encode_header,
    encode_u32,
    iter_frames,
)
from .heads import RequestHead, ResponseHead
from .hello import HelloLimits
from .stream import StreamInput, StreamState, StreamStateMachine
from .windows import MAX_WINDOW, ReceiveWindow, SendWindow

__all__ = [
    "Role",
    "Multiplexer",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "DEFAULT_STREAM_WINDOW",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_STREAMS",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

#: Credit per stream. Per-stream throughput is at most window / round-trip time: 1 MiB keeps a
#: 100 Mbit/s home uplink busy across 80 ms of internet, and bounds what one stream can make the
#: receiver buffer.
DEFAULT_STREAM_WINDOW = 1 << 20
#: How far a stream's window may grow while tuning to the link (ReceiveWindow.tune): 16 MiB
#: carries 1 Gbit/s across 130 ms. The memory budget of the transport bounds the sum.
DEFAULT_MAX_STREAM_WINDOW = 16 << 20
#: How long a round-trip sample counts towards the link's least RTT: a changed route is seen
#: within one to two of these.
RTT_MEMORY = 60.0
#: Largest frame payload. Big enough that bulk transfers cost few frames, small enough that one
#: stream's frame never delays the others' by more than a few hundred microseconds on a LAN.
DEFAULT_MAX_FRAME_SIZE = 256 << 10
#: Streams the peer may have open at once (visitor requests in flight through one agent). A
#: visitor WebSocket holds a stream for as long as it lives, so a house full of dashboards
#: (10,000 sockets through one agent, the benchmark's check) must fit; an open stream costs
#: nothing until data flows, and the bridge's max_streams_per_tunnel can set a lower bound.
DEFAULT_MAX_STREAMS = 16384

#: Replies this side owes the peer (PONGs, RESETs refusing its streams) queued and not yet
#: taken by the transport. A peer that keeps sending PINGs but never reads would otherwise grow
#: this queue without end (finding 2 of issue 15: 57 → 632 MB in 4 s); past this many bytes it is
#: cut off with GOAWAY EXCESSIVE_LOAD. A peer that reads owes nothing for long: its replies leave
#: with the next write, ahead of stream data.
MAX_UNREAD_REPLIES = 64 << 10
#: DATA payloads shorter than this count as "cheap" frames (see ``cheap_frames_received``).
TINY_PAYLOAD = 16

#: Bounds on settings a peer may announce; anything outside is a protocol error.
_MIN_FRAME_SIZE = 16 << 10
_MAX_FRAME_SIZE = 16 << 20

IN = StreamInput
#: Mask clearing FIN. (``~Flags.FIN`` would not do: inverting an IntFlag keeps only its
#: defined members and would drop the MessageKind bits.)
_NOT_FIN = 0xFF ^ int(Flags.FIN)
#: FIN as a plain int: ``int & IntFlag`` runs enum's Python-level operator, per frame.
_FIN = int(Flags.FIN)


class Role(enum.IntEnum):
    """Which end of the tunnel; decides stream id parity (bridge odd, agent even)."""

    BRIDGE = 1
    AGENT = 2


class _Stream:
    __slots__ = ("machine", "send", "recv")

    def __init__(self, send_window: int, receive_window: int) -> None:
        self.machine = StreamStateMachine()
        self.send = SendWindow(send_window)
        self.recv = ReceiveWindow(receive_window)


class Multiplexer:
    """One end of a tunnel.

    Args:
        role: BRIDGE or AGENT.
        stream_window: credit this side grants the peer per stream.
        max_stream_window: largest window a stream may tune up to (``stream_window`` turns
            tuning off); see :meth:`acknowledge_received_data`.
        max_frame_size: largest frame payload this side accepts.
        max_streams: streams the peer may have open at once; more are refused.
    """

    def __init__(
        self,
        role: Role,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        max_stream_window: int = DEFAULT_MAX_STREAM_WINDOW,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if not 0 < stream_window <= MAX_WINDOW:
            raise ValueError("stream_window out of range")
        max_stream_window = max(max_stream_window, stream_window)
        if max_stream_window > MAX_WINDOW:
            raise ValueError("max_stream_window out of range")
        if not _MIN_FRAME_SIZE <= max_frame_size <= _MAX_FRAME_SIZE:
            raise ValueError("max_frame_size out of range")
        self.role = role
        self.stream_window = stream_window
        self.max_stream_window = max_stream_window
        #: The link's least round-trip time lately, in seconds (see observe_rtt); None until known.
        self.link_rtt: float | None = None
        self._rtt_now = self._rtt_before = float("inf")
        self._rtt_since = float("-inf")
        #: Credit granted beyond ``stream_window``, summed over the streams alive: what tuning
        #: lets peers have in flight on top of the fixed windows (the transport budgets it).
        self.tuned_bytes = 0
        self.max_frame_size = max_frame_size
        self.max_streams = max_streams
        self.peer_settings: dict[str, Any] | None = None
        self.peer_stream_window = DEFAULT_STREAM_WINDOW
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.peer_max_streams = DEFAULT_MAX_STREAMS
        self.hello_sent = False
        self.closed = False
        #: The peer's fault that ended the connection, if any.
        self.error: RemoteProtocolError | None = None
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if role is Role.BRIDGE else 2
        self._last_peer_stream_id = 0
        self._peer_parity = 0 if role is Role.BRIDGE else 1
        #: Streams alive by who opened them, [ours, the peer's]: asked on every open, so kept
        #: as counts rather than counted.
        self._open_counts = [0, 0]
        self._events: list[ev.Event] = []
        self._out: deque[tuple[bytes, bytes | bytearray | memoryview | None, int]] = deque()
        self._out_bytes = 0
        #: Replies owed to the peer; they leave before ``_out`` (see MAX_UNREAD_REPLIES).
        self._replies: deque[tuple[bytes, bytes | bytearray | memoryview | None, int]] = deque()
        self._reply_bytes = 0
        #: The frames of a message not processed yet (receive_data with max_frames).
        self._input: Iterator[Frame] | None = None
        #: Frames received, and among them the cheap ones: PING, PONG, WINDOW, DATA with fewer
        #: than TINY_PAYLOAD bytes and no FIN, refused OPENs. They cost the receiver a loop
        #: iteration each yet little or no credit, so the transport holds them to a rate budget.
        self.frames_received = 0
        self.cheap_frames_received = 0
        #: Bytes of tunnel messages taken in and handed out so far (traffic counters).
        self.bytes_received = 0
        self.bytes_sent = 0
        #: RESET frames received and sent (streams abandoned by either side).
        self.resets_received = 0
        self.resets_sent = 0

    # Public methods for receiving data.

    def receive_data(self, message: bytes | bytearray | memoryview, *, max_frames: int | None = None) -> bool:
        """Feed one WebSocket message received from the peer.

        Args:
            max_frames: process at most this many of its frames now; the transport calls
                :meth:`resume_receiving` for the rest after letting its event loop run, so a
                message packed with hundreds of thousands of empty frames cannot hold the
                loop for a whole second.

        Returns:
            Whether the whole message has been processed.
        """
        if self.closed:
            return True
        if self._input is not None:
            raise LocalProtocolError("the previous message is not processed yet")
        self.bytes_received += len(message)
        self._input = iter_frames(message, self.max_frame_size)
        return self.resume_receiving(max_frames)

    def resume_receiving(self, max_frames: int | None = None) -> bool:
        """Process (at most ``max_frames`` more) frames of the message being received.

        Returns:
            Whether the message is done (no frames left, or the connection ended).
        """
        frames = self._input
        if frames is None:
            return True
        count = 0
        try:
            for frame in frames if max_frames is None else islice(frames, max_frames):
                count += 1
                self.frames_received += 1
                self._receive_frame(frame)
                if self.closed:
                    self._input = None
                    return True
        except RemoteProtocolError as err:
            self._input = None
            self._fail(err)
            return True
        if max_frames is None or count < max_frames:
            self._input = None
            return True
        return False

    def events_received(self) -> list[ev.Event]:
        """Return and forget the events produced since the last call."""
        events, self._events = self._events, []
        return events

    # Public methods for sending data.

    def data_to_send(self, max_bytes: int | None = None) -> list[bytes | bytearray | memoryview]:
        """Return and forget queued output: the buffers of ONE WebSocket message, in order.

        Args:
            max_bytes: stop after the frame that reaches this size (at least one frame is
                returned), so that one message stays within the peer's message limit.
        """
        out: list[bytes | bytearray | memoryview] = []
        taken = 0
        replies = self._replies
        if replies:
            # Owed answers first: a PONG measures the round trip and must not wait behind a
            # megabyte of stream data.
            while replies:
                header, payload, size = replies.popleft()
                out.append(header)
                if payload is not None:
                    out.append(payload)
                taken += size
            self._reply_bytes = 0
        queue = self._out
        while queue and (max_bytes is None or taken < max_bytes or not out):
            header, payload, size = queue.popleft()
            out.append(header)
            if payload is not None:
                out.append(payload)
            taken += size
        self._out_bytes -= taken
        self.bytes_sent += taken
        return out

    @property
    def pending_bytes(self) -> int:
        """Size of the output queued and not yet taken by :meth:`data_to_send`."""
        return self._out_bytes

    def send_hello(self, **settings: Any) -> None:
        """Queue this side's HELLO: protocol version, window, frame and stream limits, extras."""
        if self.hello_sent:
            raise LocalProtocolError("HELLO already sent")

        # Extras first: the limits this mux enforces are what it announces, whatever the caller passed.
        body = {
            **settings,
            "version": PROTOCOL_VERSION,
            "window": self.stream_window,
            "max_frame": self.max_frame_size,
            "max_streams": self.max_streams,
        }
        self.hello_sent = True
        self._emit(FrameType.HELLO, 0, 0, json.dumps(body, separators=(",", ":")).encode())

    def can_open_stream(self) -> bool:
        """Whether the peer will accept one more stream now."""
        return (
            not self.closed
            and self.peer_settings is not None
            and self.open_stream_count(local=True) < self.peer_max_streams
        )

    def open_stream(self, head: RequestHead, *, end_stream: bool = False) -> int:
        """Open a stream with ``head``; FIN too when there is no body. Returns the stream id."""
        self._check_ready()
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        stream = _Stream(self.peer_stream_window, self.stream_window)
        stream.machine.process(IN.SEND_OPEN)
        self._streams[stream_id] = stream
        self._open_counts[0] += 1
        self._emit(FrameType.OPEN, _FIN if end_stream else 0, stream_id, head.encode())
        if end_stream:
            self._advance(stream_id, stream, IN.SEND_FIN)
        return stream_id

    def send_reply(self, stream_id: int, head: ResponseHead, *, end_stream: bool = False) -> None:
        """Answer a stream the peer opened."""
        self._check_ready()
        stream = self._local_stream(stream_id)
        stream.machine.process(IN.SEND_REPLY)
        self._emit(FrameType.REPLY, _FIN if end_stream else 0, stream_id, head.encode())
        if end_stream:
            self._advance(stream_id, stream, IN.SEND_FIN)

    def receive_window(self, stream_id: int) -> int:
        """Credit the peer may have outstanding on the stream: its window now (0 for one that is gone)."""
        stream = self._streams.get(stream_id)
        return stream.recv.size + stream.recv.debt if stream is not None else 0

    def send_window(self, stream_id: int) -> int:
        """Credit left to send on the stream (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        return stream.send.available if stream is not None else 0

    def send_data(
        self,
        stream_id: int,
        data: bytes | bytearray | memoryview,
        *,
        flags: int = 0,
        end_stream: bool = False,
    ) -> None:
        """Queue one DATA frame; ``data`` must fit the credit and the peer's frame size.

        ``flags`` carries MORE and the MessageKind bits for WebSocket streams.
        """
        if self.closed:
            raise LocalProtocolError("connection is closed")
        stream = self._local_stream(stream_id)
        size = len(data)
        if size > self.peer_max_frame_size:
            raise LocalProtocolError(f"{size} bytes exceed the peer's frame size")
        stream.machine.process(IN.SEND_DATA)
        stream.send.consume(size)
        # FIN only through end_stream, so the state machine always knows the half is over.
        flags = flags & _NOT_FIN | (_FIN if end_stream else 0)
        self._emit(FrameType.DATA, flags, stream_id, data)
        if end_stream:
            self._advance(stream_id, stream, IN.SEND_FIN)

    def end_stream(self, stream_id: int) -> None:
        """End this side's half of the stream (an empty DATA frame with FIN)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abandon a stream; a stream already closed is left alone."""
        stream = self._drop(stream_id)
        if stream is None or self.closed:
            return
        stream.machine.process(IN.SEND_RESET)
        self.resets_sent += 1
        self._emit(FrameType.RESET, 0, stream_id, encode_code(code, reason))

    def refuse_stream(self, stream_id: int, code: int = ErrorCode.REFUSED_STREAM, reason: str = "") -> None:
        """Reset a stream the peer just opened, as a reply it must read (see MAX_UNREAD_REPLIES)."""
        stream = self._drop(stream_id)
        if stream is None or self.closed:
            return
        stream.machine.process(IN.SEND_RESET)
        self.resets_sent += 1
        self.cheap_frames_received += 1
        self._reply(FrameType.RESET, stream_id, encode_code(code, reason))

    def acknowledge_received_data(
        self,
        stream_id: int,
        size: int,
        *,
        now: float | None = None,
        growth_room: Callable[[], int] | None = None,
    ) -> None:
        """Tell the mux the application consumed ``size`` bytes; may queue a WINDOW frame.

        Given the time ``now`` (seconds, any monotonic clock) and once :meth:`observe_rtt` has
        a round-trip time, the stream's window tunes itself to the link between
        ``stream_window`` and ``max_stream_window`` (docs/PROTOCOL.md §5). ``growth_room``
        says how many bytes of credit it may add now (the receiver's memory; None: no bound);
        it is asked only when a window is about to tune, not for every acknowledgement.
        """
        stream = self._streams.get(stream_id)
        if stream is None or self.closed or stream.machine.state is StreamState.HALF_CLOSED_REMOTE:
            return  # no more data can come: returning credit is pointless
        window = stream.recv
        outstanding = window.size + window.debt
        increment = window.acknowledge(size)
        if increment:
            rtt = self.link_rtt
            if rtt is not None and now is not None and self.max_stream_window > self.stream_window:
                room = growth_room() if growth_room is not None else None
                increment += window.tune(now, rtt, floor=self.stream_window, ceiling=self.max_stream_window, room=room)
            self._emit(FrameType.WINDOW, 0, stream_id, encode_u32(increment))
        self.tuned_bytes += window.size + window.debt - outstanding

    def observe_rtt(self, sample: float, now: float) -> None:
        """Note a measured round-trip time (seconds) at time ``now``.

        :attr:`link_rtt` keeps the least of the samples of the last one to two ``RTT_MEMORY``
        periods: the link's own delay, not the queueing a busy stream adds to it.
        """
        if not sample > 0:
            return
        if now - self._rtt_since >= RTT_MEMORY:
            self._rtt_before, self._rtt_now, self._rtt_since = self._rtt_now, sample, now
        elif sample < self._rtt_now:
            self._rtt_now = sample
        self.link_rtt = min(self._rtt_now, self._rtt_before)

    def ping(self, payload: bytes) -> None:
        """Queue a PING; the answer arrives as PongReceived with the same payload."""
        if not self.closed:
            self._emit(FrameType.PING, 0, 0, payload)

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue a GOAWAY and stop: the transport closes after sending it."""
        if self.closed:
            return
        self._emit(FrameType.GOAWAY, 0, 0, encode_code(code, reason))
        self.closed = True

    # Introspection.

    def open_stream_count(self, *, local: bool | None = None) -> int:
        """Streams alive now; ``local`` counts only ours (True) or only the peer's (False)."""
        if local is None:
            return len(self._streams)
        return self._open_counts[0 if local else 1]

    def _drop(self, stream_id: int) -> _Stream | None:
        """Forget a stream (if alive), keeping the counts by opener right."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._open_counts[stream_id % 2 == self._peer_parity] -= 1
            self.tuned_bytes -= stream.recv.size + stream.recv.debt - self.stream_window
        return stream

    def stream_ids(self) -> list[int]:
        """Ids of the streams alive now."""
        return list(self._streams)

    # Private methods.

    def _emit(self, frame_type: int, flags: int, stream_id: int, payload: bytes | bytearray | memoryview) -> None:
        size = len(payload)
        self._out.append(
            (encode_header(frame_type, flags, stream_id, size), payload if size else None, HEADER_SIZE + size)
        )
        self._out_bytes += HEADER_SIZE + size

    def _reply(self, frame_type: int, stream_id: int, payload: bytes | bytearray | memoryview) -> None:
        """Queue an answer the peer's own frame asked for; cut off a peer that does not read them."""
        size = len(payload)
        total = HEADER_SIZE + size
        self._replies.append((encode_header(frame_type, 0, stream_id, size), payload if size else None, total))
        self._reply_bytes += total
        self._out_bytes += total
        if self._reply_bytes > MAX_UNREAD_REPLIES:
            raise RemoteProtocolError(
                f"peer does not read the answers to its frames ({self._reply_bytes} bytes of PONG/RESET unread)",
                error_code=ErrorCode.EXCESSIVE_LOAD,
            )

    def _check_ready(self) -> None:
        if self.closed:
            raise LocalProtocolError("connection is closed")
        if not self.hello_sent or self.peer_settings is None:
            raise LocalProtocolError("HELLO exchange not complete")

    def _local_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return stream

    def _advance(self, stream_id: int, stream: _Stream, event: StreamInput) -> None:
        if stream.machine.process(event) is StreamState.CLOSED:
            self._drop(stream_id)

    def fail(self, err: RemoteProtocolError) -> None:
        """End the connection because of a peer fault the transport detected (e.g. a text message)."""
        if not self.closed:
            self._fail(err)

    def _fail(self, err: RemoteProtocolError) -> None:
        self.error = err
        code = ErrorCode.coerce(err.error_code)
        self._emit(FrameType.GOAWAY, 0, 0, encode_code(code, str(err)))
        self.closed = True
        self._events.append(ev.ConnectionTerminated(code, str(err), remote=False))

    def _is_stale(self, stream_id: int) -> bool:
        """A stream this connection used once and has since closed: late frames are normal."""
        if stream_id % 2 == self._peer_parity:
            return stream_id <= self._last_peer_stream_id
        return stream_id < self._next_stream_id

    def _receive_frame(self, frame: Frame) -> None:
        frame_type = frame.type
        if self.peer_settings is None and frame_type is not FrameType.HELLO:
            raise RemoteProtocolError(f"{frame_type.name} before HELLO")
        if frame.stream_id == 0:
            self._receive_connection_frame(frame)
            return
        if frame_type is FrameType.OPEN:
            self._receive_open(frame)
            return
        if frame_type not in _STREAM_FRAMES:
            raise RemoteProtocolError(f"{frame_type.name} on stream {frame.stream_id}")
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            if self._is_stale(frame.stream_id):
                self.cheap_frames_received += 1
                return
            raise RemoteProtocolError(f"{frame_type.name} on unknown stream {frame.stream_id}")
        try:
            _STREAM_FRAMES[frame_type](self, frame, stream)
        except FlowControlError:
            raise
        except RemoteProtocolError as err:
            # Confined to this stream: reset it, keep the connection.
            self._drop(frame.stream_id)
            self.resets_sent += 1
            self._events.append(ev.StreamReset(frame.stream_id, err.error_code, str(err), remote=False))
            self._reply(FrameType.RESET, frame.stream_id, encode_code(err.error_code, str(err)))

    def _receive_connection_frame(self, frame: Frame) -> None:
        frame_type = frame.type
        if frame_type is FrameType.PING:
            self.cheap_frames_received += 1
            payload = bytes(frame.payload)
            self._events.append(ev.PingReceived(payload))
            self._reply(FrameType.PONG, 0, payload)
        elif frame_type is FrameType.PONG:
            self.cheap_frames_received += 1
            self._events.append(ev.PongReceived(bytes(frame.payload)))
        elif frame_type is FrameType.HELLO:
            self._receive_hello(frame)
        elif frame_type is FrameType.GOAWAY:
            code, reason = decode_code(frame.payload)
            self.closed = True
            self._events.append(ev.ConnectionTerminated(ErrorCode.coerce(code), reason, remote=True))
        else:
            raise RemoteProtocolError(f"{frame_type.name} on stream 0")

    def _receive_hello(self, frame: Frame) -> None:

        if self.peer_settings is not None:
            raise RemoteProtocolError("second HELLO")
        try:
            settings = json.loads(bytes(frame.payload))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise RemoteProtocolError("HELLO is not JSON") from None
        if not isinstance(settings, dict):
            raise RemoteProtocolError("HELLO is not a JSON object")
        limits = HelloLimits.decode(
            settings,
            versions=SUPPORTED_VERSIONS,
            window=(1, MAX_WINDOW, DEFAULT_STREAM_WINDOW),
            max_frame=(_MIN_FRAME_SIZE, _MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE),
            max_streams=(1, 1 << 20, DEFAULT_MAX_STREAMS),
        )
        self.peer_settings = settings
        self.peer_stream_window = limits.window
        self.peer_max_frame_size = limits.max_frame
        self.peer_max_streams = limits.max_streams
        self._events.append(ev.HelloReceived(settings))

    def _receive_open(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 != self._peer_parity or stream_id <= self._last_peer_stream_id:
            raise RemoteProtocolError(f"OPEN with invalid stream id {stream_id}")
        self._last_peer_stream_id = stream_id
        if self.open_stream_count(local=False) >= self.max_streams:
            self.resets_sent += 1
            self.cheap_frames_received += 1
            self._reply(FrameType.RESET, stream_id, encode_code(ErrorCode.REFUSED_STREAM, "too many streams"))
            return
        try:
            head = RequestHead.decode(frame.payload)
        except RemoteProtocolError as err:
            self.resets_sent += 1
            self.cheap_frames_received += 1
            self._reply(FrameType.RESET, stream_id, encode_code(ErrorCode.PROTOCOL_ERROR, str(err)))
            return
        stream = _Stream(self.peer_stream_window, self.stream_window)
        stream.machine.process(IN.RECV_OPEN)
        end_stream = bool(frame.flags & _FIN)
        if end_stream:
            stream.machine.process(IN.RECV_FIN)
        self._streams[stream_id] = stream
        self._open_counts[1] += 1
        self._events.append(ev.StreamOpened(stream_id, head, end_stream))

    def _receive_reply(self, frame: Frame, stream: _Stream) -> None:
        stream.machine.process(IN.RECV_REPLY)
        head = ResponseHead.decode(frame.payload)
        end_stream = bool(frame.flags & _FIN)
        self._events.append(ev.ReplyReceived(frame.stream_id, head, end_stream))
        if end_stream:
            self._advance(frame.stream_id, stream, IN.RECV_FIN)

    def _receive_data(self, frame: Frame, stream: _Stream) -> None:
        stream.machine.process(IN.RECV_DATA)
        payload = frame.payload
        size = len(payload)
        stream.recv.receive(size)
        if size < TINY_PAYLOAD and not frame.flags & _FIN:
            self.cheap_frames_received += 1
        # An empty DATA frame with FIN only ends the stream; without FIN it is an empty
        # WebSocket message and must reach the application.
        if size or not frame.flags & _FIN:
            self._events.append(ev.DataReceived(frame.stream_id, payload, frame.flags & _NOT_FIN))
        if frame.flags & _FIN:
            self._advance(frame.stream_id, stream, IN.RECV_FIN)
            self._events.append(ev.StreamEnded(frame.stream_id))

    def _receive_window(self, frame: Frame, stream: _Stream) -> None:
        self.cheap_frames_received += 1
        increment = decode_u32(frame.payload)
        stream.send.expand(increment)
        self._events.append(ev.WindowUpdated(frame.stream_id, increment))

    def _receive_reset(self, frame: Frame, stream: _Stream) -> None:
        code, reason = decode_code(frame.payload)
        stream.machine.process(IN.RECV_RESET)
        self.resets_received += 1
        self._drop(frame.stream_id)
        self._events.append(ev.StreamReset(frame.stream_id, ErrorCode.coerce(code), reason, remote=True))


_STREAM_FRAMES = {
    FrameType.REPLY: Multiplexer._receive_reply,
    FrameType.DATA: Multiplexer._receive_data,
    FrameType.WINDOW: Multiplexer._receive_window,
    FrameType.RESET: Multiplexer._receive_reset,
}


def frames_of(buffers: Iterable[bytes | memoryview]) -> bytes:
    """Join :meth:`Multiplexer.data_to_send` output into one message (tests and tools)."""
    return b"".join(buffers)
