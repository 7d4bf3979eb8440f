"""The ``rproxy`` command: ``bridge`` on a public server, ``agent`` at home, ``tcp`` to reach a TCP
service, ``demo`` to try it, ``gateway`` for WebSocket clients of an HTTP-only backend.

Exit codes: 0 stopped cleanly · 1 runtime failure (e.g. address in use, or a TCP channel
the bridge could not connect) · 2 bad flag, variable or config value · 3 the bridge refused
the agent or ``rproxy tcp`` (token, key or protocol).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..config import LOG_LEVELS
from ..exceptions import AuthenticationError, ConfigError, RproxyConnectionError
from . import common
from .common import EXIT_OK, EXIT_REFUSED, EXIT_RUNTIME, EXIT_USAGE, Parser

if TYPE_CHECKING:
    from .agent import agent_config
    from .bridge import bridge_config

__all__ = ["agent_config", "bridge_config", "main"]


#: The commands in the order ``--help`` lists them, each a module with ``add_parser`` and ``main``.
#: Loaded when the parser is built, not when this package is imported: ``rproxy_core.cli.agent``
#: imported alone (by the add-on, or a test) must not load the bridge through its siblings.
_COMMAND_MODULES = ("bridge", "agent", "demo", "hash-token", "keygen", "tcp", "status", "gateway")


def _command(name: str) -> ModuleType:
    return importlib.import_module(f".{name.replace('-', '_')}", __name__)


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rproxy",
        description="Put a web app that sits behind NAT on the internet, through one outbound WebSocket.",
    )
    parser.add_argument("--version", action="version", version=f"rproxy {__version__}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="log verbosity (default: info; $RPROXY_LOG_LEVEL, or log_level in a config file)",
    )
    parser.add_argument(
        "--log-format",
        choices=common.LOG_FORMATS,
        help="text for people (default) or json, one object per line ($RPROXY_LOG_FORMAT)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in _COMMAND_MODULES:
        _command(name).add_parser(commands)
    return parser


def __getattr__(name: str) -> Any:
    # agent_config and bridge_config, named here for embedders, load their command on first use.
    if name in ("agent_config", "bridge_config"):
        value: Callable[..., Any] = getattr(_command(name.removesuffix("_config")), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rproxy`` console script; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    prog = f"rproxy {args.command}"
    chosen = args.log_format or os.environ.get("RPROXY_LOG_FORMAT") or "text"
    if chosen not in common.LOG_FORMATS:
        print(f"{prog}: error: $RPROXY_LOG_FORMAT: expected text or json, got {chosen!r}", file=sys.stderr)
        return EXIT_USAGE
    common.log_format = chosen
    try:
        run: Callable[[argparse.Namespace], int] = _command(args.command).main
        return run(args)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (AuthenticationError, RproxyConnectionError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as err:
        print(f"{prog}: error: {common.describe_os_error(err)}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
