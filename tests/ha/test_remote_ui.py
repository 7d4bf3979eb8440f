"""Home Assistant's own UI through the tunnel, in a real browser, from a visitor on "the internet".

The parts, all real and as a user runs them: ``hass`` from ``.venv-e2e`` (Home Assistant
2025.4.4 with ``home-assistant-frontend`` 20250411.0, and rproxy-core from the wheel built from
this checkout) with the integration set up through its config flow with the target "Home
Assistant"; an ``rproxy bridge`` process; Debian's Chromium, headless, driven over the
DevTools protocol (``browser``). The browser runs in a network namespace of its own
(``netns``): it reaches the bridge and Home Assistant over a veth pair from a TEST-NET-3
address, so Home Assistant sees a visitor from the internet, not loopback.

The scenario: the same browser loads the UI straight from Home Assistant and through the
tunnel, each time with a cold cache (a fresh browser context), logging in through the real
login page and waiting for the Overview to render; every request that succeeds directly
must succeed through the tunnel with the same bytes (before the in-process transport
supported ``loop.sendfile()``, every file arrived without a body and the UI never left its
splash screen). Then, through the tunnel: Settings → Devices & services → Helpers, a helper
toggled in its dialog changes in Home Assistant, a change made in Home Assistant shows in
the page, and after a bridge restart the page reconnects by itself and stays live.

Screenshots (1280x900 and 390x844) go to ``test-artifacts/ha-remote-ui/<run>/`` (or
``$RPROXY_ARTIFACTS/ha-remote-ui/<run>/``); the test prints the directory and the load times.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .browser import Browser, Page, Request, chromium
from .common import free_port
from .e2e import (
    ROOT,
    VENV_E2E,
    HomeAssistantApi,
    Process,
    bridge_url_from,
    ensure_e2e_venv,
    log_records,
    processes,
    tail,
    wait_until,
)
from .netns import VisitorNetwork, visitor_network

if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the remote UI test needs Linux network namespaces", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("RPROXY_ARTIFACTS", ROOT / "test-artifacts")) / "ha-remote-ui"
#: The bridge's domain: the tunnel "home" is at home.DOMAIN (Chromium maps the name to the bridge).
DOMAIN = "ui.test"
HELPER = "input_boolean.porch_light"
SCREEN_SIZES = ((1280, 900), (390, 844))
MB = 1 << 20
#: A file in www/: served as /local/big.bin, and in the backup (which is then about as big).
BIG_FILE_SIZE = 48 * MB + 123

CONFIGURATION_YAML = """\
# Only what the UI needs (no default_config: its integrations would fetch from the internet).
homeassistant:
  name: Remote UI home
  time_zone: UTC
http:
  # Loopback for the test's own API calls, the host's end of the visitor network for the
  # browser's direct loads.
  server_host: [127.0.0.1, {host}]
  server_port: {port}
api:
config:
onboarding:
input_boolean:
  porch_light:
    name: Porch light
logger:
  default: info
  logs:
    custom_components.rproxy: debug
    rproxy: debug
"""


@dataclass
class Load:
    """One cold load of the UI: login page, log in, Overview."""

    origin: str
    login_page_s: float
    overview_s: float
    requests: list[Request]

    @property
    def total_s(self) -> float:
        return self.login_page_s + self.overview_s

    def own(self) -> list[Request]:
        """The requests to the origin (the brand icons Home Assistant links to are on the internet)."""
        return [r for r in self.requests if r.url.startswith(self.origin)]


def request_key(request: Request, origin: str) -> str:
    """A request as ``METHOD /path``: origin and query left out; in the API's paths, flow and
    token ids made ``*`` (files keep their names, which carry the hash of their content)."""
    path = request.url[len(origin) :].split("?", 1)[0].split("#", 1)[0] or "/"
    key = f"{request.method} {path}"
    return key if is_static(key) else re.sub(r"[0-9a-f]{16,}", "*", key)


def is_static(key: str) -> bool:
    """Files Home Assistant serves from disk: the same bytes whichever way they are fetched."""
    return key.startswith(("GET /frontend_latest/", "GET /static/")) or key == "GET /manifest.json"


def failed_requests(page: Page) -> str:
    """The page's failed requests, for a failure message."""
    failed = [
        f"{r.method} {r.url} -> {r.failed or r.status}"
        for r in page.requests.values()
        if r.failed or (r.status or 0) >= 400
    ]
    return "\n".join(failed[:30]) or "(none)"


