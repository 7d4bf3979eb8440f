"""Windows that tune themselves to the link (ReceiveWindow.tune, docs/PROTOCOL.md §5).

A stream's rate is at most window / round-trip time. These drive a receive window with a
simulated clock: a reader that keeps up with a window-limited sender makes it grow to the
ceiling; a slow reader, scarce memory or a fast link keep it small; a shrunk window keeps
back credit without ever leaving the sender with nothing to send while nothing waits.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_core.protocol import Multiplexer, Role
from rproxy_core.protocol import events as ev
from rproxy_core.protocol.heads import RequestHead, ResponseHead
from rproxy_core.protocol.mux import RTT_MEMORY
from rproxy_core.protocol.windows import ReceiveWindow

from .helpers import ready_pair

FLOOR = 1_000
CEILING = 16_000
RTT = 0.040


def window_limited(window: ReceiveWindow, rounds: int, rtt: float = RTT, room: int | None = None) -> list[int]:
    """A sender that always has data, across a link of ``rtt``, and a reader that keeps up.

    Each round trip the sender sends all the credit it had; the reader consumes each piece
    as it arrives, returning credit (tuned) as the window says. Returns the window's size
    after each round.
    """
    now = 0.0
    sizes = []
    for _ in range(rounds):
        credit = window.available
        piece = max(1, window.size // 8)
        while credit:
            n = min(piece, credit)
            credit -= n
            window.receive(n)
            if window.acknowledge(n):
                window.tune(now, rtt, floor=FLOOR, ceiling=CEILING, room=room)
        now += rtt
        sizes.append(window.size)
    return sizes


def outstanding(window: ReceiveWindow) -> int:
    return window.size + window.debt


def test_a_window_limited_stream_doubles_up_to_the_ceiling():
    """Consuming a whole window per round trip means the window holds the stream back: it grows to the ceiling."""
    window = ReceiveWindow(FLOOR)
    sizes = window_limited(window, 12)
    assert sizes[-1] == CEILING
    assert sorted(sizes) == sizes and set(sizes) <= {1_000, 2_000, 4_000, 8_000, 16_000}  # doublings
    assert window.available == CEILING  # the extra credit went to the sender, nothing is missing


def test_no_growth_without_room_or_on_a_fast_link():
    """No room in memory, or a link so short that the window is never the limit, keep the window."""
    assert window_limited(ReceiveWindow(FLOOR), 12, room=0)[-1] == FLOOR
    window = ReceiveWindow(FLOOR)
    now = 0.0
    for _ in range(40):  # a window takes 10 round trips: the link, not the window, sets the pace
        window.receive(window.available)
        for _ in range(4):
            now += 2.5 * RTT
            if window.acknowledge(FLOOR // 4):
                assert window.tune(now, RTT, floor=FLOOR, ceiling=CEILING) == 0
    assert window.size == FLOOR


def test_growth_stays_within_the_room_it_is_given():
    """The receiver's memory allows 300 bytes more each time: the window grows by that, not by double."""
    window = ReceiveWindow(FLOOR)
    sizes = window_limited(window, 4, room=300)
    assert sizes[-1] > FLOOR
    assert all((size - FLOOR) % 300 == 0 for size in sizes), sizes


