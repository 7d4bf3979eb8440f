"""rproxy: put this Home Assistant, or a web app on the LAN, on the internet through a bridge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from homeassistant.const import EVENT_HOMEASSISTANT_STOP, Platform
from homeassistant.core import Event, HomeAssistant
from homeassistant.exceptions import ConfigEntryAuthFailed, ConfigEntryError, ConfigEntryNotReady
from homeassistant.helpers import issue_registry as ir
from yarl import URL

from rproxy_core import AuthenticationError
from rproxy_core.agent import AgentState
from rproxy_core.exceptions import ConfigError

from .const import CONF_BRIDGE_URL, CONF_EXPOSED, CONF_TUNNEL_NAME, DOMAIN
from .coordinator import RproxyConfigEntry, RproxyCoordinator, cleartext_bridge, visitor_refused_issue_id

PLATFORMS: list[Platform] = [Platform.BINARY_SENSOR, Platform.BUTTON, Platform.SENSOR, Platform.SWITCH]


async def async_setup_entry(hass: HomeAssistant, entry: RproxyConfigEntry) -> bool:
    """Start the tunnel of a config entry."""
    coordinator = RproxyCoordinator(hass, entry)
    _check_bridge_url(hass, entry)
    if coordinator.exposed:
        try:
            outcome = await coordinator.async_start()
        except ConfigError as err:  # settings stored by an older version, or edited by hand
            raise ConfigEntryError(
                translation_domain=DOMAIN,
                translation_key="invalid_settings",
                translation_placeholders={"error": str(err)},
            ) from None
        if outcome is not AgentState.CONNECTED:
            agent = coordinator.agent
            failure = agent.failure if agent is not None else None
            error = (agent.last_error if agent is not None else None) or "no answer from the bridge"
            await coordinator.async_stop()
            if isinstance(failure, AuthenticationError):
                raise ConfigEntryAuthFailed(
                    translation_domain=DOMAIN, translation_key="invalid_auth", translation_placeholders={"error": error}
                )
            raise ConfigEntryNotReady(
                translation_domain=DOMAIN, translation_key="cannot_connect", translation_placeholders={"error": error}
            )
    entry.runtime_data = coordinator
    entry.async_on_unload(entry.add_update_listener(_async_options_updated))

    async def _stop_on_shutdown(event: Event) -> None:
        # Close with a goodbye while the loop still runs: the bridge stops routing visitors
        # here at once, and nothing logs a lost tunnel as Home Assistant goes down.
        await coordinator.async_stop()

    entry.async_on_unload(hass.bus.async_listen_once(EVENT_HOMEASSISTANT_STOP, _stop_on_shutdown))
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
    ir.async_delete_issue(hass, DOMAIN, visitor_refused_issue_id(entry))
    ir.async_delete_issue(hass, DOMAIN, insecure_bridge_issue_id(entry))


async def _async_options_updated(hass: HomeAssistant, entry: RproxyConfigEntry) -> None:
    """Apply new options by restarting the agent; the switch's own change needs no restart."""
    coordinator = entry.runtime_data
    if coordinator.applied_options == _without_exposed(entry.options):
        return
    await hass.config_entries.async_reload(entry.entry_id)


def _without_exposed(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != CONF_EXPOSED}


def insecure_bridge_issue_id(entry: RproxyConfigEntry) -> str:
    """Repair issue raised while the tunnel runs unencrypted over the internet."""
    return f"insecure_bridge_{entry.entry_id}"


def _check_bridge_url(hass: HomeAssistant, entry: RproxyConfigEntry) -> None:
    """Warn while the tunnel to a non-local bridge is not encrypted; clear once it is."""
    if cleartext_bridge(entry.data[CONF_BRIDGE_URL]):
        url = URL(entry.data[CONF_BRIDGE_URL])
        ir.async_create_issue(
            hass,
            DOMAIN,
            insecure_bridge_issue_id(entry),
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="insecure_bridge",
            translation_placeholders={"tunnel": entry.data[CONF_TUNNEL_NAME], "bridge": str(url.origin())},
        )
    else:
        ir.async_delete_issue(hass, DOMAIN, insecure_bridge_issue_id(entry))
