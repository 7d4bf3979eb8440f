"""Types shared across rproxy_core."""

from __future__ import annotations

from typing import NewType

__all__ = ["StreamId", "Headers"]

StreamId = NewType("StreamId", int)
"""Identifier of one stream inside a tunnel; odd when the bridge opened it, even for the agent."""

Headers = list[tuple[str, str]]
"""HTTP header fields in order, duplicates kept (``Set-Cookie`` may repeat)."""
