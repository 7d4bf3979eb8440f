"""Home Assistant itself as the tunnel's target, the way Home Assistant Cloud does it.

Tunnelled requests do not go back out over TCP to port 8123: each one is handed to Home
Assistant's own HTTP server in this process, on a connection whose peer is the visitor's
address as the bridge saw it. So no ``http:`` reverse-proxy settings are needed, IP bans
hit the visitor and not the agent, and the login page judges the visitor, not 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address

from homeassistant.core import HomeAssistant


def homeassistant_server(hass: HomeAssistant) -> asyncio.Protocol:
    """A new server-side connection handler of Home Assistant's HTTP server.

    Raises:
        ConnectionRefusedError: the server is not running (Home Assistant is starting or
            stopping); the visitor gets 502, as from a home app that is down.
    """
    http = getattr(hass, "http", None)
    runner = getattr(http, "runner", None)
    server = getattr(runner, "server", None)
    if server is None:
        raise ConnectionRefusedError("Home Assistant's HTTP server is not running")
    protocol: asyncio.Protocol = server()
    return protocol


def trusted_networks_refusal(hass: HomeAssistant, ip: IPv4Address | IPv6Address) -> str | None:
    """Why a visitor at ``ip`` must not reach Home Assistant, if a trusted_networks provider trusts it."""
    for provider in hass.auth.auth_providers:
        if provider.type != "trusted_networks":
            continue
        for network in getattr(provider, "trusted_networks", ()):
            if ip in network:
                return f"{ip} is in the trusted network {network} of the trusted_networks login provider"
    return None
