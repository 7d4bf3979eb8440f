"""Traffic and health of the tunnel."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from homeassistant.components.sensor import SensorDeviceClass, SensorEntity, SensorEntityDescription, SensorStateClass
from homeassistant.const import EntityCategory, UnitOfInformation, UnitOfTime
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.util import dt as dt_util

from .coordinator import RproxyConfigEntry, RproxyCoordinator, TunnelSnapshot
from .entity import RproxyEntity

PARALLEL_UPDATES = 0  # pushed by the agent; nothing to fetch


@dataclass(frozen=True, kw_only=True)
class RproxySensorDescription(SensorEntityDescription):
    """A sensor and how to read it from a snapshot."""

    value_fn: Callable[[TunnelSnapshot], str | int | float | datetime | None]
    attributes_fn: Callable[[TunnelSnapshot], Mapping[str, Any]] | None = None


def _connected_since(data: TunnelSnapshot) -> datetime | None:
    return dt_util.utc_from_timestamp(data.connected_since) if data.connected_since else None


SENSORS: tuple[RproxySensorDescription, ...] = (
    RproxySensorDescription(
        key="public_url",
        value_fn=lambda data: data.public_url,
        # Why the address is what it is, or unknown; and where the extra services are.
        attributes_fn=lambda data: {"source": data.public_url_source, "services": data.services},
    ),
    RproxySensorDescription(
        key="active_connections",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda data: data.stats.active_streams,
    ),
    RproxySensorDescription(
        key="requests_served",
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda data: data.stats.requests_served,
    ),
    RproxySensorDescription(
        key="bytes_in",
        device_class=SensorDeviceClass.DATA_SIZE,
        state_class=SensorStateClass.TOTAL_INCREASING,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.MEBIBYTES,
        suggested_display_precision=2,
        value_fn=lambda data: data.stats.bytes_received,
    ),
    RproxySensorDescription(
        key="bytes_out",
        device_class=SensorDeviceClass.DATA_SIZE,
        state_class=SensorStateClass.TOTAL_INCREASING,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.MEBIBYTES,
        suggested_display_precision=2,
        value_fn=lambda data: data.stats.bytes_sent,
    ),
    RproxySensorDescription(
        key="round_trip_time",
        device_class=SensorDeviceClass.DURATION,
        state_class=SensorStateClass.MEASUREMENT,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        suggested_display_precision=1,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda data: round(data.stats.rtt * 1000, 2) if data.stats.rtt is not None else None,
    ),
    RproxySensorDescription(
        key="connected_since",
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=_connected_since,
    ),
    RproxySensorDescription(
        key="reconnects",
        state_class=SensorStateClass.TOTAL_INCREASING,
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=lambda data: data.stats.reconnects,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant, entry: RproxyConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the tunnel's sensors."""
    async_add_entities(RproxySensor(entry.runtime_data, description) for description in SENSORS)


class RproxySensor(RproxyEntity, SensorEntity):
    """One figure of the tunnel."""

    entity_description: RproxySensorDescription

    def __init__(self, coordinator: RproxyCoordinator, description: RproxySensorDescription) -> None:
        super().__init__(coordinator, description.key)
        self.entity_description = description

    @property
    def native_value(self) -> str | int | float | datetime | None:
        return self.entity_description.value_fn(self.coordinator.data)

    @property
    def extra_state_attributes(self) -> Mapping[str, Any] | None:
        attributes_fn = self.entity_description.attributes_fn
        return None if attributes_fn is None else attributes_fn(self.coordinator.data)
