"""The gateway inside a bridge (docs/GATEWAY.md, "In a bridge"): frames for a tunnel go through it.

A frame, disconnect or connect URL whose host is a tunnel's public name becomes a normal
visitor request on a stream of that tunnel (``registry.open_stream``), so it reaches the home
app without leaving the bridge; every other URL goes over the internet as in ``rproxy gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets

from yarl import URL

from ..exceptions import NoAgentError, StreamResetError, TunnelClosedError
from ..gateway import DeliveryRefused, Gateway, HttpDelivery
from ..gateway.core import CLIENT_HEADER
from ..protocol.frames import ErrorCode
from ..protocol.heads import KIND_HTTP, RequestHead
from .context import BridgeContext
from .registry import NoServiceError, TunnelBusyError
from .routing import host_name, resolve_route

__all__ = ["TunnelDelivery", "bridge_gateway"]

#: Of a tunnel's answer, this much is read (so the agent's stream ends cleanly); the rest is reset.
_ANSWER_READ = 64 << 10


class TunnelDelivery:
    """POSTs to a tunnel's host name through the tunnel; others over the internet."""

    def __init__(self, context: BridgeContext, internet: HttpDelivery) -> None:
        self._context = context
        self._internet = internet
        self._ids = itertools.count(1)
        self._prefix = "gw" + secrets.token_hex(3)

    def route(self, url: URL) -> tuple[str, str] | None:
        """(tunnel, service) when ``url``'s host is a tunnel's public name, else None.

        Only names the operator made a tunnel's: ``<tunnel>.<domain>`` (and services under it)
        or an alias. Without a domain a first label that equals a tunnel's name could be anyone's
        host, so nothing is taken for a tunnel's.
        """
        config = self._context.config
        name = host_name(url.host or "")
        if name in config.aliases:
            return config.aliases[name]
        if config.domain is None or not name.endswith("." + config.domain):
            return None
        return resolve_route(name, config.domain, self._context.registry.names(), config.aliases)

    async def post(self, url: str, headers: list[tuple[str, str]], body: bytes, timeout: float) -> int:
        parsed = URL(url)
        route = self.route(parsed)
        if route is None:
            return await self._internet.post(url, headers, body, timeout)
        name, service = route
        context = self._context
        if context.visitor_guard.protects(name):
            raise DeliveryRefused(f"tunnel {name!r} is protected by visitor rules")
        client = next((value for key, value in headers if key == CLIENT_HEADER), "")
        head = RequestHead(
            method="POST",
            target=parsed.raw_path_qs or "/",
            headers=[
                *headers,
                ("Host", parsed.raw_authority),
                ("Content-Length", str(len(body))),
                ("X-Forwarded-For", client),
                ("X-Forwarded-Proto", parsed.scheme),
                ("X-Forwarded-Host", parsed.raw_authority),
            ],
            kind=KIND_HTTP,
            request_id=f"{self._prefix}{next(self._ids):08x}",
            service=service,
        )
        try:
            stream = await context.registry.open_stream(name, head, end_stream=not body)
        except NoServiceError:
            raise DeliveryRefused(f"tunnel {name!r} has no web app {service!r}") from None
        except (NoAgentError, TunnelBusyError) as err:  # may come back: retried
            raise ConnectionError(f"tunnel {name!r}: {err.__class__.__name__}") from None
        try:
            async with asyncio.timeout(timeout):
                if body:
                    await stream.write(body, end_stream=True)
                reply = await stream.reply()
                read = 0
                while read <= _ANSWER_READ and (chunk := await stream.read()):
                    read += len(chunk)
            return reply.status
        except (StreamResetError, TunnelClosedError) as err:
            raise ConnectionError(f"tunnel {name!r}: {err}") from None
        finally:
            if not stream.closed:
                with contextlib.suppress(Exception):
                    stream.reset(ErrorCode.CANCEL, "gateway done")

    async def close(self) -> None:
        await self._internet.close()


def bridge_gateway(context: BridgeContext) -> Gateway | None:
    """The bridge's gateway from ``config.gateway``, delivering through tunnels; None without one."""
    config = context.config.gateway
    if config is None:
        return None
    gateway = Gateway(config, address_of=lambda request: context.visitor_address(request)[0])  # type: ignore[arg-type]
    gateway.delivery = TunnelDelivery(context, HttpDelivery(gateway.allowlist, max_connections=config.max_connections))
    return gateway
