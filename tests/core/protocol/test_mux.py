"""The Multiplexer, driven in memory: two ends wired back to back, no event loop."""

from __future__ import annotations

import json

import pytest

from rproxy_core.exceptions import LocalProtocolError, RemoteProtocolError
from rproxy_core.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_WINDOW,
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
from rproxy_core.protocol.frames import HEADER_SIZE, decode_code, encode_code, encode_u32, iter_frames

from .helpers import ConnectionPair, parse, raw_frame, raw_hello, ready_mux, ready_pair, take, take_frames

GET = RequestHead("GET", "/index.html", [("Host", "home.example")], request_id="r1")
POST = RequestHead("POST", "/api", [("Content-Type", "text/plain")])
OK = ResponseHead(200, "OK", [("Content-Type", "text/plain")])
SMALL_WINDOW = 40_000  # quarter = 10_000
HEAD = RequestHead("GET", "/").encode()
REPLY = ResponseHead(200).encode()
#: The spec (§2, §7) does not pin the code for a truncated frame, an unknown type or a short payload.
MALFORMED = {ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_SIZE_ERROR}


def types(events):
    """The event classes, in order."""
    return [type(e) for e in events]


def assert_terminated(mux: Multiplexer, events, code: int | set[int]) -> None:
    """A local connection error with ``code`` (or one of a set) was reported, and one GOAWAY carrying it queued last."""
    assert mux.closed
    assert isinstance(mux.error, RemoteProtocolError)
    terminated = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert len(terminated) == 1
    assert events[-1] is terminated[0]
    assert terminated[0].remote is False
    codes = code if isinstance(code, set) else {code}
    assert terminated[0].code in codes
    frames = take_frames(mux)
    goaways = [f for f in frames if f.type is FrameType.GOAWAY]
    assert len(goaways) == 1 and frames[-1] is goaways[0]
    assert goaways[0].stream_id == 0
    assert decode_code(goaways[0].payload)[0] == terminated[0].code


def assert_stream_reset_locally(mux: Multiplexer, events, stream_id: int, code: int | set[int]) -> None:
    """Only ``stream_id`` was reset, with ``code``: StreamReset(remote=False), a RESET frame, connection alive."""
    assert not mux.closed
    assert mux.error is None
    resets = [e for e in events if isinstance(e, ev.StreamReset)]
    assert len(resets) == 1
    codes = code if isinstance(code, set) else {code}
    assert (resets[0].stream_id, resets[0].remote) == (stream_id, False)
    assert resets[0].code in codes
    frames = take_frames(mux)
    assert [(f.type, f.stream_id) for f in frames] == [(FrameType.RESET, stream_id)]
    assert decode_code(frames[0].payload)[0] == resets[0].code
    assert stream_id not in mux.stream_ids()


def responder_stream(mux: Multiplexer, stream_id: int = 1, *, fin: bool = False) -> None:
    """Make the (agent) mux receive a raw OPEN for ``stream_id``."""
    mux.receive_data(raw_frame(FrameType.OPEN, Flags.FIN if fin else 0, stream_id, HEAD))
    assert types(mux.events_received()) == [ev.StreamOpened]


def opener_stream_with_reply(mux: Multiplexer) -> int:
    """Open a stream on ``mux`` and make it receive the peer's REPLY; returns the id."""
    stream_id = mux.open_stream(GET)
    mux.receive_data(raw_frame(FrameType.REPLY, 0, stream_id, REPLY))
    assert types(mux.events_received()) == [ev.ReplyReceived]
    take(mux)
    return stream_id


# HELLO.


def test_hello_exchange_reports_each_sides_settings():
    """Each end sees the other's version, window, frame size, stream limit and extra settings."""
    pair = ConnectionPair(agent={"stream_window": 65_536, "max_frame_size": 32_768, "max_streams": 7})
    pair.bridge.send_hello(server="bridge-1")
    pair.agent.send_hello(tunnel="home", agent_id="a1")
    at_bridge, at_agent = pair.flush()
    (hello_at_bridge,) = at_bridge
    (hello_at_agent,) = at_agent
    assert hello_at_bridge.settings == {
        "version": 1,
        "window": 65_536,
        "max_frame": 32_768,
        "max_streams": 7,
        "tunnel": "home",
        "agent_id": "a1",
    }
    assert hello_at_agent.settings == {
        "version": 1,
        "window": DEFAULT_STREAM_WINDOW,
        "max_frame": DEFAULT_MAX_FRAME_SIZE,
        "max_streams": DEFAULT_MAX_STREAMS,
        "server": "bridge-1",
    }
    assert pair.bridge.peer_stream_window == 65_536
    assert pair.bridge.peer_max_frame_size == 32_768
    assert pair.bridge.peer_max_streams == 7
    assert pair.bridge.peer_settings == hello_at_bridge.settings


def test_the_peers_window_is_the_send_credit_of_new_streams():
    """A stream starts with the credit the peer announced in its HELLO."""
    pair = ready_pair(agent={"stream_window": 65_536})
    stream_id = pair.bridge.open_stream(GET)
    assert pair.bridge.send_window(stream_id) == 65_536
    pair.flush()
    pair.agent.send_reply(stream_id, OK)
    assert pair.agent.send_window(stream_id) == DEFAULT_STREAM_WINDOW


def test_hello_missing_settings_take_the_defaults():
    """A HELLO with only the version leaves the peer's limits at their defaults."""
    mux = ready_mux(Role.BRIDGE)
    assert (mux.peer_stream_window, mux.peer_max_frame_size, mux.peer_max_streams) == (
        DEFAULT_STREAM_WINDOW,
        DEFAULT_MAX_FRAME_SIZE,
        DEFAULT_MAX_STREAMS,
    )


def test_sending_hello_twice_is_a_local_error():
    """send_hello may be called once."""
    mux = Multiplexer(Role.AGENT)
    mux.send_hello()
    with pytest.raises(LocalProtocolError):
        mux.send_hello()


