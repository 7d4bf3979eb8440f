"""The bridge's status page in real headless Chromium (Debian's), on a phone-sized screen: the
admin token is asked for, the tunnel and its agent are listed, and the traffic chart moves while
the test sends requests. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web
from playwright.async_api import ConsoleMessage, Page, async_playwright, expect

from tests.conftest import running_agent, running_bridge, start_app, wait_for_tunnel
from tests.core.browser.test_demo_browser import ARTIFACTS, CHROMIUM_ARGS, chromium_path

ADMIN = "admin-token-" + "s" * 24


async def test_the_status_page_lists_the_tunnel_and_its_chart_moves_with_traffic() -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * 20_000)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner, url = await start_app(app)
    stop = asyncio.Event()

    async def traffic(base: str) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.get(base + "/load") as response:
                    await response.read()
                await asyncio.sleep(0.005)

    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # A CSP violation shows here; the 401 of the wrong token tried on purpose is expected.
        if message.type in ("error", "warning") and "status of 401" not in message.text:
            problems.append(message.text)

    try:
        async with (
            running_bridge(admin_token=ADMIN) as bridge,
            running_agent(bridge.url, url, agent_id="pi@garden", heartbeat_interval=0.5),
            async_playwright() as playwright,
        ):
            await wait_for_tunnel(bridge)
            # Headless (Playwright's default), and no name resolves but the loopback address.
            browser = await playwright.chromium.launch(
                executable_path=chromium_path(),
                args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
            )
            try:
                page = await browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
                page.on("console", on_console)
                page.on("pageerror", lambda error: problems.append(str(error)))
                await page.goto(bridge.url + "/_rproxy/status")
                await expect(page.locator("#login")).to_be_visible()
                await expect(page.locator("#tunnels .tunnel")).to_have_count(0)

                await page.fill("#token", "not-the-token")
                await page.click("#token-form button")
                await expect(page.locator("#problem")).to_have_text("That admin token is not accepted.", timeout=10_000)

                await page.fill("#token", ADMIN)
                await page.click("#token-form button")
                tunnel = page.locator('.tunnel[data-name="home"]')
                await expect(tunnel).to_be_visible(timeout=10_000)
                await expect(tunnel.locator("tr.agent")).to_contain_text("pi@garden")
                await expect(tunnel.locator("tr.agent")).to_contain_text("127.0.0.1")
                await _fits_sideways(page, 390)
                await expect(page.locator("#chart")).to_have_attribute("data-points", "2", timeout=10_000)
                quiet = await page.eval_on_selector("#chart", "c => c.toDataURL()")
                assert await page.get_attribute("#chart", "data-peak") == "0.00"

                load = asyncio.create_task(traffic(bridge.url))
                try:
                    # The chart is redrawn every 2 s from the status JSON: traffic must show in it.
                    async with asyncio.timeout(20):
                        while float(await page.get_attribute("#chart", "data-peak") or 0) < 5:
                            await asyncio.sleep(0.25)
                    assert await page.eval_on_selector("#chart", "c => c.toDataURL()") != quiet
                    await expect(page.locator("#rate")).not_to_have_text("0.0")
                    await page.screenshot(path=str(ARTIFACTS / "status-phone.png"), full_page=True)
                finally:
                    stop.set()
                    with contextlib.suppress(asyncio.CancelledError):
                        await load
                await expect(tunnel).not_to_contain_text("requests\n0")
                wide = await browser.new_page(viewport={"width": 1200, "height": 800})
                await wide.goto(bridge.url + "/_rproxy/status")
                # The token lives in the tab's session storage: a new tab asks again.
                await expect(wide.locator("#login")).to_be_visible()
            finally:
                await browser.close()
    finally:
        await runner.cleanup()
    assert problems == [], problems


async def _fits_sideways(page: Page, width: int) -> None:
    """Nothing on the page is wider than the screen or cut by a scroll box: every cell of the
    agent table, its "streams" column too, is on screen (a phone, 390 px)."""
    overflow = await page.evaluate(
        """(width) => {
            const wide = [];
            if (document.documentElement.scrollWidth > width) wide.push("page " + document.documentElement.scrollWidth);
            for (const box of document.querySelectorAll(".scroll")) {
                if (box.scrollWidth > box.clientWidth)
                    wide.push("scroll box " + box.scrollWidth + " > " + box.clientWidth);
            }
            for (const cell of document.querySelectorAll("td, th")) {
                const r = cell.getBoundingClientRect();
                if (r.width && (r.right > width || r.left < 0))
                    wide.push(cell.textContent + " at " + r.left + "-" + r.right);
            }
            return wide;
        }""",
        width,
    )
    assert overflow == [], overflow


async def test_the_status_page_does_not_exist_without_an_admin_token() -> None:
    async with (
        running_bridge() as bridge,
        aiohttp.ClientSession() as session,
        session.get(bridge.url + "/_rproxy/status") as response,
    ):
        assert response.status == 404


async def test_the_status_page_is_locked_down_by_its_headers() -> None:
    """A fresh nonce per answer in a strict Content-Security-Policy; nothing cached or framed."""
    async with running_bridge(admin_token=ADMIN) as bridge, aiohttp.ClientSession() as session:
        policies = []
        for _ in range(2):
            async with session.get(bridge.url + "/_rproxy/status") as response:
                assert response.status == 200 and response.content_type == "text/html"
                policy = response.headers["Content-Security-Policy"]
                body = await response.text()
                nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
                assert body.count(f'nonce="{nonce}"') == 2 and "__NONCE__" not in body
                assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
                assert response.headers["Cache-Control"] == "no-store"
                policies.append(policy)
        assert policies[0] != policies[1]
