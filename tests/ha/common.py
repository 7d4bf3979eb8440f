"""Helpers shared by the Home Assistant tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from homeassistant.components.http.ban import KEY_BAN_MANAGER
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rproxy.const import DOMAIN
from rproxy_core import Bridge

from .conftest import TOKEN, free_port

__all__ = [
    "claim",
    "entry_data",
    "free_port",
    "homeassistant_tunnel",
    "setup_tunnel",
    "start_homeassistant_http",
    "wait_for",
]


def claim(address: str) -> dict[str, str]:
    """Headers of a visitor of ``proxied_bridge`` claiming ``address`` (believed: that bridge
    trusts 127.0.0.0/8)."""
    return {"X-Forwarded-For": address}


def entry_data(
    bridge_url: str, target_url: str | None = None, *, name: str = "home", token: str = TOKEN
) -> dict[str, Any]:
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


@asynccontextmanager
async def homeassistant_tunnel(
    hass: HomeAssistant, bridge: Bridge, tmp_path: Path, *, options: dict[str, Any] | None = None, **http_config: Any
) -> AsyncIterator[MockConfigEntry]:
    """Home Assistant's HTTP server running (with ``auth`` and ``api``) and a tunnel to it through ``bridge``.

    The ban manager's file goes to ``tmp_path``: a ban must never land in the plugin's shared
    ``testing_config`` directory (where it would ban the same address in every later test).
    """
    await start_homeassistant_http(hass, **http_config)
    entry: MockConfigEntry | None = None
    try:
        if (ban_manager := hass.http.app.get(KEY_BAN_MANAGER)) is not None:
            ban_manager.path = str(tmp_path / "ip_bans.yaml")
        assert await async_setup_component(hass, "auth", {})
        assert await async_setup_component(hass, "api", {})
        entry = await setup_tunnel(hass, bridge.url, None, options=options)
        yield entry
    finally:
        if entry is not None:
            assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.http.stop()
