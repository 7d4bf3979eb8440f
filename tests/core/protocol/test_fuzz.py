"""Property tests: hostile input never escapes receive_data, and data round trips under flow control."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rproxy_core.exceptions import RemoteProtocolError
from rproxy_core.protocol import (
    ErrorCode,
    Flags,
    FrameType,
    MessageKind,
    Multiplexer,
    RequestHead,
    ResponseHead,
    Role,
)
from rproxy_core.protocol import events as ev
from rproxy_core.protocol.frames import encode_code, encode_u32

from .helpers import ConnectionPair, parse, raw_frame, raw_hello, ready_mux, take

FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
HEAD = RequestHead("GET", "/").encode()
REPLY = ResponseHead(200).encode()
WINDOW = 4096  # small, so that fuzzed DATA can overrun it

# Building blocks of plausible frames: ids that exist, are stale, never used or of either parity.
stream_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 9, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
flags = st.one_of(
    st.sampled_from(
        [
            0,
            Flags.FIN,
            Flags.MORE,
            Flags.FIN | Flags.MORE,
            112,
            MessageKind.TEXT.flag_bits,
            MessageKind.CLOSE.flag_bits | Flags.FIN,
        ]
    ),
    st.integers(0, 255),
)
payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", HEAD, REPLY, b"{}", b"{bad", b'{"s":99}', b'{"m":"GET","t":"/","k":"x"}', raw_hello()[10:]]),
    st.integers(0, 2**32 - 1).map(encode_u32),
    st.builds(encode_code, st.integers(0, 0xFFFF), st.text(max_size=10)),
    st.integers(0, 6000).map(lambda n: b"d" * n),
)
frames = st.builds(
    lambda t, f, s, p: raw_frame(t, f, s, p),
    st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)),
    flags,
    stream_ids,
    payloads,
)
messages = st.lists(frames, min_size=1, max_size=6).map(b"".join)


def live_agent() -> Multiplexer:
    """An agent past HELLO with a peer stream (1, replied) and one of its own (2, reply received)."""
    mux = ready_mux(Role.AGENT, stream_window=WINDOW, max_frame_size=16 << 10, max_streams=8)
    mux.receive_data(raw_frame(FrameType.OPEN, 0, 1, HEAD))
    mux.send_reply(1, ResponseHead(200))
    own = mux.open_stream(RequestHead("GET", "/own"))
    mux.receive_data(raw_frame(FrameType.REPLY, 0, own, REPLY))
    assert [type(e) for e in mux.events_received()] == [ev.StreamOpened, ev.ReplyReceived]
    take(mux)
    return mux


def check_outcome(mux: Multiplexer, events: list[ev.Event], output: bytes) -> None:
    """Either a clean termination, or a connection without a GOAWAY; all output well formed."""
    out_frames = parse(output)  # whatever we send must itself parse
    goaways = [f for f in out_frames if f.type is FrameType.GOAWAY]
    terminated = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    for event in events:
        if isinstance(event, ev.DataReceived):
            assert len(event.data) <= mux.max_frame_size
            assert not event.flags & Flags.FIN
        if isinstance(event, ev.StreamReset) and not event.remote:
            assert any(f.type is FrameType.RESET and f.stream_id == event.stream_id for f in out_frames)
    if mux.closed:
        assert len(terminated) == 1
        assert events[-1] is terminated[0]
        if terminated[0].remote:
            assert mux.error is None
            assert not goaways
        else:
            assert isinstance(mux.error, RemoteProtocolError)
            assert len(goaways) == 1 and out_frames[-1] is goaways[0]
    else:
        assert not terminated
        assert mux.error is None
        assert not goaways
    # The kept counts of open streams (by opener) agree with the streams actually alive.
    ids = mux.stream_ids()
    ours = sum(1 for stream_id in ids if stream_id % 2 == (0 if mux.role is Role.AGENT else 1))
    assert (mux.open_stream_count(local=True), mux.open_stream_count(local=False)) == (ours, len(ids) - ours)


def assert_usable(mux: Multiplexer) -> None:
    """The connection still answers a PING and can open a stream."""
    mux.receive_data(raw_frame(FrameType.PING, 0, 0, b"alive?"))
    assert mux.events_received() == [ev.PingReceived(b"alive?")]
    assert [(f.type, bytes(f.payload)) for f in parse(take(mux))] == [(FrameType.PONG, b"alive?")]
    stream_id = mux.open_stream(RequestHead("GET", "/after"))
    assert stream_id % 2 == 0
    assert [f.type for f in parse(take(mux))] == [FrameType.OPEN]


def feed(mux: Multiplexer, inputs: list[bytes], *, usable_after: bool = True) -> None:
    """Feed messages one by one, checking the outcome after each; then check usability."""
    for message in inputs:
        was_closed = mux.closed
        mux.receive_data(message)
        events = mux.events_received()
        output = take(mux)
        if was_closed:
            assert events == [] and output == b""
            continue
        check_outcome(mux, events, output)
    if usable_after and not mux.closed:
        assert_usable(mux)


@given(inputs=st.lists(st.binary(min_size=0, max_size=120), min_size=1, max_size=4))
@FUZZ
def test_arbitrary_bytes_never_escape_receive_data(inputs):
    """For any bytes after HELLO, receive_data returns; the connection ends cleanly or stays usable."""
    feed(live_agent(), inputs)


@given(inputs=st.lists(messages, min_size=1, max_size=4))
@FUZZ
def test_arbitrary_frame_sequences_never_escape_receive_data(inputs):
    """Well-framed but arbitrary frames (any type, flags, stream, payload) never raise out of receive_data."""
    feed(live_agent(), inputs)


@st.composite
def mutated_messages(draw):
    """A valid-looking message, then truncated, bit-flipped, concatenated or duplicated."""
    message = draw(messages)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["truncate", "flip", "concat", "duplicate", "splice"]))
        if how == "truncate" and message:
            message = message[: draw(st.integers(0, len(message) - 1))]
        elif how == "flip" and message:
            index = draw(st.integers(0, len(message) - 1))
            bit = 1 << draw(st.integers(0, 7))
            message = message[:index] + bytes([message[index] ^ bit]) + message[index + 1 :]
        elif how == "concat":
            message += draw(messages)
        elif how == "duplicate":
            message += message
        elif how == "splice" and message:
            index = draw(st.integers(0, len(message)))
            message = message[:index] + draw(st.binary(max_size=12)) + message[index:]
    return message


@given(inputs=st.lists(mutated_messages(), min_size=1, max_size=4))
@FUZZ
def test_mutated_valid_messages_never_escape_receive_data(inputs):
    """Truncations, bit flips and concatenations of valid messages never raise out of receive_data."""
    feed(live_agent(), inputs)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**33), 2**33) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@given(
    hello=st.one_of(
        st.dictionaries(
            st.sampled_from(["version", "window", "max_frame", "max_streams", "x"]), json_values, max_size=5
        ),
        st.fixed_dictionaries({"version": json_values}),
        json_values,
    )
)
@FUZZ
def test_any_json_hello_never_escapes_receive_data(hello):
    """A first HELLO with any JSON content is accepted or terminates the connection; it never raises."""
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, json.dumps(hello).encode()))
    events = mux.events_received()
    check_outcome(mux, events, take(mux))
    if not mux.closed:
        assert [type(e) for e in events] == [ev.HelloReceived]
        assert mux.can_open_stream()


@given(inputs=st.lists(st.binary(max_size=80), min_size=1, max_size=3))
@FUZZ
def test_arbitrary_bytes_before_hello_never_escape_receive_data(inputs):
    """Garbage in place of the peer's HELLO terminates the connection cleanly."""
    mux = Multiplexer(Role.AGENT)
    mux.send_hello()
    take(mux)
    feed(mux, inputs, usable_after=False)
    if not mux.closed:  # the garbage happened to start with a valid HELLO
        assert mux.peer_settings is not None


