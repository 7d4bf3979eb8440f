"""The base of every rproxy entity: one device per tunnel."""

from __future__ import annotations

from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from rproxy_core import __version__ as rproxy_version

from .const import CONF_TUNNEL_NAME, DOMAIN
from .coordinator import RproxyCoordinator


class RproxyEntity(CoordinatorEntity[RproxyCoordinator]):
    """An entity of a tunnel's device, updated by the agent's pushes."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: RproxyCoordinator, key: str) -> None:
        super().__init__(coordinator)
        entry = coordinator.config_entry
        self._attr_unique_id = f"{entry.entry_id}_{key}"
        self._attr_translation_key = key
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, entry.entry_id)},
            name=f"rproxy {entry.data[CONF_TUNNEL_NAME]}",
            manufacturer="rproxy",
            model="Tunnel agent",
            sw_version=rproxy_version,
            entry_type=DeviceEntryType.SERVICE,
        )