async def step(page: Page, what: str, action: Callable[[], Awaitable[Any]]) -> Any:
    """Run one step; if it fails, say which, with the page's failed requests."""
    try:
        return await action()
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}\nfailed requests of the page:\n{failed_requests(page)}") from None


async def log_in(browser: Browser, origin: str, password: str) -> tuple[Page, Load]:
    """Open ``origin`` in a fresh browser context, log in through the login page, wait for the Overview."""
    page = await browser.page(*SCREEN_SIZES[0])
    started = time.monotonic()
    await page.navigate(origin + "/")
    await step(
        page,
        f"the login page at {origin}",
        lambda: page.wait_for("the login form", "return deep('input[name=username]').length > 0", 45),
    )
    login_page = time.monotonic() - started
    await page.click("the user name field", "return deep('input[name=username]')[0]")
    await page.type_text("owner")
    await page.click("the password field", "return deep('input[name=password]')[0]")
    await page.type_text(password)
    started = time.monotonic()
    await page.press_enter()
    await step(
        page,
        f"the Overview at {origin} after logging in",
        lambda: page.wait_for(
            "the Overview with its cards",
            "return location.pathname.startsWith('/lovelace') && !!byText('hui-card', 'Porch light')",
            45,
        ),
    )
    overview = time.monotonic() - started
    await page.wait_for_network_idle(quiet=1.0, timeout=20)
    # What the login page had under way when it handed over to the app is of no interest.
    requests = [r for r in page.requests.values() if not page.abandoned(r)]
    return page, Load(origin, login_page, overview, requests)


def outcome(request: Request) -> str:
    """How a request ended: its status, or the browser's error."""
    return request.failed or str(request.status)


def compare(directs: list[Load], tunnels: list[Load]) -> list[str]:
    """What ended otherwise through the tunnel than directly: a failure, another status, or a
    file with other bytes; and files every direct load fetched but no load through the tunnel.

    The frontend fetches some chunks lazily, on timers and on what has rendered so far, so one
    cold load may skip a file another fetched (two direct loads differ too); a file the tunnel
    could not carry would show as a failure above or be missing from every load through it."""

    def by_key(load: Load) -> dict[str, list[Request]]:
        keyed: dict[str, list[Request]] = {}
        for request in load.own():
            keyed.setdefault(request_key(request, load.origin), []).append(request)
        return keyed

    every_direct = [by_key(load) for load in directs]
    straight: dict[str, list[Request]] = {}
    for keyed in every_direct:
        for key, requests in keyed.items():
            straight.setdefault(key, []).extend(requests)
    throughs = [by_key(load) for load in tunnels]
    problems: list[str] = []
    for through in throughs:
        for key, requests in through.items():
            seen_directly = {outcome(r) for r in straight.get(key, [])}
            for request in requests:
                if outcome(request) != "200" and outcome(request) not in seen_directly:
                    problems.append(
                        f"{key}: {outcome(request)} through the tunnel, {sorted(seen_directly) or 'not asked'} directly"
                    )
            if is_static(key) and key in straight:
                sizes = {r.body_bytes for r in requests if outcome(r) == "200"}
                expected = {r.body_bytes for r in straight[key] if outcome(r) == "200"}
                if sizes - expected:
                    problems.append(f"{key}: {sorted(expected)} bytes directly, {sorted(sizes)} through the tunnel")
    for key in every_direct[0]:
        loaded = [any(outcome(r) == "200" for r in keyed.get(key, [])) for keyed in every_direct]
        if is_static(key) and all(loaded) and not any(key in through for through in throughs):
            problems.append(f"{key}: loaded by every direct load, never through the tunnel")
    return problems


