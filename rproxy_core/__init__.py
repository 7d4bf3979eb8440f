"""rproxy: put a home web app on the internet from behind NAT, over one outbound WebSocket."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .exceptions import *  # noqa: F403
from .exceptions import __all__ as _exceptions_all

if TYPE_CHECKING:
    from .agent import Agent, AgentConfig
    from .bridge import Bridge, BridgeConfig, MemoryRegistry, TokenGrant, TunnelRegistry

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

#: The package face's names and the room each comes from. They load on first use (PEP 562), so
#: importing any part of rproxy (the agent inside Home Assistant, above all) loads only that
#: part: an eager ``from .bridge import Bridge`` here would drag aiohttp.web, prometheus_client
#: and every bridge module into each ``import rproxy_core.agent``.
_LAZY = {
    "Agent": "agent",
    "AgentConfig": "agent",
    "Bridge": "bridge",
    "BridgeConfig": "bridge",
    "MemoryRegistry": "bridge",
    "TokenGrant": "bridge",
    "TunnelRegistry": "bridge",
}


def __getattr__(name: str) -> Any:
    room = _LAZY.get(name)
    if room is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{room}", __name__), name)
    globals()[name] = value
    return value
