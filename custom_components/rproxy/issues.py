"""The repair issues a tunnel raises, and their clearing: one place for their ids and texts."""

from __future__ import annotations

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from yarl import URL

from .const import CONF_TUNNEL_NAME, DOMAIN

#: Where the visitor_local_address repair sends the user.
VISITORS_REFUSED_DOCS = "https://github.com/rproxy-dev/rproxy/blob/main/docs/HOME-ASSISTANT.md#visitors-refused"


def insecure_bridge_issue_id(entry: ConfigEntry) -> str:
    """Repair issue raised while the tunnel runs unencrypted over the internet."""
    return f"insecure_bridge_{entry.entry_id}"


def visitor_refused_issue_id(entry: ConfigEntry) -> str:
    """Repair issue raised while tunnelled visitors arrive with local addresses."""
    return f"visitor_local_address_{entry.entry_id}"


def async_update_insecure_bridge(hass: HomeAssistant, entry: ConfigEntry, bridge_url: str, cleartext: bool) -> None:
    """Warn while the tunnel to a non-local bridge is not encrypted; clear once it is."""
    if cleartext:
        ir.async_create_issue(
            hass,
            DOMAIN,
            insecure_bridge_issue_id(entry),
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="insecure_bridge",
            translation_placeholders={"tunnel": entry.data[CONF_TUNNEL_NAME], "bridge": str(URL(bridge_url).origin())},
        )
    else:
        ir.async_delete_issue(hass, DOMAIN, insecure_bridge_issue_id(entry))


def visitor_refused_raised(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    """Whether the visitor_local_address repair is up (raised before a reload, say)."""
    return ir.async_get(hass).async_get_issue(DOMAIN, visitor_refused_issue_id(entry)) is not None


def async_raise_visitor_refused(hass: HomeAssistant, entry: ConfigEntry, address: str) -> None:
    """Tell the user that tunnelled visitors arrive with addresses Home Assistant would trust."""
    ir.async_create_issue(
        hass,
        DOMAIN,
        visitor_refused_issue_id(entry),
        is_fixable=False,
        severity=ir.IssueSeverity.ERROR,
        translation_key="visitor_local_address",
        translation_placeholders={"tunnel": entry.data[CONF_TUNNEL_NAME], "address": address},
        learn_more_url=VISITORS_REFUSED_DOCS,
    )


def async_clear_visitor_refused(hass: HomeAssistant, entry: ConfigEntry) -> None:
    """Visitors arrive with public addresses again: the repair goes."""
    ir.async_delete_issue(hass, DOMAIN, visitor_refused_issue_id(entry))


def async_delete_issues(hass: HomeAssistant, entry: ConfigEntry) -> None:
    """Forget every repair this entry raised (the entry is removed)."""
    ir.async_delete_issue(hass, DOMAIN, visitor_refused_issue_id(entry))
    ir.async_delete_issue(hass, DOMAIN, insecure_bridge_issue_id(entry))
