"""End to end, installed the way a user installs it.

A real ``hass`` process (``.venv-e2e``: Home Assistant 2025.4.4 with its frontend, and
rproxy-core from the wheel built from this checkout, not the checkout itself) runs on
127.0.0.1 with a fresh configuration directory that holds ``configuration.yaml`` and
``custom_components/rproxy`` copied as HACS places it. Beside it run a real bridge (the wheel's
``rproxy bridge`` command) and a web app on the LAN: rproxy-core's demo home app (lights and
sprinklers) announced over mDNS as ``_rproxy-app._tcp``, and a page for blinds announced as
``_http._tcp`` with the ``rproxy`` property.

Everything after the start goes through Home Assistant's HTTP and WebSocket APIs, as the
browser does: onboarding creates the owner, Settings → Devices & services lists the two
discovered apps; the Sprinklers discovery is confirmed and given the bridge; a tunnel added
by hand picks Blinds from the apps the target form lists. Then visitors on the bridge reach
both apps, and the entities show the tunnels up, their public URLs and the traffic.

``.venv-e2e`` is made by ``scripts/_env.sh``'s ``ensure_e2e_venv`` (``scripts/test ha`` runs it;
this test runs it too, a no-op when nothing changed): the first time takes about 35 s, after a
change to rproxy_core about 6 s.

mDNS: Home Assistant's zeroconf never uses loopback, so the app announces itself on the
address this host sends mDNS from (the one Home Assistant's network integration picks by
default), through the kernel's multicast loopback; without such an interface this test fails
and says so.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

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

if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the end-to-end test runs Home Assistant the Linux way", allow_module_level=True)

#: The bridge's domain: tunnel NAME is served at NAME.DOMAIN (visitors send that Host).
BRIDGE_DOMAIN = "e2e.test"

#: The web app on the LAN, run with .venv-e2e's Python. Prints one JSON line once it listens and
#: is announced; SIGTERM says goodbye over mDNS and ends it.
HOME_APP = r"""
import asyncio, json, signal, socket, sys

from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from rproxy_core.demo.homeapp import create_home_app


def lan_address():
    # The address this host sends mDNS from: the one Home Assistant's network integration
    # enables by default (it connects a UDP socket to the mDNS group the same way).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("224.0.0.251", 5353))
        return sock.getsockname()[0]


async def blinds(request):
    return web.Response(text="<h1>Blinds</h1><p>Living room: open</p>", content_type="text/html")


