"""Web apps on the LAN that announce themselves for rproxy over mDNS (zeroconf).

An app counts when it announces the project's own service type, or a plain ``_http._tcp``
service carrying an ``rproxy`` TXT property (so a web server that already announces itself
can opt in without a second service). Optional TXT properties: ``name`` (what lists show and
``zeroconf:NAME`` matches), ``path`` (where the app lives on that server), ``scheme``
(``https`` if it wants TLS) and ``id`` (an identity that survives renames).

The Home Assistant integration reads the same definitions; the ``rproxy agent`` command
lists apps (``--discover``) and follows one by name (``--target zeroconf:NAME``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Self

from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..config import ZEROCONF_TARGET_PREFIX

__all__ = [
    "DISCOVER_TIMEOUT",
    "SERVICE_TYPES",
    "ZEROCONF_HTTP_TYPE",
    "ZEROCONF_MARKER",
    "ZEROCONF_TYPE",
    "AppBrowser",
    "AppFollower",
    "DiscoveredApp",
    "announce_app",
    "app_from_info",
    "app_from_properties",
    "discover",
    "preferred_address",
    "property_text",
    "zeroconf_target_name",
]

_LOGGER = logging.getLogger("rproxy.discovery")

#: The project's own mDNS service type, and the TXT property that marks a plain
#: ``_http._tcp`` service as meant for rproxy.
ZEROCONF_TYPE = "_rproxy-app._tcp.local."
ZEROCONF_HTTP_TYPE = "_http._tcp.local."
ZEROCONF_MARKER = "rproxy"
SERVICE_TYPES = (ZEROCONF_TYPE, ZEROCONF_HTTP_TYPE)

#: Seconds ``rproxy agent --discover`` browses. Responders answer within half a second
#: (RFC 6762 §6), but one that multicast its records less than a second ago stays quiet
#: (§6.2), so an app that has just announced itself answers only the browser's second query,
#: about a second in; three seconds leave room for that and for a slow LAN.
DISCOVER_TIMEOUT = 3.0
#: Seconds one app gets to answer the questions that resolve its address, port and TXT.
RESOLVE_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class DiscoveredApp:
    """A web app found on the LAN."""

    #: Stable identity: the app's ``id`` property, else its mDNS instance name.
    key: str
    name: str
    host: str
    port: int
    path: str
    scheme: str
    #: The mDNS instance name without the service type (``name`` unless a TXT ``name`` is given).
    instance: str = ""

    @property
    def url(self) -> str:
        """Where the agent reaches it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def label(self) -> str:
        """How a list shows it."""
        return f"{self.name} ({self.host}:{self.port})"

    def answers_to(self, name: str) -> bool:
        """Whether ``zeroconf:name`` means this app: its name, instance name or id, in any case."""
        wanted = name.strip().casefold()
        return wanted in (self.name.casefold(), self.instance.casefold(), self.key.casefold())


