"""``rproxy tcp``: reach a TCP service of a tunnel (ssh, a database) through the bridge's one port.

With ``--listen`` every connection to a local port is carried to the service over a channel
of its own; with ``--stdio`` standard input and output are the connection, as ssh's
``ProxyCommand`` wants::

    ssh -o ProxyCommand='rproxy tcp --stdio --bridge wss://bridge.example.com --service ssh' pi@home

In ``--stdio`` mode standard output is the service's byte stream: every message, and the one
error line, goes to standard error. Exit codes there: 0 the connection ended normally, 1 the
channel was refused (404, 502, 503, 504), the bridge unreachable or the channel aborted, 2 a
bad flag, 3 the bridge refused the credential (401, 403).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import voluptuous as vol

from ..client.tcp import TcpClient, TcpClientConfig, open_fd_sink, open_fd_source
from ..config import (
    CA_FILE_SETTING,
    INSECURE_SETTING,
    KEY_SETTING,
    PIN_SHA256_SETTING,
    TOKEN_FILE_SETTING,
    TOKEN_SETTING,
    parse_listen,
)
from ..const import DEFAULT_TUNNEL_NAME
from ..exceptions import AuthenticationError, ConfigError, RproxyConnectionError
from ..identity import derived_name
from .common import EXIT_OK, EXIT_REFUSED, EXIT_RUNTIME, Signals, log_level, read_token_file, run, setup_logging
from .keygen import load_private_key
from .options import add_arguments

__all__ = ["add_parser", "main", "tcp_config"]

_LOGGER = logging.getLogger("rproxy.tcp")


def add_parser(commands: Any) -> None:
    tcp = commands.add_parser(
        "tcp",
        help="reach a TCP service of a tunnel (e.g. ssh) on a local port or on stdin/stdout",
        description="Carry TCP connections to a service an agent offers (rproxy agent --service NAME=tcp://HOST:PORT) "
        "over WebSockets to the bridge: from a local port (--listen), or from stdin/stdout (--stdio, "
        "for ssh's ProxyCommand). Needs a credential the bridge accepts for the tunnel.",
    )
    tcp.add_argument("--bridge", metavar="URL", help="the bridge, e.g. wss://bridge.example.com ($RPROXY_BRIDGE)")
    tcp.add_argument(
        "--tunnel",
        metavar="NAME",
        help=f"the tunnel whose service to reach (default: {DEFAULT_TUNNEL_NAME}, or with --key the "
        "name derived from the key, as for rproxy agent) ($RPROXY_TUNNEL)",
    )
    tcp.add_argument("--service", metavar="NAME", required=True, help="the TCP service's name, e.g. ssh")
    # Declared once for the agent, rproxy tcp and rproxy status (config.py); here one of them.
    add_arguments(tcp.add_mutually_exclusive_group(), (TOKEN_SETTING, TOKEN_FILE_SETTING, KEY_SETTING), with_env=False)
    mode = tcp.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        type=_listen_address,
        help="accept connections on this local address (host default 127.0.0.1)",
    )
    mode.add_argument(
        "--stdio",
        action="store_true",
        help="one connection on stdin/stdout, e.g. as ssh -o ProxyCommand='rproxy tcp --stdio ...'",
    )
    add_arguments(tcp, (CA_FILE_SETTING, PIN_SHA256_SETTING, INSECURE_SETTING), with_env=False)


def _listen_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT``; a bare port (or ``:PORT``) is on 127.0.0.1, never on every interface."""
    text = text.strip()
    if text.lstrip(":").isdigit() and text.count(":") <= 1:
        text = "127.0.0.1:" + text.lstrip(":")
    try:
        return parse_listen(text)
    except vol.Invalid as err:
        raise argparse.ArgumentTypeError(str(err.msg)) from None