def test_streams_cannot_be_opened_before_the_hello_exchange_completes():
    """open_stream needs both our HELLO sent and the peer's received."""
    mux = Multiplexer(Role.BRIDGE)
    assert not mux.can_open_stream()
    with pytest.raises(LocalProtocolError):
        mux.open_stream(GET)
    mux.send_hello()
    with pytest.raises(LocalProtocolError):
        mux.open_stream(GET)
    mux.receive_data(raw_hello())
    assert mux.can_open_stream()
    assert mux.open_stream(GET) == 1


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw_frame(FrameType.OPEN, 0, 2, HEAD), id="open"),
        pytest.param(raw_frame(FrameType.DATA, 0, 1, b"x"), id="data"),
        pytest.param(raw_frame(FrameType.PING, 0, 0, b"12345678"), id="ping"),
        pytest.param(raw_frame(FrameType.GOAWAY, 0, 0, b"\x00\x00"), id="goaway"),
    ],
)
def test_any_frame_before_the_peers_hello_terminates_the_connection(frame):
    """The first frame from the peer must be HELLO; anything else is a connection error."""
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(frame + raw_hello())
    events = mux.events_received()
    assert ev.HelloReceived not in types(events)
    assert_terminated(mux, events, ErrorCode.PROTOCOL_ERROR)


def test_hello_and_a_stream_in_the_same_message_are_both_processed():
    """HELLO followed by OPEN in one message: the OPEN is handled once HELLO set the settings."""
    mux = Multiplexer(Role.AGENT)
    mux.send_hello()
    mux.receive_data(raw_hello() + raw_frame(FrameType.OPEN, Flags.FIN, 1, HEAD))
    assert types(mux.events_received()) == [ev.HelloReceived, ev.StreamOpened]


def test_a_second_hello_terminates_the_connection():
    """HELLO is sent once per connection."""
    mux = ready_mux()
    mux.receive_data(raw_hello())
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[1]", id="array"),
        pytest.param(b"{}", id="no-version"),
        pytest.param(b'{"version":2}', id="version-2"),
        pytest.param(b'{"version":"1"}', id="version-string"),
        pytest.param(b'{"version":1,"window":0}', id="window-zero"),
        pytest.param(b'{"version":1,"window":2147483648}', id="window-too-big"),
        pytest.param(b'{"version":1,"window":1.5}', id="window-float"),
        pytest.param(b'{"version":1,"max_frame":1024}', id="frame-too-small"),
        pytest.param(b'{"version":1,"max_frame":true}', id="frame-bool"),
        pytest.param(b'{"version":1,"max_streams":0}', id="streams-zero"),
        pytest.param(b'{"version":1,"max_streams":"8"}', id="streams-string"),
    ],
)
def test_an_invalid_hello_terminates_the_connection(payload):
    """A HELLO that is not a JSON object, has an unsupported version or an out-of-range setting fails the connection."""
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, payload))
    assert mux.peer_settings is None
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "version",
    [
        pytest.param([1], id="array"),
        pytest.param({"v": 1}, id="object"),
        pytest.param([], id="empty-array"),
        pytest.param(None, id="null"),
        pytest.param(True, id="true"),
        pytest.param(1.0, id="float"),
    ],
)
def test_a_hello_whose_version_is_not_an_integer_terminates_the_connection_cleanly(version):
    """A version that is not a JSON integer is a protocol error (not a TypeError out of receive_data, not accepted)."""
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, json.dumps({"version": version}).encode()))
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


def test_a_deeply_nested_hello_terminates_the_connection_cleanly():
    """A HELLO nested thousands of levels deep is a protocol error, not a RecursionError out of receive_data."""
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, b"[" * 50_000 + b"]" * 50_000))
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


# Request and response.


def test_a_request_and_response_with_bodies_both_ways_completes_and_forgets_the_stream():
    """OPEN, request body, FIN; REPLY, response body, FIN: every event arrives, then both ends forget the stream."""
    pair = ready_pair()
    bridge, agent = pair.bridge, pair.agent
    stream_id = bridge.open_stream(POST)
    assert stream_id == 1
    bridge.send_data(stream_id, b"hello ")
    bridge.send_data(stream_id, b"world", end_stream=True)
    events = pair.send(bridge)
    assert events[0] == ev.StreamOpened(stream_id, POST, False)
    assert types(events) == [ev.StreamOpened, ev.DataReceived, ev.DataReceived, ev.StreamEnded]
    assert b"".join(bytes(e.data) for e in events[1:3]) == b"hello world"
    assert [e.flags for e in events[1:3]] == [0, 0]
    assert events[3] == ev.StreamEnded(stream_id)
    assert bridge.stream_ids() == [stream_id]
    assert agent.stream_ids() == [stream_id]

    agent.send_reply(stream_id, OK)
    agent.send_data(stream_id, b"response body")
    agent.end_stream(stream_id)
    assert agent.stream_ids() == []
    events = pair.send(agent)
    assert events == [
        ev.ReplyReceived(stream_id, OK, False),
        ev.DataReceived(stream_id, memoryview(b"response body"), 0),
        ev.StreamEnded(stream_id),
    ]
    assert bridge.stream_ids() == []
    assert bridge.open_stream_count() == agent.open_stream_count() == 0
    assert not bridge.pending_bytes and not agent.pending_bytes


