"""``rproxy demo``: a bridge, an agent and a small home app in one process, to see rproxy work."""

from __future__ import annotations

import argparse
import secrets
from typing import Any

from aiohttp import web

from ..agent import Agent, AgentConfig
from ..bridge import Bridge, BridgeConfig
from ..config import parse_listen
from ..demo import create_home_app
from ..exceptions import ConfigError
from .common import EXIT_OK, Signals, log_level, run, setup_logging

__all__ = ["add_parser", "main"]


def add_parser(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run a bridge, an agent and a small home app in one process",
                               description="See rproxy work: a lights-and-sprinklers app served through a local tunnel.")
    demo.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8080",
                      help="public address of the demo bridge (default 127.0.0.1:8080)")


async def _serve(host: str, port: int, signals: Signals) -> None:
    home = web.AppRunner(create_home_app(), access_log=None)
    await home.setup()
    home_site = web.TCPSite(home, "127.0.0.1", 0)
    await home_site.start()
    home_port = home_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    token = secrets.token_urlsafe(24)
    bridge = Bridge(BridgeConfig(host=host, port=port, tokens=[token], shutdown_grace=1.0))
    try:
        await bridge.start()
        agent = Agent(AgentConfig(bridge=bridge.url, token=token, target=f"http://127.0.0.1:{home_port}", agent_id="demo"))
        await agent.start()
        try:
            await agent.wait_connected(timeout=10)
            public = bridge.url + "/"
            print(
                "\n  rproxy demo is running.\n"
                f"  Public address, through the tunnel: {public}\n"
                f"  The home app itself (as if behind NAT): http://127.0.0.1:{home_port}/\n"
                "  Open the public address in a browser and switch a light; Ctrl-C stops.\n",
                flush=True,
            )
            await signals.stop.wait()
        finally:
            await agent.stop()
    finally:
        await bridge.stop()
        await home.cleanup()


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen)
    except Exception as err:
        raise ConfigError(f"--listen: {err}") from None
    setup_logging(log_level(args.log_level))
    run(lambda signals: _serve(host, port, signals))
    return EXIT_OK