def test_a_burst_faster_than_a_window_per_round_trip_is_no_reason_to_grow():
    """Half a window taken in a tenth of a round trip had already arrived (say, into kernel buffers)."""
    window = ReceiveWindow(FLOOR)
    now = 0.0
    for _ in range(40):
        window.receive(window.available)
        for _ in range(4):
            now += RTT / 20  # four quarter windows per fifth of a round trip
            if window.acknowledge(FLOOR // 4):
                window.tune(now, RTT, floor=FLOOR, ceiling=CEILING)
    assert window.size == FLOOR


def test_a_reader_that_lets_bytes_pile_up_gets_no_growth():
    """Fast epochs while most of the window waits unread: the reader, not the window, sets the pace."""
    window = ReceiveWindow(FLOOR)
    now = 0.0
    window.receive(FLOOR)
    window.acknowledge(FLOOR // 4)
    window.tune(now, RTT, floor=FLOOR, ceiling=CEILING)  # the first epoch starts
    window.receive(window.available)
    for _ in range(3):
        window.acknowledge(FLOOR // 4)
        # Still most of a window waits: nothing grows, however short the epoch.
        assert window.tune(now, RTT, floor=FLOOR, ceiling=CEILING) == 0
        window.receive(window.available)
    assert window.size == FLOOR


def test_a_grown_window_shrinks_when_the_reader_slows_and_keeps_back_credit():
    """After growth, a slow reader halves the window; the credit it keeps back brings the sender down to it."""
    window = ReceiveWindow(FLOOR)
    window_limited(window, 4)
    grown = window.size
    assert grown > FLOOR
    now = 10.0
    window.receive(window.available)
    for _ in range(40):
        now += 100 * RTT  # a piece every 100 round trips: far below what the window allows
        if window.acknowledge(window.size // 4):
            window.tune(now, RTT, floor=FLOOR, ceiling=CEILING)
        window.receive(window.available)
    assert window.size == FLOOR
    assert window.debt == 0 and outstanding(window) == FLOOR
    assert window.available == 0  # everything sent is waiting (the reader is slow), no more credit


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["receive", "ack", "wait"]), st.floats(0, 1), st.sampled_from([None, 0, 300, 5000])),
        max_size=120,
    )
)
@settings(max_examples=400, deadline=None, database=None)
def test_tuning_keeps_the_accounting_and_never_strands_the_sender(steps):
    """Whatever the order: outstanding credit adds up, stays between floor and ceiling, and is never all withheld."""
    window = ReceiveWindow(FLOOR)
    waiting = 0
    now = 0.0
    for action, fraction, room in steps:
        if action == "receive":
            n = int(window.available * fraction)
            window.receive(n)
            waiting += n
        elif action == "ack":
            n = int(waiting * fraction)
            waiting -= n
            if window.acknowledge(n):
                before = window.size
                assert window.tune(now, RTT, floor=FLOOR, ceiling=CEILING, room=room) >= 0
                assert window.size - before <= (room if room is not None else CEILING)
        else:
            now += fraction * 20 * RTT
        # Credit the sender holds + bytes waiting + consumed not yet returned = what is outstanding.
        assert window.available + waiting + window._consumed == outstanding(window)
        assert FLOOR <= window.size <= CEILING
        assert 0 <= window.available <= outstanding(window)
        # Liveness: with nothing waiting and nothing held back, the sender has credit.
        if waiting == 0 and window._consumed == 0:
            assert window.available > 0


GET = RequestHead("GET", "/big")


def test_the_mux_tunes_once_it_knows_the_round_trip_time_and_counts_tuned_credit():
    """Over a real pair of multiplexers: no RTT, no tuning; with one, the sender's credit grows; the sum is counted."""
    pair = ready_pair(bridge={"stream_window": FLOOR, "max_stream_window": CEILING})
    bridge, agent = pair.bridge, pair.agent
    stream_id = bridge.open_stream(GET, end_stream=True)
    pair.flush()
    agent.send_reply(stream_id, ResponseHead(200))
    pair.flush()

    def round_trip(now: float) -> None:
        credit = agent.send_window(stream_id)
        agent.send_data(stream_id, b"x" * credit)
        events = pair.send(agent)
        for event in events:
            if isinstance(event, ev.DataReceived):
                bridge.acknowledge_received_data(stream_id, len(event.data), now=now)
        pair.flush()

    for n in range(6):
        round_trip(n * RTT)
    assert agent.send_window(stream_id) == FLOOR  # no RTT known yet: the fixed window
    bridge.observe_rtt(RTT, 1.0)
    assert bridge.link_rtt == RTT
    for n in range(12):
        round_trip(1.0 + n * RTT)
    assert agent.send_window(stream_id) == CEILING
    assert bridge.tuned_bytes == CEILING - FLOOR
    bridge.reset_stream(stream_id)
    assert bridge.tuned_bytes == 0


def test_without_room_above_the_fixed_window_nothing_tunes():
    """max_stream_window equal to stream_window (or below it) turns tuning off."""
    mux = Multiplexer(Role.BRIDGE, stream_window=FLOOR, max_stream_window=FLOOR // 2)
    assert mux.max_stream_window == FLOOR


def test_the_link_rtt_is_the_least_recent_sample_and_old_ones_expire():
    """Queueing inflates later samples: the least counts, for one to two RTT_MEMORY periods."""
    mux = Multiplexer(Role.BRIDGE)
    assert mux.link_rtt is None
    mux.observe_rtt(0.0, 0.0)  # a zero (or negative) sample says nothing
    assert mux.link_rtt is None
    mux.observe_rtt(0.040, 0.0)
    mux.observe_rtt(0.300, 10.0)
    assert mux.link_rtt == 0.040
    mux.observe_rtt(0.200, RTT_MEMORY + 1)  # a new period: the old one still counts
    assert mux.link_rtt == 0.040
    mux.observe_rtt(0.250, 2 * RTT_MEMORY + 2)  # two periods on: the 40 ms sample is gone
    assert mux.link_rtt == 0.200