def test_open_with_fin_and_reply_with_fin_need_no_data_frames():
    """A bodiless request and a bodiless response close the stream with two frames."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(GET, end_stream=True)
    assert pair.send(pair.bridge) == [ev.StreamOpened(stream_id, GET, True)]
    pair.agent.send_reply(stream_id, ResponseHead(204), end_stream=True)
    assert pair.send(pair.agent) == [ev.ReplyReceived(stream_id, ResponseHead(204), True)]
    assert pair.bridge.stream_ids() == pair.agent.stream_ids() == []


def test_the_agent_can_open_streams_to_the_bridge():
    """Streams work in the other direction too, with even ids."""
    pair = ready_pair()
    stream_id = pair.agent.open_stream(GET, end_stream=True)
    assert stream_id == 2
    assert pair.send(pair.agent) == [ev.StreamOpened(2, GET, True)]
    pair.bridge.send_reply(2, OK)
    pair.bridge.send_data(2, b"x", end_stream=True)
    assert types(pair.send(pair.bridge)) == [ev.ReplyReceived, ev.DataReceived, ev.StreamEnded]


def test_stream_ids_follow_the_role_parity():
    """The bridge opens 1, 3, 5, ...; the agent 2, 4, 6, ..."""
    pair = ready_pair()
    assert [pair.bridge.open_stream(GET) for _ in range(3)] == [1, 3, 5]
    assert [pair.agent.open_stream(GET) for _ in range(3)] == [2, 4, 6]
    pair.flush()
    assert pair.bridge.open_stream_count(local=True) == 3
    assert pair.bridge.open_stream_count(local=False) == 3
    assert sorted(pair.agent.stream_ids()) == [1, 2, 3, 4, 5, 6]


def test_many_concurrent_streams_interleave_without_mixing_data():
    """Fifty streams opened at once, bodies sent round robin both ways, each arrives intact and in order."""
    pair = ready_pair()
    bridge, agent = pair.bridge, pair.agent
    ids = [bridge.open_stream(RequestHead("PUT", f"/{i}")) for i in range(50)]
    for chunk in range(5):
        for n, stream_id in enumerate(ids):
            bridge.send_data(stream_id, f"req{n}.{chunk};".encode(), end_stream=chunk == 4)
    opened, received, ended = {}, {i: b"" for i in ids}, []
    for event in pair.send(bridge):
        if isinstance(event, ev.StreamOpened):
            opened[event.stream_id] = event.head.target
            agent.send_reply(event.stream_id, OK)
        elif isinstance(event, ev.DataReceived):
            received[event.stream_id] += bytes(event.data)
            agent.send_data(event.stream_id, b"<" + bytes(event.data) + b">")
        elif isinstance(event, ev.StreamEnded):
            ended.append(event.stream_id)
            agent.end_stream(event.stream_id)
    assert opened == {stream_id: f"/{n}" for n, stream_id in enumerate(ids)}
    assert sorted(ended) == ids
    for n, stream_id in enumerate(ids):
        assert received[stream_id] == b"".join(f"req{n}.{c};".encode() for c in range(5))
    responses = {i: b"" for i in ids}
    finished = set()
    for event in pair.send(agent):
        if isinstance(event, ev.DataReceived):
            responses[event.stream_id] += bytes(event.data)
        elif isinstance(event, ev.StreamEnded):
            finished.add(event.stream_id)
    assert finished == set(ids)
    for n, stream_id in enumerate(ids):
        assert responses[stream_id] == b"".join(f"<req{n}.{c};>".encode() for c in range(5))
    assert bridge.stream_ids() == agent.stream_ids() == []


@pytest.mark.parametrize("kind", list(MessageKind))
@pytest.mark.parametrize("more", [False, True])
def test_websocket_message_kind_and_more_flags_reach_the_peer(kind, more):
    """DataReceived.flags keeps the MessageKind bits and MORE so the far end rebuilds the same message."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(RequestHead("GET", "/ws", kind="websocket"))
    pair.flush()
    pair.agent.send_reply(stream_id, ResponseHead(101))
    flags = kind.flag_bits | (Flags.MORE if more else 0)
    pair.agent.send_data(stream_id, b"payload", flags=flags)
    pair.agent.send_data(stream_id, b"last", flags=kind.flag_bits, end_stream=True)
    events = pair.send(pair.agent)
    assert types(events) == [ev.ReplyReceived, ev.DataReceived, ev.DataReceived, ev.StreamEnded]
    assert events[1].flags == flags
    assert MessageKind.from_flags(events[1].flags) is kind
    assert bool(events[1].flags & Flags.MORE) is more
    assert events[2].flags == kind.flag_bits  # FIN itself is reported as StreamEnded, not as a flag
    assert MessageKind.from_flags(events[2].flags) is kind


def test_data_larger_than_the_peers_frame_size_is_refused_locally():
    """send_data never queues a payload the peer would reject as oversized."""
    pair = ready_pair(agent={"max_frame_size": 16_384})
    stream_id = pair.bridge.open_stream(POST)
    with pytest.raises(LocalProtocolError):
        pair.bridge.send_data(stream_id, b"x" * 16_385)
    pair.bridge.send_data(stream_id, b"x" * 16_384)
    events = pair.send(pair.bridge)
    assert types(events) == [ev.StreamOpened, ev.DataReceived]


def test_sending_on_an_unknown_stream_is_a_local_error():
    """send_data, send_reply and end_stream on a stream that is not open raise LocalProtocolError."""
    pair = ready_pair()
    with pytest.raises(LocalProtocolError):
        pair.bridge.send_data(9, b"x")
    with pytest.raises(LocalProtocolError):
        pair.agent.send_reply(1, OK)
    with pytest.raises(LocalProtocolError):
        pair.bridge.end_stream(1)


