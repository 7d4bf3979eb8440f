"""The stream lifecycle table of rproxy_core.protocol.stream."""

from __future__ import annotations

import pytest

from rproxy_core.exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError
from rproxy_core.protocol.stream import StreamInput as I
from rproxy_core.protocol.stream import StreamState as S
from rproxy_core.protocol.stream import StreamStateMachine

LOCAL = {I.SEND_OPEN, I.SEND_REPLY, I.SEND_DATA, I.SEND_FIN, I.SEND_RESET}


def machine(*inputs: I) -> StreamStateMachine:
    """A state machine that went through ``inputs``."""
    m = StreamStateMachine()
    for event in inputs:
        m.process(event)
    return m


def expect_violation(m: StreamStateMachine, event: I) -> ProtocolError:
    """Assert that ``event`` is refused with the right exception and leaves the state alone."""
    before = (m.state, m.opened_locally, m.reply_sent, m.reply_received)
    expected = LocalProtocolError if event in LOCAL else RemoteProtocolError
    with pytest.raises(expected) as info:
        m.process(event)
    assert (m.state, m.opened_locally, m.reply_sent, m.reply_received) == before
    if event not in LOCAL:
        assert info.value.error_code == 4  # STREAM_CLOSED
    else:
        assert not isinstance(info.value, RemoteProtocolError)
    return info.value


#: Ways to reach each state, from either end of the stream.
REACH = {
    "idle": (),
    "open-opener": (I.SEND_OPEN,),
    "open-responder": (I.RECV_OPEN,),
    "half-closed-local-opener": (I.SEND_OPEN, I.SEND_FIN),
    "half-closed-local-responder": (I.RECV_OPEN, I.SEND_REPLY, I.SEND_FIN),
    "half-closed-remote-opener": (I.SEND_OPEN, I.RECV_REPLY, I.RECV_FIN),
    "half-closed-remote-responder": (I.RECV_OPEN, I.RECV_FIN),
    "closed-opener": (I.SEND_OPEN, I.SEND_FIN, I.RECV_REPLY, I.RECV_FIN),
    "closed-responder": (I.RECV_OPEN, I.RECV_FIN, I.SEND_REPLY, I.SEND_FIN),
}


def test_a_new_stream_is_idle():
    """A fresh stream is IDLE, opened by nobody, with no REPLY either way."""
    m = StreamStateMachine()
    assert (m.state, m.opened_locally, m.reply_sent, m.reply_received) == (S.IDLE, False, False, False)


def test_the_opener_goes_through_a_normal_request_response_life():
    """OPEN, body, FIN, then REPLY, body, FIN from the peer: OPEN → HALF_CLOSED_LOCAL → CLOSED."""
    m = StreamStateMachine()
    assert m.process(I.SEND_OPEN) is S.OPEN
    assert m.opened_locally
    assert m.process(I.SEND_DATA) is S.OPEN
    assert m.process(I.SEND_DATA) is S.OPEN
    assert m.process(I.SEND_FIN) is S.HALF_CLOSED_LOCAL
    assert m.process(I.RECV_REPLY) is S.HALF_CLOSED_LOCAL
    assert m.reply_received
    assert m.process(I.RECV_DATA) is S.HALF_CLOSED_LOCAL
    assert m.process(I.RECV_FIN) is S.CLOSED
    assert m.state is S.CLOSED


def test_the_responder_goes_through_a_normal_request_response_life():
    """Receive OPEN and body, FIN, then send REPLY, body, FIN: OPEN → HALF_CLOSED_REMOTE → CLOSED."""
    m = StreamStateMachine()
    assert m.process(I.RECV_OPEN) is S.OPEN
    assert not m.opened_locally
    assert m.process(I.RECV_DATA) is S.OPEN
    assert m.process(I.RECV_FIN) is S.HALF_CLOSED_REMOTE
    assert m.process(I.SEND_REPLY) is S.HALF_CLOSED_REMOTE
    assert m.reply_sent
    assert m.process(I.SEND_DATA) is S.HALF_CLOSED_REMOTE
    assert m.process(I.SEND_FIN) is S.CLOSED


def test_a_websocket_style_stream_interleaves_both_directions_while_open():
    """With both halves open, REPLY and DATA flow both ways until each side sends FIN."""
    m = machine(I.RECV_OPEN, I.SEND_REPLY)
    for event in (I.RECV_DATA, I.SEND_DATA, I.SEND_DATA, I.RECV_DATA):
        assert m.process(event) is S.OPEN
    assert m.process(I.SEND_FIN) is S.HALF_CLOSED_LOCAL
    assert m.process(I.RECV_DATA) is S.HALF_CLOSED_LOCAL
    assert m.process(I.RECV_FIN) is S.CLOSED


def test_fin_on_open_half_closes_the_stream_at_once():
    """An OPEN carrying FIN (no body) leaves the responder HALF_CLOSED_REMOTE, free to answer."""
    m = machine(I.RECV_OPEN, I.RECV_FIN)
    assert m.state is S.HALF_CLOSED_REMOTE
    expect_violation(m, I.RECV_DATA)
    assert m.process(I.SEND_REPLY) is S.HALF_CLOSED_REMOTE
    assert m.process(I.SEND_FIN) is S.CLOSED


def test_sending_open_with_fin_half_closes_locally():
    """Sending OPEN with FIN leaves the opener HALF_CLOSED_LOCAL, still able to receive the answer."""
    m = machine(I.SEND_OPEN, I.SEND_FIN)
    assert m.state is S.HALF_CLOSED_LOCAL
    expect_violation(m, I.SEND_DATA)
    assert m.process(I.RECV_REPLY) is S.HALF_CLOSED_LOCAL
    assert m.process(I.RECV_FIN) is S.CLOSED


