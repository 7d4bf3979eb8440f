"""Which tunnel a visitor's Host names (README, "Routing")."""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["host_name", "resolve_tunnel"]


def host_name(host: str) -> str:
    """Lower-case host without port or trailing dot (``Home.Example.com:443`` → ``home.example.com``)."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def resolve_tunnel(host: str, domain: str | None, tunnels: Collection[str]) -> str | None:
    """Return the tunnel name ``host`` reaches, or None.

    With a ``domain``, ``<name>.<domain>`` reaches tunnel ``name`` (and, for services of a
    tunnel, ``<service>.<name>.<domain>`` too: the label just left of the domain counts).
    Without one, a Host whose first label names a tunnel reaches it; otherwise, when exactly
    one tunnel exists, it serves every host (the one-home case).
    """
    name = host_name(host)
    if domain is not None:
        suffix = "." + domain
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        return labels[-1] or None
    first = name.split(".", 1)[0]
    if first in tunnels:
        return first
    if len(tunnels) == 1:
        return next(iter(tunnels))
    return None
