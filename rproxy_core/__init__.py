"""rproxy: put a home web app on the internet from behind NAT, over one outbound WebSocket."""

from __future__ import annotations

from ._version import __version__
from .agent import Agent, AgentConfig
from .bridge import Bridge, BridgeConfig, MemoryRegistry, TokenGrant, TunnelRegistry
from .exceptions import *  # noqa: F403
from .exceptions import __all__ as _exceptions_all

__all__ = [
    "__version__",
    "Agent",
    "AgentConfig",
    "Bridge",
    "BridgeConfig",
    "TokenGrant",
    "TunnelRegistry",
    "MemoryRegistry",
    *_exceptions_all,
]
