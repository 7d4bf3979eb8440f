"""Who a visitor is when the bridge sits behind trusted proxies (X-Forwarded-For/-Proto)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from aiohttp import hdrs, web

__all__ = ["behind_proxies"]


def behind_proxies(
    request: web.Request, address: str, scheme: str, trusted: list[IPv4Network | IPv6Network]
) -> tuple[str, str]:
    """The visitor's address and scheme when the bridge sits behind trusted proxies.

    Walks X-Forwarded-For from the right (the entry our own proxy appended) past every
    trusted proxy; the first untrusted address is the visitor. Entries left of it were
    written by the visitor and are ignored, and so is everything from an entry that is not
    an address on: the last trusted hop is then the best-known visitor (as nginx's realip).
    """
    peer = _hop_address(address)
    if peer is None or not any(peer in network for network in trusted):
        return address, scheme
    chain = [hop for value in request.headers.getall(hdrs.X_FORWARDED_FOR, ()) for hop in value.split(",")]
    visitor = peer
    for hop in reversed(chain):
        ip = _hop_address(hop)
        if ip is None:
            break
        visitor = ip
        if not any(ip in network for network in trusted):
            break
    proto = request.headers.get(hdrs.X_FORWARDED_PROTO, "").split(",")[-1].strip().lower()
    return str(visitor), proto if proto in ("http", "https") else scheme


def _hop_address(text: str) -> IPv4Address | IPv6Address | None:
    """One X-Forwarded-For entry as an address: ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:443``, ``::1``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
