"""A tunnel to Home Assistant itself: requests handed in-process to Home Assistant's own HTTP
server, with the visitor's address as the connection's peer.

Everything here is real: Home Assistant's HTTP server (``http``, ``auth``, ``websocket_api``,
its ban middleware and login flows), the rproxy integration's agent, a real rproxy bridge
on 127.0.0.1 and visitors that are aiohttp clients of that bridge. No network code is mocked.

How a test visitor gets a public address: every visitor here connects from 127.0.0.1, so
the tests run their own bridge (``proxied_bridge``) configured with
``trusted_proxies=[127.0.0.0/8]``, as a bridge behind nginx or a load balancer would be. The
bridge then believes the ``X-Forwarded-For`` its loopback peer sends, so a visitor sending
``X-Forwarded-For: 203.0.113.7`` is, to the bridge, the agent and Home Assistant, the visitor
at 203.0.113.7 (the bridge passes exactly that one address on to the agent). A visitor that
sends no ``X-Forwarded-For`` is reported as what it really is, 127.0.0.1.

Test set-up reaches into a few Home Assistant internals, as Home Assistant's own tests do:
``register_auth_provider`` (appends a provider to ``hass.auth._providers``) for the
``trusted_networks`` login provider, and the ban manager's ``path``, pointed at ``tmp_path``
so a ban never lands in the plugin's shared ``testing_config`` directory (where it would
ban the same address in every later test).
"""

from __future__ import annotations

import hashlib
import logging
import random
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from homeassistant.auth.const import GROUP_ID_USER
from homeassistant.auth.providers.homeassistant import HassAuthProvider
from homeassistant.components.http.ban import KEY_BAN_MANAGER, KEY_FAILED_LOGIN_ATTEMPTS
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.http import HomeAssistantView
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import register_auth_provider

from custom_components.rproxy.const import DOMAIN
from custom_components.rproxy.coordinator import RproxyCoordinator
from rproxy_core import Bridge, BridgeConfig
from rproxy_core.agent import AgentState

from .common import claim, free_port, homeassistant_tunnel, setup_tunnel
from .conftest import HELLO, TOKEN, HomeApp

#: What the login flows are asked for; Home Assistant's indieauth accepts any http(s) URL
#: as a client id and a redirect URI on the client's own host.
CLIENT_ID = "http://example.com/"
REDIRECT_URI = "http://example.com/"

PUBLIC_VISITOR = "203.0.113.7"
OTHER_PUBLIC_VISITOR = "198.51.100.4"

#: Where the recording view answers.
WHOAMI_PATH = "/api/rproxy_test/whoami"
BIG_PATH = "/api/rproxy_test/big"
#: Just over 5 MB, not a multiple of any buffer size.
BIG_SIZE = 5 * 1024 * 1024 + 4321


class WhoAmIView(HomeAssistantView):
    """Answers with the peer address and the headers Home Assistant saw; records each call."""

    url = WHOAMI_PATH
    name = "api:rproxy_test:whoami"
    requires_auth = False

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def get(self, request: web.Request) -> web.Response:
        self.seen.append(request.remote)
        return self.json({"remote": request.remote, "headers": sorted(k.lower() for k in request.headers)})