def test_the_responder_cannot_send_data_before_its_reply():
    """The mux enforces REPLY before the responder's body on the sending side too."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(GET)
    pair.flush()
    with pytest.raises(LocalProtocolError):
        pair.agent.send_data(stream_id, b"early")
    assert not pair.agent.pending_bytes


# Flow control.


def test_the_sender_cannot_exceed_the_window():
    """Credit runs down to 0 as DATA is queued; one more byte raises LocalProtocolError and queues nothing."""
    pair = ready_pair(agent={"stream_window": SMALL_WINDOW})
    bridge = pair.bridge
    stream_id = bridge.open_stream(POST)
    assert bridge.send_window(stream_id) == SMALL_WINDOW
    bridge.send_data(stream_id, b"a" * 30_000)
    assert bridge.send_window(stream_id) == 10_000
    bridge.send_data(stream_id, b"b" * 10_000)
    assert bridge.send_window(stream_id) == 0
    queued = bridge.pending_bytes
    with pytest.raises(LocalProtocolError):
        bridge.send_data(stream_id, b"c")
    assert bridge.pending_bytes == queued
    bridge.send_data(stream_id, b"")  # an empty frame costs no credit
    events = pair.send(bridge)
    assert sum(len(e.data) for e in events if isinstance(e, ev.DataReceived)) == SMALL_WINDOW
    assert not pair.agent.closed


def test_acknowledging_a_quarter_window_sends_window_and_grows_the_senders_credit():
    """Credit is returned only once a quarter window was consumed; the sender's window then grows by that much."""
    pair = ready_pair(agent={"stream_window": SMALL_WINDOW})
    bridge, agent = pair.bridge, pair.agent
    stream_id = bridge.open_stream(POST)
    bridge.send_data(stream_id, b"x" * 25_000)
    pair.send(bridge)
    assert bridge.send_window(stream_id) == 15_000

    agent.acknowledge_received_data(stream_id, 9_999)
    assert take(agent) == b""
    agent.acknowledge_received_data(stream_id, 1)
    frames = take_frames(agent)
    assert [(f.type, f.stream_id, bytes(f.payload)) for f in frames] == [
        (FrameType.WINDOW, stream_id, encode_u32(10_000)),
    ]
    bridge.receive_data(raw_frame(FrameType.WINDOW, 0, stream_id, encode_u32(10_000)))
    assert bridge.events_received() == [ev.WindowUpdated(stream_id, 10_000)]
    assert bridge.send_window(stream_id) == 25_000

    agent.acknowledge_received_data(stream_id, 15_000)
    assert pair.send(agent) == [ev.WindowUpdated(stream_id, 15_000)]
    assert bridge.send_window(stream_id) == SMALL_WINDOW


def test_a_stalled_sender_gets_credit_back_for_any_acknowledgement():
    """When the sender's credit is exhausted, even one acknowledged byte is returned at once."""
    pair = ready_pair(agent={"stream_window": SMALL_WINDOW})
    stream_id = pair.bridge.open_stream(POST)
    pair.bridge.send_data(stream_id, b"x" * SMALL_WINDOW)
    pair.send(pair.bridge)
    pair.agent.acknowledge_received_data(stream_id, 1)
    assert pair.send(pair.agent) == [ev.WindowUpdated(stream_id, 1)]
    assert pair.bridge.send_window(stream_id) == 1


def test_no_window_is_sent_after_the_peer_ended_its_half():
    """Once the peer sent FIN no more data can come, so acknowledging sends nothing."""
    pair = ready_pair(agent={"stream_window": SMALL_WINDOW})
    stream_id = pair.bridge.open_stream(POST)
    pair.bridge.send_data(stream_id, b"x" * SMALL_WINDOW, end_stream=True)
    pair.send(pair.bridge)
    pair.agent.acknowledge_received_data(stream_id, SMALL_WINDOW)
    assert not pair.agent.pending_bytes


def test_acknowledging_an_unknown_stream_is_ignored():
    """Acknowledging data of a stream that is gone is a no-op (the application may lag behind a reset)."""
    mux = ready_mux()
    mux.acknowledge_received_data(99, 1_000)
    assert not mux.pending_bytes


def test_a_peer_sending_beyond_the_window_terminates_with_flow_control_error():
    """DATA beyond the credit the peer was given is a connection error with FLOW_CONTROL_ERROR."""
    mux = ready_mux(stream_window=SMALL_WINDOW)
    responder_stream(mux)
    mux.receive_data(raw_frame(FrameType.DATA, 0, 1, b"x" * 30_000) + raw_frame(FrameType.DATA, 0, 1, b"y" * 10_001))
    events = mux.events_received()
    assert types(events) == [ev.DataReceived, ev.ConnectionTerminated]
    assert_terminated(mux, events, ErrorCode.FLOW_CONTROL_ERROR)


def test_a_window_increment_that_overflows_terminates_with_flow_control_error():
    """A WINDOW pushing the sender's credit above 2**31-1 is a FLOW_CONTROL_ERROR connection error."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    mux.receive_data(raw_frame(FrameType.WINDOW, 0, stream_id, encode_u32(2**31 - 1)))
    assert_terminated(mux, mux.events_received(), ErrorCode.FLOW_CONTROL_ERROR)


def test_a_zero_window_increment_terminates_with_flow_control_error():
    """A WINDOW of zero is a FLOW_CONTROL_ERROR connection error."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    mux.receive_data(raw_frame(FrameType.WINDOW, 0, stream_id, encode_u32(0)))
    assert_terminated(mux, mux.events_received(), ErrorCode.FLOW_CONTROL_ERROR)


def test_a_window_frame_with_a_bad_payload_resets_only_that_stream():
    """A WINDOW payload that is not 4 bytes resets that stream (FRAME_SIZE_ERROR or PROTOCOL_ERROR), nothing else."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    other = mux.open_stream(GET)
    take(mux)
    mux.receive_data(raw_frame(FrameType.WINDOW, 0, stream_id, b"\x00\x01"))
    assert_stream_reset_locally(mux, mux.events_received(), stream_id, MALFORMED)
    assert mux.stream_ids() == [other]


# RESET and stream ids.


def test_a_reset_by_the_opener_reaches_the_responder():
    """reset_stream queues RESET; the peer reports StreamReset(remote=True) with code and reason."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(POST)
    pair.flush()
    pair.bridge.reset_stream(stream_id, ErrorCode.CANCEL, "visitor left")
    assert pair.bridge.stream_ids() == []
    assert pair.send(pair.bridge) == [ev.StreamReset(stream_id, ErrorCode.CANCEL, "visitor left", remote=True)]
    assert pair.agent.stream_ids() == []


def test_a_reset_by_the_responder_reaches_the_opener():
    """The responder may reset too, with an agent-specific code."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(GET, end_stream=True)
    pair.flush()
    pair.agent.reset_stream(stream_id, ErrorCode.TARGET_UNREACHABLE, "connection refused")
    events = pair.send(pair.agent)
    assert events == [ev.StreamReset(stream_id, ErrorCode.TARGET_UNREACHABLE, "connection refused", remote=True)]
    assert events[0].code is ErrorCode.TARGET_UNREACHABLE
    assert pair.bridge.stream_ids() == []


def test_an_unknown_reset_code_is_reported_as_a_plain_int():
    """Reset codes this side does not know are passed up unchanged."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    mux.receive_data(raw_frame(FrameType.RESET, 0, stream_id, encode_code(0x4242, "?")))
    assert mux.events_received() == [ev.StreamReset(stream_id, 0x4242, "?", remote=True)]


