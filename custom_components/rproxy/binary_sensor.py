"""Whether the tunnel is up."""

from __future__ import annotations

from homeassistant.components.binary_sensor import BinarySensorDeviceClass, BinarySensorEntity
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .coordinator import RproxyConfigEntry
from .entity import RproxyEntity

PARALLEL_UPDATES = 0  # pushed by the agent; nothing to fetch


async def async_setup_entry(
    hass: HomeAssistant, entry: RproxyConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the connectivity sensor of the tunnel."""
    async_add_entities([TunnelConnectedSensor(entry.runtime_data, "connected")])


class TunnelConnectedSensor(RproxyEntity, BinarySensorEntity):
    """On while the agent holds a live tunnel to the bridge."""

    _attr_device_class = BinarySensorDeviceClass.CONNECTIVITY

    @property
    def is_on(self) -> bool:
        return self.coordinator.data.connected

    @property
    def extra_state_attributes(self) -> dict[str, str | None]:
        data = self.coordinator.data
        return {"state": data.state.value, "last_error": data.last_error}
