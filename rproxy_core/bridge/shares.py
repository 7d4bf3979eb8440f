"""Fair shares: what one address or one credential may hold at once on a shared bridge.

A bridge serves many homes and faces the whole internet, so each scarce thing (a tunnel's
stream slots, the agent endpoint's pending handshakes) is capped per holder as well as in
total: one visitor or one agent credential can take its share, never everyone's.

Who is "one address": an IPv4 address, or an IPv6 /64. An IPv6 subscriber is routinely given
at least a /64 (often a /56 or /48) and can pick any address in it, so counting single IPv6
addresses would give one home 2^64 shares; a /64 is the smallest block that is one
subscriber. IPv4-mapped IPv6 addresses count as their IPv4 address.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from ipaddress import IPv6Address, IPv6Network, ip_address
from typing import Generic, TypeVar

__all__ = ["IPV6_SHARE_PREFIX", "Shares", "address_share"]

#: An IPv6 visitor's share is its /64 (see the module's note).
IPV6_SHARE_PREFIX = 64

_K = TypeVar("_K", bound=Hashable)


@functools.lru_cache(maxsize=4096)  # parsing an address was ~5% of a small request's CPU at the bridge
def address_share(address: str) -> str:
    """The key an address's share is counted under: the IPv4 address, or the IPv6 /64 (``2001:db8::/64``).

    Anything that is not an IP address (a Unix socket's empty peer) is its own key.
    """
    try:
        ip = ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(IPv6Network((ip, IPV6_SHARE_PREFIX), strict=False))
    return str(ip)


class Shares(Generic[_K]):
    """How many of something each key holds, each under ``limit``.

    A key is present only while it holds at least one, so the table is bounded by what is
    held (each entry stands for a live request or connection), never by who came and went.
    """

    __slots__ = ("limit", "_held")

    def __init__(self, limit: int | None) -> None:
        #: Most one key may hold; None: no limit (counted all the same).
        self.limit = limit
        self._held: dict[_K, int] = {}

    def take(self, key: _K) -> bool:
        """Take one for ``key``; False (and nothing taken) if it already holds ``limit``."""
        held = self._held.get(key, 0)
        if self.limit is not None and held >= self.limit:
            return False
        self._held[key] = held + 1
        return True

    def give_back(self, key: _K) -> None:
        held = self._held.get(key, 0)
        if held <= 1:
            self._held.pop(key, None)
        else:
            self._held[key] = held - 1

    def held(self, key: _K) -> int:
        return self._held.get(key, 0)

    def __len__(self) -> int:
        """Keys holding at least one."""
        return len(self._held)
