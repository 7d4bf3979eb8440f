"""The home side: dials out to the bridge and serves streams from the configured target."""

from __future__ import annotations

from .client import Agent, AgentConfig, AgentState, Backoff, bridge_connect_url
from .upstream import Upstream, create_upstream_session

__all__ = ["Agent", "AgentConfig", "AgentState", "Backoff", "bridge_connect_url", "Upstream", "create_upstream_session"]
