"""The demo as a newcomer uses it: real Chromium opens the public URL and switches a light."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import aiohttp
from playwright.async_api import async_playwright, expect

from tests.conftest import ROOT, Proc, free_port, wait_http

ARTIFACTS = Path(os.environ.get("RPROXY_ARTIFACTS", ROOT / "test-artifacts"))

#: As the machine's own probe found: without the background-networking flags Chromium keeps
#: trying to reach Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """Debian's Chromium; scripts/test installs it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed (scripts/test installs Debian's chromium package)"
    return path


async def test_a_light_switched_in_the_browser_through_the_tunnel_reaches_the_home_app(
    procs: Callable[..., Proc],
) -> None:
    """Clicking a light on the public page switches it at home and shows live on a second page."""
    port = free_port()
    demo = procs("demo", "--listen", f"127.0.0.1:{port}")
    public = f"http://127.0.0.1:{port}/"
    await wait_http(public + "api/state")
    assert "Public address, through the tunnel: " + public in demo.output()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            laptop = await browser.new_page()
            for page in (phone, laptop):
                await page.goto(public)
                await expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
            porch_on_phone = phone.locator("#device-porch")
            await expect(porch_on_phone).to_have_attribute("aria-pressed", "false")

            await porch_on_phone.click()

            await expect(porch_on_phone).to_have_attribute("aria-pressed", "true", timeout=10_000)
            # The other open page learns of it over its own WebSocket through the tunnel.
            await expect(laptop.locator("#device-porch")).to_have_attribute("aria-pressed", "true", timeout=10_000)
            await phone.screenshot(path=str(ARTIFACTS / "demo-phone.png"), full_page=True)
        finally:
            await browser.close()

    async with aiohttp.ClientSession() as session, session.get(public + "api/state") as response:
        state = await response.json()
    assert {d["id"]: d["on"] for d in state["devices"]}["porch"] is True
