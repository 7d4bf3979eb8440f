"""``rproxy agent``: the home side, next to the web app.

One process serves one tunnel (``--name``) over one connection: its main web app
(``--target``) and any further services (``--service NAME=URL``, or ``services`` in a config
file): web apps visited as ``<service>.<tunnel>.<domain>`` and TCP services (``tcp://host:port``)
reached with ``rproxy tcp``. The agent connects to nothing that is not in this list.

A target may be ``zeroconf:NAME``: the web app announced on the LAN under NAME (mDNS), found
at run time and followed when it moves. ``--discover`` lists the apps announced on the LAN.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import voluptuous as vol

from ..agent import Agent, AgentConfig, split_bridge_credential
from ..agent.discovery import (
    DISCOVER_TIMEOUT,
    ZEROCONF_HTTP_TYPE,
    ZEROCONF_MARKER,
    ZEROCONF_TYPE,
    AppBrowser,
    AppFollower,
    DiscoveredApp,
    discover,
    zeroconf_target_name,
)
from ..config import AGENT_SCHEMA, AGENT_SETTINGS, agent_token, env_names, flag_names, load_file, merge, validate
from ..const import DEFAULT_TUNNEL_NAME
from ..exceptions import ConfigError
from ..identity import derived_name
from .common import EXIT_OK, Signals, log_level, read_token_file, run, setup_logging
from .envfile import read_env_file
from .keygen import load_private_key
from .options import add_arguments, flag_values

__all__ = [
    "AGENT_ENV",
    "AGENT_FLAGS",
    "AgentSettings",
    "add_parser",
    "agent_config",
    "agent_settings",
    "format_apps",
    "main",
]

_LOGGER = logging.getLogger("rproxy.agent")

#: Settings key → its flag, and → its variables (from AGENT_SETTINGS). REMOTE_URL, LOCAL_URL and
#: AGENT_ID are the names a seed system used; both spellings work.
AGENT_FLAGS = flag_names(AGENT_SETTINGS)
AGENT_ENV = env_names(AGENT_SETTINGS)


def add_parser(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="run the home side (next to the web app)",
        usage="%(prog)s [BRIDGE_URL [TARGET_URL]] [options]",
        description="Dial the bridge and serve its visitors from --target.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_AGENT_EPILOG,
    )
    agent.add_argument(
        "bridge_url",
        nargs="?",
        metavar="BRIDGE_URL",
        help="the bridge, as --bridge; ws://USER:PASS@host:8080 gives USER:PASS as the "
        "credential (sent as HTTP Basic, never logged)",
    )
    agent.add_argument(
        "target_url",
        nargs="?",
        metavar="TARGET_URL",
        help="the home app, as --target (ws:// and wss:// are read as http:// and https://)",
    )
    agent.add_argument(
        "--config",
        metavar="FILE",
        help="YAML (or JSON, or .toml) file with these settings and extra services; keys are the "
        "flag names with _ ($RPROXY_CONFIG)",
    )
    agent.add_argument(
        "--env-file",
        metavar="FILE",
        help="read these settings' environment variables (RPROXY_*, REMOTE_URL, LOCAL_URL, AGENT_ID) "
        "from FILE, python-dotenv's format (default: ./.env when it exists); the real "
        "environment wins",
    )
    add_arguments(agent, AGENT_SETTINGS)
    agent.add_argument(
        "--discover",
        action="store_true",
        help="list the web apps announced on the LAN (mDNS) and exit; needs no other setting",
    )
    agent.add_argument(
        "--discover-timeout",
        metavar="SECONDS",
        type=_discover_seconds,
        default=DISCOVER_TIMEOUT,
        help=f"how long --discover browses (default {DISCOVER_TIMEOUT:g})",
    )


_AGENT_EPILOG = """\
examples:
  rproxy agent --bridge wss://bridge.example.com --token TOKEN --target http://127.0.0.1:8123
  rproxy agent wss://bridge.example.com http://127.0.0.1:8123 --token TOKEN
  rproxy agent wss://user:password@bridge.example.com ws://localhost:8080
      (node-rproxy's form: the bridge was started as rproxy bridge 8080 user:password)
  rproxy agent            (settings from the environment or ./.env: REMOTE_URL, LOCAL_URL, AGENT_ID,
                           RPROXY_TOKEN, as NAT Web Reverse Proxy's client reads them)

A password in a URL is seen by anyone who can list this machine's processes (ps) and stays in
shell history: on a shared machine prefer $RPROXY_TOKEN, a .env file (mode 0600) or --config.
Plain ws:// to a bridge on another machine also needs --insecure: the credential would cross
the network unencrypted; use wss://.
"""


def _http_target(target: str) -> str:
    """node-rproxy names its home app ``ws://localhost:8080``: the same server over HTTP."""
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if target[: len(ws)].lower() == ws:
            return http + target[len(ws) :]
    return target


def _positionals(args: argparse.Namespace, flags: dict[str, Any]) -> None:
    """BRIDGE_URL and TARGET_URL into ``flags``: each stands for its flag, and not beside it."""
    for positional, key in (("bridge_url", "bridge"), ("target_url", "target")):
        given = getattr(args, positional, None)
        if given is None:
            continue
        if flags.get(key) is not None:
            raise ConfigError(f"{positional.upper()} and {AGENT_FLAGS[key]}: give one of them, not both")
        flags[key] = given


def _discover_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0.1 <= seconds <= 60:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected seconds between 0.1 and 60, got {text!r}")
    return seconds


@dataclass(slots=True)
class AgentSettings:
    """The tunnel this agent process serves (one config: its services ride on it)."""

    configs: list[AgentConfig]
    log_level: str | None


def agent_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentSettings:
    """Flags, environment and config file → one AgentConfig per tunnel (ConfigError names the culprit)."""
    # The real environment wins over the file, as with every dotenv tool.
    environ = {**read_env_file(getattr(args, "env_file", None)), **(os.environ if environ is None else environ)}
    config_file = args.config or environ.get("RPROXY_CONFIG") or None
    flags = flag_values(args, AGENT_SETTINGS)
    _positionals(args, flags)
    values, origin = merge(flags, AGENT_ENV, load_file(config_file), environ, file=config_file, flag_names=AGENT_FLAGS)
    url_credential = None
    if isinstance(values.get("bridge"), str):  # off before anything can echo the URL
        values["bridge"], url_credential = split_bridge_credential(values["bridge"])
    if isinstance(values.get("target"), str):
        values["target"] = _http_target(values["target"])
    settings = validate(AGENT_SCHEMA, values, origin, AGENT_FLAGS)
    token, token_file, key_file = settings.get("token"), settings.get("token_file"), settings.get("key")
    given = [
        where
        for where, value in (
            (origin.get("token", "--token"), token),
            (origin.get("token_file", "--token-file"), token_file),
            (origin.get("key", "--key"), key_file),
            (f"user:password@ in {origin.get('bridge', '--bridge')}", url_credential),
        )
        if value
    ]
    if not given:
        raise ConfigError(
            "--token: give an agent token (--token, --token-file, or RPROXY_TOKEN in the environment or .env), --key, "
            "or user:password@ in the bridge URL (one of them)"
        )
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]}: two credentials; give one of them, not both")
    if token_file:
        # Read here, not by the schema: the token never passes through the merged settings,
        # and a mistake names the flag or variable that named the file.
        where = origin.get("token_file", "--token-file")
        token = read_token_file(token_file, where)
        try:
            token = agent_token(token)
        except vol.Invalid as err:
            raise ConfigError(f"{where} {token_file}: {err.msg}") from None
    key = load_private_key(key_file) if key_file else None
    if not settings.get("name"):
        # A key's own name is the one an --open-registration bridge gives it.
        settings["name"] = derived_name(key.public_key().public_bytes_raw()) if key else DEFAULT_TUNNEL_NAME
    if not settings.get("target") and not settings["services"]:
        raise ConfigError("--target: the home app's URL is required (or at least one --service NAME=URL)")
    agent_id = settings.get("agent_id") or socket.gethostname()
    config = AgentConfig(
        bridge=settings["bridge"],
        token=token or url_credential or "",
        basic_auth=url_credential is not None,
        key=key,
        target=settings.get("target") or "",
        name=settings["name"],
        services={s["name"]: s["target"] for s in settings["services"]},
        agent_id=agent_id,
        ca_file=settings.get("ca_file"),
        pins=tuple(settings["pin_sha256"]),
        insecure=settings["insecure"],
        visitor_allow=tuple(settings["visitor_allow"]),
        visitor_basic=tuple(settings["visitor_auth"]),
    )
    return AgentSettings([config], settings.get("log_level"))


