"""Expose or stop exposing the target."""

from __future__ import annotations

from typing import Any

from homeassistant.components.switch import SwitchEntity
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .coordinator import RproxyConfigEntry
from .entity import RproxyEntity

PARALLEL_UPDATES = 1


async def async_setup_entry(
    hass: HomeAssistant, entry: RproxyConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the tunnel's on/off switch."""
    async_add_entities([ExposeSwitch(entry.runtime_data, "exposed")])


class ExposeSwitch(RproxyEntity, SwitchEntity):
    """On: the agent keeps the tunnel up. Off: nothing is reachable from outside (remembered)."""

    @property
    def is_on(self) -> bool:
        return self.coordinator.data.exposed

    async def async_turn_on(self, **kwargs: Any) -> None:
        await self.coordinator.async_set_exposed(True)

    async def async_turn_off(self, **kwargs: Any) -> None:
        await self.coordinator.async_set_exposed(False)