def test_reply_with_fin_and_no_body_closes_the_stream():
    """A REPLY with FIN (e.g. 204) right after a bodiless OPEN closes the stream."""
    m = machine(I.SEND_OPEN, I.SEND_FIN, I.RECV_REPLY)
    assert m.process(I.RECV_FIN) is S.CLOSED


def test_sending_reply_twice_is_a_local_error():
    """The responder sends exactly one REPLY; a second is LocalProtocolError."""
    m = machine(I.RECV_OPEN, I.SEND_REPLY)
    expect_violation(m, I.SEND_REPLY)


def test_receiving_reply_twice_is_a_remote_error_with_stream_closed():
    """A second REPLY from the peer is RemoteProtocolError with error_code 4 (STREAM_CLOSED)."""
    m = machine(I.SEND_OPEN, I.RECV_REPLY)
    expect_violation(m, I.RECV_REPLY)


def test_receiving_reply_twice_after_fin_is_still_refused():
    """The one-REPLY rule also holds once this side has half-closed."""
    m = machine(I.SEND_OPEN, I.SEND_FIN, I.RECV_REPLY)
    expect_violation(m, I.RECV_REPLY)


def test_the_opener_may_not_send_a_reply():
    """REPLY is the responder's: the opener sending one is LocalProtocolError."""
    expect_violation(machine(I.SEND_OPEN), I.SEND_REPLY)


def test_a_reply_from_the_peer_on_a_stream_it_opened_is_refused():
    """The peer opened the stream, so the peer must not send a REPLY on it."""
    expect_violation(machine(I.RECV_OPEN), I.RECV_REPLY)


def test_responder_sending_data_before_its_reply_is_a_local_error():
    """The responder's body must follow its REPLY."""
    expect_violation(machine(I.RECV_OPEN), I.SEND_DATA)
    expect_violation(machine(I.RECV_OPEN, I.RECV_FIN), I.SEND_DATA)


def test_data_from_the_responder_before_its_reply_is_a_remote_error():
    """DATA received on a stream we opened before its REPLY is RemoteProtocolError code 4."""
    expect_violation(machine(I.SEND_OPEN), I.RECV_DATA)
    expect_violation(machine(I.SEND_OPEN, I.SEND_FIN), I.RECV_DATA)


def test_the_opener_may_send_its_body_before_any_reply():
    """The request body flows before the response head exists, and the responder may receive it."""
    assert machine(I.SEND_OPEN, I.SEND_DATA).state is S.OPEN
    assert machine(I.RECV_OPEN, I.RECV_DATA).state is S.OPEN


def test_data_after_the_peer_sent_fin_is_a_remote_error_with_code_4():
    """Once the peer ended its half, its DATA, REPLY or FIN are RemoteProtocolError with error_code 4."""
    for event in (I.RECV_DATA, I.RECV_FIN):
        error = expect_violation(machine(I.SEND_OPEN, I.RECV_REPLY, I.RECV_FIN), event)
        assert error.error_code == 4
    expect_violation(machine(I.RECV_OPEN, I.RECV_FIN), I.RECV_FIN)


def test_data_after_this_side_sent_fin_is_a_local_error():
    """Once this side ended its half, sending DATA, FIN or REPLY again is LocalProtocolError."""
    for event in (I.SEND_DATA, I.SEND_FIN):
        expect_violation(machine(I.SEND_OPEN, I.SEND_FIN), event)
    expect_violation(machine(I.RECV_OPEN, I.SEND_REPLY, I.SEND_FIN), I.SEND_REPLY)


@pytest.mark.parametrize("event", [e for e in I if e not in (I.SEND_OPEN, I.RECV_OPEN, I.SEND_RESET, I.RECV_RESET)])
def test_an_idle_stream_only_accepts_open(event):
    """Before OPEN nothing but OPEN (or a reset) is allowed."""
    expect_violation(StreamStateMachine(), event)


@pytest.mark.parametrize("reach", ["open-opener", "open-responder", "closed-opener", "closed-responder"])
@pytest.mark.parametrize("event", [I.SEND_OPEN, I.RECV_OPEN])
def test_a_stream_is_opened_only_once(reach, event):
    """OPEN on a stream that is no longer IDLE is refused."""
    expect_violation(machine(*REACH[reach]), event)


@pytest.mark.parametrize("reach", ["closed-opener", "closed-responder"])
@pytest.mark.parametrize("event", [e for e in I if e not in (I.SEND_RESET, I.RECV_RESET)])
def test_a_closed_stream_accepts_nothing_but_reset(reach, event):
    """After both FINs every input other than a reset is a violation."""
    m = machine(*REACH[reach])
    assert m.state is S.CLOSED
    expect_violation(m, event)


@pytest.mark.parametrize("reach", list(REACH))
@pytest.mark.parametrize("event", [I.SEND_RESET, I.RECV_RESET])
def test_a_reset_from_any_state_closes_the_stream(reach, event):
    """SEND_RESET and RECV_RESET close the stream whatever state it was in."""
    m = machine(*REACH[reach])
    assert m.process(event) is S.CLOSED
    assert m.state is S.CLOSED


@pytest.mark.parametrize("reach", list(REACH))
def test_each_reachable_state_is_the_documented_one(reach):
    """The helper paths land in the states their names claim."""
    expected = {
        "idle": S.IDLE,
        "open": S.OPEN,
        "half-closed-local": S.HALF_CLOSED_LOCAL,
        "half-closed-remote": S.HALF_CLOSED_REMOTE,
        "closed": S.CLOSED,
    }
    prefix = reach.removesuffix("-opener").removesuffix("-responder")
    assert machine(*REACH[reach]).state is expected[prefix]
