"""``rproxy demo``: a bridge, an agent and a small home app in one process, to see rproxy work."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import secrets
import socket
from typing import Any

from aiohttp import web

from ..agent import Agent, AgentConfig
from ..agent.discovery import announce_app
from ..bridge import Bridge, BridgeConfig
from ..config import parse_listen
from ..demo import create_home_app
from ..exceptions import ConfigError
from .common import EXIT_OK, Signals, log_level, run, setup_logging

__all__ = ["DEMO_APP_NAME", "add_parser", "main"]

_LOGGER = logging.getLogger("rproxy.demo")

#: The mDNS instance name the demo's home app announces itself under.
DEMO_APP_NAME = "rproxy demo home app"
#: Where the demo's home app listens: this machine only, as a home app behind NAT would be.
_HOME_ADDRESS = "127.0.0.1"


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a bridge, an agent and a small home app in one process",
        description="See rproxy work: a lights-and-sprinklers app served through a local tunnel.",
    )
    demo.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"public address of the demo bridge (default {_DEFAULT_LISTEN}, or the next free port "
        "after it when that one is taken)",
    )


_DEFAULT_LISTEN = "127.0.0.1:8080"
#: Without --listen, ports tried after 8080 before the system picks any free one.
_SPARE_PORTS = 10


async def _start_bridge(host: str, port: int, token: str, *, explicit: bool) -> Bridge:
    """The demo's bridge on ``host:port``; without --listen, on the next free port when that
    one is taken (a newcomer's machine often runs something on 8080), said in one line."""
    candidates = [port] if explicit else [*range(port, port + _SPARE_PORTS), 0]
    for candidate in candidates:
        bridge = Bridge(BridgeConfig(host=host, port=candidate, tokens=[token], shutdown_grace=1.0))
        try:
            await bridge.start()  # nothing is left running when it raises
        except OSError as err:
            if explicit or err.errno != errno.EADDRINUSE or candidate == 0:
                raise
            continue
        if bridge.port != port:
            _LOGGER.warning(
                "%s:%d is in use; the demo listens on %s:%d instead (--listen HOST:PORT picks one)",
                host,
                port,
                host,
                bridge.port,
            )
        return bridge
    raise AssertionError("unreachable: port 0 either binds or raises")


async def _serve(host: str, port: int, signals: Signals, *, explicit: bool = True) -> None:
    home = web.AppRunner(create_home_app(), access_log=None)
    await home.setup()
    home_site = web.TCPSite(home, _HOME_ADDRESS, 0)
    await home_site.start()
    home_port = home_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    token = secrets.token_urlsafe(24)
    try:
        bridge = await _start_bridge(host, port, token, explicit=explicit)
    except BaseException:
        await home.cleanup()
        raise
    try:
        agent = Agent(
            AgentConfig(bridge=bridge.url, token=token, target=f"http://{_HOME_ADDRESS}:{home_port}", agent_id="demo")
        )
        await agent.start()
        try:
            await agent.wait_connected(timeout=10)
            public = bridge.url + "/"
            print(
                "\n  rproxy demo is running.\n"
                f"  Public address, through the tunnel: {public}\n"
                f"  The home app itself (as if behind NAT): http://{_HOME_ADDRESS}:{home_port}/\n"
                "  Open the public address in a browser and switch a light; Ctrl-C stops.\n",
                flush=True,
            )
            await _announce_until_stopped(home_port, signals)
        finally:
            await agent.stop()
    finally:
        await bridge.stop()
        await home.cleanup()


async def _announce_until_stopped(home_port: int, signals: Signals) -> None:
    """Announce the home app over mDNS (``rproxy agent --discover`` lists it) until a stop signal.

    The app listens on loopback, so it is announced on loopback only: processes on this
    machine find it, other machines on the LAN would be handed an address they cannot use.
    The demo works on without mDNS (e.g. where multicast is not allowed).
    """
    announcing = asyncio.ensure_future(_announce(home_port, signals))
    await signals.stop.wait()
    # Not cancelled: the goodbye on the way out of announce_app must go out (a registration
    # still probing finishes first, in under two seconds).
    await asyncio.gather(announcing, return_exceptions=True)


async def _announce(home_port: int, signals: Signals) -> None:
    try:
        async with announce_app(
            DEMO_APP_NAME,
            home_port,
            address=_HOME_ADDRESS,
            path="/",
            app_id=f"rproxy-demo-{socket.gethostname()}-{home_port}",
            interfaces=[_HOME_ADDRESS],
        ) as instance:
            _LOGGER.info(
                "home app announced over mDNS on this machine as %r (rproxy agent --discover lists it)", instance
            )
            await signals.stop.wait()
    except OSError as err:
        _LOGGER.warning("home app not announced over mDNS: %s", err.strerror or err)


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen or _DEFAULT_LISTEN)
    except Exception as err:
        raise ConfigError(f"--listen: {err}") from None
    setup_logging(log_level(args.log_level))
    run(lambda signals: _serve(host, port, signals, explicit=args.listen is not None))
    return EXIT_OK