def agent_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The main tunnel's AgentConfig from parsed flags, environment and config file."""
    return agent_settings(args, environ).configs[0]


#: Seconds a ``zeroconf:NAME`` app may take to be found before the agent says it is waiting:
#: as long as ``--discover`` browses, so an app that answers at all is found in time.
_FIND_GRACE = DISCOVER_TIMEOUT


async def _follow_app(agent: Agent, name: str, browser: AppBrowser, service: str = "") -> None:
    """Point ``agent``'s web ``service`` ("": its main app) at the app announced as ``name``,
    now and whenever it moves, until cancelled."""
    tunnel = agent.config.name if not service else f"{agent.config.name}/{service}"
    found = asyncio.Event()

    def on_change(app: DiscoveredApp | None) -> None:
        if app is None:
            _LOGGER.warning(
                "tunnel %r: %r is no longer announced on the LAN; requests still go to %s",
                tunnel,
                name,
                agent.service_target(service),
            )
            return
        previous = agent.service_target(service)
        try:
            agent.set_target(app.url, service)
        except ConfigError:
            _LOGGER.warning("tunnel %r: %r is announced at %s, which is not a usable URL", tunnel, name, app.url)
            return
        if not found.is_set():
            found.set()
            _LOGGER.info("tunnel %r: found %r on the LAN at %s", tunnel, name, app.url)
        elif previous != app.url:
            _LOGGER.info(
                "tunnel %r: %r moved from %s to %s; the next requests go there", tunnel, name, previous, app.url
            )
        else:
            _LOGGER.info("tunnel %r: %r is announced again at %s", tunnel, name, app.url)

    follower = AppFollower(browser, name, on_change)
    follower.start()
    try:
        try:
            await asyncio.wait_for(found.wait(), _FIND_GRACE)
        except TimeoutError:
            _LOGGER.warning(
                "tunnel %r: waiting for a web app announced on the LAN as %r (mDNS %s, or %s with an %r "
                "property); until it appears visitors get 502 (the home app cannot be reached)",
                tunnel,
                name,
                ZEROCONF_TYPE,
                ZEROCONF_HTTP_TYPE,
                ZEROCONF_MARKER,
            )
        await asyncio.Event().wait()  # the follower works from the browser's callbacks
    finally:
        follower.stop()