@pytest.mark.timeout(300)  # a cold install of .venv-e2e included; about 25 s once installed
async def test_the_home_assistant_ui_through_the_tunnel(socket_enabled: None, tmp_path: Path) -> None:
    """Log in, render, stay live and recover from a bridge restart, in Chromium, through the tunnel."""
    started = time.monotonic()
    await asyncio.to_thread(ensure_e2e_venv)
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    artifacts = ARTIFACTS / run
    artifacts.mkdir(parents=True)
    print(f"\nscreenshots and logs of this run: {artifacts}")
    token = f"agent-token-{secrets.token_hex(16)}"
    (tmp_path / "tokens").write_text(token + "\n")
    failed = True
    try:
        with visitor_network() as network:
            config = tmp_path / "config"
            (config / "custom_components").mkdir(parents=True)
            shutil.copytree(
                ROOT / "custom_components" / "rproxy",
                config / "custom_components" / "rproxy",
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
            port = free_port()
            (config / "configuration.yaml").write_text(CONFIGURATION_YAML.format(host=network.host_address, port=port))
            (config / "www").mkdir()
            big_sha256 = await asyncio.to_thread(write_pattern, config / "www" / "big.bin", BIG_FILE_SIZE)
            async with processes() as running:
                try:
                    running["bridge"] = start_bridge(tmp_path, network, 0)
                    running["hass"] = Process(
                        "hass",
                        [str(VENV_E2E / "bin" / "hass"), "--config", str(config), "--log-no-color"],
                        tmp_path,
                        tmp_path / "hass.out",
                    )
                    async with aiohttp.ClientSession() as session:
                        await scenario(session, running, network, tmp_path, port, token, artifacts, big_sha256)
                    failed = False
                finally:
                    if failed:
                        for process in running.values():
                            print(f"----- {process.name} ({process.log}) -----\n{tail(process.output())}")
    finally:
        # Every process has stopped: their logs are whole.
        for log in (*tmp_path.glob("*.log"), tmp_path / "hass.out"):
            if log.exists():
                shutil.copy(log, artifacts / log.name)
    hass_output = running["hass"].output()
    assert running["hass"].exit_code == 0, tail(hass_output)
    # Nothing failed under Home Assistant's HTTP server (a failed sendfile was logged as
    # "Unhandled exception" by aiohttp.server) and nothing the integration did raised.
    problems = [
        record
        for record in log_records(hass_output)
        if "aiohttp.server" in record or ("rproxy" in record and ("Traceback" in record or " ERROR " in record))
    ]
    assert not problems, "\n\n".join(problems)
    assert token not in hass_output
    print(f"whole test {time.monotonic() - started:.1f} s")


def start_bridge(tmp_path: Path, network: VisitorNetwork, port: int, log: str = "bridge.log") -> Process:
    """``rproxy bridge`` on the host's end of the visitor network (port 0: any free one)."""
    return Process(
        "bridge",
        [
            str(VENV_E2E / "bin" / "rproxy"),
            "bridge",
            "--listen",
            f"{network.host_address}:{port}",
            "--domain",
            DOMAIN,
            "--token-file",
            str(tmp_path / "tokens"),
        ],
        tmp_path,
        tmp_path / log,
    )


async def onboard(api: HomeAssistantApi) -> str:
    """Every onboarding step over the API, as the onboarding pages do; returns the owner's password."""
    password = secrets.token_urlsafe(12)
    created = await api.request(
        "POST",
        "/api/onboarding/users",
        json={"client_id": api.client_id, "name": "Owner", "username": "owner", "password": password, "language": "en"},
    )
    tokens = await api.request(
        "POST",
        "/auth/token",
        data={"grant_type": "authorization_code", "code": created["auth_code"], "client_id": api.client_id},
    )
    api.token = tokens["access_token"]
    await api.request("POST", "/api/onboarding/core_config")
    await api.request("POST", "/api/onboarding/analytics")
    await api.request(
        "POST", "/api/onboarding/integration", json={"client_id": api.client_id, "redirect_uri": api.client_id}
    )
    return password


async def scenario(
    session: aiohttp.ClientSession,
    running: dict[str, Process],
    network: VisitorNetwork,
    tmp_path: Path,
    port: int,
    token: str,
    artifacts: Path,
    big_sha256: str,
) -> None:
    bridge, hass = running["bridge"], running["hass"]
    api = HomeAssistantApi(session, f"http://127.0.0.1:{port}")
    bridge_url = await wait_until("the bridge to listen", 20, lambda: bridge_url_from(bridge.output()), bridge)
    bridge_port = int(bridge_url.rsplit(":", 1)[1])

    async def onboarding_answers() -> bool:
        async with session.get(f"{api.url}/api/onboarding") as response:
            return response.status == 200

    await wait_until("Home Assistant to answer", 90, onboarding_answers, hass, bridge)
    password = await onboard(api)

    # Settings → Devices & services → Add integration → rproxy: the bridge, then "Home Assistant".
    result = await api.request("POST", "/api/config/config_entries/flow", json={"handler": "rproxy"})
    result = await api.flow_step(result["flow_id"], {"bridge_url": bridge_url, "token": token, "tunnel_name": "home"})
    assert (result["type"], result["step_id"]) == ("form", "target"), result
    result = await api.flow_step(result["flow_id"], {"target": "homeassistant"})
    assert result["type"] == "create_entry", result
    tunnel_origin = f"http://home.{DOMAIN}:{bridge_port}"
    direct_origin = f"http://{network.host_address}:{port}"

    async def tunnel_up() -> bool:
        states = await api.states()
        return states.get("binary_sensor.rproxy_home_tunnel", {}).get("state") == "on"

    await wait_until("the tunnel to be up", 30, tunnel_up, hass, bridge)
    # The address visitors use, as the Public URL sensor shows it.
    assert (await api.states())["sensor.rproxy_home_public_url"]["state"] == tunnel_origin + "/"

    await downloads(api, network, tmp_path, bridge_port, port, big_sha256)

    # No name resolves but the tunnel's (to the bridge); addresses are used as they are.
    rules = f"MAP home.{DOMAIN} {network.host_address}, MAP * ~NOTFOUND, EXCLUDE {network.host_address}"
    async with chromium(
        network, tmp_path / "profile", tmp_path / "chromium.log", f"--host-resolver-rules={rules}"
    ) as browser:
        await browse(
            api, browser, running, network, tmp_path, bridge_port, password, direct_origin, tunnel_origin, artifacts
        )


async def browse(
    api: HomeAssistantApi,
    browser: Browser,
    running: dict[str, Process],
    network: VisitorNetwork,
    tmp_path: Path,
    bridge_port: int,
    password: str,
    direct_origin: str,
    tunnel_origin: str,
    artifacts: Path,
) -> None:
    # Cold loads, alternating (Home Assistant's own file lookups warm up on the first).
    loads: dict[str, list[Load]] = {"direct": [], "tunnel": []}
    for way, origin in (
        ("direct", direct_origin),
        ("tunnel", tunnel_origin),
        ("tunnel", tunnel_origin),
        ("direct", direct_origin),
    ):
        page, load = await log_in(browser, origin, password)
        loads[way].append(load)
        if way == "tunnel" and len(loads["tunnel"]) == 1:
            kept = page
        else:
            await browser.close_page(page)
    (artifacts / "requests.json").write_text(
        json.dumps(
            {way: [[vars(r) for r in load.requests] for load in found] for way, found in loads.items()},
            indent=1,
            default=str,
        )
    )
    for way, found in loads.items():
        for load in found:
            own = load.own()
            print(
                f"{way:6} cold load: login page {load.login_page_s:.2f} s, overview {load.overview_s:.2f} s "
                f"(total {load.total_s:.2f} s), {len(own)} requests, {sum(r.body_bytes for r in own) / 1e6:.2f} MB"
            )
    problems = compare(loads["direct"], loads["tunnel"])
    assert not problems, "through the tunnel, unlike directly:\n" + "\n".join(problems)
    assert any(is_static(request_key(r, tunnel_origin)) for r in loads["tunnel"][0].own()), "no static file was loaded"

    page = kept
    for width, height in SCREEN_SIZES:
        await page.set_viewport(width, height)
        await asyncio.sleep(0.5)  # the layout follows the new size
        await page.screenshot(artifacts / f"overview-{width}x{height}.png")
    await page.set_viewport(*SCREEN_SIZES[0])

    # Settings → Devices & services: the integrations, rproxy among them; then Helpers.
    await step(
        page,
        "Settings",
        lambda: page.click_until(
            "Settings in the sidebar",
            "return deep('a[href=\"/config\"]')[0]",
            "the Settings page with Devices & services",
            "return location.pathname.startsWith('/config') && !!byText('ha-list-item', 'Devices & services')",
        ),
    )
    await step(
        page,
        "Settings → Devices & services",
        lambda: page.click_until(
            "Devices & services",
            "return byText('ha-list-item', 'Devices & services')",
            "the rproxy integration card",
            "return location.pathname.startsWith('/config/integrations') && !!byText('ha-integration-card', 'rproxy')",
        ),
    )
    await page.screenshot(artifacts / "devices-and-services-1280x900.png")
    await step(
        page,
        "the Helpers tab",
        lambda: page.click_until(
            "the Helpers tab",
            "return byText('ha-tab', 'Helpers')",
            "Porch light in the list",
            "return !!byText('.mdc-data-table__row', 'Porch light')",
        ),
    )
    await step(
        page,
        "the Porch light row",
        lambda: page.click_until(
            "the Porch light row",
            "return byText('.mdc-data-table__row', 'Porch light')",
            "the Porch light dialog",
            "return !!byText('ha-more-info-dialog', 'Porch light') && deep('ha-control-switch').length > 0",
        ),
    )
    await asyncio.sleep(0.5)  # the dialog's opening animation

    # The switch in the dialog, clicked: Home Assistant turns the helper on.
    assert (await api.request("GET", f"/api/states/{HELPER}"))["state"] == "off"
    await page.click("the Porch light switch", "return deep('ha-control-switch')[0]")
    await wait_until("the helper to turn on in Home Assistant", 10, lambda: helper_is(api, "on"), running["hass"])
    await page.screenshot(artifacts / "helper-on-1280x900.png")

    # A change made in Home Assistant shows in the page (over the frontend's WebSocket).
    await api.request("POST", "/api/services/input_boolean/turn_off", json={"entity_id": HELPER})
    await page.wait_for("the page to show the helper off", shows_helper("off"), 10)

    assert not page.console_errors, page.console_errors

    # The bridge restarts (same address): the page notices, reconnects by itself, stays live.
    running["bridge"].stop(timeout=10)
    await page.wait_for(
        "the page to notice the lost connection",
        "return document.querySelector('home-assistant').hass.connected === false",
        30,
    )
    restarted = time.monotonic()
    running["bridge"] = start_bridge(tmp_path, network, bridge_port, "bridge-restarted.log")
    await page.wait_for(
        "the page to reconnect after the bridge restart",
        "return document.querySelector('home-assistant').hass.connected === true",
        60,
    )
    print(f"the page reconnected {time.monotonic() - restarted:.2f} s after the bridge restarted")
    await api.request("POST", "/api/services/input_boolean/turn_on", json={"entity_id": HELPER})
    await page.wait_for("the page to show the helper on after the restart", shows_helper("on"), 15)
    await page.click("the Porch light switch after the restart", "return deep('ha-control-switch')[0]")
    await wait_until(
        "the helper to turn off from the page after the restart", 10, lambda: helper_is(api, "off"), running["hass"]
    )
    await page.set_viewport(*SCREEN_SIZES[1])
    await asyncio.sleep(0.5)
    await page.screenshot(artifacts / "after-bridge-restart-390x844.png")
    # After any reconnection (a restart of Home Assistant too) the frontend ends subscriptions
    # of its old connection on the new one, which answers "not found": nothing else may fail.
    unexpected = [e for e in page.console_errors if '"Subscription not found."' not in e]
    assert not unexpected, unexpected

    # Home Assistant saw the visitor's address: its logins through the tunnel carry it.
    async with api.websocket():
        tokens = await api.command({"type": "auth/refresh_tokens"})
    through_tunnel = [t for t in tokens if t["client_id"] == tunnel_origin + "/"]
    assert through_tunnel, tokens
    assert {t["last_used_ip"] for t in through_tunnel} == {network.visitor_address}


def write_pattern(path: Path, size: int) -> str:
    """Write ``size`` bytes that differ block by block (and do not compress); return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for index in range(0, size, MB):
            block = hashlib.shake_256(index.to_bytes(8, "big")).digest(min(MB, size - index))
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


#: A visitor with a script, run inside the visitor network: GETs each URL of argv[1] (JSON: a
#: list of [url, headers]) and prints one JSON line per answer: status, sha256 and size of the
#: body, seconds taken, and the Content-Range header.
DOWNLOADER = r"""
import asyncio, hashlib, json, sys, time

import aiohttp


async def main():
    async with aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)) as session:
        for url, headers in json.loads(sys.argv[1]):
            started = time.monotonic()
            digest, size = hashlib.sha256(), 0
            async with session.get(url, headers=headers) as response:
                async for chunk in response.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            print(json.dumps({"status": response.status, "sha256": digest.hexdigest(), "size": size,
                              "seconds": time.monotonic() - started,
                              "range": response.headers.get("Content-Range")}), flush=True)


