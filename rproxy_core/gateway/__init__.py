"""WebSocket-to-POST gateway (docs/GATEWAY.md): live WebSocket clients for plain-HTTP backends.

A client connects to ``/connect?f=FRAME_URL&d=DISCONNECT_URL``; each of its frames is POSTed to
``f`` with an ``x-ws-proxy-send`` header naming a callback URL, and a POST to that URL sends a
frame back, for as long as the socket lives. ``core`` is the bookkeeping without I/O,
``delivery`` the POSTs and their retries, ``server`` the sockets and the callback API.
"""

from __future__ import annotations

from .core import Allowlist, GatewayConfig
from .delivery import Delivery, DeliveryRefused, HttpDelivery
from .server import Gateway

__all__ = ["Allowlist", "Delivery", "DeliveryRefused", "Gateway", "GatewayConfig", "HttpDelivery"]