def test_resetting_a_stream_that_is_gone_sends_nothing():
    """reset_stream on an unknown or already closed stream is a no-op."""
    pair = ready_pair()
    pair.bridge.reset_stream(7)
    stream_id = pair.bridge.open_stream(GET)
    pair.bridge.reset_stream(stream_id)
    take(pair.bridge)
    pair.bridge.reset_stream(stream_id)
    assert not pair.bridge.pending_bytes


def test_frames_in_flight_for_a_stream_the_receiver_reset_are_ignored():
    """DATA and FIN crossing our RESET on the wire are stale: no event, no output, connection fine."""
    pair = ready_pair()
    bridge, agent = pair.bridge, pair.agent
    stream_id = bridge.open_stream(POST)
    pair.flush()
    agent.reset_stream(stream_id, ErrorCode.REQUEST_REJECTED)
    bridge.send_data(stream_id, b"late body")
    bridge.end_stream(stream_id)
    assert pair.send(bridge) == []
    assert not agent.closed
    assert agent.pending_bytes == HEADER_SIZE + 2  # only our own RESET (code, no reason) is queued
    assert pair.send(agent) == [ev.StreamReset(stream_id, ErrorCode.REQUEST_REJECTED, "", remote=True)]
    assert bridge.stream_ids() == agent.stream_ids() == []


def test_frames_for_a_stream_this_side_opened_and_reset_are_ignored():
    """REPLY, DATA, WINDOW and RESET for one of our streams that we already reset are dropped silently."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    mux.reset_stream(stream_id)
    take(mux)
    mux.receive_data(
        raw_frame(FrameType.REPLY, 0, stream_id, REPLY)
        + raw_frame(FrameType.DATA, 0, stream_id, b"x")
        + raw_frame(FrameType.WINDOW, 0, stream_id, encode_u32(5))
        + raw_frame(FrameType.RESET, 0, stream_id, encode_code(ErrorCode.CANCEL))
    )
    assert mux.events_received() == []
    assert not mux.closed
    assert not mux.pending_bytes


def test_frames_for_a_finished_peer_stream_are_ignored():
    """A late RESET or WINDOW for a stream that closed normally is stale, not an error."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(GET, end_stream=True)
    pair.flush()
    pair.agent.send_reply(stream_id, OK, end_stream=True)
    pair.flush()
    pair.agent.receive_data(raw_frame(FrameType.WINDOW, 0, stream_id, encode_u32(1)))
    pair.agent.receive_data(raw_frame(FrameType.RESET, 0, stream_id, encode_code(ErrorCode.CANCEL)))
    assert pair.agent.events_received() == []
    assert not pair.agent.closed


@pytest.mark.parametrize(
    ("role", "stream_id"),
    [
        pytest.param(Role.AGENT, 1, id="peer-parity-never-opened"),
        pytest.param(Role.AGENT, 2, id="own-parity-never-opened"),
        pytest.param(Role.BRIDGE, 5, id="bridge-own-parity"),
        pytest.param(Role.BRIDGE, 4, id="bridge-peer-parity"),
    ],
)
@pytest.mark.parametrize("frame_type", [FrameType.DATA, FrameType.REPLY, FrameType.WINDOW, FrameType.RESET])
def test_frames_for_a_never_opened_stream_terminate_the_connection(role, stream_id, frame_type):
    """A stream frame naming an id that was never used is a connection error."""
    mux = ready_mux(role)
    if role is Role.BRIDGE:
        mux.open_stream(GET)  # 1 is used, 3 and 5 are not
        take(mux)
    payload = {FrameType.WINDOW: encode_u32(1), FrameType.RESET: b"\x00\x07", FrameType.REPLY: REPLY}
    mux.receive_data(raw_frame(frame_type, 0, stream_id, payload.get(frame_type, b"x")))
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("role", "stream_id"),
    [
        pytest.param(Role.AGENT, 2, id="agent-receives-even"),
        pytest.param(Role.BRIDGE, 1, id="bridge-receives-odd"),
    ],
)
def test_an_open_with_the_wrong_parity_terminates_the_connection(role, stream_id):
    """The peer may only open ids of its own parity."""
    mux = ready_mux(role)
    mux.receive_data(raw_frame(FrameType.OPEN, 0, stream_id, HEAD))
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("close_first", [False, True])
def test_an_open_reusing_a_stream_id_terminates_the_connection(close_first):
    """Reopening an id, whether still open or already closed, is a connection error."""
    mux = ready_mux()
    responder_stream(mux, 3, fin=True)
    if close_first:
        mux.send_reply(3, OK, end_stream=True)
        assert mux.stream_ids() == []
    take(mux)
    mux.receive_data(raw_frame(FrameType.OPEN, 0, 3, HEAD))
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


def test_an_open_with_a_lower_id_than_before_terminates_the_connection():
    """Peer stream ids must increase."""
    mux = ready_mux()
    responder_stream(mux, 7)
    mux.receive_data(raw_frame(FrameType.OPEN, 0, 5, HEAD))
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


def test_skipping_stream_ids_is_allowed():
    """Ids need not be consecutive, only increasing; skipped ids become stale."""
    mux = ready_mux()
    responder_stream(mux, 9)
    mux.receive_data(raw_frame(FrameType.DATA, 0, 3, b"late"))
    assert mux.events_received() == []
    assert not mux.closed