asyncio.run(main())
"""


async def visitor_gets(
    network: VisitorNetwork, tmp_path: Path, *requests: tuple[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """What a visitor in the visitor network gets for each (url, headers)."""
    script = tmp_path / "downloader.py"
    script.write_text(DOWNLOADER)
    done = await asyncio.to_thread(
        subprocess.run,
        network.command(str(VENV_E2E / "bin" / "python"), str(script), json.dumps(list(requests))),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"the visitor's downloads failed:\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines()]


async def downloads(
    api: HomeAssistantApi, network: VisitorNetwork, tmp_path: Path, bridge_port: int, port: int, big_sha256: str
) -> None:
    """A file from /local/ and a backup, directly and through the tunnel: the same bytes."""
    async with api.websocket():
        await api.command({"type": "backup/generate", "agent_ids": ["backup.local"], "name": "remote UI test"})

        async def backup_done() -> str | None:
            info = await api.command({"type": "backup/info"})
            done = [b for b in info["backups"] if b["name"] == "remote UI test"]
            return str(done[0]["backup_id"]) if done and info.get("state") == "idle" else None

        backup_id = await wait_until("the backup to be made", 60, backup_done)
    tunnel = {"Host": f"home.{DOMAIN}:{bridge_port}"}
    bearer = {"Authorization": f"Bearer {api.token}"}
    direct, bridge = f"http://{network.host_address}:{port}", f"http://{network.host_address}:{bridge_port}"
    backup = f"/api/backup/download/{backup_id}?agent_id=backup.local"
    answers = await visitor_gets(
        network,
        tmp_path,
        (direct + "/local/big.bin", {}),
        (bridge + "/local/big.bin", tunnel),
        (direct + backup, bearer),
        (bridge + backup, {**bearer, **tunnel}),
        # A range of the file, as a video player or a resumed download asks for it.
        (bridge + "/local/big.bin", {**tunnel, "Range": "bytes=1000000-1000999"}),
    )
    for what, straight, through in (("/local/big.bin", *answers[0:2]), ("the backup", *answers[2:4])):
        assert straight["status"] == through["status"] == 200, (what, straight, through)
        assert (through["sha256"], through["size"]) == (straight["sha256"], straight["size"]), (what, straight, through)
        assert straight["size"] >= BIG_FILE_SIZE
        print(
            f"{what}: {straight['size'] / 1e6:.1f} MB, directly {straight['seconds']:.2f} s "
            f"({straight['size'] / straight['seconds'] / 1e6:.0f} MB/s), through the tunnel {through['seconds']:.2f} s "
            f"({through['size'] / through['seconds'] / 1e6:.0f} MB/s)"
        )
    assert answers[1]["sha256"] == big_sha256
    ranged = answers[4]
    assert (ranged["status"], ranged["size"]) == (206, 1000)
    assert ranged["range"] == f"bytes 1000000-1000999/{BIG_FILE_SIZE}"


async def helper_is(api: HomeAssistantApi, wanted: str) -> bool:
    """Whether the helper is ``wanted`` in Home Assistant."""
    return bool((await api.request("GET", f"/api/states/{HELPER}"))["state"] == wanted)


def shows_helper(wanted: str) -> str:
    """A page script: the frontend's state and the dialog's switch both say ``wanted``."""
    checked = "true" if wanted == "on" else "false"
    return (
        f"const state = document.querySelector('home-assistant').hass.states['{HELPER}'].state;"
        f"const switches = deep('ha-control-switch');"
        f"return state === '{wanted}' && switches.length > 0 && switches[0].checked === {checked};"
    )
