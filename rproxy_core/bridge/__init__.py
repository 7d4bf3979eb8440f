"""The public side: visitors and agents on one port."""

from __future__ import annotations

from .app import Bridge, BridgeConfig
from .auth import TokenGrant
from .registry import MemoryRegistry, TunnelRegistry

__all__ = ["Bridge", "BridgeConfig", "TokenGrant", "TunnelRegistry", "MemoryRegistry"]
