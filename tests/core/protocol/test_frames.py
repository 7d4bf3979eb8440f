"""Binary frame encoding: golden vectors, iter_frames, error codes and message kinds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_core.exceptions import FrameError, RemoteProtocolError
from rproxy_core.protocol import ErrorCode, Flags, FrameType, MessageKind, Multiplexer, Role
from rproxy_core.protocol.frames import (
    HEADER_SIZE,
    decode_code,
    decode_u32,
    encode_code,
    encode_header,
    encode_u32,
    iter_frames,
)

from .helpers import raw_frame, raw_hello, take

LIMIT = 1 << 20

PING_PAYLOAD = b"\x01\x02\x03\x04\x05\x06\x07\x08"
GOLDEN = [
    pytest.param(
        FrameType.PING,
        0,
        0,
        PING_PAYLOAD,
        b"\x06\x00\x00\x00\x00\x00\x00\x00\x00\x08" + PING_PAYLOAD,
        id="ping",
    ),
    pytest.param(
        FrameType.DATA,
        Flags.FIN,
        1,
        b"hi",
        b"\x03\x01\x00\x00\x00\x01\x00\x00\x00\x02hi",
        id="data-fin",
    ),
    pytest.param(
        FrameType.DATA,
        Flags.MORE | MessageKind.TEXT.flag_bits,
        0x01020304,
        b"",
        b"\x03\x12\x01\x02\x03\x04\x00\x00\x00\x00",
        id="data-text-more-empty",
    ),
    pytest.param(
        FrameType.WINDOW,
        0,
        3,
        b"\x00\x01\x00\x00",
        b"\x04\x00\x00\x00\x00\x03\x00\x00\x00\x04\x00\x01\x00\x00",
        id="window",
    ),
    pytest.param(
        FrameType.RESET,
        0,
        5,
        b"\x00\x07x",
        b"\x05\x00\x00\x00\x00\x05\x00\x00\x00\x03\x00\x07x",
        id="reset",
    ),
    pytest.param(
        FrameType.GOAWAY,
        0,
        0,
        b"\x00\x01",
        b"\x08\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01",
        id="goaway",
    ),
    pytest.param(
        FrameType.OPEN,
        0,
        0xFFFFFFFF,
        b"{}",
        b"\x01\x00\xff\xff\xff\xff\x00\x00\x00\x02{}",
        id="open-max-stream-id",
    ),
]


@pytest.mark.parametrize(("frame_type", "flags", "stream_id", "payload", "wire"), GOLDEN)
def test_frames_encode_to_the_documented_bytes(frame_type, flags, stream_id, payload, wire):
    """A header plus payload is exactly the golden byte vector of docs/PROTOCOL.md §2."""
    assert encode_header(frame_type, flags, stream_id, len(payload)) + payload == wire


@pytest.mark.parametrize(("frame_type", "flags", "stream_id", "payload", "wire"), GOLDEN)
def test_golden_vectors_decode_back_to_their_fields(frame_type, flags, stream_id, payload, wire):
    """iter_frames turns each golden vector back into the frame it encodes."""
    (frame,) = iter_frames(wire, LIMIT)
    assert (frame.type, frame.flags, frame.stream_id, bytes(frame.payload)) == (
        frame_type,
        flags,
        stream_id,
        payload,
    )
    assert frame.type is frame_type


def test_header_is_ten_bytes():
    """Every frame header is 10 bytes: type, flags, stream id, payload length."""
    assert HEADER_SIZE == 10


def test_multiplexer_ping_and_reset_produce_the_golden_bytes():
    """The Multiplexer's own PING, RESET and GOAWAY output matches the golden vectors."""
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    mux.receive_data(raw_hello())
    mux.events_received()
    take(mux)
    mux.ping(PING_PAYLOAD)
    assert take(mux) == b"\x06\x00\x00\x00\x00\x00\x00\x00\x00\x08" + PING_PAYLOAD
    from rproxy_core.protocol import RequestHead

    stream_id = mux.open_stream(RequestHead("GET", "/"))
    take(mux)
    mux.reset_stream(stream_id, ErrorCode.CANCEL, "x")
    assert take(mux) == b"\x05\x00\x00\x00\x00\x01\x00\x00\x00\x03\x00\x07x"
    mux.goaway(ErrorCode.PROTOCOL_ERROR)
    assert take(mux) == b"\x08\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"