async def _serve(configs: list[AgentConfig], signals: Signals) -> None:
    """Run one Agent per tunnel until a stop signal, or until one is refused for good."""
    agents = [Agent(config) for config in configs]
    wanted = [
        (agent, name, service)
        for agent in agents
        for service, target in [("", agent.config.target), *agent.config.services.items()]
        if (name := zeroconf_target_name(target))
    ]
    browser: AppBrowser | None = None
    followers: list[asyncio.Task[None]] = []
    waiters: dict[asyncio.Future[Any], Agent] = {}
    stopper: asyncio.Future[Any] = asyncio.ensure_future(signals.stop.wait())
    failure: BaseException | None = None
    try:
        if wanted:
            browser = AppBrowser()
            await browser.start()
            followers = [
                asyncio.create_task(_follow_app(agent, name, browser, service)) for agent, name, service in wanted
            ]
        for agent in agents:
            await agent.start()
        waiters = {asyncio.ensure_future(agent.wait()): agent for agent in agents}
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                failure = task.exception()
                break
    finally:
        stopper.cancel()
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        if browser is not None:
            await browser.stop()
    if failure is not None:
        raise failure


def _printable(text: str) -> str:
    """A TXT value fit for one table cell: whoever announces it must not forge lines."""
    return "".join(c if c.isprintable() else "?" for c in text)


def format_apps(apps: Sequence[DiscoveredApp], browsed: float) -> str:
    """``--discover``'s output: a table, or one line saying nothing was found."""
    if not apps:
        return (
            f"No web apps announced on the LAN (browsed {browsed:g} s for {ZEROCONF_TYPE}, "
            f"and {ZEROCONF_HTTP_TYPE} with an {ZEROCONF_MARKER!r} property)."
        )
    rows: list[tuple[str, ...]] = [("NAME", "HOST", "PORT", "PATH", "URL")]
    rows += [tuple(_printable(cell) for cell in (a.name, a.host, str(a.port), a.path, a.url)) for a in apps]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]) for row in rows
    )


async def _discover(timeout: float, signals: Signals) -> list[DiscoveredApp] | None:
    """The apps found in ``timeout`` seconds of browsing; None if a stop signal cut it short."""
    browsing = asyncio.ensure_future(discover(timeout))
    stopping = asyncio.ensure_future(signals.stop.wait())
    try:
        await asyncio.wait({browsing, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not browsing.done():
            browsing.cancel()
        await asyncio.gather(browsing, stopping, return_exceptions=True)
    return None if browsing.cancelled() else browsing.result()


def _print_discovered(timeout: float) -> None:
    found: list[list[DiscoveredApp] | None] = []

    async def work(signals: Signals) -> None:
        found.append(await _discover(timeout, signals))

    run(work)
    if found and found[0] is not None:
        print(format_apps(found[0], timeout), flush=True)


def main(args: argparse.Namespace) -> int:
    if args.discover:
        setup_logging(log_level(args.log_level))
        _print_discovered(args.discover_timeout)
        return EXIT_OK
    settings = agent_settings(args)
    setup_logging(log_level(args.log_level, settings.log_level))
    run(lambda signals: _serve(settings.configs, signals))
    return EXIT_OK