def property_text(value: str | bytes | None) -> str:
    """A TXT property (key or value) as text; a key without a value is empty."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def app_from_properties(
    service_type: str, instance: str, host: str, port: int, properties: dict[str, str]
) -> DiscoveredApp | None:
    """The app a service describes, or None if it is not one for rproxy."""
    if service_type == ZEROCONF_HTTP_TYPE and ZEROCONF_MARKER not in properties:
        return None
    if not port or not host:
        return None
    label = instance.removesuffix("." + service_type)
    name = properties.get("name") or label
    path = properties.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    scheme = "https" if properties.get("scheme", "").lower() == "https" else "http"
    key = properties.get("id") or instance
    return DiscoveredApp(key=key, name=name, host=host, port=port, path=path, scheme=scheme, instance=label)


def preferred_address(addresses: Sequence[str]) -> str | None:
    """An IPv4 address if there is one (the likeliest to work from the agent), else IPv6.

    python-zeroconf lists the newest address first, so an app that moved is reached at its
    new address even while the old one lingers in the cache.
    """
    for text in addresses:
        try:
            if not isinstance(ip_address(text.split("%")[0]), IPv6Address):
                return text
        except ValueError:
            continue
    return addresses[0] if addresses else None


def app_from_info(info: ServiceInfo) -> DiscoveredApp | None:
    """The app a resolved (or cache-loaded) service describes, or None if it is not one."""
    host = preferred_address(info.parsed_scoped_addresses(IPVersion.All)) or (info.server or "").rstrip(".")
    properties = {property_text(k): property_text(v) for k, v in info.properties.items()}
    return app_from_properties(info.type, info.name, host, info.port or 0, properties)


def zeroconf_target_name(target: str) -> str | None:
    """NAME of a ``zeroconf:NAME`` target, or None for a URL."""
    if target[: len(ZEROCONF_TARGET_PREFIX)].lower() != ZEROCONF_TARGET_PREFIX:
        return None
    return target[len(ZEROCONF_TARGET_PREFIX) :].strip() or None


def _interface_choice(interfaces: Sequence[str] | None) -> InterfaceChoice | list[str]:
    return list(interfaces) if interfaces else InterfaceChoice.All


def _open_zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    try:
        return AsyncZeroconf(interfaces=_interface_choice(interfaces))
    except OSError as err:
        # The socket error alone ("No such device") does not say what was being tried.
        raise OSError(err.errno, f"cannot use mDNS (zeroconf) here: {err.strerror or err}") from None


class AppBrowser:
    """The web apps announced on the LAN, kept current for as long as it runs.

    Args:
        interfaces: addresses of the interfaces to browse on (default: every IPv4 interface).
        zeroconf: a running instance to share (e.g. an application's); by default the
            browser opens its own and closes it on stop.
        resolve_timeout: seconds an app gets to answer before it is left out.
    """

    def __init__(
        self,
        *,
        interfaces: Sequence[str] | None = None,
        zeroconf: AsyncZeroconf | None = None,
        resolve_timeout: float = RESOLVE_TIMEOUT,
    ) -> None:
        self._interfaces = interfaces
        self._aiozc = zeroconf
        self._owns_zeroconf = zeroconf is None
        self._resolve_timeout_ms = int(resolve_timeout * 1000)
        self._browser: AsyncServiceBrowser | None = None
        #: Resolved apps by (service type, instance name): one per announcement.
        self._found: dict[tuple[str, str], DiscoveredApp] = {}
        #: At most one resolution per announcement: a newer update cancels the older one, so
        #: a slow answer about an old address can never overwrite a new one.
        self._resolving: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._listeners: list[Callable[[], None]] = []

    @property
    def apps(self) -> list[DiscoveredApp]:
        """Every app found so far, once each (by ``key``), sorted by name."""
        unique: dict[str, DiscoveredApp] = {}
        for app in self._found.values():
            unique.setdefault(app.key, app)
        return sorted(unique.values(), key=lambda app: (app.name.casefold(), app.host, app.port))

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever ``apps`` changes; returns a function that removes it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    async def start(self) -> None:
        """Begin browsing; raises OSError when mDNS cannot be used on this host."""
        if self._browser is not None:
            return
        self._found.clear()  # what an earlier run saw may have gone since
        if self._aiozc is None:
            self._aiozc = _open_zeroconf(self._interfaces)
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, list(SERVICE_TYPES), handlers=[self._on_service_state_change]
        )

    async def stop(self) -> None:
        """Stop browsing; close the zeroconf instance if the browser opened it."""
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        self._resolving.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_zeroconf and self._aiozc is not None:
            await self._aiozc.async_close()
            self._aiozc = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # python-zeroconf calls this with keyword arguments: the parameter names are its own.
        key = (service_type, name)
        previous = self._resolving.pop(key, None)
        if previous is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            if self._found.pop(key, None) is not None:
                self._notify()
            return
        task = asyncio.create_task(self._resolve(key), name=f"rproxy resolve {name}")
        self._resolving[key] = task
        task.add_done_callback(lambda done: self._forget_resolution(key, done))

    def _forget_resolution(self, key: tuple[str, str], done: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is done:  # not a newer resolution that replaced it
            del self._resolving[key]

    async def _resolve(self, key: tuple[str, str]) -> None:
        service_type, instance = key
        if self._aiozc is None:
            return
        info = AsyncServiceInfo(service_type, instance)
        try:
            complete = await info.async_request(self._aiozc.zeroconf, self._resolve_timeout_ms)
        except (OSError, RuntimeError) as err:  # e.g. the instance closing under us
            _LOGGER.debug("resolving %s failed: %s", instance, err)
            return
        if not complete:
            _LOGGER.debug("%s did not answer within %d ms", instance, self._resolve_timeout_ms)
            return
        app = app_from_info(info)
        if app is None:
            changed = self._found.pop(key, None) is not None
        else:
            changed = self._found.get(key) != app
            self._found[key] = app
        if changed:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                _LOGGER.exception("discovery listener failed")


async def discover(
    timeout: float = DISCOVER_TIMEOUT, *, interfaces: Sequence[str] | None = None
) -> list[DiscoveredApp]:
    """Browse the LAN for ``timeout`` seconds; return the apps found, sorted by name."""
    async with AppBrowser(interfaces=interfaces, resolve_timeout=timeout) as browser:
        await asyncio.sleep(timeout)
        return browser.apps


class AppFollower:
    """Follows the app announced under one name, wherever it moves.

    ``on_change(app)`` is called when the app is first found, when its URL changes (a new
    address or port), and with None when it is no longer announced (it may come back). The
    last app found stays in ``app``: a restart of the app, or a missed mDNS refresh, should
    not cut off visitors while its old address still works.

    Args:
        browser: a running (or soon started) AppBrowser.
        name: what ``zeroconf:NAME`` gave: the app's name, mDNS instance name or id.
        on_change: see above.
    """

    def __init__(self, browser: AppBrowser, name: str, on_change: Callable[[DiscoveredApp | None], None]) -> None:
        self.name = name
        self.app: DiscoveredApp | None = None
        self.announced = False
        self._browser = browser
        self._on_change = on_change
        self._remove: Callable[[], None] | None = None
        self._warned_ambiguous: frozenset[str] = frozenset()

    def start(self) -> None:
        if self._remove is None:
            self._remove = self._browser.add_listener(self._check)
            self._check()

    def stop(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _pick(self) -> DiscoveredApp | None:
        candidates = [app for app in self._browser.apps if app.answers_to(self.name)]
        if not candidates:
            return None
        keys = frozenset(app.key for app in candidates)
        if len(keys) > 1 and keys != self._warned_ambiguous:
            self._warned_ambiguous = keys
            _LOGGER.warning(
                "several apps on the LAN answer to %r: %s; following %s",
                self.name,
                ", ".join(app.label for app in candidates),
                (self._same_app(candidates) or candidates[0]).label,
            )
        return self._same_app(candidates) or candidates[0]

    def _same_app(self, candidates: list[DiscoveredApp]) -> DiscoveredApp | None:
        """The candidate that is the app already followed, so a namesake never takes over."""
        if self.app is None:
            return None
        return next((app for app in candidates if app.key == self.app.key), None)

    def _check(self) -> None:
        app = self._pick()
        if app is None:
            if self.announced:
                self.announced = False
                self._on_change(None)
            return
        if self.announced and self.app is not None and app.url == self.app.url:
            self.app = app  # a TXT change that does not move it
            return
        self.app = app
        self.announced = True
        self._on_change(app)


def _server_name(label: str) -> str:
    """A host name of the app's own, so its address record never clashes with the machine's."""
    safe = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:40] or "app"
    return f"{safe}-{uuid.uuid4().hex[:8]}.local."


@asynccontextmanager
async def announce_app(
    name: str,
    port: int,
    *,
    address: str,
    path: str = "/",
    app_id: str | None = None,
    interfaces: Sequence[str] | None = None,
) -> AsyncIterator[str]:
    """Announce a web app as ``_rproxy-app._tcp`` until the block ends (then say goodbye).

    Yields the instance name it got: mDNS renames it (``name-2``) when another app on the
    LAN already uses ``name``.

    Args:
        name: the instance name lists show.
        port, address: where the app listens (one IPv4 or IPv6 address).
        path: where the app lives on that server.
        app_id: its ``id`` property (a stable identity).
        interfaces: addresses of the interfaces to announce on (default: all IPv4 ones).
    """
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    properties = {"path": path, **({"id": app_id} if app_id else {})}
    info = AsyncServiceInfo(
        ZEROCONF_TYPE,
        f"{name}.{ZEROCONF_TYPE}",
        addresses=[packed],
        port=port,
        properties=properties,
        server=_server_name(name),
    )
    aiozc = _open_zeroconf(interfaces)
    try:
        await (await aiozc.async_register_service(info, allow_name_change=True))
        yield info.name.removesuffix("." + ZEROCONF_TYPE)
    finally:
        await aiozc.async_close()  # sends the goodbyes: browsers drop the app at once