def tcp_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TcpClientConfig:
    """Flags and environment → TcpClientConfig (ConfigError names the flag or variable at fault)."""
    env = os.environ if environ is None else environ
    bridge = args.bridge or env.get("RPROXY_BRIDGE")
    if not bridge:
        raise ConfigError("--bridge: the bridge's URL is required ($RPROXY_BRIDGE)")
    token, key_file = "", None
    # A credential flag wins over the environment as a whole, so an exported $RPROXY_TOKEN does not
    # clash with an explicit --key.
    if args.token is not None:
        token = args.token
    elif args.token_file is not None:
        token = read_token_file(args.token_file)
    elif args.key is not None:
        key_file = args.key
    else:
        token, key_file = env.get("RPROXY_TOKEN", ""), env.get("RPROXY_KEY") or None
        if token and key_file:
            raise ConfigError("$RPROXY_TOKEN and $RPROXY_KEY: give one of them, not both")
    key = load_private_key(key_file) if key_file else None
    tunnel = args.tunnel or env.get("RPROXY_TUNNEL")
    if not tunnel:
        tunnel = derived_name(key.public_key().public_bytes_raw()) if key is not None else DEFAULT_TUNNEL_NAME
    config = TcpClientConfig(
        bridge=bridge,
        service=args.service,
        tunnel=tunnel,
        token=token,
        key=key,
        ca_file=args.ca_file,
        pins=tuple(args.pin_sha256 or ()),
        insecure=bool(args.insecure),
    )
    config.validate()
    return config


def _take_stdio() -> tuple[int, int]:
    """Our own descriptors for stdin and stdout, with 0 and 1 pointed at /dev/null.

    Closing ours then really ends the stream (no other descriptor keeps the pipe open), and a
    stray print can never slip into the service's bytes.
    """
    stdin, stdout = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    return stdin, stdout


async def _relay_stdio(client: TcpClient, stdin: int, stdout: int, signals: Signals) -> None:
    """One channel between stdin/stdout and the service, until it ends or a signal stops it.

    SIGHUP stops it too: ssh sends it to its ProxyCommand when the session is over.
    """
    stopping = asyncio.ensure_future(_first(signals.stop, signals.reload))
    opening = asyncio.ensure_future(client.open_channel())
    relay: asyncio.Future[None] | None = None
    try:
        await asyncio.wait({stopping, opening}, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            return
        channel = opening.result()
        relay = asyncio.ensure_future(channel.relay(await open_fd_source(stdin), await open_fd_sink(stdout)))
        await asyncio.wait({stopping, relay}, return_when=asyncio.FIRST_COMPLETED)
        if relay.done():
            relay.result()
    finally:
        for task in (stopping, opening, relay):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (stopping, opening, relay) if t is not None), return_exceptions=True)
        if opening.done() and not opening.cancelled() and opening.exception() is None and relay is None:
            await opening.result().abandon()


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _serve(client: TcpClient, host: str, port: int, signals: Signals) -> None:
    try:
        server = await client.serve(host, port)
    except OSError as err:
        # asyncio's message repeats the address; the errno's own text is enough after ours.
        reason = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror or str(err)
        raise OSError(err.errno, f"--listen {host}:{port}: {reason}") from None
    try:
        bound = server.sockets[0].getsockname()
        shown = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        config = client.config
        _LOGGER.info(
            "listening on %s -> service %s of tunnel %s via %s", shown, config.service, config.tunnel, client.origin
        )
        if not _is_loopback(host):
            _LOGGER.warning(
                "--listen %s is reachable from other machines: whoever connects to it reaches service "
                "%s with your credential",
                shown,
                config.service,
            )
        await signals.stop.wait()
    finally:
        await client.close()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    config = tcp_config(args)
    level = args.log_level or os.environ.get("RPROXY_LOG_LEVEL")
    # In --stdio mode stderr is shown in the middle of an ssh session: only what goes wrong.
    setup_logging(log_level(args.log_level) if level or not args.stdio else "warning")
    client = TcpClient(config)
    try:
        if args.stdio:
            stdin, stdout = _take_stdio()
            run(lambda signals: _relay_stdio(client, stdin, stdout, signals), reload=True)
        else:
            host, port = args.listen
            run(lambda signals: _serve(client, host, port, signals))
    except AuthenticationError as err:
        print(f"rproxy tcp: error: {err}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    except RproxyConnectionError as err:
        print(f"rproxy tcp: error: {err}", file=sys.stderr, flush=True)
        return EXIT_RUNTIME
    return EXIT_OK
