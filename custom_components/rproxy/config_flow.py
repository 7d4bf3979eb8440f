"""Set up a tunnel from the UI: the bridge, then what to expose."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

import aiohttp
import voluptuous as vol
from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    ConfigEntry,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.const import CONF_TOKEN
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.selector import (
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from yarl import URL

from rproxy_core import Agent, AgentConfig, AuthenticationError, RproxyConnectionError
from rproxy_core.agent import FORWARDED_HEADERS, bridge_connect_url, split_bridge_credential
from rproxy_core.exceptions import ConfigError
from rproxy_core.headers import is_tunnel_name

from .const import (
    CONF_BRIDGE_URL,
    CONF_EXPOSED,
    CONF_FORWARD_HEADERS,
    CONF_PUBLIC_URL,
    CONF_REQUEST_TIMEOUT,
    CONF_SERVICES,
    CONF_TARGET,
    CONF_TARGET_NAME,
    CONF_TARGET_URL,
    CONF_TUNNEL_NAME,
    CONF_VISITOR_AUTH,
    CONF_VISITOR_PASSWORD,
    CONF_VISITOR_USERNAME,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TUNNEL_NAME,
    DOMAIN,
    TARGET_HOMEASSISTANT,
    TARGET_URL,
    VISITOR_AUTH_BASIC,
    VISITOR_AUTH_NONE,
)
from .coordinator import agent_id, cleartext_bridge
from .discovery import DiscoveredApp, app_from_service_info, discovered_apps
from .service_list import ServiceError, is_tcp, parse_services, service_lines

_LOGGER = logging.getLogger(__package__)

_PASSWORD = TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))
_URL = TextSelector(TextSelectorConfig(type=TextSelectorType.URL))
#: One ``NAME=URL`` per field, as ``rproxy agent --service`` takes them.
_SERVICES = TextSelector(TextSelectorConfig(multiple=True))

#: Time the target step's check of a typed URL may take.
_URL_CHECK_TIMEOUT = 10


def _bridge_schema(defaults: Mapping[str, Any]) -> vol.Schema:
    """The bridge form. A token already stored is never sent to the browser: the field may
    stay empty to keep it. Optional even for a first tunnel: ``user:password@`` in the URL
    may be the credential."""
    return vol.Schema(
        {
            vol.Required(CONF_BRIDGE_URL, default=defaults.get(CONF_BRIDGE_URL, vol.UNDEFINED)): _URL,
            vol.Optional(CONF_TOKEN): _PASSWORD,
            vol.Required(CONF_TUNNEL_NAME, default=defaults.get(CONF_TUNNEL_NAME, DEFAULT_TUNNEL_NAME)): str,
        }
    )


async def probe_bridge(hass: HomeAssistant, bridge_url: str, token: str, name: str) -> tuple[dict[str, str], str]:
    """Connect to the bridge once with these settings.

    Returns form errors (empty when the bridge accepted the agent) and a detail to show.
    """
    try:
        bridge_connect_url(bridge_url)
    except ConfigError:
        return {CONF_BRIDGE_URL: "invalid_url"}, ""
    if not is_tunnel_name(name):
        return {CONF_TUNNEL_NAME: "invalid_name"}, ""
    try:
        agent = Agent(
            AgentConfig(
                bridge=bridge_url,
                token=token,
                target="http://127.0.0.1",
                name=name,
                agent_id=agent_id(hass),
                # Accepted as before; the entry then raises the insecure_bridge repair.
                insecure=cleartext_bridge(bridge_url),
            ),
            tunnel_session=async_get_clientsession(hass),
        )
    except ConfigError:  # only the token is left to be wrong: it cannot go into a header
        return {CONF_TOKEN: "invalid_token"}, ""
    try:
        await agent.probe()
    except AuthenticationError:
        return {"base": "invalid_auth"}, ""
    except (RproxyConnectionError, TimeoutError) as err:
        return {"base": "cannot_connect"}, str(err) or "timed out"
    return {}, ""


def credential_from_url(bridge_url: str, token: str) -> tuple[str, str, dict[str, str]]:
    """node-rproxy's form, ``ws://user:password@host``: the URL without its userinfo, the
    token (the typed one, or ``user:password`` from the URL), and form errors.

    Stored so, the password never sits in the entry's URL (shown in the UI and logs): it is
    the token, which the bridge started as ``rproxy bridge PORT user:password`` accepts.
    """
    try:
        url, credential = split_bridge_credential(bridge_url)
    except ConfigError:
        return bridge_url, token, {CONF_BRIDGE_URL: "invalid_url"}
    if credential is None:
        return bridge_url, token, {}
    if token:
        return url, token, {CONF_TOKEN: "token_twice"}
    return url, credential, {}


def _same_bridge(a: str, b: str) -> bool:
    """Whether two bridge URLs name the same bridge (``https://x`` and ``wss://x/`` do)."""
    try:
        return bridge_connect_url(a) == bridge_connect_url(b)
    except ConfigError:
        return False


def _parse_url(text: str) -> URL | None:
    """``text`` as a URL, or None where yarl refuses it (a port out of range, a broken IPv6 host)."""
    try:
        return URL(text.strip())
    except (ValueError, TypeError):
        return None


async def _is_this_homeassistant(hass: HomeAssistant, url: URL) -> bool:
    """Whether a typed URL leads back to this Home Assistant's own HTTP server.

    Proxied over HTTP, Home Assistant would see every visitor as its own local address: the
    protections of the Home Assistant target (bans on the visitor, no trusted-network or
    local-only logins from outside) would not hold.
    """
    http = getattr(hass, "http", None)
    port = getattr(http, "server_port", None)
    if port is None or url.port != port or url.host is None:
        return False
    host = url.host.lower().rstrip(".")
    if host in ("localhost", "homeassistant", "homeassistant.local"):
        return True
    try:
        address = ip_address(host)
    except ValueError:  # a host name: this instance's own internal one?
        internal = URL(hass.config.internal_url) if hass.config.internal_url else None
        return internal is not None and (internal.host or "").lower() == host
    if address.is_loopback or address.is_unspecified:
        return True
    from homeassistant.components import network  # imported late: an after_dependency

    own: set[str] = set()
    for adapter in await network.async_get_adapters(hass):
        own.update(str(item["address"]) for item in adapter["ipv4"])
        own.update(str(item["address"]) for item in adapter["ipv6"])
    return str(address) in own


class RproxyConfigFlow(ConfigFlow, domain=DOMAIN):
    """Bridge settings (checked by connecting), then the target."""

    VERSION = 1

    def __init__(self) -> None:
        self._bridge: dict[str, Any] = {}
        self._target: dict[str, Any] | None = None
        self._apps: dict[str, DiscoveredApp] = {}

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> RproxyOptionsFlow:
        """The options of a tunnel."""
        return RproxyOptionsFlow()

    # The bridge.

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the bridge, the token and the tunnel's name; connect to check them."""
        errors: dict[str, str] = {}
        detail = bridge_url = ""
        known = self._known_bridge()
        if user_input is not None:
            bridge_url, token, errors = credential_from_url(
                user_input[CONF_BRIDGE_URL].strip(), user_input.get(CONF_TOKEN) or ""
            )
            if not token and known and _same_bridge(bridge_url, known[CONF_BRIDGE_URL]):
                token = known[CONF_TOKEN]  # left empty: the token of the other tunnel there
            if errors:
                pass
            elif self._name_in_use(bridge_url, user_input[CONF_TUNNEL_NAME]):
                errors = {CONF_TUNNEL_NAME: "name_in_use"}
            else:
                errors, detail = await probe_bridge(self.hass, bridge_url, token, user_input[CONF_TUNNEL_NAME])
            if not errors:
                self._bridge = {
                    CONF_BRIDGE_URL: bridge_url,
                    CONF_TOKEN: token,
                    CONF_TUNNEL_NAME: user_input[CONF_TUNNEL_NAME],
                }
                if self._target is not None:  # a discovered app, already confirmed
                    return self._create()
                return await self.async_step_target()
        # The URL shown again without its password: that went into the token.
        defaults: Mapping[str, Any] = {**user_input, CONF_BRIDGE_URL: bridge_url} if user_input else known
        return self.async_show_form(
            step_id="user",
            data_schema=_bridge_schema(defaults),
            errors=errors,
            description_placeholders={"error": detail},
        )

    def _name_in_use(self, bridge_url: str, name: str, exclude: str | None = None) -> bool:
        """Whether another tunnel of this Home Assistant has this name on this bridge.

        The bridge takes agents of one name for copies of one app and spreads visitors over
        them: two different targets under one name would each get every other request.
        """
        return any(
            entry.entry_id != exclude
            and entry.data.get(CONF_TUNNEL_NAME) == name
            and _same_bridge(entry.data.get(CONF_BRIDGE_URL, ""), bridge_url)
            for entry in self._async_current_entries(include_ignore=False)
        )

    def _known_bridge(self) -> dict[str, Any]:
        """The bridge of a tunnel set up before (most homes have one): its URL is offered,
        and its token is used if the field is left empty (it is never shown)."""
        for entry in self._async_current_entries(include_ignore=False):
            return {CONF_BRIDGE_URL: entry.data[CONF_BRIDGE_URL], CONF_TOKEN: entry.data[CONF_TOKEN]}
        return {}

    # The target.

    async def async_step_target(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Choose what to expose: Home Assistant, an app found on the LAN, or a URL."""
        if user_input is not None:
            choice = user_input[CONF_TARGET]
            if choice == TARGET_HOMEASSISTANT:
                await self.async_set_unique_id(TARGET_HOMEASSISTANT, raise_on_progress=False)
                self._abort_if_unique_id_configured()
                self._target = {
                    CONF_TARGET: TARGET_HOMEASSISTANT,
                    CONF_TARGET_URL: None,
                    CONF_TARGET_NAME: "Home Assistant",
                }
                return self._create()
            if choice == TARGET_URL:
                return await self.async_step_url()
            app = self._apps.get(choice)
            if app is not None:
                await self.async_set_unique_id(f"zeroconf:{app.key}", raise_on_progress=False)
                self._abort_if_unique_id_configured()
                self._target = {CONF_TARGET: TARGET_URL, CONF_TARGET_URL: app.url, CONF_TARGET_NAME: app.name}
                return self._create()
        self._apps = {f"app:{app.key}": app for app in await discovered_apps(self.hass)}
        options = [
            SelectOptionDict(value=TARGET_HOMEASSISTANT, label="Home Assistant"),
            *(SelectOptionDict(value=key, label=app.label) for key, app in self._apps.items()),
            SelectOptionDict(value=TARGET_URL, label="URL"),
        ]
        return self.async_show_form(
            step_id="target",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_TARGET, default=TARGET_HOMEASSISTANT): SelectSelector(
                        SelectSelectorConfig(options=options, mode=SelectSelectorMode.LIST, translation_key=CONF_TARGET)
                    )
                }
            ),
            description_placeholders={"found": str(len(self._apps))},
        )

    async def async_step_url(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """A web app typed by hand, checked with a request."""
        errors: dict[str, str] = {}
        detail = ""
        if user_input is not None:
            url = _parse_url(user_input[CONF_TARGET_URL])
            if url is None or url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
                errors[CONF_TARGET_URL] = "invalid_url"
            elif await _is_this_homeassistant(self.hass, url):
                errors[CONF_TARGET_URL] = "is_homeassistant"
            else:
                detail = await self._check_url(url)
                if detail:
                    errors["base"] = "cannot_connect_target"
            if not errors and url is not None:
                await self.async_set_unique_id(f"url:{url.origin()}{url.path}", raise_on_progress=False)
                self._abort_if_unique_id_configured()
                self._target = {CONF_TARGET: TARGET_URL, CONF_TARGET_URL: str(url), CONF_TARGET_NAME: str(url.origin())}
                return self._create()
        return self.async_show_form(
            step_id="url",
            data_schema=vol.Schema(
                {vol.Required(CONF_TARGET_URL, default=(user_input or {}).get(CONF_TARGET_URL, vol.UNDEFINED)): _URL}
            ),
            errors=errors,
            description_placeholders={"error": detail},
        )

    async def _check_url(self, url: URL) -> str:
        """Empty if the web app answers at ``url`` (any HTTP status), else why not."""
        session = async_get_clientsession(self.hass)
        try:
            async with session.get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=_URL_CHECK_TIMEOUT)
            ) as response:
                _LOGGER.debug("%s answered %s", url, response.status)
        except TimeoutError:
            return "no answer in time"
        except aiohttp.ClientConnectorError as err:
            return err.os_error.strerror or str(err.os_error)
        except aiohttp.ClientError as err:
            return str(err) or type(err).__name__
        return ""

    # Discovery.

    async def async_step_zeroconf(self, discovery_info: ZeroconfServiceInfo) -> ConfigFlowResult:
        """A web app announced itself on the LAN."""
        app = app_from_service_info(discovery_info)
        if app is None:
            return self.async_abort(reason="not_rproxy_app")
        await self.async_set_unique_id(f"zeroconf:{app.key}")
        # An app that moved to another address is followed: the tunnel's target is updated.
        self._abort_if_unique_id_configured(updates={CONF_TARGET_URL: app.url})
        self._target = {CONF_TARGET: TARGET_URL, CONF_TARGET_URL: app.url, CONF_TARGET_NAME: app.name}
        self.context["title_placeholders"] = {"name": app.name}
        return await self.async_step_zeroconf_confirm()

    async def async_step_zeroconf_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Offer to expose the discovered app, naming it."""
        assert self._target is not None
        if user_input is not None:
            return await self.async_step_user()
        return self.async_show_form(
            step_id="zeroconf_confirm",
            description_placeholders={"name": self._target[CONF_TARGET_NAME], "url": self._target[CONF_TARGET_URL]},
        )

    # Token refused, settings changed.

    async def async_step_reauth(self, entry_data: Mapping[str, Any]) -> ConfigFlowResult:
        """The bridge refuses the token."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for a token the bridge accepts."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        detail = ""
        if user_input is not None:
            errors, detail = await probe_bridge(
                self.hass, entry.data[CONF_BRIDGE_URL], user_input[CONF_TOKEN], entry.data[CONF_TUNNEL_NAME]
            )
            if not errors:
                return self.async_update_reload_and_abort(entry, data_updates={CONF_TOKEN: user_input[CONF_TOKEN]})
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=vol.Schema({vol.Required(CONF_TOKEN): _PASSWORD}),
            errors=errors,
            description_placeholders={
                "tunnel": entry.data[CONF_TUNNEL_NAME],
                "bridge": entry.data[CONF_BRIDGE_URL],
                "error": detail,
            },
        )

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Change the bridge, token or tunnel name of a tunnel."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        detail = bridge_url = ""
        if user_input is not None:
            name = user_input[CONF_TUNNEL_NAME]
            bridge_url, token, errors = credential_from_url(
                user_input[CONF_BRIDGE_URL].strip(), user_input.get(CONF_TOKEN) or ""
            )
            token = token or entry.data[CONF_TOKEN]  # empty: keep the current one
            if errors:
                pass
            elif self._name_in_use(bridge_url, name, exclude=entry.entry_id):
                errors = {CONF_TUNNEL_NAME: "name_in_use"}
            else:
                errors, detail = await probe_bridge(self.hass, bridge_url, token, name)
            if not errors:
                return self.async_update_reload_and_abort(
                    entry,
                    title=f"{name}: {entry.data[CONF_TARGET_NAME]}",
                    data_updates={
                        CONF_BRIDGE_URL: bridge_url,
                        CONF_TOKEN: token,
                        CONF_TUNNEL_NAME: name,
                    },
                )
        return self.async_show_form(
            step_id=SOURCE_RECONFIGURE,
            data_schema=_bridge_schema({**user_input, CONF_BRIDGE_URL: bridge_url} if user_input else entry.data),
            errors=errors,
            description_placeholders={"error": detail},
        )

    def _create(self) -> ConfigFlowResult:
        assert self._target is not None
        data = {**self._bridge, **self._target}
        return self.async_create_entry(title=f"{data[CONF_TUNNEL_NAME]}: {data[CONF_TARGET_NAME]}", data=data)


class RproxyOptionsFlow(OptionsFlow):
    """Request timeout, the public address, extra services; for a web app other than Home
    Assistant also visitor authentication and forwarded headers."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """One form for all options that apply to this tunnel's target."""
        entry = self.config_entry
        homeassistant = entry.data[CONF_TARGET] == TARGET_HOMEASSISTANT
        errors: dict[str, str] = {}
        placeholders = {"service": ""}
        if user_input is not None:
            if not homeassistant and user_input.get(CONF_VISITOR_AUTH) == VISITOR_AUTH_BASIC:
                if not user_input.get(CONF_VISITOR_USERNAME) or ":" in user_input[CONF_VISITOR_USERNAME]:
                    errors[CONF_VISITOR_USERNAME] = "invalid_username"
                elif not user_input.get(CONF_VISITOR_PASSWORD):
                    errors[CONF_VISITOR_PASSWORD] = "password_required"
            if public_url := (user_input.get(CONF_PUBLIC_URL) or "").strip():
                url = _parse_url(public_url)
                if url is None or url.scheme not in ("http", "https") or not url.host:
                    errors[CONF_PUBLIC_URL] = "invalid_public_url"
                else:
                    user_input[CONF_PUBLIC_URL] = public_url
            else:
                user_input.pop(CONF_PUBLIC_URL, None)
            try:
                services = parse_services(user_input.get(CONF_SERVICES) or ())
                for name, target in services.items():
                    if not is_tcp(target) and await _is_this_homeassistant(self.hass, URL(target)):
                        raise ServiceError("service_is_homeassistant", name)
            except ServiceError as err:
                errors[CONF_SERVICES] = err.key
                placeholders["service"] = err.service
            else:
                if services:
                    user_input[CONF_SERVICES] = service_lines(services)
                else:
                    user_input.pop(CONF_SERVICES, None)
            if not errors:
                # The switch's state lives in the options too: keep it, and only it (a field
                # the user emptied, such as a password, must go, and so must options that do
                # not apply to this target).
                kept = {CONF_EXPOSED: entry.options[CONF_EXPOSED]} if CONF_EXPOSED in entry.options else {}
                return self.async_create_entry(data={**kept, **user_input})
        current = user_input or entry.options
        fields: dict[vol.Marker, Any] = {
            vol.Required(
                CONF_REQUEST_TIMEOUT, default=current.get(CONF_REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT)
            ): NumberSelector(
                NumberSelectorConfig(min=1, max=600, step=1, unit_of_measurement="s", mode=NumberSelectorMode.BOX)
            ),
        }
        if not homeassistant:
            fields.update(
                {
                    vol.Required(
                        CONF_VISITOR_AUTH, default=current.get(CONF_VISITOR_AUTH, VISITOR_AUTH_NONE)
                    ): SelectSelector(
                        SelectSelectorConfig(
                            options=[VISITOR_AUTH_NONE, VISITOR_AUTH_BASIC], translation_key=CONF_VISITOR_AUTH
                        )
                    ),
                    vol.Optional(
                        CONF_VISITOR_USERNAME, description={"suggested_value": current.get(CONF_VISITOR_USERNAME)}
                    ): str,
                    vol.Optional(
                        CONF_VISITOR_PASSWORD, description={"suggested_value": current.get(CONF_VISITOR_PASSWORD)}
                    ): _PASSWORD,
                    vol.Required(
                        CONF_FORWARD_HEADERS, default=list(current.get(CONF_FORWARD_HEADERS, FORWARDED_HEADERS))
                    ): SelectSelector(SelectSelectorConfig(options=list(FORWARDED_HEADERS), multiple=True)),
                }
            )
        fields.update(
            {
                vol.Optional(CONF_PUBLIC_URL, description={"suggested_value": current.get(CONF_PUBLIC_URL)}): _URL,
                vol.Optional(
                    CONF_SERVICES, description={"suggested_value": list(current.get(CONF_SERVICES) or [])}
                ): _SERVICES,
            }
        )
        return self.async_show_form(
            step_id="init",
            data_schema=vol.Schema(fields),
            errors=errors,
            description_placeholders=placeholders,
        )
