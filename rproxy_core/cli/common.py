"""What every subcommand of ``rproxy`` shares: exit codes, argument errors, logging, the loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import NoReturn

from ..config import LOG_LEVELS
from ..exceptions import ConfigError

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "Parser",
    "log_level",
    "read_token_file",
    "run",
    "setup_logging",
]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


#: asyncio's (and uvloop's) bind failure: "error while attempting to bind on address ('HOST', PORT): ..."
_BIND_ADDRESS = re.compile(r"bind on address \('([^']*)', (\d+)")


def describe_os_error(err: OSError) -> str:
    """One line for an OSError that ends a command: for a listening address that cannot be
    had, which one and how to pick another (not asyncio's "error while attempting to bind...")."""
    found = _BIND_ADDRESS.search(str(err))
    if found and err.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        host, port = found.groups()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:
            why = "is already in use (another program, or another rproxy, listens there)"
        elif err.errno == errno.EACCES:
            why = "is not allowed: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        else:
            why = "is not an address of this machine"
        return f"cannot listen on {address}: it {why}; pick another with --listen HOST:PORT"
    return err.strerror or str(err)


def read_token_file(path: str, where: str = "--token-file") -> str:
    """The token on the first line of ``path`` (so that it need not be on a command line, which
    ``ps`` shows to every user of the machine).

    Raises:
        ConfigError: unreadable, not text, or an empty first line; the message starts with
            ``where`` (the flag or variable that named the file) and never shows the file's content.
    """
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"{where} {path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} {path}: not a text file") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"{where} {path}: the first line is empty (it should hold the token)")
    return token


def log_level(flag: str | None, setting: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The log level: ``--log-level``, then ``$RPROXY_LOG_LEVEL``, then the config file, then info."""
    for candidate in (flag, environ.get("RPROXY_LOG_LEVEL"), setting):
        if candidate and candidate.lower() in LOG_LEVELS:
            return candidate.lower()
    return "info"


#: ``text`` (for people) or ``json`` (one object per line, for log collectors); set from
#: ``--log-format`` or ``$RPROXY_LOG_FORMAT`` before a command sets up its logging.
LOG_FORMATS = ("text", "json")
log_format = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the
    traceback as ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    # websockets logs every handshake failure with a traceback at ERROR; ours is one line.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (``pip install rproxy-core[speed]``).

    It makes the relay measurably faster (fewer microseconds per request and per write).
    ``RPROXY_EVENT_LOOP=asyncio`` keeps the standard loop.
    """
    if os.environ.get("RPROXY_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class Signals:
    """SIGINT/SIGTERM (stop) and SIGHUP (reload) as asyncio events.

    ``stop`` is set by the first stop signal; a second one calls ``on_second_stop`` (to skip
    what is left of a graceful shutdown).
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self.on_second_stop: Callable[[], None] | None = None

    def install(self, *, reload: bool) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop_signal)
        if reload:
            with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
                loop.add_signal_handler(signal.SIGHUP, self.reload.set)

    def _stop_signal(self) -> None:
        if self.stop.is_set() and self.on_second_stop is not None:
            self.on_second_stop()
        self.stop.set()


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one, as nginx and Go programs do.

    Each visitor connection, tunnel stream to the home app and TCP channel is a socket; the
    usual soft limit of 1024 would cap a bridge or agent far below what it can carry.
    """
    try:
        import resource
    except ImportError:  # not a Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(work: Callable[[Signals], Awaitable[None]], *, reload: bool = False) -> None:
    """Run ``work`` on a fresh event loop until it returns; signals arrive through ``Signals``."""
    raise_open_file_limit()

    async def main() -> None:
        signals = Signals()
        signals.install(reload=reload)
        await work(signals)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
