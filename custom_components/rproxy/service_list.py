"""A tunnel's extra services: the ``NAME=URL`` lines of its options, as ``rproxy agent --service``
takes them (web apps visited as NAME.<tunnel>.<domain>, TCP services reached with ``rproxy tcp``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from yarl import URL

from rproxy_core.agent import check_service
from rproxy_core.const import MAX_SERVICES
from rproxy_core.exceptions import ConfigError
from rproxy_core.headers import is_tunnel_name

#: The scheme of a TCP service's target.
TCP_PREFIX = "tcp://"
#: ``zeroconf:NAME`` targets are followed on the LAN by the rproxy command, not here.
ZEROCONF_PREFIX = "zeroconf:"


class ServiceError(ValueError):
    """A services line the agent would refuse: ``key`` is the form's error, ``service`` names the line."""

    def __init__(self, key: str, service: str) -> None:
        super().__init__(f"{key}: {service}")
        self.key = key
        self.service = service


def parse_services(lines: Iterable[str]) -> dict[str, str]:
    """The services of ``NAME=URL`` lines (empty ones skipped), by name.

    Raises:
        ServiceError: the first line the agent would refuse, and why.
    """
    services: dict[str, str] = {}
    for line in lines:
        text = line.strip()
        if not text:
            continue
        name, equals, target = (part.strip() for part in text.partition("="))
        if not equals or not name or not target:
            raise ServiceError("service_format", text[:80])
        if not is_tunnel_name(name):
            raise ServiceError("service_name", name[:80])
        if name in services:
            raise ServiceError("service_twice", name)
        if target.lower().startswith(ZEROCONF_PREFIX):
            raise ServiceError("service_zeroconf", name)
        try:
            check_service(name, target)
        except ConfigError:
            raise ServiceError("service_target", name) from None
        services[name] = target
    if len(services) > MAX_SERVICES:
        raise ServiceError("too_many_services", str(MAX_SERVICES))
    return services


def service_lines(services: Mapping[str, str]) -> list[str]:
    """``services`` as the options store them and the form shows them."""
    return [f"{name}={target}" for name, target in services.items()]


def is_tcp(target: str) -> bool:
    """Whether ``target`` is a TCP service (else a web app)."""
    return target.lower().startswith(TCP_PREFIX)


def service_addresses(public_url: str | None, tunnel: str, services: Mapping[str, str]) -> dict[str, str | None]:
    """Where visitors reach each service: a web app's URL, "tcp" for a TCP service (``rproxy tcp``).

    A web app is at ``<service>.<tunnel>.<domain>``: known when the tunnel's own address is
    ``<tunnel>.<domain>``, else None (a bridge without a domain routes by whatever names the
    DNS gives it).
    """
    try:
        base = URL(public_url) if public_url else None
        host = (base.host or "") if base is not None else ""
    except (ValueError, TypeError):  # options edited by hand
        base, host = None, ""
    addresses: dict[str, str | None] = {}
    for name, target in services.items():
        if is_tcp(target):
            addresses[name] = "tcp"
        elif base is not None and host.startswith(f"{tunnel}.") and host.count(".") >= 2:
            addresses[name] = str(base.with_host(f"{name}.{host}").with_path("/"))
        else:
            addresses[name] = None
    return addresses
