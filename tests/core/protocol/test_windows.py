"""Per-stream flow-control windows: credit accounting and batching of WINDOW increments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_core.exceptions import FlowControlError, LocalProtocolError, RemoteProtocolError
from rproxy_core.protocol.windows import MAX_WINDOW, ReceiveWindow, SendWindow


@given(
    size=st.integers(1, 5000),
    steps=st.lists(st.tuples(st.sampled_from(["receive", "ack"]), st.floats(0, 1)), max_size=60),
)
@settings(max_examples=300, deadline=None, database=None)
def test_legal_receive_and_acknowledge_sequences_keep_the_window_consistent(size, steps):
    """Legal receive/acknowledge sequences keep 0 <= available <= size and return exactly the acknowledged credit."""
    window = ReceiveWindow(size)
    received = acknowledged = returned = 0
    pending = 0  # acknowledged but not yet returned: the spec's model of the batching
    for action, fraction in steps:
        if action == "receive":
            n = int(window.available * fraction)
            window.receive(n)
            received += n
        else:
            unacknowledged = received - acknowledged
            n = int(unacknowledged * fraction)
            increment = window.acknowledge(n)
            acknowledged += n
            pending += n
            # Credit goes back in batches of a quarter window, or at once if the peer is stalled.
            if pending >= size // 4 or window.available - increment == 0:
                assert increment == pending
                pending = 0
            else:
                assert increment == 0
            returned += increment
        assert 0 <= window.available <= size
        # What the peer may still send = size - bytes in flight (received but not returned).
        assert window.available == size - (received - returned)
        assert returned == acknowledged - pending
        assert 0 <= pending <= received - returned


def test_a_quarter_window_of_acknowledgements_returns_credit():
    """Credit is held back until a quarter of the window was consumed, then returned in one increment."""
    window = ReceiveWindow(1000)
    window.receive(600)
    assert window.acknowledge(100) == 0
    assert window.acknowledge(149) == 0
    assert window.acknowledge(1) == 250
    assert window.available == 650
    assert window.acknowledge(10) == 0


def test_credit_returns_at_once_when_the_peer_has_none_left():
    """When the peer's credit is exhausted even a tiny acknowledgement is returned, so it never stalls."""
    window = ReceiveWindow(1000)
    window.receive(1000)
    assert window.available == 0
    assert window.acknowledge(1) == 1
    assert window.available == 1


def test_receiving_beyond_the_window_is_a_flow_control_error():
    """Bytes beyond the credit granted raise FlowControlError (a RemoteProtocolError with code 3)."""
    window = ReceiveWindow(100)
    window.receive(60)
    with pytest.raises(FlowControlError) as info:
        window.receive(41)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.error_code == 3
    window.receive(40)
    with pytest.raises(FlowControlError):
        window.receive(1)


def test_acknowledging_more_than_received_is_a_local_error():
    """Acknowledging bytes that never arrived is a bug on this side: LocalProtocolError."""
    window = ReceiveWindow(100)
    window.receive(10)
    with pytest.raises(LocalProtocolError):
        window.acknowledge(11)


def test_a_rejected_acknowledgement_leaves_the_window_unchanged():
    """After a refused over-acknowledgement, legal acknowledgements still work as before."""
    window = ReceiveWindow(100)
    window.receive(100)
    with pytest.raises(LocalProtocolError):
        window.acknowledge(101)
    assert window.acknowledge(100) == 100
    assert window.available == 100


def test_send_window_consume_spends_credit_down_to_zero():
    """consume subtracts from the credit and allows spending it exactly to zero."""
    window = SendWindow(10)
    window.consume(4)
    window.consume(0)
    window.consume(6)
    assert window.available == 0
    window.consume(0)


def test_send_window_consume_beyond_credit_is_a_local_error():
    """Sending more than the credit left is a bug on this side: LocalProtocolError, credit unchanged."""
    window = SendWindow(10)
    with pytest.raises(LocalProtocolError):
        window.consume(11)
    assert window.available == 10


@pytest.mark.parametrize("increment", [0, -1, -(2**31)])
def test_send_window_rejects_a_non_positive_increment(increment):
    """A zero or negative WINDOW increment from the peer is a FlowControlError."""
    window = SendWindow(10)
    with pytest.raises(FlowControlError):
        window.expand(increment)
    assert window.available == 10


def test_send_window_rejects_an_increment_that_overflows():
    """Credit above 2**31-1 is a FlowControlError; exactly 2**31-1 is allowed."""
    window = SendWindow(10)
    with pytest.raises(FlowControlError):
        window.expand(MAX_WINDOW - 9)
    assert window.available == 10
    window.expand(MAX_WINDOW - 10)
    assert window.available == MAX_WINDOW
    with pytest.raises(FlowControlError):
        window.expand(1)


@given(initial=st.integers(0, 10_000), ops=st.lists(st.integers(-100, 3000), max_size=40))
@settings(max_examples=200, deadline=None, database=None)
def test_send_window_never_goes_negative(initial, ops):
    """Whatever is consumed and granted, the credit stays between 0 and MAX_WINDOW."""
    window = SendWindow(initial)
    for op in ops:
        try:
            if op >= 0:
                window.consume(op)
            else:
                window.expand(-op)
        except (LocalProtocolError, FlowControlError):
            pass
        assert 0 <= window.available <= MAX_WINDOW
