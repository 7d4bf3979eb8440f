"""Reconnect the tunnel now."""

from __future__ import annotations

from homeassistant.components.button import ButtonEntity
from homeassistant.const import EntityCategory
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .coordinator import RproxyConfigEntry
from .entity import RproxyEntity

PARALLEL_UPDATES = 1


async def async_setup_entry(
    hass: HomeAssistant, entry: RproxyConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the reconnect button."""
    async_add_entities([ReconnectButton(entry.runtime_data, "reconnect")])


class ReconnectButton(RproxyEntity, ButtonEntity):
    """Drops the tunnel and dials the bridge again at once (e.g. after changing networks)."""

    _attr_entity_category = EntityCategory.CONFIG

    async def async_press(self) -> None:
        await self.coordinator.async_reconnect()
