"""Which tunnel, and which of its services, a visitor's Host names (README, "Routing")."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from ipaddress import ip_address

__all__ = ["host_name", "is_loopback_host", "resolve_route"]


def is_loopback_host(name: str) -> bool:
    """``localhost``, a ``*.localhost`` name or a loopback address (``host_name``'s form)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """Lower-case host without port or trailing dot (``Home.Example.com:443`` → ``home.example.com``)."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def resolve_route(
    host: str,
    domain: str | None,
    tunnels: Collection[str],
    aliases: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[str, str] | None:
    """Return ``(tunnel, service)`` for ``host`` ("" is the tunnel's main web app), or None.

    An operator's ``aliases`` (host name → tunnel and service) come first. With a ``domain``,
    ``<tunnel>.<domain>`` reaches a tunnel's main app and ``<service>.<tunnel>.<domain>`` one
    of its services; deeper names reach nothing. Without one, a Host whose first label names a
    tunnel reaches its main app, ``<service>.<tunnel>.…`` a service, and otherwise, when
    exactly one tunnel exists, it serves every host (the one-home case).
    """
    name = host_name(host)
    if aliases:
        route = aliases.get(name)
        if route is not None:
            return route
    if domain is not None:
        suffix = "." + domain
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        if len(labels) == 1:
            return (labels[0], "") if labels[0] else None
        if len(labels) == 2 and all(labels):
            return labels[1], labels[0]
        return None
    labels = name.split(".", 2)
    if labels[0] in tunnels:
        return labels[0], ""
    if len(labels) > 1 and labels[1] in tunnels:
        return labels[1], labels[0]
    if len(tunnels) == 1:
        return next(iter(tunnels)), ""
    return None
