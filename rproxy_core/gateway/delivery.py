"""POSTs to the backend: over the internet (aiohttp, SSRF rules), with bounded retries.

A delivery is one POST and its status; ``deliver`` adds the retry policy: connection errors,
timeouts and 5xx are tried again a bounded number of times with doubling pauses, anything else
(a 3xx is never followed, a 4xx is the backend's refusal) ends the connection at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ..protocol.closecodes import CloseCode
from .core import Allowlist, is_private_address, shown

__all__ = ["Delivery", "DeliveryRefused", "HttpDelivery", "Outcome", "deliver"]

_LOGGER = logging.getLogger("rproxy.gateway")

#: Close codes (RFC 6455 §7.4.1).

#: The backend's answer body is not used; up to this much is read so the connection can be
#: kept alive, a longer one is dropped with its connection.
_ANSWER_READ = 64 << 10


class DeliveryRefused(Exception):
    """The gateway will not POST there (a private address, a protected tunnel): not retried."""


class Delivery(Protocol):
    async def post(self, url: str, headers: list[tuple[str, str]], body: bytes, timeout: float) -> int:
        """POST ``body`` to ``url``; return the answer's status.

        Raises:
            DeliveryRefused: never to be tried again.
            OSError, TimeoutError, aiohttp.ClientError: the attempt failed (may be retried).
        """

    async def close(self) -> None: ...


class _PrivateTarget(OSError):
    pass


class _PublicResolver(AbstractResolver):
    """The system resolver, refusing names that resolve to non-public addresses.

    Checked at every resolution (not once at connect time), so a name that later points at
    127.0.0.1 (DNS rebinding) is refused too. Hosts the allowlist writes literally are exempt.
    """

    def __init__(self, explicit: frozenset[str]) -> None:
        self._inner = DefaultResolver()
        self._explicit = explicit

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower().rstrip(".") not in self._explicit:
            for result in results:
                if is_private_address(ip_address(result["host"])):
                    raise _PrivateTarget(f"{host} resolves to a private, loopback or link-local address")
        return results

    async def close(self) -> None:
        await self._inner.close()


class HttpDelivery:
    """POSTs over the internet with one aiohttp session; never follows a redirect."""

    def __init__(self, allowlist: Allowlist, *, max_connections: int = 256) -> None:
        self._allowlist = allowlist
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            resolver=_PublicResolver(self._allowlist.explicit_hosts),
            ttl_dns_cache=10,
        )
        return aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def post(self, url: str, headers: list[tuple[str, str]], body: bytes, timeout: float) -> int:
        if self._session is None:
            self._session = self._open()
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.content_length is not None and response.content_length <= _ANSWER_READ:
                    await response.read()
                return response.status
        except aiohttp.ClientConnectorError as err:
            if isinstance(err.os_error, _PrivateTarget):
                raise DeliveryRefused(str(err.os_error)) from None
            raise

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


@dataclass(slots=True)
class Outcome:
    """How a POST ended after its retries: ok, or the close code and reason for the client."""

    ok: bool
    code: int = CloseCode.NORMAL
    reason: str = ""
    #: The backend's last answer, if there was one.
    status: int | None = None


async def deliver(
    delivery: Delivery,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    what: str = "frame",
) -> Outcome:
    """POST with the retry policy; never raises for the backend's doing."""
    pause = backoff
    attempt = 0
    status: int | None = None
    while True:
        problem: str
        status = None
        try:
            status = await delivery.post(url, headers, body, timeout)
        except DeliveryRefused as err:
            return Outcome(False, CloseCode.POLICY_VIOLATION, f"{what} target refused: {err}")
        except aiohttp.InvalidURL:
            return Outcome(False, CloseCode.POLICY_VIOLATION, f"{what} target is not a URL aiohttp can reach")
        except TimeoutError:
            problem = f"no answer in {timeout:g}s"
        except (OSError, aiohttp.ClientError) as err:
            problem = _error_text(err)
        else:
            if 200 <= status < 300:
                return Outcome(True, status=status)
            if status < 500:
                # 3xx is never followed (it could point anywhere); 4xx is the backend saying no.
                return Outcome(
                    False, CloseCode.POLICY_VIOLATION, f"backend answered the {what} with HTTP {status}", status
                )
            problem = f"HTTP {status}"
        if attempt >= retries:
            tries = f" after {attempt + 1} attempts" if attempt else ""
            return Outcome(False, CloseCode.INTERNAL_ERROR, f"{what} delivery failed{tries}: {problem}", status)
        attempt += 1
        _LOGGER.debug("%s POST failed (%s), retry %d of %d in %gs", what, problem, attempt, retries, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 5.0)


def _error_text(err: BaseException) -> str:
    """A short reason: the error's class and first line, escaped (it may quote the peer)."""
    text = str(err).splitlines()[0] if str(err) else ""
    name = err.__class__.__name__
    return f"{name}: {shown(text, 100)}" if text else name