def test_streams_beyond_max_streams_are_refused_and_the_others_keep_working():
    """The stream over the limit gets RESET REFUSED_STREAM; the connection and the other streams are fine."""
    pair = ready_pair(agent={"max_streams": 2})
    bridge, agent = pair.bridge, pair.agent
    first, second, third = (bridge.open_stream(GET) for _ in range(3))
    events = pair.send(bridge)
    assert [e.stream_id for e in events if isinstance(e, ev.StreamOpened)] == [first, second]
    assert not agent.closed
    assert pair.send(agent) == [ev.StreamReset(third, ErrorCode.REFUSED_STREAM, "too many streams", remote=True)]
    assert sorted(bridge.stream_ids()) == [first, second]

    bridge.send_data(first, b"still fine", end_stream=True)
    assert types(pair.send(bridge)) == [ev.DataReceived, ev.StreamEnded]
    agent.send_reply(first, OK, end_stream=True)
    pair.flush()
    fourth = bridge.open_stream(GET)  # a slot is free again
    assert types(pair.send(bridge)) == [ev.StreamOpened]
    assert sorted(agent.stream_ids()) == [second, fourth]


def test_can_open_stream_respects_the_peers_stream_limit():
    """can_open_stream turns False once the peer's max_streams of our streams are open."""
    pair = ready_pair(agent={"max_streams": 2})
    pair.bridge.open_stream(GET)
    assert pair.bridge.can_open_stream()
    pair.bridge.open_stream(GET)
    assert not pair.bridge.can_open_stream()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"{bad json", id="not-json"),
        pytest.param(b'{"m":"GET"}', id="no-target"),
        pytest.param(b'{"m":"GET","t":"/","k":"gopher"}', id="unknown-kind"),
        pytest.param(b'{"m":"GET","t":"/","h":[["a"]]}', id="bad-header"),
    ],
)
def test_a_bad_head_in_open_resets_that_stream_and_keeps_the_connection(payload):
    """An OPEN whose head does not decode is answered with RESET PROTOCOL_ERROR; later streams work."""
    mux = ready_mux()
    mux.receive_data(raw_frame(FrameType.OPEN, 0, 1, payload) + raw_frame(FrameType.DATA, 0, 1, b"body"))
    assert ev.StreamOpened not in types(mux.events_received())
    assert not mux.closed
    frames = take_frames(mux)
    assert [(f.type, f.stream_id) for f in frames] == [(FrameType.RESET, 1)]
    assert decode_code(frames[0].payload)[0] == ErrorCode.PROTOCOL_ERROR
    responder_stream(mux, 3)


def test_a_deeply_nested_head_in_open_resets_that_stream_and_keeps_the_connection():
    """A hostile, deeply nested OPEN head must not raise RecursionError out of receive_data."""
    mux = ready_mux()
    mux.receive_data(raw_frame(FrameType.OPEN, 0, 1, b'{"h":' + b"[" * 50_000 + b"]" * 50_000 + b"}"))
    assert not mux.closed
    frames = take_frames(mux)
    assert [(f.type, f.stream_id) for f in frames] == [(FrameType.RESET, 1)]


def test_a_bad_head_in_reply_resets_that_stream_with_protocol_error():
    """A REPLY head that does not decode resets the stream, not the connection."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    take(mux)
    mux.receive_data(raw_frame(FrameType.REPLY, 0, stream_id, b'{"s":1000}'))
    assert_stream_reset_locally(mux, mux.events_received(), stream_id, ErrorCode.PROTOCOL_ERROR)


def test_a_second_reply_resets_the_stream_with_stream_closed():
    """REPLY twice from the peer is a stream error STREAM_CLOSED."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = opener_stream_with_reply(mux)
    mux.receive_data(raw_frame(FrameType.REPLY, 0, stream_id, REPLY))
    assert_stream_reset_locally(mux, mux.events_received(), stream_id, ErrorCode.STREAM_CLOSED)


def test_data_before_reply_from_the_responder_resets_the_stream():
    """The responder's DATA must follow its REPLY."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    take(mux)
    mux.receive_data(raw_frame(FrameType.DATA, 0, stream_id, b"early"))
    assert_stream_reset_locally(mux, mux.events_received(), stream_id, ErrorCode.STREAM_CLOSED)


def test_a_reply_from_the_opener_resets_the_stream():
    """The side that opened a stream must not REPLY on it."""
    mux = ready_mux()
    responder_stream(mux)
    mux.receive_data(raw_frame(FrameType.REPLY, 0, 1, REPLY))
    assert_stream_reset_locally(mux, mux.events_received(), 1, ErrorCode.STREAM_CLOSED)


def test_data_after_fin_resets_the_stream_and_later_frames_are_stale():
    """DATA after the peer's FIN resets the stream with STREAM_CLOSED; what follows for it is ignored."""
    mux = ready_mux()
    responder_stream(mux, fin=True)
    mux.receive_data(raw_frame(FrameType.DATA, 0, 1, b"more"))
    assert_stream_reset_locally(mux, mux.events_received(), 1, ErrorCode.STREAM_CLOSED)
    mux.receive_data(raw_frame(FrameType.DATA, 0, 1, b"even more"))
    assert mux.events_received() == []
    assert not mux.pending_bytes


def test_a_stream_error_does_not_disturb_other_frames_in_the_same_message():
    """Frames after a stream-confined fault in the same message are still processed."""
    mux = ready_mux()
    responder_stream(mux, 1, fin=True)
    mux.receive_data(
        raw_frame(FrameType.DATA, 0, 1, b"bad")
        + raw_frame(FrameType.OPEN, 0, 3, HEAD)
        + raw_frame(FrameType.DATA, 0, 3, b"good")
    )
    events = mux.events_received()
    assert types(events) == [ev.StreamReset, ev.StreamOpened, ev.DataReceived]
    assert bytes(events[2].data) == b"good"


