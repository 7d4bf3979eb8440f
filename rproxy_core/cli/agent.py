"""``rproxy agent``: the home side, next to the web app.

One process serves the main tunnel (``--name``/``--target``) and, from a config file, any
extra ``services``: each is a tunnel of its own, on its own connection to the same bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..agent import Agent, AgentConfig
from ..config import AGENT_SCHEMA, ZEROCONF_TARGET_PREFIX, load_file, merge, validate
from ..exceptions import ConfigError
from .common import EXIT_OK, Signals, log_level, run, setup_logging

__all__ = ["AGENT_ENV", "AGENT_FLAGS", "AgentSettings", "add_parser", "agent_config", "agent_settings", "main"]

_LOGGER = logging.getLogger("rproxy.agent")

AGENT_FLAGS = {
    "bridge": "--bridge",
    "token": "--token",
    "target": "--target",
    "name": "--name",
    "agent_id": "--agent-id",
    "log_level": "--log-level",
}
#: REMOTE_URL, LOCAL_URL and AGENT_ID are the names a seed system used; both spellings work.
AGENT_ENV = {
    "bridge": ("RPROXY_BRIDGE", "REMOTE_URL"),
    "token": ("RPROXY_TOKEN",),
    "target": ("RPROXY_TARGET", "LOCAL_URL"),
    "name": ("RPROXY_NAME",),
    "agent_id": ("RPROXY_AGENT_ID", "AGENT_ID"),
    "log_level": ("RPROXY_LOG_LEVEL",),
}


def add_parser(commands: Any) -> None:
    agent = commands.add_parser("agent", help="run the home side (next to the web app)",
                                description="Dial the bridge and serve its visitors from --target.")
    agent.add_argument("--config", metavar="FILE",
                       help="YAML (or JSON, or .toml) file with these settings and extra services; keys are the "
                            "flag names with _ ($RPROXY_CONFIG)")
    agent.add_argument("--bridge", metavar="URL",
                       help="the bridge, e.g. wss://bridge.example.com ($RPROXY_BRIDGE, $REMOTE_URL)")
    agent.add_argument("--token", metavar="T", help="agent token the bridge accepts ($RPROXY_TOKEN)")
    agent.add_argument("--target", metavar="URL",
                       help="the home app, e.g. http://127.0.0.1:8123, or zeroconf:NAME for an app announced "
                            "on the LAN ($RPROXY_TARGET, $LOCAL_URL)")
    agent.add_argument("--name", metavar="NAME", help="tunnel name, a DNS label (default: home) ($RPROXY_NAME)")
    agent.add_argument("--agent-id", metavar="ID",
                       help="this agent's identity in logs, e.g. mac@home (default: host name) "
                            "($RPROXY_AGENT_ID, $AGENT_ID)")


@dataclass(slots=True)
class AgentSettings:
    """The tunnels this agent process serves: the main one first, then the extra services."""

    configs: list[AgentConfig]
    log_level: str | None


def agent_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentSettings:
    """Flags, environment and config file → one AgentConfig per tunnel (ConfigError names the culprit)."""
    environ = dict(os.environ if environ is None else environ)
    config_file = args.config or environ.get("RPROXY_CONFIG") or None
    flags = {key: getattr(args, key, None) for key in AGENT_FLAGS if key != "log_level"}
    values, origin = merge(flags, AGENT_ENV, load_file(config_file), environ, file=config_file, flag_names=AGENT_FLAGS)
    settings = validate(AGENT_SCHEMA, values, origin, AGENT_FLAGS)
    if any(s["name"] == settings["name"] for s in settings["services"]):
        raise ConfigError(f"{config_file}: services: {settings['name']!r} is already the main tunnel's name")
    agent_id = settings.get("agent_id") or socket.gethostname()
    tunnels = [(settings["name"], settings["target"])] + [(s["name"], s["target"]) for s in settings["services"]]
    configs = [
        AgentConfig(bridge=settings["bridge"], token=settings["token"], target=target, name=name, agent_id=agent_id)
        for name, target in tunnels
    ]
    return AgentSettings(configs, settings.get("log_level"))


def agent_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The main tunnel's AgentConfig from parsed flags, environment and config file."""
    return agent_settings(args, environ).configs[0]


async def _serve(configs: list[AgentConfig], signals: Signals) -> None:
    """Run one Agent per tunnel until a stop signal, or until one is refused for good."""
    for config in configs:
        if config.target.startswith(ZEROCONF_TARGET_PREFIX):
            raise ConfigError(f"--target {config.target}: zeroconf targets are not available in this build")
    agents = [Agent(config) for config in configs]
    for agent in agents:
        await agent.start()
    waiters = {asyncio.ensure_future(agent.wait()): agent for agent in agents}
    stopper = asyncio.ensure_future(signals.stop.wait())
    failure: BaseException | None = None
    try:
        done, _ = await asyncio.wait({stopper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                failure = task.exception()
                break
    finally:
        stopper.cancel()
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    if failure is not None:
        raise failure


def main(args: argparse.Namespace) -> int:
    settings = agent_settings(args)
    setup_logging(log_level(args.log_level, settings.log_level))
    run(lambda signals: _serve(settings.configs, signals))
    return EXIT_OK