def test_multiplexer_hello_is_a_type_zero_frame_on_stream_zero():
    """send_hello queues one HELLO frame on stream 0 whose payload is the JSON settings."""
    mux = Multiplexer(Role.AGENT)
    mux.send_hello(name="home")
    wire = take(mux)
    assert wire[:6] == b"\x00\x00\x00\x00\x00\x00"
    (frame,) = iter_frames(wire, LIMIT)
    assert frame.type is FrameType.HELLO
    assert b'"name":"home"' in bytes(frame.payload)


def test_iter_frames_yields_every_frame_of_a_message_in_order():
    """Several frames packed back to back in one message come out one by one, in order."""
    message = (
        raw_frame(FrameType.PING, 0, 0, b"abc")
        + raw_frame(FrameType.DATA, Flags.FIN, 7, b"")
        + raw_frame(FrameType.WINDOW, 0, 9, encode_u32(5))
        + raw_frame(FrameType.PONG, 0, 0, b"z" * 300)
    )
    frames = list(iter_frames(message, LIMIT))
    assert [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in frames] == [
        (FrameType.PING, 0, 0, b"abc"),
        (FrameType.DATA, Flags.FIN, 7, b""),
        (FrameType.WINDOW, 0, 9, b"\x00\x00\x00\x05"),
        (FrameType.PONG, 0, 0, b"z" * 300),
    ]


def test_iter_frames_payload_is_a_view_into_the_message():
    """Payloads are memoryviews into the received buffer, not copies."""
    message = bytearray(raw_frame(FrameType.DATA, 0, 1, b"abcd"))
    (frame,) = iter_frames(message, LIMIT)
    assert isinstance(frame.payload, memoryview)
    message[HEADER_SIZE] = ord("X")
    assert bytes(frame.payload) == b"Xbcd"


@pytest.mark.parametrize("message", [b"", bytearray(), memoryview(b"")])
def test_iter_frames_rejects_an_empty_message(message):
    """An empty WebSocket message carries no frame and is a FrameError."""
    with pytest.raises(FrameError):
        list(iter_frames(message, LIMIT))


@pytest.mark.parametrize("cut", range(1, HEADER_SIZE))
def test_iter_frames_rejects_a_truncated_header(cut):
    """Fewer than 10 bytes left where a header should start is a FrameError."""
    with pytest.raises(FrameError, match="header"):
        list(iter_frames(raw_frame(FrameType.PING, 0, 0, b"12345678")[:cut], LIMIT))


def test_iter_frames_rejects_a_truncated_payload():
    """A payload shorter than the header's length field is a FrameError."""
    wire = raw_frame(FrameType.DATA, 0, 1, b"abcdef")[:-1]
    with pytest.raises(FrameError, match="payload"):
        list(iter_frames(wire, LIMIT))


def test_iter_frames_yields_good_frames_before_the_bad_one():
    """Frames before a malformed one have already been yielded when FrameError is raised."""
    message = raw_frame(FrameType.PING, 0, 0, b"a") + raw_frame(FrameType.PONG, 0, 0, b"b") + b"\x06\x00"
    seen = []
    with pytest.raises(FrameError):
        for frame in iter_frames(message, LIMIT):
            seen.append(bytes(frame.payload))
    assert seen == [b"a", b"b"]


@pytest.mark.parametrize("raw_type", [0x09, 0x0F, 0x80, 0xFF])
def test_iter_frames_rejects_an_unknown_frame_type(raw_type):
    """A type byte naming no FrameType is a FrameError (a connection error)."""
    with pytest.raises(FrameError, match="unknown frame type"):
        list(iter_frames(raw_frame(raw_type, 0, 0, b""), LIMIT))


def test_iter_frames_rejects_an_oversized_payload_before_reading_it():
    """A length above max_payload is a FrameError with FRAME_SIZE_ERROR, even if the bytes are absent."""
    with pytest.raises(FrameError) as info:
        list(iter_frames(encode_header(FrameType.DATA, 0, 1, 1025), 1024))
    assert info.value.error_code == ErrorCode.FRAME_SIZE_ERROR
    assert isinstance(info.value, RemoteProtocolError)


def test_iter_frames_accepts_a_payload_of_exactly_max_payload():
    """The limit is inclusive: a payload of exactly max_payload bytes is fine."""
    (frame,) = iter_frames(raw_frame(FrameType.DATA, 0, 1, b"x" * 1024), 1024)
    assert len(frame.payload) == 1024


