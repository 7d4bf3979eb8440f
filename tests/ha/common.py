"""Helpers shared by the Home Assistant tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pytest_homeassistant_custom_component.common import MockConfigEntry

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component

from custom_components.rproxy.const import DOMAIN

from .conftest import TOKEN, free_port

__all__ = ["entry_data", "free_port", "setup_tunnel", "start_homeassistant_http", "wait_for"]


def entry_data(bridge_url: str, target_url: str | None = None, *, name: str = "home", token: str = TOKEN) -> dict[str, Any]:
    """Config entry data of a tunnel to ``target_url`` (None: Home Assistant itself)."""
    if target_url is None:
        return {
            "bridge_url": bridge_url,
            "token": token,
            "tunnel_name": name,
            "target": "homeassistant",
            "target_url": None,
            "target_name": "Home Assistant",
        }
    return {
        "bridge_url": bridge_url,
        "token": token,
        "tunnel_name": name,
        "target": "url",
        "target_url": target_url,
        "target_name": "Home app",
    }


async def setup_tunnel(
    hass: HomeAssistant,
    bridge_url: str,
    target_url: str | None = None,
    *,
    options: dict[str, Any] | None = None,
    expect: ConfigEntryState = ConfigEntryState.LOADED,
    **data_overrides: Any,
) -> MockConfigEntry:
    """Add and set up an rproxy config entry; check it reached ``expect``."""
    data = entry_data(bridge_url, target_url)
    data.update(data_overrides)
    entry = MockConfigEntry(
        domain=DOMAIN,
        title=f"{data['tunnel_name']}: {data['target_name']}",
        data=data,
        options=options or {},
        unique_id="homeassistant" if target_url is None else f"url:{target_url}",
    )
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is expect, entry.reason
    return entry


async def start_homeassistant_http(hass: HomeAssistant, **http_config: Any) -> int:
    """Set up Home Assistant's own HTTP server on 127.0.0.1 and start it; return its port.

    The tunnel to Home Assistant itself hands requests to this server's connection handler
    (``hass.http.runner``), which exists once the server has started. Stop it with
    ``await hass.http.stop()``.
    """
    port = free_port()
    config = {"server_host": ["127.0.0.1"], "server_port": port, **http_config}
    assert await async_setup_component(hass, "http", {"http": config})
    await hass.http.start()
    return port


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail with ``what`` after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
