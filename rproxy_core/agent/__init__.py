"""The home side: dials out to the bridge and serves streams from the configured target."""

from __future__ import annotations

from ..dial import bridge_connect_url, certificate_sha256, is_cleartext_remote, split_bridge_credential
from .backoff import Backoff
from .client import Agent
from .config import AgentConfig, check_service
from .discovery import AppBrowser, AppFollower, DiscoveredApp, announce_app, discover
from .inprocess import create_inprocess_session
from .state import AgentState, AgentStats
from .upstream import FORWARDED_HEADERS, Upstream, create_upstream_session

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentState",
    "AgentStats",
    "AppBrowser",
    "AppFollower",
    "Backoff",
    "DiscoveredApp",
    "FORWARDED_HEADERS",
    "Upstream",
    "announce_app",
    "bridge_connect_url",
    "certificate_sha256",
    "check_service",
    "create_inprocess_session",
    "create_upstream_session",
    "discover",
    "is_cleartext_remote",
    "split_bridge_credential",
]