def test_frame_error_defaults_to_frame_size_error_code():
    """FrameError goes on the wire as FRAME_SIZE_ERROR unless told otherwise."""
    assert FrameError("x").error_code == ErrorCode.FRAME_SIZE_ERROR


@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from(list(FrameType)),
            st.integers(0, 255),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=200, deadline=None, database=None)
def test_any_sequence_of_encoded_frames_decodes_back_exactly(frames):
    """Encoding any frames back to back and decoding the message gives the same frames."""
    message = b"".join(encode_header(t, f, s, len(p)) + p for t, f, s, p in frames)
    decoded = [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in iter_frames(message, 64)]
    assert decoded == frames


@given(data=st.binary(max_size=64), limit=st.integers(0, 64))
@settings(max_examples=300, deadline=None, database=None)
def test_iter_frames_raises_only_frame_error_on_arbitrary_bytes(data, limit):
    """Whatever the bytes, iter_frames either yields frames or raises FrameError, nothing else."""
    try:
        for frame in iter_frames(data, limit):
            assert len(frame.payload) <= limit
    except FrameError:
        pass


@given(code=st.integers(0, 0xFFFF), reason=st.text(max_size=30))
@settings(max_examples=200, deadline=None, database=None)
def test_encode_code_and_decode_code_round_trip(code, reason):
    """A code and a short reason survive encode_code/decode_code unchanged."""
    if len(reason.encode("utf-8", "replace")) > 123:
        reason = reason[:10]
    assert decode_code(encode_code(code, reason)) == (code, reason)


def test_encode_code_is_a_big_endian_uint16_then_utf8():
    """The payload is the uint16 code in network order followed by the UTF-8 reason."""
    assert encode_code(0x1234, "é") == b"\x12\x34\xc3\xa9"
    assert encode_code(ErrorCode.NO_ERROR) == b"\x00\x00"


def test_encode_code_truncates_long_reasons_to_123_bytes():
    """Reasons are cut to 123 bytes so a CLOSE payload fits a WebSocket control frame."""
    payload = encode_code(1000, "r" * 500)
    assert len(payload) == 125
    assert decode_code(payload) == (1000, "r" * 123)


def test_decode_code_tolerates_invalid_utf8_in_the_reason():
    """A reason that is not UTF-8 is decoded with replacement characters, not an exception."""
    code, reason = decode_code(b"\x00\x07\xff\xfe")
    assert code == ErrorCode.CANCEL
    assert "\ufffd" in reason


@pytest.mark.parametrize("payload", [b"", b"\x00", memoryview(b"\x01")])
def test_decode_code_rejects_a_payload_shorter_than_the_code(payload):
    """Fewer than two bytes cannot hold the code: FrameError."""
    with pytest.raises(FrameError):
        decode_code(payload)


@pytest.mark.parametrize("value", [0, 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_encode_u32_and_decode_u32_round_trip(value):
    """WINDOW increments round trip through their 4-byte big-endian encoding."""
    assert decode_u32(encode_u32(value)) == value
    assert len(encode_u32(value)) == 4


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_decode_u32_rejects_a_payload_that_is_not_four_bytes(payload):
    """A WINDOW payload of any other length is a FrameError."""
    with pytest.raises(FrameError):
        decode_u32(payload)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_message_kind_flag_bits_round_trip(kind):
    """Each kind's bits, OR-ed with FIN and MORE, read back as the same kind."""
    assert kind.flag_bits == kind.value << 4
    assert kind.flag_bits & (Flags.FIN | Flags.MORE) == 0
    for extra in (0, Flags.FIN, Flags.MORE, Flags.FIN | Flags.MORE):
        assert MessageKind.from_flags(kind.flag_bits | extra) is kind


def test_message_kind_ignores_the_high_bit():
    """Only bits 4-6 name the kind; bit 7 is not part of it."""
    assert MessageKind.from_flags(0x80 | MessageKind.TEXT.flag_bits) is MessageKind.TEXT


@pytest.mark.parametrize("value", [5, 6, 7])
def test_message_kind_rejects_unknown_bits(value):
    """Bits 4-6 naming no MessageKind are a FrameError."""
    with pytest.raises(FrameError):
        MessageKind.from_flags(value << 4)


def test_error_code_coerce_keeps_unknown_codes_as_ints():
    """Known codes become ErrorCode members; unknown ones stay plain ints."""
    assert ErrorCode.coerce(7) is ErrorCode.CANCEL
    unknown = ErrorCode.coerce(0x1234)
    assert unknown == 0x1234
    assert not isinstance(unknown, ErrorCode)