# Round trip under flow control.


class Pump:
    """Moves messages both ways, recording received data and acknowledging all of it at once."""

    def __init__(self, pair: ConnectionPair, max_bytes: int | None) -> None:
        self.pair = pair
        self.max_bytes = max_bytes
        self.received: dict[tuple[str, int], bytearray] = {}
        self.ended: set[tuple[str, int]] = set()

    def _deliver(self, sender: Multiplexer, name: str) -> None:
        receiver = self.pair.other(sender)
        pending = sender.pending_bytes
        message = take(sender, self.max_bytes)
        assert bool(message) == bool(pending), "data_to_send returned nothing although output is pending"
        if not message:
            return
        receiver.receive_data(message)
        for event in receiver.events_received():
            if isinstance(event, ev.DataReceived):
                self.received.setdefault((name, event.stream_id), bytearray()).extend(event.data)
                receiver.acknowledge_received_data(event.stream_id, len(event.data))
            elif isinstance(event, ev.StreamEnded):
                self.ended.add((name, event.stream_id))
            else:
                assert isinstance(event, (ev.WindowUpdated, ev.StreamOpened, ev.ReplyReceived)), event

    def run(self) -> None:
        for _ in range(100_000):
            if not self.pair.bridge.pending_bytes and not self.pair.agent.pending_bytes:
                return
            self._deliver(self.pair.bridge, "to-agent")
            self._deliver(self.pair.agent, "to-bridge")
        raise AssertionError("pump never went quiet")


