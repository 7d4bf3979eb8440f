"""The tunnel of one config entry: an rproxy agent in Home Assistant's event loop.

The agent pushes its state changes and, at most once a second, its traffic counters; the
coordinator turns both into snapshots its entities render. Nothing here polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from ipaddress import ip_address
from typing import Any

import aiohttp
from homeassistant.config_entries import ConfigEntry
from homeassistant.const import CONF_TOKEN
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.exceptions import (
    ConfigEntryAuthFailed,
    ConfigEntryError,
    ConfigEntryNotReady,
    ServiceValidationError,
)
from homeassistant.helpers.aiohttp_client import async_create_clientsession, async_get_clientsession
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator
from homeassistant.util.network import is_local
from yarl import URL

from rproxy_core import Agent, AgentConfig, AuthenticationError
from rproxy_core.agent import FORWARDED_HEADERS, AgentState, AgentStats, create_inprocess_session, is_cleartext_remote
from rproxy_core.exceptions import ConfigError

from .const import (
    CONF_BRIDGE_URL,
    CONF_EXPOSED,
    CONF_FORWARD_HEADERS,
    CONF_PUBLIC_URL,
    CONF_REQUEST_TIMEOUT,
    CONF_SERVICES,
    CONF_TARGET,
    CONF_TARGET_URL,
    CONF_TUNNEL_NAME,
    CONF_VISITOR_AUTH,
    CONF_VISITOR_PASSWORD,
    CONF_VISITOR_USERNAME,
    DEFAULT_REQUEST_TIMEOUT,
    DOMAIN,
    HOMEASSISTANT_TARGET_URL,
    PUBLIC_URL_FROM_BRIDGE,
    PUBLIC_URL_FROM_OPTIONS,
    PUBLIC_URL_INVALID,
    PUBLIC_URL_LOCAL_BRIDGE,
    SETUP_TIMEOUT,
    TARGET_HOMEASSISTANT,
    VISITOR_AUTH_BASIC,
)
from .homeassistant_target import homeassistant_server, trusted_networks_refusal
from .issues import (
    async_clear_visitor_refused,
    async_raise_visitor_refused,
    async_update_insecure_bridge,
    visitor_refused_raised,
)
from .service_list import ServiceError, is_tcp, parse_services, service_addresses

_LOGGER = logging.getLogger(__package__)

type RproxyConfigEntry = ConfigEntry[RproxyCoordinator]


@dataclass(frozen=True, slots=True)
class TunnelSnapshot:
    """What the entities show, taken whenever the agent reports something."""

    state: AgentState
    exposed: bool
    #: The address visitors open (None: not known, see ``public_url_source``).
    public_url: str | None
    #: Where ``public_url`` comes from: PUBLIC_URL_FROM_BRIDGE, PUBLIC_URL_FROM_OPTIONS, or
    #: PUBLIC_URL_LOCAL_BRIDGE (unknown: the bridge named an address on this network); None
    #: while the tunnel has never been up and nothing is set.
    public_url_source: str | None
    #: What the bridge said when the tunnel came up (the address the agent dialled, or
    #: ``<tunnel>.<domain>``).
    bridge_public_url: str | None
    #: Where visitors reach each extra service (see ``service_addresses``).
    services: dict[str, str | None]
    connected_since: float | None
    #: The agent's counters (kept from the last run while the agent is stopped).
    stats: AgentStats
    last_error: str | None

    @property
    def connected(self) -> bool:
        """Whether the tunnel is up."""
        return self.state is AgentState.CONNECTED


class RproxyCoordinator(DataUpdateCoordinator[TunnelSnapshot]):
    """Runs the agent of one tunnel and publishes its snapshots."""

    config_entry: RproxyConfigEntry

    def __init__(self, hass: HomeAssistant, entry: RproxyConfigEntry) -> None:
        super().__init__(hass, _LOGGER, config_entry=entry, name=f"{DOMAIN} {entry.data[CONF_TUNNEL_NAME]}")
        self.agent: Agent | None = None
        #: The agent's session to the target, made per start: ours to release at stop.
        self._target_session: aiohttp.ClientSession | None = None
        #: With Home Assistant as the target, the session to the extra web services.
        self._service_session: aiohttp.ClientSession | None = None
        try:
            self._services = parse_services(entry.options.get(CONF_SERVICES, ()))
        except ServiceError:  # the agent is refused them too, and setup says why
            self._services = {}
        self._unsubscribe: list[Any] = []
        self._was_connected = False
        self._reauth_started = False
        # From the registry, not False: a notice raised before a reload must still clear.
        self._refusing_local_visitors = visitor_refused_raised(hass, entry)
        #: The options the agent was built with, but for the switch's (see async_set_exposed).
        self.applied_options = _without_exposed(entry.options)
        public_url, source = self._visitor_url(None)
        self.data = TunnelSnapshot(
            state=AgentState.STOPPED,
            exposed=self.exposed,
            public_url=public_url,
            public_url_source=source,
            bridge_public_url=None,
            services=self._service_addresses(public_url),
            connected_since=None,
            stats=AgentStats(
                active_streams=0, requests_served=0, bytes_received=0, bytes_sent=0, rtt=None, reconnects=0
            ),
            last_error=None,
        )

    @property
    def exposes_homeassistant(self) -> bool:
        """Whether the tunnel leads to this Home Assistant."""
        return bool(self.config_entry.data[CONF_TARGET] == TARGET_HOMEASSISTANT)

    @property
    def exposed(self) -> bool:
        """Whether the user wants the tunnel up (the switch)."""
        return bool(self.config_entry.options.get(CONF_EXPOSED, True))

    # Lifecycle.

    async def async_first_start(self) -> None:
        """Start the tunnel of a config entry being set up, as Home Assistant wants it told.

        The analogue of ``async_config_entry_first_refresh``: setup waits for the first
        connection, and a failure becomes the exception that makes Home Assistant retry,
        ask for a new token, or show why the settings cannot work.

        Raises:
            ConfigEntryError: the stored settings are refused (written by an older version, or
                edited by hand).
            ConfigEntryAuthFailed: the bridge refuses the token (starts the reauth flow).
            ConfigEntryNotReady: no connection yet (Home Assistant retries later).
        """
        bridge_url = self.config_entry.data[CONF_BRIDGE_URL]
        async_update_insecure_bridge(self.hass, self.config_entry, bridge_url, cleartext_bridge(bridge_url))
        if not self.exposed:
            return
        try:
            outcome = await self.async_start()
        except ConfigError as err:
            raise ConfigEntryError(
                translation_domain=DOMAIN,
                translation_key="invalid_settings",
                translation_placeholders={"error": str(err)},
            ) from None
        if outcome is AgentState.CONNECTED:
            return
        agent = self.agent
        failure = agent.failure if agent is not None else None
        error = (agent.last_error if agent is not None else None) or "no answer from the bridge"
        await self.async_stop()
        if isinstance(failure, AuthenticationError):
            raise ConfigEntryAuthFailed(
                translation_domain=DOMAIN, translation_key="invalid_auth", translation_placeholders={"error": error}
            )
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN, translation_key="cannot_connect", translation_placeholders={"error": error}
        )

    async def async_start(self) -> AgentState:
        """Start the agent; return the outcome of its first attempt (or its state after SETUP_TIMEOUT)."""
        if self.agent is not None:
            return self.agent.state
        agent = self._build_agent()  # raises ConfigError for settings the agent refuses
        self.agent = agent
        first_outcome: asyncio.Future[AgentState] = self.hass.loop.create_future()

        @callback
        def on_state(changed: Agent) -> None:
            if (
                changed.state in (AgentState.CONNECTED, AgentState.WAITING, AgentState.FAILED)
                and not first_outcome.done()
            ):
                first_outcome.set_result(changed.state)
            self._on_state(changed)

        self._unsubscribe = [
            agent.add_listener(on_state),
            agent.add_stats_listener(self._on_stats),
        ]
        await agent.start()
        try:
            async with asyncio.timeout(SETUP_TIMEOUT):
                return await first_outcome
        except TimeoutError:
            return agent.state
        finally:
            self._publish()

    async def async_stop(self) -> None:
        """Stop the agent and wait until every request it was serving is cancelled."""
        agent, self.agent = self.agent, None
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if agent is not None:
            await agent.stop()
            if self._was_connected:
                _LOGGER.info("Tunnel %s stopped", self.config_entry.data[CONF_TUNNEL_NAME])
        session, self._target_session = self._target_session, None
        if session is not None:
            if self.exposes_homeassistant:
                await session.close()  # in-process: its connector is ours
            else:
                session.detach()  # Home Assistant's connector stays with Home Assistant
        if (session := self._service_session) is not None:
            self._service_session = None
            session.detach()
        self._was_connected = False
        self._publish()

    async def async_on_hass_stop(self, event: Event) -> None:
        """Home Assistant stops: close with a goodbye while the loop still runs, so the bridge
        stops routing visitors here at once and nothing logs a lost tunnel."""
        await self.async_stop()

    def options_need_restart(self) -> bool:
        """Whether the options changed since the agent was built (the switch's own change needs no restart)."""
        return self.applied_options != _without_exposed(self.config_entry.options)

    async def async_set_exposed(self, exposed: bool) -> None:
        """Start or stop exposing, and remember the choice across restarts."""
        entry = self.config_entry
        self.hass.config_entries.async_update_entry(entry, options={**entry.options, CONF_EXPOSED: exposed})
        if exposed:
            await self.async_start()
        else:
            await self.async_stop()

    async def async_reconnect(self) -> None:
        """Drop the tunnel and dial the bridge again now.

        Raises:
            ServiceValidationError: the tunnel is switched off; reconnecting must not expose it.
        """
        if not self.exposed:
            raise ServiceValidationError(translation_domain=DOMAIN, translation_key="not_exposed")
        if self.agent is None:
            await self.async_start()
        else:
            await self.agent.reconnect()
        self._publish()

    # Agent callbacks (all in the event loop).

    @callback
    def _on_state(self, agent: Agent) -> None:
        state = agent.state
        name = self.config_entry.data[CONF_TUNNEL_NAME]
        if state is AgentState.CONNECTED:
            if not self._was_connected:
                _LOGGER.info("Tunnel %s is up at %s", name, agent.public_url)
            self._was_connected = True
            self._reauth_started = False
        elif state in (AgentState.WAITING, AgentState.FAILED) and self._was_connected:
            # log-when-unavailable: once when the tunnel goes down, once when it is back.
            _LOGGER.info("Tunnel %s is down: %s", name, agent.last_error)
            self._was_connected = False
        if state is AgentState.FAILED and isinstance(agent.failure, AuthenticationError) and not self._reauth_started:
            self._reauth_started = True
            self.config_entry.async_start_reauth(self.hass)
        self._publish()

    @callback
    def _on_stats(self, stats: AgentStats) -> None:
        self._publish()

    @callback
    def _publish(self) -> None:
        self.async_set_updated_data(self._snapshot())

    def _snapshot(self) -> TunnelSnapshot:
        agent = self.agent
        if agent is None:
            previous = self.data
            return replace(
                previous,
                state=AgentState.STOPPED,
                exposed=self.exposed,
                connected_since=None,
                stats=replace(previous.stats, active_streams=0, rtt=None),
                last_error=None,
            )
        # What the bridge says goes into a state and the diagnostics: bounded, whatever it sent.
        bridge_url = (agent.public_url or self.data.bridge_public_url or "")[:MAX_URL_LENGTH] or None
        public_url, source = self._visitor_url(bridge_url)
        return TunnelSnapshot(
            state=agent.state,
            exposed=self.exposed,
            public_url=public_url,
            public_url_source=source,
            bridge_public_url=bridge_url,
            services=self._service_addresses(public_url),
            connected_since=agent.connected_since,
            stats=agent.stats,
            last_error=agent.last_error,
        )

    def _visitor_url(self, bridge_url: str | None) -> tuple[str | None, str | None]:
        """The address visitors open, and where it comes from (see ``TunnelSnapshot``)."""
        return visitor_url(bridge_url, self.config_entry.options.get(CONF_PUBLIC_URL))

    def _service_addresses(self, public_url: str | None) -> dict[str, str | None]:
        return service_addresses(public_url, self.config_entry.data[CONF_TUNNEL_NAME], self._services)

    # Building the agent.

    def _build_agent(self) -> Agent:
        hass, entry = self.hass, self.config_entry
        data, options = entry.data, entry.options
        try:
            services = parse_services(options.get(CONF_SERVICES, ()))
        except ServiceError as err:  # stored by hand or by a later version
            raise ConfigError(f"services: {err.service!r} is not a service the agent can serve ({err.key})") from None
        # Home Assistant has its own login and learns the visitor's address in-process: a
        # password in front of it and forwarded headers are for the other web apps only.
        credentials = None
        forward_headers = FORWARDED_HEADERS
        if not self.exposes_homeassistant:
            if options.get(CONF_VISITOR_AUTH) == VISITOR_AUTH_BASIC:
                credentials = (options[CONF_VISITOR_USERNAME], options[CONF_VISITOR_PASSWORD])
            forward_headers = tuple(options.get(CONF_FORWARD_HEADERS, FORWARDED_HEADERS))
        config = AgentConfig(
            bridge=data[CONF_BRIDGE_URL],
            token=data[CONF_TOKEN],
            target=data.get(CONF_TARGET_URL) or HOMEASSISTANT_TARGET_URL,
            name=data[CONF_TUNNEL_NAME],
            services=services,
            agent_id=agent_id(hass),
            request_timeout=float(options.get(CONF_REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT)),
            forward_headers=forward_headers,
            visitor_credentials=credentials,
            # The agent refuses such a bridge unless told; entries made before it did keep
            # working, and the insecure_bridge repair tells the user to move to TLS.
            insecure=cleartext_bridge(data[CONF_BRIDGE_URL]),
        )
        config.validate()  # before any session is made: a refusal leaves nothing to release
        tunnel_session = async_get_clientsession(hass)
        if self.exposes_homeassistant:
            if any(not is_tcp(target) for target in services.values()):
                self._service_session = self._network_session()
            self._target_session = create_inprocess_session(lambda: homeassistant_server(hass))
            return Agent(
                config,
                session=self._target_session,
                tunnel_session=tunnel_session,
                in_process=True,
                admit=self._admit_visitor,
                service_session=self._service_session,
            )
        self._target_session = self._network_session()
        return Agent(config, session=self._target_session, tunnel_session=tunnel_session)

    def _network_session(self) -> aiohttp.ClientSession:
        """Home Assistant's connection pool, but no cookie jar (visitors must not share one)
        and bodies passed through as they are."""
        return async_create_clientsession(
            self.hass, auto_cleanup=False, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )

    def _admit_visitor(self, address: str) -> str | None:
        """Refuse tunnelled visitors Home Assistant would take for local ones.

        Home Assistant sees the visitor's address as the connection's peer. Were that
        address local (the bridge runs behind a proxy it does not trust, or on the LAN),
        local-only users and a ``trusted_networks`` provider would let a stranger from the
        internet in; so such a request never reaches Home Assistant.
        """
        try:
            ip = ip_address(address)
        except ValueError:
            refusal: str | None = "the bridge did not say who this visitor is"
        else:
            refusal = None
            if is_local(ip):
                refusal = f"the bridge reports this visitor as {ip}, a local address"
            elif (trusted := trusted_networks_refusal(self.hass, ip)) is not None:
                refusal = trusted
        self._track_local_visitors(refusal, address)
        if refusal is None:
            return None
        return f"rproxy refused this request: {refusal}; Home Assistant would trust it."

    def _track_local_visitors(self, refusal: str | None, address: str) -> None:
        entry = self.config_entry
        if refusal is not None and not self._refusing_local_visitors:
            self._refusing_local_visitors = True
            _LOGGER.warning("Refusing tunnelled visitors from %s: %s", address, refusal)
            async_raise_visitor_refused(self.hass, entry, address)
        elif refusal is None and self._refusing_local_visitors:
            self._refusing_local_visitors = False
            async_clear_visitor_refused(self.hass, entry)


def _without_exposed(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != CONF_EXPOSED}


#: Home Assistant's longest state; a URL visitors type is far shorter.
MAX_URL_LENGTH = 255


def visitor_url(bridge_url: str | None, configured: str | None) -> tuple[str | None, str | None]:
    """The address visitors open and where it comes from (``PUBLIC_URL_FROM_*``), given what
    the bridge named (None: nothing yet) and the Public URL option."""
    if configured:
        return configured, PUBLIC_URL_FROM_OPTIONS
    if not bridge_url:
        return None, None
    try:
        url = URL(bridge_url)
        valid = url.scheme in ("http", "https") and bool(url.host) and bridge_url.isprintable()
    except (ValueError, TypeError):
        valid = False
    if not valid or len(bridge_url) > MAX_URL_LENGTH:
        return None, PUBLIC_URL_INVALID  # a bridge that lies, or speaks a later protocol
    if is_local_address(url.host or ""):
        # Without a domain the bridge names the address the agent dialled: from here,
        # and not where visitors from the internet find it.
        return None, PUBLIC_URL_LOCAL_BRIDGE
    return bridge_url, PUBLIC_URL_FROM_BRIDGE


def is_local_address(host: str) -> bool:
    """Whether visitors from the internet cannot use ``host``: a loopback, private or
    link-local address, ``localhost``, an mDNS ``.local`` name or a name without a dot."""
    host = host.lower().rstrip(".")
    try:
        return is_local(ip_address(host.strip("[]")))
    except ValueError:
        return host == "localhost" or host.endswith((".localhost", ".local")) or "." not in host


def cleartext_bridge(bridge_url: str) -> bool:
    """Whether the tunnel to ``bridge_url`` crosses a network unencrypted (ws:// or http://
    beyond this machine); False for a URL the agent refuses anyway."""
    try:
        return is_cleartext_remote(bridge_url)
    except ConfigError:
        return False


def agent_id(hass: HomeAssistant) -> str:
    """How this Home Assistant introduces itself to the bridge (in the bridge's logs)."""
    name = "".join(ch for ch in hass.config.location_name if ch.isprintable())[:80] or "home"
    return f"home-assistant:{name}"
