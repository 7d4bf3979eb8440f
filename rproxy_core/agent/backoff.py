"""Delays between the agent's reconnection attempts."""

from __future__ import annotations

import random

from ..const import BACKOFF_INITIAL, BACKOFF_MAX

__all__ = ["Backoff"]


class Backoff:
    """Delays between reconnection attempts: doubling, capped, with jitter."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next(self) -> float:
        """The next delay: half fixed, half random, so a fleet of agents does not stampede."""
        ceiling = min(self.maximum, self.initial * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return ceiling * (0.5 + 0.5 * random.random())

    def reset(self) -> None:
        """Start again from the initial delay."""
        self.attempt = 0