def test_a_reset_frame_without_a_code_resets_the_stream_locally():
    """A RESET too short to carry a code is a stream error, not a crash nor a connection error."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(GET)
    take(mux)
    mux.receive_data(raw_frame(FrameType.RESET, 0, stream_id, b"\x07"))
    events = mux.events_received()
    assert not mux.closed
    assert stream_id not in mux.stream_ids()
    assert types(events) == [ev.StreamReset]


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw_frame(FrameType.PING, 0, 1, b"x"), id="ping-on-stream"),
        pytest.param(raw_frame(FrameType.PONG, 0, 1, b"x"), id="pong-on-stream"),
        pytest.param(raw_frame(FrameType.GOAWAY, 0, 1, b"\x00\x00"), id="goaway-on-stream"),
        pytest.param(raw_frame(FrameType.HELLO, 0, 1, b"{}"), id="hello-on-stream"),
        pytest.param(raw_frame(FrameType.OPEN, 0, 0, HEAD), id="open-on-stream-0"),
        pytest.param(raw_frame(FrameType.DATA, 0, 0, b"x"), id="data-on-stream-0"),
        pytest.param(raw_frame(FrameType.WINDOW, 0, 0, encode_u32(1)), id="window-on-stream-0"),
        pytest.param(raw_frame(FrameType.RESET, 0, 0, b"\x00\x00"), id="reset-on-stream-0"),
        pytest.param(raw_frame(FrameType.REPLY, 0, 0, REPLY), id="reply-on-stream-0"),
    ],
)
def test_frames_on_the_wrong_kind_of_stream_terminate_the_connection(frame):
    """Connection frames on a stream, or stream frames on stream 0, are connection errors."""
    mux = ready_mux()
    responder_stream(mux)
    mux.receive_data(frame)
    assert_terminated(mux, mux.events_received(), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"\x03\x00\x00", id="truncated-header"),
        pytest.param(raw_frame(FrameType.DATA, 0, 1, b"abc")[:-1], id="truncated-payload"),
        pytest.param(raw_frame(0x0C, 0, 0, b""), id="unknown-type"),
    ],
)
def test_unparsable_bytes_terminate_the_connection(message):
    """Bytes that are not frames (truncated, unknown type) end the connection with a GOAWAY."""
    mux = ready_mux()
    mux.receive_data(message)
    assert_terminated(mux, mux.events_received(), MALFORMED)


def test_a_frame_above_our_max_frame_size_terminates_the_connection():
    """A payload larger than the max_frame_size this side announced is FRAME_SIZE_ERROR."""
    mux = ready_mux(max_frame_size=16_384)
    responder_stream(mux)
    mux.receive_data(raw_frame(FrameType.DATA, 0, 1, b"x" * 16_385))
    assert_terminated(mux, mux.events_received(), ErrorCode.FRAME_SIZE_ERROR)


def test_frames_before_a_malformed_one_in_the_same_message_are_delivered():
    """A bad frame ends the connection, but the good frames before it already produced events."""
    mux = ready_mux()
    mux.receive_data(raw_frame(FrameType.PING, 0, 0, b"p") + b"\x06\x00\x00")
    events = mux.events_received()
    assert types(events) == [ev.PingReceived, ev.ConnectionTerminated]
    frames = take_frames(mux)
    assert [f.type for f in frames] == [FrameType.PONG, FrameType.GOAWAY]


def test_an_empty_message_terminates_the_connection():
    """A WebSocket message without any frame is a protocol violation."""
    mux = ready_mux()
    mux.receive_data(b"")
    assert_terminated(mux, mux.events_received(), MALFORMED)


# PING, GOAWAY, fail.


@pytest.mark.parametrize("payload", [b"", b"12345678", bytes(range(256))])
def test_a_ping_is_answered_with_a_pong_carrying_the_same_payload(payload):
    """PING → PingReceived on the peer, a PONG back with the same bytes, PongReceived here."""
    pair = ready_pair()
    pair.bridge.ping(payload)
    assert pair.send(pair.bridge) == [ev.PingReceived(payload)]
    frames = parse(b"".join(pair.agent.data_to_send()))
    assert [(f.type, f.stream_id, bytes(f.payload)) for f in frames] == [(FrameType.PONG, 0, payload)]
    pair.bridge.receive_data(b"".join(raw_frame(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in frames))
    assert pair.bridge.events_received() == [ev.PongReceived(payload)]


def test_goaway_closes_both_ends_and_reports_connection_terminated_remotely():
    """goaway() closes this end; the peer reports ConnectionTerminated(remote=True) with code and reason."""
    pair = ready_pair()
    pair.bridge.open_stream(GET)
    pair.flush()
    pair.bridge.goaway(ErrorCode.NO_ERROR, "shutting down")
    assert pair.bridge.closed
    assert pair.bridge.error is None
    assert not pair.bridge.can_open_stream()
    events = pair.send(pair.bridge)
    assert events == [ev.ConnectionTerminated(ErrorCode.NO_ERROR, "shutting down", remote=True)]
    assert pair.agent.closed
    assert pair.agent.error is None
    assert not pair.agent.pending_bytes  # no GOAWAY is sent back
    with pytest.raises(LocalProtocolError):
        pair.agent.open_stream(GET)


def test_goaway_is_sent_only_once():
    """A second goaway(), or ping() after it, queues nothing."""
    mux = ready_mux()
    mux.goaway(ErrorCode.INTERNAL_ERROR, "boom")
    mux.goaway()
    mux.ping(b"x")
    frames = take_frames(mux)
    assert [f.type for f in frames] == [FrameType.GOAWAY]
    assert decode_code(frames[0].payload) == (ErrorCode.INTERNAL_ERROR, "boom")


def test_a_goaway_with_an_unknown_code_is_reported_as_a_plain_int():
    """GOAWAY codes this side does not know are passed up unchanged."""
    mux = ready_mux()
    mux.receive_data(raw_frame(FrameType.GOAWAY, 0, 0, encode_code(0x99, "?")))
    assert mux.events_received() == [ev.ConnectionTerminated(0x99, "?", remote=True)]


def test_a_goaway_without_a_code_terminates_the_connection_locally():
    """A GOAWAY payload too short for a code is itself a protocol error."""
    mux = ready_mux()
    mux.receive_data(raw_frame(FrameType.GOAWAY, 0, 0, b"\x00"))
    assert_terminated(mux, mux.events_received(), MALFORMED)


def test_frames_after_goaway_in_the_same_message_are_ignored():
    """Nothing after the peer's GOAWAY is processed."""
    mux = ready_mux()
    mux.receive_data(raw_frame(FrameType.GOAWAY, 0, 0, b"\x00\x00") + raw_frame(FrameType.PING, 0, 0, b"x"))
    assert types(mux.events_received()) == [ev.ConnectionTerminated]
    assert not mux.pending_bytes


