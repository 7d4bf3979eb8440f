"""Web apps on the LAN that announce themselves for rproxy over mDNS."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
import logging

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo

from homeassistant.core import HomeAssistant
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo

from .const import ZEROCONF_HTTP_TYPE, ZEROCONF_MARKER, ZEROCONF_TYPE

_LOGGER = logging.getLogger(__package__)

#: mDNS record type and class of the service pointers (RFC 6763 §4.1).
_TYPE_PTR = 12
_CLASS_IN = 1


@dataclass(frozen=True, slots=True)
class DiscoveredApp:
    """A web app found on the LAN."""

    #: Stable identity: the app's ``id`` property, else its mDNS instance name.
    key: str
    name: str
    host: str
    port: int
    path: str
    scheme: str

    @property
    def url(self) -> str:
        """Where the agent reaches it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def label(self) -> str:
        """How a list shows it."""
        return f"{self.name} ({self.host}:{self.port})"


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def app_from_properties(
    service_type: str, instance: str, host: str, port: int, properties: dict[str, str]
) -> DiscoveredApp | None:
    """The app a service describes, or None if it is not one for rproxy."""
    if service_type == ZEROCONF_HTTP_TYPE and ZEROCONF_MARKER not in properties:
        return None
    if not port or not host:
        return None
    name = properties.get("name") or instance.removesuffix("." + service_type)
    path = properties.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    scheme = "https" if properties.get("scheme", "").lower() == "https" else "http"
    key = properties.get("id") or instance
    return DiscoveredApp(key=key, name=name, host=host, port=port, path=path, scheme=scheme)


def app_from_service_info(info: ZeroconfServiceInfo) -> DiscoveredApp | None:
    """The app a Home Assistant zeroconf discovery describes."""
    address = info.ip_address
    host = str(address) if address is not None else (info.hostname or "").rstrip(".")
    properties = {str(k): _text(v) for k, v in info.properties.items()}
    return app_from_properties(info.type, info.name, host, info.port or 0, properties)


async def discovered_apps(hass: HomeAssistant) -> list[DiscoveredApp]:
    """What Home Assistant's zeroconf browser currently knows about, without waiting on the network.

    Home Assistant browses our service types for as long as it runs (the manifest's
    ``zeroconf`` matchers), so the answers are in its cache; reading them there keeps the
    form instant.
    """
    from homeassistant.components import zeroconf  # imported late: an after_dependency

    try:
        aiozc = await zeroconf.async_get_async_instance(hass)
    except OSError as err:  # no usable network interface
        _LOGGER.debug("zeroconf unavailable: %s", err)
        return []
    zc = aiozc.zeroconf
    apps: dict[str, DiscoveredApp] = {}
    for service_type in (ZEROCONF_TYPE, ZEROCONF_HTTP_TYPE):
        for record in zc.cache.async_all_by_details(service_type, _TYPE_PTR, _CLASS_IN):
            instance = getattr(record, "alias", None)
            if not instance:
                continue
            info = AsyncServiceInfo(service_type, instance)
            if not info.load_from_cache(zc):
                continue
            addresses = info.parsed_scoped_addresses(IPVersion.All)
            host = _preferred(addresses) or (info.server or "").rstrip(".")
            properties = {_text(k): _text(v) for k, v in info.properties.items()}
            app = app_from_properties(service_type, instance, host, info.port or 0, properties)
            if app is not None:
                apps.setdefault(app.key, app)
    return sorted(apps.values(), key=lambda app: app.name.lower())


def _preferred(addresses: list[str]) -> str | None:
    """An IPv4 address if there is one (the likeliest to work from the agent), else IPv6."""
    for text in addresses:
        try:
            if not isinstance(ip_address(text.split("%")[0]), IPv6Address):
                return text
        except ValueError:
            continue
    return addresses[0] if addresses else None