class BigView(HomeAssistantView):
    """Streams ``BIG_SIZE`` pseudo-random bytes in uneven pieces."""

    url = BIG_PATH
    name = "api:rproxy_test:big"
    requires_auth = False

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    async def get(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        offset, piece = 0, 1
        while offset < len(self.payload):
            size = 37_000 * piece % 300_000 + 1
            await response.write(self.payload[offset : offset + size])
            offset += size
            piece += 1
        await response.write_eof()
        return response


def is_rproxy_refusal(status: int, body: str) -> bool:
    """The agent's own 403: short, plain text, saying why (not Home Assistant's "403: Forbidden")."""
    return status == 403 and body.startswith("rproxy refused this request:") and len(body) < 300


async def add_user(
    hass: HomeAssistant, provider: HassAuthProvider, username: str, password: str, *, local_only: bool = False
) -> None:
    """A Home Assistant user who logs in with ``username``/``password`` (homeassistant provider)."""
    user = await hass.auth.async_create_user(username, group_ids=[GROUP_ID_USER], local_only=local_only)
    await provider.async_add_auth(username, password)
    credentials = await provider.async_get_or_create_credentials({"username": username})
    await hass.auth.async_link_user(user, credentials)


async def start_login(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], handler: str = "homeassistant"
) -> tuple[int, Any]:
    """POST /auth/login_flow with ``headers`` (a visitor's ``claim``): (status, JSON or text)."""
    async with session.post(
        f"{url}/auth/login_flow",
        json={"client_id": CLIENT_ID, "handler": [handler, None], "redirect_uri": REDIRECT_URI},
        headers=headers,
    ) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def log_in(
    session: aiohttp.ClientSession, url: str, address: str, username: str, password: str
) -> tuple[int, Any]:
    """A whole login through the homeassistant provider's flow as the visitor at ``address``."""
    status, flow = await start_login(session, url, claim(address))
    if status != 200:
        return status, flow
    assert flow["type"] == "form", flow
    async with session.post(
        f"{url}/auth/login_flow/{flow['flow_id']}",
        json={"client_id": CLIENT_ID, "username": username, "password": password},
        headers=claim(address),
    ) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_public_visitor_reaches_homeassistant_as_itself(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A visitor at 203.0.113.7 reaches Home Assistant (no 400 for X-Forwarded-For) and Home
    Assistant sees 203.0.113.7 as the connection's peer, with no forwarding headers."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        whoami = WhoAmIView()
        hass.http.register_view(whoami)
        url = proxied_bridge.url

        # HA's own 401: the request got past its forwarded middleware (which answers 400 to
        # an X-Forwarded-For it was not told to trust, core#63083) to the auth check.
        async with visitor.get(f"{url}/api/", headers=claim(PUBLIC_VISITOR)) as response:
            assert response.status == 401, await response.text()

        async with visitor.get(f"{url}/auth/providers", headers=claim(PUBLIC_VISITOR)) as response:
            assert response.status == 200
            providers = await response.json()
        # A public visitor: Home Assistant does not offer "remember me" as to a local one.
        assert providers["preselect_remember_me"] is False

        # Forwarding headers of any kind stop at the bridge or the agent.
        async with visitor.get(
            f"{url}{WHOAMI_PATH}",
            headers={
                **claim(PUBLIC_VISITOR),
                "Forwarded": "for=10.0.0.1",
                "X-Real-IP": "10.0.0.1",
                "X-Forwarded-Host": "x",
            },
        ) as response:
            assert response.status == 200
            seen = await response.json()
        assert seen["remote"] == PUBLIC_VISITOR
        assert not {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"} & set(
            seen["headers"]
        )
        # A second visitor is a second peer: every request carries its own visitor's address.
        async with visitor.get(f"{url}{WHOAMI_PATH}", headers=claim(OTHER_PUBLIC_VISITOR)) as response:
            assert (await response.json())["remote"] == OTHER_PUBLIC_VISITOR
        assert whoami.seen == [PUBLIC_VISITOR, OTHER_PUBLIC_VISITOR]


async def test_bans_land_on_the_visitor(
    hass: HomeAssistant,
    proxied_bridge: Bridge,
    visitor: aiohttp.ClientSession,
    tmp_path: Path,
    local_auth: HassAuthProvider,
    hass_access_token: str,
) -> None:
    """Failed logins through the tunnel count against, and ban, the visitor, never 127.0.0.1;
    another visitor still gets in, and logs in."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path, ip_ban_enabled=True, login_attempts_threshold=2):
        await add_user(hass, local_auth, "resident", "right password")
        url = proxied_bridge.url
        failed = hass.http.app[KEY_FAILED_LOGIN_ATTEMPTS]
        bans = hass.http.app[KEY_BAN_MANAGER].ip_bans_lookup

        # A login flow belongs to the address that began it: another visitor cannot continue it.
        status, flow = await start_login(visitor, url, claim(PUBLIC_VISITOR))
        assert status == 200 and flow["type"] == "form"
        async with visitor.post(
            f"{url}/auth/login_flow/{flow['flow_id']}",
            json={"client_id": CLIENT_ID, "username": "resident", "password": "right password"},
            headers=claim(OTHER_PUBLIC_VISITOR),
        ) as response:
            assert response.status == 400
            assert (await response.json())["message"] == "IP address changed"

        for attempt in (1, 2):
            status, result = await log_in(visitor, url, PUBLIC_VISITOR, "resident", "wrong password")
            assert status == 200
            assert result["errors"] == {"base": "invalid_auth"}, result
            assert failed[ip_address(PUBLIC_VISITOR)] == attempt

        assert ip_address(PUBLIC_VISITOR) in bans
        assert ip_address("127.0.0.1") not in bans
        assert ip_address("127.0.0.1") not in failed
        assert (tmp_path / "ip_bans.yaml").read_text().count(PUBLIC_VISITOR) == 1

        # The banned visitor now gets Home Assistant's own 403 (not rproxy's).
        async with visitor.get(f"{url}/auth/providers", headers=claim(PUBLIC_VISITOR)) as response:
            assert response.status == 403
            assert not is_rproxy_refusal(response.status, await response.text())

        # Someone else is not banned: the API answers their token, and they log in.
        async with visitor.get(
            f"{url}/api/", headers={**claim(OTHER_PUBLIC_VISITOR), "Authorization": f"Bearer {hass_access_token}"}
        ) as response:
            assert response.status == 200
            assert await response.json() == {"message": "API running."}
        status, result = await log_in(visitor, url, OTHER_PUBLIC_VISITOR, "resident", "right password")
        assert status == 200
        assert result["type"] == "create_entry" and result["result"], result
        assert set(bans) == {ip_address(PUBLIC_VISITOR)}


async def test_trusted_networks_never_trust_a_tunnelled_visitor(
    hass: HomeAssistant,
    proxied_bridge: Bridge,
    visitor: aiohttp.ClientSession,
    tmp_path: Path,
    local_auth: HassAuthProvider,
) -> None:
    """A visitor whose address a trusted_networks provider trusts never reaches Home Assistant;
    a visitor it does not trust reaches it, and Home Assistant's provider refuses it."""
    await register_auth_provider(
        hass,
        {"type": "trusted_networks", "trusted_networks": ["127.0.0.0/8", "192.168.0.0/16", "203.0.113.0/24"]},
    )
    await add_user(hass, local_auth, "resident", "right password")
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        whoami = WhoAmIView()
        hass.http.register_view(whoami)
        url = proxied_bridge.url

        # 192.168.1.50: local and trusted; 203.0.113.7: public but trusted; no claim: the
        # bridge reports the visitor's own 127.0.0.1.
        for headers in (claim("192.168.1.50"), claim(PUBLIC_VISITOR), {}):
            async with visitor.get(f"{url}{WHOAMI_PATH}", headers=headers) as response:
                body = await response.text()
                assert is_rproxy_refusal(response.status, body), (headers, response.status, body)
            async with visitor.get(f"{url}/auth/providers", headers=headers) as response:
                assert is_rproxy_refusal(response.status, await response.text())
            status, body = await start_login(visitor, url, headers, "trusted_networks")
            assert is_rproxy_refusal(status, body), (headers, status, body)
        async with visitor.get(f"{url}{WHOAMI_PATH}", headers=claim(PUBLIC_VISITOR)) as response:
            assert "trusted network 203.0.113.0/24" in await response.text()
        assert whoami.seen == []
        assert hass.auth.login_flow.async_progress() == []

        # 198.51.100.4 is neither local nor trusted: it reaches Home Assistant, which does not
        # offer it the trusted_networks provider and refuses that provider's flow itself.
        async with visitor.get(f"{url}/auth/providers", headers=claim(OTHER_PUBLIC_VISITOR)) as response:
            assert response.status == 200
            offered = [p["type"] for p in (await response.json())["providers"]]
        assert offered == ["homeassistant"]
        status, result = await start_login(visitor, url, claim(OTHER_PUBLIC_VISITOR), "trusted_networks")
        assert status == 200
        assert (result["type"], result["reason"]) == ("abort", "not_allowed")
        async with visitor.get(f"{url}{WHOAMI_PATH}", headers=claim(OTHER_PUBLIC_VISITOR)) as response:
            assert response.status == 200
        assert whoami.seen == [OTHER_PUBLIC_VISITOR]


async def test_local_visitors_are_refused_so_local_only_users_stay_local(
    hass: HomeAssistant,
    proxied_bridge: Bridge,
    visitor: aiohttp.ClientSession,
    tmp_path: Path,
    local_auth: HassAuthProvider,
) -> None:
    """A visitor at a local address is refused by rproxy: a local-only user cannot log in
    through the tunnel, not from a claimed LAN address nor (HA's own check) from a public one."""
    await add_user(hass, local_auth, "homebody", "right password", local_only=True)
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        whoami = WhoAmIView()
        hass.http.register_view(whoami)
        url = proxied_bridge.url
        for address in ("10.0.0.8", "172.16.0.1", "fe80::1", "::1", "127.0.0.1"):
            async with visitor.get(f"{url}{WHOAMI_PATH}", headers=claim(address)) as response:
                body = await response.text()
                assert is_rproxy_refusal(response.status, body), (address, response.status, body)
                assert "local address" in body
            status, body = await log_in(visitor, url, address, "homebody", "right password")
            assert is_rproxy_refusal(status, body), (address, status, body)
        # A claim that is no address at all is no way around it: the bridge reports the last
        # address it could believe (its trusted peer, 127.0.0.1), which is refused.
        async with visitor.get(f"{url}{WHOAMI_PATH}", headers=claim("unknown")) as response:
            body = await response.text()
            assert is_rproxy_refusal(response.status, body), (response.status, body)
            assert "127.0.0.1, a local address" in body
        assert whoami.seen == []
        assert hass.auth.login_flow.async_progress() == []

        # From a public address Home Assistant itself blocks the local-only user: it judged
        # the visitor, not 127.0.0.1 (which it would have let in).
        status, result = await log_in(visitor, url, OTHER_PUBLIC_VISITOR, "homebody", "right password")
        assert status == 403
        assert result["message"] == "Login blocked: User cannot authenticate remotely"


async def test_repair_issue_raised_by_refused_visitor_and_cleared_by_admitted_one(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The first refused visitor raises visitor_local_address_<entry_id>; an admitted public
    visitor clears it; the next refused visitor raises it again."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path) as entry:
        issues = ir.async_get(hass)
        issue_id = f"visitor_local_address_{entry.entry_id}"
        url = proxied_bridge.url
        assert issues.async_get_issue(DOMAIN, issue_id) is None

        async with visitor.get(f"{url}/api/", headers=claim("10.0.0.8")) as response:
            assert response.status == 403
        issue = issues.async_get_issue(DOMAIN, issue_id)
        assert issue is not None
        assert issue.translation_key == "visitor_local_address"
        assert issue.severity is ir.IssueSeverity.ERROR
        assert issue.translation_placeholders == {"tunnel": "home", "address": "10.0.0.8"}

        # Another refusal keeps the first address in the issue.
        async with visitor.get(f"{url}/api/", headers=claim("172.16.0.1")) as response:
            assert response.status == 403
        issue = issues.async_get_issue(DOMAIN, issue_id)
        assert issue is not None and issue.translation_placeholders == {"tunnel": "home", "address": "10.0.0.8"}

        async with visitor.get(f"{url}/api/", headers=claim(PUBLIC_VISITOR)) as response:
            assert response.status == 401  # Home Assistant's answer
        assert issues.async_get_issue(DOMAIN, issue_id) is None

        async with visitor.get(f"{url}/api/", headers={}) as response:
            assert response.status == 403
        issue = issues.async_get_issue(DOMAIN, issue_id)
        assert issue is not None and issue.translation_placeholders == {"tunnel": "home", "address": "127.0.0.1"}


async def test_repair_issue_cleared_after_the_tunnel_reloads(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A repair raised before the entry reloads (an options change reloads it) is cleared by the
    next admitted visitor, as one raised since the reload would be."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path) as entry:
        issues = ir.async_get(hass)
        issue_id = f"visitor_local_address_{entry.entry_id}"
        url = proxied_bridge.url
        async with visitor.get(f"{url}/api/", headers=claim("10.0.0.8")) as response:
            assert response.status == 403
        assert issues.async_get_issue(DOMAIN, issue_id) is not None

        assert await hass.config_entries.async_reload(entry.entry_id)
        await hass.async_block_till_done()
        coordinator: RproxyCoordinator = entry.runtime_data
        assert coordinator.agent is not None and coordinator.agent.state is AgentState.CONNECTED

        async with visitor.get(f"{url}/api/", headers=claim(PUBLIC_VISITOR)) as response:
            assert response.status == 401  # Home Assistant's answer: the visitor was admitted
        # The reload made a new coordinator: it still knows of the notice raised before it.
        assert issues.async_get_issue(DOMAIN, issue_id) is None


async def test_websocket_api_through_the_tunnel(
    hass: HomeAssistant,
    proxied_bridge: Bridge,
    visitor: aiohttp.ClientSession,
    tmp_path: Path,
    hass_access_token: str,
) -> None:
    """Home Assistant's WebSocket API answers a visitor: auth_required, auth_ok, pong."""
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        assert await async_setup_component(hass, "websocket_api", {})
        async with visitor.ws_connect(f"{proxied_bridge.url}/api/websocket", headers=claim(PUBLIC_VISITOR)) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "auth_required"
            await ws.send_json({"type": "auth", "access_token": hass_access_token})
            assert (await ws.receive_json(timeout=10))["type"] == "auth_ok"
            await ws.send_json({"id": 1, "type": "ping"})
            assert await ws.receive_json(timeout=10) == {"id": 1, "type": "pong"}

        # A refused visitor's upgrade gets rproxy's 403 instead.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with visitor.ws_connect(f"{proxied_bridge.url}/api/websocket", headers=claim("192.168.1.50")):
                pass
        assert refused.value.status == 403


async def test_homeassistant_not_serving_gives_502(
    hass: HomeAssistant,
    proxied_bridge: Bridge,
    visitor: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before Home Assistant's HTTP server starts and after it stops, visitors get a short 502,
    the logs hold at most a warning, and the tunnel stays up."""
    caplog.set_level(logging.INFO)
    url = proxied_bridge.url
    # http is set up (as at boot) but not started: no server to hand requests to yet.
    assert await async_setup_component(
        hass, "http", {"http": {"server_host": ["127.0.0.1"], "server_port": free_port()}}
    )
    assert await async_setup_component(hass, "api", {})
    assert hass.http.runner is None
    entry = await setup_tunnel(hass, url, None)
    coordinator: RproxyCoordinator = entry.runtime_data
    try:

        async def expect_502() -> None:
            caplog.clear()
            async with visitor.get(f"{url}/api/", headers=claim(PUBLIC_VISITOR)) as response:
                body = await response.text()
                assert response.status == 502, body
                assert len(body) < 300 and "Traceback" not in body
            await hass.async_block_till_done()
            assert coordinator.agent is not None and coordinator.agent.state is AgentState.CONNECTED
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text

        await expect_502()

        await hass.http.start()
        try:
            async with visitor.get(f"{url}/api/", headers=claim(PUBLIC_VISITOR)) as response:
                assert response.status == 401
        finally:
            await hass.http.stop()

        await expect_502()
    finally:
        assert await hass.config_entries.async_unload(entry.entry_id)


async def test_large_streamed_response_arrives_intact(
    hass: HomeAssistant, proxied_bridge: Bridge, visitor: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A streamed response of more than 5 MB from a Home Assistant view crosses the tunnel whole."""
    payload = random.Random(1234).randbytes(BIG_SIZE)
    async with homeassistant_tunnel(hass, proxied_bridge, tmp_path):
        hass.http.register_view(BigView(payload))
        digest = hashlib.sha256()
        received = 0
        async with visitor.get(f"{proxied_bridge.url}{BIG_PATH}", headers=claim(PUBLIC_VISITOR)) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(1 << 16):
                digest.update(chunk)
                received += len(chunk)
        assert received == BIG_SIZE
        assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_extra_services_ride_on_the_tunnel_to_homeassistant(
    hass: HomeAssistant, visitor: aiohttp.ClientSession, home_app: HomeApp, tmp_path: Path
) -> None:
    """Home Assistant in-process at <tunnel>.<domain>, a web app on the network one label down
    (it gets the bridge's forwarded headers; Home Assistant gets none), a TCP service offered."""
    bridge = Bridge(
        BridgeConfig(
            host="127.0.0.1",
            port=0,
            tokens=[TOKEN],
            access_log=False,
            domain="example.test",
            trusted_proxies=[ip_network("127.0.0.0/8")],
        )
    )
    await bridge.start()
    try:
        options = {"services": [f"garden={home_app.url}", "ssh=tcp://127.0.0.1:22"]}
        async with homeassistant_tunnel(hass, bridge, tmp_path, options=options) as entry:
            whoami = WhoAmIView()
            hass.http.register_view(whoami)
            agent = entry.runtime_data.agent
            assert agent is not None
            assert agent.config.services == {"garden": home_app.url, "ssh": "tcp://127.0.0.1:22"}
            headers = claim(PUBLIC_VISITOR)
            async with visitor.get(
                f"{bridge.url}{WHOAMI_PATH}", headers={**headers, "Host": "home.example.test"}
            ) as response:
                seen = await response.json()
            assert seen["remote"] == PUBLIC_VISITOR
            assert "x-forwarded-for" not in seen["headers"]
            async with visitor.get(
                f"{bridge.url}/", headers={**headers, "Host": "garden.home.example.test"}
            ) as response:
                assert (response.status, await response.text()) == (200, HELLO)
            assert home_app.requests == ["/"]
    finally:
        await bridge.stop()
