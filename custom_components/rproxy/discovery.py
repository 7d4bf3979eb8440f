"""Web apps on the LAN that announce themselves for rproxy over mDNS.

What counts as one, and how its announcement reads, is rproxy_core's (the ``rproxy agent``
command lists and follows the same apps); this module reads them from Home Assistant's own
zeroconf browser.
"""

from __future__ import annotations

import logging

from homeassistant.core import HomeAssistant
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from zeroconf.asyncio import AsyncServiceInfo

from rproxy_core.agent.discovery import (
    DiscoveredApp,
    app_from_info,
    app_from_properties,
    property_text,
)

from .const import ZEROCONF_HTTP_TYPE, ZEROCONF_TYPE

__all__ = ["DiscoveredApp", "app_from_properties", "app_from_service_info", "discovered_apps"]

_LOGGER = logging.getLogger(__package__)

#: mDNS record type and class of the service pointers (RFC 6763 §4.1).
_TYPE_PTR = 12
_CLASS_IN = 1


def app_from_service_info(info: ZeroconfServiceInfo) -> DiscoveredApp | None:
    """The app a Home Assistant zeroconf discovery describes."""
    address = info.ip_address
    host = str(address) if address is not None else (info.hostname or "").rstrip(".")
    properties = {str(k): property_text(v) for k, v in info.properties.items()}
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
            app = app_from_info(info)
            if app is not None:
                apps.setdefault(app.key, app)
    return sorted(apps.values(), key=lambda app: app.name.lower())
