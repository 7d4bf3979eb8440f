"""rproxy: put a home web app on the internet from behind NAT, over one outbound WebSocket."""

from __future__ import annotations

__version__ = "0.1.0"

from .agent import Agent, AgentConfig  # noqa: E402
from .bridge import Bridge, BridgeConfig, MemoryRegistry, TunnelRegistry  # noqa: E402
from .exceptions import *  # noqa: E402,F403
from .exceptions import __all__ as _exceptions_all  # noqa: E402

__all__ = ["__version__", "Agent", "AgentConfig", "Bridge", "BridgeConfig", "TunnelRegistry", "MemoryRegistry", *_exceptions_all]
