"""Diagnostics download: settings and tunnel state, secrets removed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.const import CONF_TOKEN
from homeassistant.core import HomeAssistant
from yarl import URL

from .const import CONF_BRIDGE_URL, CONF_TARGET_URL, CONF_VISITOR_PASSWORD, CONF_VISITOR_USERNAME
from .coordinator import RproxyConfigEntry

TO_REDACT = {CONF_TOKEN, CONF_VISITOR_PASSWORD, CONF_VISITOR_USERNAME}


def _without_userinfo(url: str | None) -> str | None:
    """URLs may carry ``user:password@``; keep the rest, which helps to debug."""
    if not url:
        return url
    parsed = URL(url)
    if parsed.user is None and parsed.password is None:
        return url
    return str(parsed.with_user(None))


async def async_get_config_entry_diagnostics(hass: HomeAssistant, entry: RproxyConfigEntry) -> dict[str, Any]:
    """What support needs to see of a tunnel, and nothing secret."""
    data = dict(async_redact_data(entry.data, TO_REDACT))
    for key in (CONF_BRIDGE_URL, CONF_TARGET_URL):
        if key in data:
            data[key] = _without_userinfo(data[key])
    coordinator = entry.runtime_data
    snapshot = asdict(coordinator.data)
    snapshot.update(snapshot.pop("stats"))  # one flat table of the tunnel's figures
    snapshot["state"] = coordinator.data.state.value
    agent = coordinator.agent
    return {
        "entry": {"title": entry.title, "data": data, "options": async_redact_data(entry.options, TO_REDACT)},
        "tunnel": snapshot,
        "agent": None
        if agent is None
        else {"connect_url": _without_userinfo(agent.connect_url), "agent_id": agent.config.agent_id},
    }
