"""Backoff: the delays between an agent's reconnection attempts."""

from __future__ import annotations

import random

import pytest

from rproxy_core.agent import Backoff
from rproxy_core.const import BACKOFF_INITIAL, BACKOFF_MAX

# (initial, maximum, the ceilings of the first attempts)
CEILINGS = [
    pytest.param(1.0, 60.0, [1, 2, 4, 8, 16, 32, 60, 60, 60], id="defaults-shape"),
    pytest.param(0.5, 3.0, [0.5, 1, 2, 3, 3], id="small-cap"),
    pytest.param(5.0, 5.0, [5, 5, 5], id="initial-is-cap"),
    pytest.param(2.0, 1.0, [1, 1], id="cap-below-initial"),
]


@pytest.mark.parametrize(("initial", "maximum", "ceilings"), CEILINGS)
def test_delays_double_up_to_the_cap_with_up_to_half_jitter(
    initial: float, maximum: float, ceilings: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each delay lies in [ceiling/2, ceiling], the ceiling doubling from ``initial`` up to ``maximum``."""
    draws = iter([0.0, 1.0] * len(ceilings))  # the two ends of random.random()'s range
    monkeypatch.setattr(random, "random", lambda: next(draws))
    lowest, highest = Backoff(initial, maximum), Backoff(initial, maximum)
    for ceiling in ceilings:
        assert lowest.next() == pytest.approx(ceiling / 2)
        assert highest.next() == pytest.approx(ceiling)


def test_jitter_spreads_a_fleet_of_agents() -> None:
    """Real random draws: always within bounds, and not all equal (agents do not reconnect in step)."""
    delays = [Backoff().next() for _ in range(200)]
    assert all(BACKOFF_INITIAL / 2 <= d <= BACKOFF_INITIAL for d in delays)
    assert len(set(delays)) > 100


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff()
    for _ in range(10):
        backoff.next()
    assert backoff.next() > BACKOFF_MAX / 2 - 1e-9
    backoff.reset()
    assert backoff.next() <= BACKOFF_INITIAL


def test_a_long_outage_neither_overflows_nor_grows_past_the_cap() -> None:
    """Thousands of attempts (days of an unreachable bridge): the delay stays at the cap, no OverflowError."""
    backoff = Backoff()
    delays = [backoff.next() for _ in range(5000)]
    assert max(delays) <= BACKOFF_MAX
    assert min(delays[-100:]) >= BACKOFF_MAX / 2