def test_fail_reports_the_transport_detected_error_and_queues_goaway():
    """fail(err) ends the connection like a parsed violation: GOAWAY with err's code, local ConnectionTerminated."""
    mux = ready_mux()
    error = RemoteProtocolError("text message on the tunnel")
    mux.fail(error)
    assert mux.error is error
    events = mux.events_received()
    assert events == [ev.ConnectionTerminated(ErrorCode.PROTOCOL_ERROR, "text message on the tunnel", remote=False)]
    assert_terminated(mux, events, ErrorCode.PROTOCOL_ERROR)
    mux.fail(RemoteProtocolError("again"))
    assert mux.error is error
    assert mux.events_received() == []


def test_receive_data_after_close_is_a_no_op():
    """Once closed, receive_data produces no event and no output."""
    for close in ("goaway", "fail", "remote-goaway"):
        mux = ready_mux()
        responder_stream(mux)
        if close == "goaway":
            mux.goaway()
        elif close == "fail":
            mux.fail(RemoteProtocolError("x"))
        else:
            mux.receive_data(raw_frame(FrameType.GOAWAY, 0, 0, b"\x00\x00"))
        mux.events_received()
        take(mux)
        mux.receive_data(raw_frame(FrameType.PING, 0, 0, b"x") + raw_frame(FrameType.DATA, 0, 1, b"data"))
        mux.receive_data(b"garbage")
        assert mux.events_received() == []
        assert not mux.pending_bytes


# Empty DATA.


def test_empty_data_without_fin_is_delivered_as_an_empty_message():
    """An empty DATA frame without FIN is an empty WebSocket message and reaches the application."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(RequestHead("GET", "/ws", kind="websocket"))
    pair.bridge.send_data(stream_id, b"", flags=MessageKind.TEXT.flag_bits)
    events = pair.send(pair.bridge)
    assert types(events) == [ev.StreamOpened, ev.DataReceived]
    assert bytes(events[1].data) == b""
    assert MessageKind.from_flags(events[1].flags) is MessageKind.TEXT
    assert pair.agent.stream_ids() == [stream_id]


def test_empty_data_with_fin_only_ends_the_stream():
    """end_stream sends an empty DATA with FIN, reported as StreamEnded alone."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(POST)
    pair.bridge.send_data(stream_id, b"body")
    pair.bridge.end_stream(stream_id)
    frames = parse(b"".join(pair.bridge.data_to_send()))
    assert (frames[-1].type, frames[-1].flags, len(frames[-1].payload)) == (FrameType.DATA, Flags.FIN, 0)
    pair.agent.receive_data(b"".join(raw_frame(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in frames))
    events = pair.agent.events_received()
    assert types(events) == [ev.StreamOpened, ev.DataReceived, ev.StreamEnded]


def test_data_with_fin_gives_data_then_stream_ended():
    """A non-empty DATA with FIN yields DataReceived (without FIN in flags) then StreamEnded."""
    pair = ready_pair()
    stream_id = pair.bridge.open_stream(POST)
    pair.bridge.send_data(stream_id, b"all", end_stream=True)
    events = pair.send(pair.bridge)
    assert events[1:] == [ev.DataReceived(stream_id, memoryview(b"all"), 0), ev.StreamEnded(stream_id)]


# data_to_send.


def test_data_to_send_is_empty_when_nothing_is_queued():
    """No output queued: an empty list, not an empty message."""
    mux = ready_mux()
    assert mux.data_to_send() == []
    assert mux.data_to_send(100) == []
    assert mux.pending_bytes == 0


def test_data_to_send_with_max_bytes_cuts_at_frame_boundaries():
    """Each bounded message holds whole frames; the pieces joined equal the unbounded output."""
    reference = ready_mux(Role.BRIDGE)
    cut = ready_mux(Role.BRIDGE)
    for mux in (reference, cut):
        for _ in range(3):
            stream_id = mux.open_stream(POST)
            mux.send_data(stream_id, b"a" * 100)
            mux.send_data(stream_id, b"b" * 5)
            mux.ping(b"p")
    whole = take(reference)
    assert cut.pending_bytes == len(whole)
    pieces = []
    while cut.pending_bytes:
        before = cut.pending_bytes
        message = take(cut, max_bytes=120)
        assert message
        frames = list(iter_frames(message, 1 << 20))  # whole frames only: parses to the end
        assert frames
        # It stops after the frame that reaches the limit.
        assert len(message) - (HEADER_SIZE + len(frames[-1].payload)) < 120
        assert cut.pending_bytes == before - len(message)
        pieces.append(message)
    assert len(pieces) > 1
    assert b"".join(pieces) == whole


def test_data_to_send_returns_at_least_one_frame_even_if_it_exceeds_max_bytes():
    """A single frame larger than max_bytes is still returned whole."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(POST)
    mux.send_data(stream_id, b"x" * 1000)
    first = take(mux, max_bytes=1)
    assert [f.type for f in parse(first)] == [FrameType.OPEN]
    second = take(mux, max_bytes=1)
    assert [(f.type, len(f.payload)) for f in parse(second)] == [(FrameType.DATA, 1000)]
    assert mux.pending_bytes == 0


def test_data_to_send_returns_header_and_payload_buffers_without_copying():
    """DATA payloads are queued by reference: the buffers returned include the caller's bytes object."""
    mux = ready_mux(Role.BRIDGE)
    stream_id = mux.open_stream(POST)
    take(mux)
    body = b"y" * 4096
    mux.send_data(stream_id, body)
    buffers = mux.data_to_send()
    assert len(buffers) == 2
    assert len(buffers[0]) == HEADER_SIZE
    assert buffers[1] is body