async def main(run):
    try:
        address = lan_address()
    except OSError as err:
        address = f"none ({err})"
    if not address[0].isdigit() or address.startswith("127.") or address == "0.0.0.0":
        print(json.dumps({"error": f"no LAN address to announce on: {address}"}), flush=True)
        return 3
    blinds_app = web.Application()
    blinds_app.router.add_get("/", blinds)
    runners, ports = [], {}
    for key, app in (("sprinklers", create_home_app()), ("blinds", blinds_app)):
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, address, 0).start()
        ports[key] = runner.addresses[0][1]
        runners.append(runner)
    packed = socket.inet_aton(address)
    infos = [
        AsyncServiceInfo(
            "_rproxy-app._tcp.local.", f"Sprinklers {run}._rproxy-app._tcp.local.",
            addresses=[packed], port=ports["sprinklers"], server=f"sprinklers-{run}.local.",
            properties={"name": "Sprinklers", "path": "/", "id": f"{run}-sprinklers"},
        ),
        AsyncServiceInfo(
            "_http._tcp.local.", f"Blinds {run}._http._tcp.local.",
            addresses=[packed], port=ports["blinds"], server=f"blinds-{run}.local.",
            properties={"rproxy": "1", "name": "Blinds", "id": f"{run}-blinds"},
        ),
    ]
    aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=[address])
    for info in infos:
        await (await aiozc.async_register_service(info))
    print(json.dumps({"address": address, "ports": ports}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await aiozc.async_unregister_all_services()
    await aiozc.async_close()
    for runner in runners:
        await runner.cleanup()
    return 0


sys.exit(asyncio.run(main(sys.argv[1])))
"""

CONFIGURATION_YAML = """\
# Only what the flows need (no default_config: its integrations would fetch from the internet).
# Home Assistant adds its default integrations (frontend, network, person, backup, ...) anyway.
homeassistant:
  name: E2E home
  time_zone: UTC
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
onboarding:
zeroconf:
logger:
  default: info
  logs:
    custom_components.rproxy: debug
    rproxy: debug
"""


def announced(output: str) -> dict[str, Any] | None:
    """The home app's JSON line, once it has printed it."""
    for line in output.splitlines():
        if line.startswith("{") and line.endswith("}"):
            result: dict[str, Any] = json.loads(line)
            return result
    return None


@pytest.mark.timeout(360)  # a cold install of .venv-e2e included; about 10 s once installed
async def test_from_add_integration_to_live_tunnels(socket_enabled: None, tmp_path: Path) -> None:
    """From a fresh Home Assistant to two live tunnels to discovered apps, through the UI's APIs only."""
    started = time.monotonic()
    await asyncio.to_thread(ensure_e2e_venv)
    installed = time.monotonic()
    run = f"e2e-{secrets.token_hex(4)}"  # mDNS is host-wide: names of this run only
    token = f"agent-token-{secrets.token_hex(16)}"

    config = tmp_path / "config"
    (config / "custom_components").mkdir(parents=True)
    shutil.copytree(
        ROOT / "custom_components" / "rproxy",
        config / "custom_components" / "rproxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    port = free_port()
    (config / "configuration.yaml").write_text(CONFIGURATION_YAML.format(port=port))
    (tmp_path / "tokens").write_text(token + "\n")
    (tmp_path / "home_app.py").write_text(HOME_APP)
    bin_dir = VENV_E2E / "bin"

    failed = True
    async with processes() as running:
        try:
            bridge = running["bridge"] = Process(
                "bridge",
                [
                    str(bin_dir / "rproxy"),
                    "bridge",
                    "--listen",
                    "127.0.0.1:0",
                    "--domain",
                    BRIDGE_DOMAIN,
                    "--token-file",
                    str(tmp_path / "tokens"),
                ],
                tmp_path,
                tmp_path / "bridge.log",
            )
            app = running["home app"] = Process(
                "home app",
                [str(bin_dir / "python"), str(tmp_path / "home_app.py"), run],
                tmp_path,
                tmp_path / "home_app.log",
            )
            hass = running["hass"] = Process(
                "hass",
                [str(bin_dir / "hass"), "--config", str(config), "--log-no-color"],
                tmp_path,
                tmp_path / "hass.out",
            )
            async with aiohttp.ClientSession() as session:
                await run_scenario(session, port, run, token, bridge, app, hass)
            failed = False
        finally:
            if failed:
                for process in running.values():
                    print(f"----- {process.name} ({process.log}) -----\n{tail(process.output())}")
    hass_output = running["hass"].output()  # the same records as config/home-assistant.log
    hass_log = (config / "home-assistant.log").read_text(errors="replace") + hass_output

    # Home Assistant stopped by itself on SIGTERM, tunnels and all.
    assert running["hass"].exit_code == 0, tail(hass_output)

    # Home Assistant found rproxy-core==0.1.0 (the wheel) and everything else installed.
    assert "Attempting install of" not in hass_log, [r for r in log_records(hass_log) if "install" in r]
    # Nothing the integration did raised or was reported; the token went nowhere near the log.
    problems = [
        record
        for record in log_records(hass_output)
        if "rproxy" in record
        and ("Traceback" in record or " ERROR " in record or "Detected that custom integration" in record)
    ]
    assert not problems, "\n\n".join(problems)
    assert token not in hass_log
    print(f"install check {installed - started:.1f} s, scenario {time.monotonic() - installed:.1f} s")


async def run_scenario(
    session: aiohttp.ClientSession, port: int, run: str, token: str, bridge: Process, app: Process, hass: Process
) -> None:
    api = HomeAssistantApi(session, f"http://127.0.0.1:{port}")

    bridge_url = await wait_until("the bridge to listen", 20, lambda: bridge_url_from(bridge.output()), bridge)
    lan = await wait_until("the home app to listen and announce itself", 20, lambda: announced(app.output()), app)
    if "error" in lan:
        pytest.fail(
            f"{lan['error']}: Home Assistant's zeroconf does not use loopback, so discovery needs an interface "
            "with a non-loopback IPv4 address and the default route"
        )
    sprinklers_url = f"http://{lan['address']}:{lan['ports']['sprinklers']}/"
    blinds_url = f"http://{lan['address']}:{lan['ports']['blinds']}/"

    async def onboarding_answers() -> bool:
        async with session.get(f"{api.url}/api/onboarding") as response:
            return response.status == 200

    await wait_until("Home Assistant to answer", 60, onboarding_answers, hass, bridge, app)
    await api.onboard()

    async with api.websocket():
        # Settings → Devices & services, "Discovered": both apps, found over mDNS.
        async def discovered() -> dict[str, dict[str, Any]] | None:
            flows = {
                flow["context"].get("unique_id"): flow
                for flow in await api.command({"type": "config_entries/flow/progress"})
                if flow["handler"] == "rproxy" and flow["context"]["source"] == "zeroconf"
            }
            wanted = (f"zeroconf:{run}-sprinklers", f"zeroconf:{run}-blinds")
            return flows if all(key in flows for key in wanted) else None

        flows = await wait_until("Home Assistant to discover both apps", 30, discovered, hass)
        sprinklers_flow = flows[f"zeroconf:{run}-sprinklers"]
        assert sprinklers_flow["step_id"] == "zeroconf_confirm"
        assert sprinklers_flow["context"]["title_placeholders"] == {"name": "Sprinklers"}

        # "Add integration" → rproxy, by hand: the bridge form, then the target form, which
        # lists the apps on the LAN; choose Blinds.
        result = await api.request("POST", "/api/config/config_entries/flow", json={"handler": "rproxy"})
        assert (result["type"], result["step_id"]) == ("form", "user"), result
        result = await api.flow_step(
            result["flow_id"], {"bridge_url": bridge_url, "token": token, "tunnel_name": "blinds"}
        )
        assert (result["type"], result["step_id"]) == ("form", "target"), result
        options = {
            option["label"]: option["value"] for option in result["data_schema"][0]["selector"]["select"]["options"]
        }
        host = lan["address"]
        assert f"Sprinklers ({host}:{lan['ports']['sprinklers']})" in options, options
        assert f"Blinds ({host}:{lan['ports']['blinds']})" in options, options
        result = await api.flow_step(
            result["flow_id"], {"target": options[f"Blinds ({host}:{lan['ports']['blinds']})"]}
        )
        assert result["type"] == "create_entry", result
        assert result["title"] == "blinds: Blinds"
        blinds_entry = result["result"]["entry_id"]
        # The discovery of the app just added is gone from "Discovered".
        remaining = {flow["flow_id"] for flow in await api.command({"type": "config_entries/flow/progress"})}
        assert flows[f"zeroconf:{run}-blinds"]["flow_id"] not in remaining

        # "Discovered: Sprinklers" → Add: confirm, then the bridge form (prefilled with the
        # bridge of the tunnel set up before).
        result = await api.request("GET", f"/api/config/config_entries/flow/{sprinklers_flow['flow_id']}")
        assert result["step_id"] == "zeroconf_confirm", result
        assert result["description_placeholders"] == {"name": "Sprinklers", "url": sprinklers_url}
        result = await api.flow_step(sprinklers_flow["flow_id"], {})
        assert (result["type"], result["step_id"]) == ("form", "user"), result
        result = await api.flow_step(
            sprinklers_flow["flow_id"], {"bridge_url": bridge_url, "token": token, "tunnel_name": "sprinklers"}
        )
        assert result["type"] == "create_entry", result
        assert result["title"] == "sprinklers: Sprinklers"
        sprinklers_entry = result["result"]["entry_id"]

    entries = await api.request("GET", "/api/config/config_entries/entry", params={"domain": "rproxy"})
    assert sorted((entry["title"], entry["source"]) for entry in entries) == [
        ("blinds: Blinds", "user"),
        ("sprinklers: Sprinklers", "zeroconf"),
    ]

    # The tunnels are up and show where visitors reach them.
    bridge_port = int(bridge_url.rsplit(":", 1)[1])
    public = {name: f"http://{name}.{BRIDGE_DOMAIN}:{bridge_port}/" for name in ("sprinklers", "blinds")}

    async def tunnels_up() -> dict[str, dict[str, Any]] | None:
        states = await api.states()
        for name in public:
            tunnel = states.get(f"binary_sensor.rproxy_{name}_tunnel")
            if tunnel is None or tunnel["state"] != "on":
                return None
        return states

    states = await wait_until("both tunnels to be up", 30, tunnels_up, hass, bridge, app)
    for name, url in public.items():
        assert states[f"sensor.rproxy_{name}_public_url"]["state"] == url
        assert states[f"sensor.rproxy_{name}_requests_served"]["state"] == "0"

    # Visitors on the bridge reach the apps on the LAN.
    async def visit(name: str, path: str = "/") -> str:
        async with session.get(
            f"{bridge_url}{path}", headers={"Host": f"{name}.{BRIDGE_DOMAIN}:{bridge_port}"}
        ) as response:
            body = await response.text()
            assert response.status == 200, (name, path, response.status, body)
            return body

    for _ in range(3):
        page = await visit("sprinklers")
        assert "Front lawn" in page and "Garden" in page
    devices = json.loads(await visit("sprinklers", "/api/state"))
    assert {device["name"] for device in devices["devices"]} >= {"Front lawn", "Garden"}
    assert "Living room: open" in await visit("blinds")

    # ... and the entities count them (the agent pushes its counters at most once a second).
    visits = {"sprinklers": 4, "blinds": 1}

    async def traffic_shown() -> dict[str, dict[str, Any]] | None:
        states = await api.states()
        served = {name: int(states[f"sensor.rproxy_{name}_requests_served"]["state"]) for name in public}
        return states if all(served[name] >= visits[name] for name in public) else None

    states = await wait_until("the entities to show the requests served", 10, traffic_shown, hass)
    for name in public:
        assert states[f"sensor.rproxy_{name}_requests_served"]["state"] == str(visits[name])
    for name in public:
        assert float(states[f"sensor.rproxy_{name}_data_out"]["state"]) > 0
        assert states[f"sensor.rproxy_{name}_active_connections"]["state"] == "0"
        assert states[f"binary_sensor.rproxy_{name}_tunnel"]["state"] == "on"

    # "Download diagnostics" of each tunnel: where it leads, the token left out.
    for entry_id, target_url, name in (
        (sprinklers_entry, sprinklers_url, "sprinklers"),
        (blinds_entry, blinds_url, "blinds"),
    ):
        diagnostics = await api.request("GET", f"/api/diagnostics/config_entry/{entry_id}")
        assert token not in json.dumps(diagnostics)
        data = diagnostics["data"]
        assert data["entry"]["data"]["target_url"] == target_url
        assert data["entry"]["data"]["token"] == "**REDACTED**"
        assert data["tunnel"]["state"] == "connected"
        assert data["tunnel"]["public_url"] == public[name]
