"""The HELLO each side sends first, as typed values (no I/O; docs/PROTOCOL.md §3).

A HELLO is a JSON object. The limits both sides announce (``version``, ``window``,
``max_frame``, ``max_streams``) are read by the multiplexer; what else the bridge tells an
agent is a :class:`BridgeHello`, what an agent announces an :class:`AgentHello`. Each
``decode`` checks the fields it reads and names the bad one in its error; keys it does not
know are ignored, as the protocol's compatibility rule asks (a later version may add some).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from ..exceptions import RemoteProtocolError
from .heads import KIND_HTTP, SERVICE_KINDS

__all__ = ["MAX_SERVICES", "AgentHello", "BridgeHello", "HelloLimits"]

#: Services one agent may announce besides its main web app (``rproxy_core.const.MAX_SERVICES``
#: names the same number for the agent's config; the protocol imports no module above it, and a
#: unit test keeps the two equal).
MAX_SERVICES = 64
#: A service name: a lower-case DNS label (``rproxy_core.headers.TUNNEL_NAME_RE``; a test keeps them equal).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

#: An agent that announces no services (one from before them) offers its main web app.
_MAIN_ONLY: Mapping[str, str] = {"": KIND_HTTP}


def _bad(path: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"HELLO field {path!r}: {why}")


def _int(settings: Mapping[str, Any], key: str, low: int, high: int, default: int) -> int:
    value = settings.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RemoteProtocolError(f"HELLO setting {key!r} out of range: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class HelloLimits:
    """What both sides announce: the protocol version and the limits the sender enforces."""

    version: int
    window: int
    max_frame: int
    max_streams: int

    @classmethod
    def decode(
        cls,
        settings: Mapping[str, Any],
        *,
        versions: frozenset[int],
        window: tuple[int, int, int],
        max_frame: tuple[int, int, int],
        max_streams: tuple[int, int, int],
    ) -> Self:
        """Each limit as ``(lowest, highest, default when absent)``.

        Raises:
            RemoteProtocolError: an unsupported version, or a limit out of its range (named).
        """
        version = settings.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in versions:
            raise RemoteProtocolError(f"unsupported protocol version {version!r}")
        return cls(
            version,
            _int(settings, "window", *window),
            _int(settings, "max_frame", *max_frame),
            _int(settings, "max_streams", *max_streams),
        )


@dataclass(frozen=True, slots=True)
class BridgeHello:
    """What the bridge tells its agent beyond the limits."""

    #: The tunnel's public address, as the bridge shows it (None: it has none to give).
    public_url: str | None = None
    #: The address of the agent's services with ``{service}`` for the name (None: no domain).
    service_url: str | None = None

    @classmethod
    def decode(cls, settings: Mapping[str, Any]) -> Self:
        # Only shown to the user (escaped where logged), never followed: any JSON value reads as
        # text, as before; a service_url without the placeholder says nothing about services.
        public_url = str(settings.get("public_url") or "") or None
        service_url = settings.get("service_url")
        return cls(public_url, service_url if isinstance(service_url, str) and "{service}" in service_url else None)


@dataclass(frozen=True, slots=True)
class AgentHello:
    """What an agent announces beyond the limits: its services and the visitor protection it asks for."""

    #: Service name → kind (``"http"`` or ``"tcp"``); ``""`` is the tunnel's main web app.
    services: Mapping[str, str] = field(default_factory=lambda: dict(_MAIN_ONLY))
    #: The agent's ``visitor_allow`` and ``visitor_basic`` entries as sent (the visitor policy's
    #: parser reads them: ``rproxy_core.policy.parse_agent_policy``).
    visitor_allow: tuple[Any, ...] = ()
    visitor_basic: tuple[Any, ...] = ()
    #: Shown in the bridge's status, cut short there.
    software: str = ""

    @classmethod
    def decode(cls, settings: Mapping[str, Any]) -> Self:
        """Raises RemoteProtocolError naming the bad field (``services.<name>`` for one service)."""
        services = settings.get("services")
        if services is None:  # an agent from before services: its main web app only
            services = dict(_MAIN_ONLY)
        elif not isinstance(services, dict):
            raise _bad("services", "must be an object")
        elif len(services) > MAX_SERVICES + 1:
            raise _bad("services", f"more than {MAX_SERVICES} services")
        for service, kind in services.items():
            if service and not (isinstance(service, str) and _LABEL.fullmatch(service)):
                raise _bad(f"services.{service[:64]}", "the service name is not a DNS label")
            if kind not in SERVICE_KINDS:
                raise _bad(f"services.{service}", f"unknown kind {str(kind)[:32]!r}")
        lists = []
        for key in ("visitor_allow", "visitor_basic"):
            items = settings.get(key) or []
            if not isinstance(items, list):
                raise _bad(key, "must be a list")
            lists.append(tuple(items))
        if len(lists[0]) + len(lists[1]) > 256:
            raise _bad("visitor_allow", "visitor_allow and visitor_basic have more than 256 entries")
        software = settings.get("software", "")
        return cls(dict(services), lists[0], lists[1], software if isinstance(software, str) else str(software))