def send_with_credit(pump: Pump, sender: Multiplexer, stream_id: int, data: bytes) -> None:
    """Send ``data`` in pieces that fit the credit, pumping whenever the credit runs out."""
    if not data:
        sender.send_data(stream_id, b"")
        return
    view = memoryview(data)
    while view:
        credit = sender.send_window(stream_id)
        assert credit >= 0
        if credit == 0:
            pump.run()
            assert sender.send_window(stream_id) > 0, "stalled although the receiver acknowledged everything"
            continue
        n = min(credit, len(view), sender.peer_max_frame_size)
        sender.send_data(stream_id, view[:n])
        view = view[n:]


@given(
    n_streams=st.integers(1, 4),
    bridge_window=st.integers(1, 5000),
    agent_window=st.integers(1, 5000),
    max_bytes=st.one_of(st.none(), st.integers(1, 4000)),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.binary(max_size=1500)),
        max_size=20,
    ),
)
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_data_sent_on_any_streams_arrives_in_order_and_byte_exact(
    n_streams, bridge_window, agent_window, max_bytes, ops
):
    """Arbitrary chunks on several streams, both ways, arrive in order per stream and exact, within the credit."""
    pair = ConnectionPair(bridge={"stream_window": bridge_window}, agent={"stream_window": agent_window}).handshake()
    bridge, agent = pair.bridge, pair.agent
    pump = Pump(pair, max_bytes)
    ids = [bridge.open_stream(RequestHead("POST", f"/{i}")) for i in range(n_streams)]
    pump.run()
    for stream_id in ids:
        agent.send_reply(stream_id, ResponseHead(200))
    pump.run()

    expected: dict[tuple[str, int], bytearray] = {}
    for to_agent, index, chunk in ops:
        stream_id = ids[index % n_streams]
        sender, name = (bridge, "to-agent") if to_agent else (agent, "to-bridge")
        expected.setdefault((name, stream_id), bytearray()).extend(chunk)
        send_with_credit(pump, sender, stream_id, chunk)
        assert bridge.send_window(stream_id) >= 0 and agent.send_window(stream_id) >= 0
    for stream_id in ids:
        bridge.end_stream(stream_id)
        agent.end_stream(stream_id)
    pump.run()

    assert not bridge.closed and not agent.closed
    received = {key: bytes(value) for key, value in pump.received.items() if value}
    assert received == {key: bytes(value) for key, value in expected.items() if value}
    assert pump.ended == {(name, stream_id) for name in ("to-agent", "to-bridge") for stream_id in ids}
    assert bridge.stream_ids() == agent.stream_ids() == []
    assert bridge.error is None and agent.error is None


def test_fuzz_helpers_detect_a_clean_termination():
    """Sanity check of the oracle: a GOAWAY-worthy input is recognised as a clean local termination."""
    mux = live_agent()
    mux.receive_data(raw_frame(FrameType.PING, 0, 5, b""))
    events = mux.events_received()
    check_outcome(mux, events, take(mux))
    assert mux.closed and events[-1].code == ErrorCode.PROTOCOL_ERROR
