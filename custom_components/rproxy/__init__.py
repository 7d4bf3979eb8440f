"""rproxy: put this Home Assistant, or a web app on the LAN, on the internet through a bridge."""

from __future__ import annotations

from homeassistant.const import EVENT_HOMEASSISTANT_STOP, Platform
from homeassistant.core import HomeAssistant

from .coordinator import RproxyConfigEntry, RproxyCoordinator
from .issues import async_delete_issues

PLATFORMS: list[Platform] = [Platform.BINARY_SENSOR, Platform.BUTTON, Platform.SENSOR, Platform.SWITCH]


async def async_setup_entry(hass: HomeAssistant, entry: RproxyConfigEntry) -> bool:
    """Start the tunnel of a config entry."""
    coordinator = RproxyCoordinator(hass, entry)
    await coordinator.async_first_start()
    entry.runtime_data = coordinator
    entry.async_on_unload(entry.add_update_listener(_async_options_updated))
    entry.async_on_unload(hass.bus.async_listen_once(EVENT_HOMEASSISTANT_STOP, coordinator.async_on_hass_stop))
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: RproxyConfigEntry) -> bool:
    """Stop the tunnel: the agent closes and every request it was serving is cancelled."""
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded:
        await entry.runtime_data.async_stop()
    return unloaded


async def async_remove_entry(hass: HomeAssistant, entry: RproxyConfigEntry) -> None:
    """Forget the repairs this entry raised."""
    async_delete_issues(hass, entry)


async def _async_options_updated(hass: HomeAssistant, entry: RproxyConfigEntry) -> None:
    """Apply new options by restarting the agent; the switch's own change needs no restart."""
    if entry.runtime_data.options_need_restart():
        await hass.config_entries.async_reload(entry.entry_id)
