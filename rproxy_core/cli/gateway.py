"""``rproxy gateway``: WebSocket clients for backends that only take HTTP POSTs (docs/GATEWAY.md).

Flags as websocket-bridge spells them (``--address``, ``--base-url``, ``--cert``, ``--key``,
``--allowlist``) and as the bridge does (``--listen``, ``--tls-cert``, ``--tls-key``); a config
file and ``RPROXY_*`` variables as for every command.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import GATEWAY_COMMAND_SCHEMA, load_file, merge, validate
from ..exceptions import ConfigError
from ..gateway import Gateway, GatewayConfig
from .common import EXIT_OK, Signals, log_level, run, setup_logging

__all__ = ["GATEWAY_ENV", "GATEWAY_FLAGS", "add_parser", "gateway_config", "gateway_settings", "main"]

_LOGGER = logging.getLogger("rproxy.gateway")

GATEWAY_FLAGS = {
    "listen": "--address",
    "base_url": "--base-url",
    "tls_cert": "--cert",
    "tls_key": "--key",
    "allowlist": "--allowlist",
    "secret": "--secret",
    "forward_headers": "--forward-header",
    "max_message_size": "--max-message-size",
    "idle_timeout": "--idle-timeout",
    "max_lifetime": "--max-lifetime",
    "max_connections": "--max-connections",
    "max_connections_per_address": "--max-connections-per-address",
    "callback_rate": "--callback-rate",
    "queue_frames": "--queue-frames",
    "queue_bytes": "--queue-bytes",
    "post_timeout": "--post-timeout",
    "retries": "--retries",
    "shutdown_grace": "--shutdown-grace",
    "access_log": "--no-access-log",
    "admin_token": "--admin-token",
    "log_level": "--log-level",
}
GATEWAY_ENV: dict[str, tuple[str, ...]] = {key: ("RPROXY_" + key.upper(),) for key in GATEWAY_FLAGS}
GATEWAY_ENV["secret"] = ("RPROXY_GATEWAY_SECRET",)
GATEWAY_ENV["listen"] = ("RPROXY_LISTEN", "RPROXY_ADDRESS")

_ALLOWLIST_HELP = (
    "a regular expression a frame, disconnect or connect URL must match as a WHOLE (re.fullmatch: "
    r"'https://api\.example\.com/.*' does not admit https://api.example.com.evil.test/); escape the dots; "
    "repeatable. Without one, every connection is refused. Loopback, private and link-local targets only where "
    "a pattern writes their host literally ($RPROXY_ALLOWLIST, separated by spaces)"
)


def add_parser(commands: Any) -> None:
    gateway = commands.add_parser(
        "gateway",
        help="serve WebSocket clients for an HTTP-only backend (frames become POSTs)",
        description="Accept WebSocket clients on /connect?f=FRAME_URL&d=DISCONNECT_URL. Each frame is POSTed to "
        "FRAME_URL with an x-ws-proxy-send header naming a callback URL (BASE_URL/<id>); a POST to the "
        "callback sends its body to the client as one frame, GET shows the connection, DELETE closes "
        "it. When the client goes, one POST to DISCONNECT_URL. Allowlist patterns match the WHOLE URL.",
    )
    gateway.add_argument(
        "--config",
        metavar="FILE",
        help="YAML (or JSON, or .toml) file with these settings; keys are the long flag names "
        "with _ (--address is listen, --cert tls_cert) ($RPROXY_CONFIG)",
    )
    gateway.add_argument(
        "--address",
        "--listen",
        dest="listen",
        metavar="HOST:PORT",
        help="address to listen on (default 0.0.0.0:8080) ($RPROXY_LISTEN)",
    )
    gateway.add_argument(
        "--base-url",
        metavar="URL",
        help="the public URL of this gateway, e.g. https://ws.example.com: callbacks are URL/<id> ($RPROXY_BASE_URL)",
    )
    gateway.add_argument("--cert", "--tls-cert", dest="tls_cert", metavar="F", help="PEM certificate chain: serve WSS")
    gateway.add_argument("--key", "--tls-key", dest="tls_key", metavar="F", help="PEM private key for --cert")
    gateway.add_argument("--allowlist", action="append", metavar="REGEX", help=_ALLOWLIST_HELP)
    gateway.add_argument(
        "--secret",
        metavar="S",
        help="sign every POST with HMAC-SHA256 under this secret (x-ws-proxy-signature) ($RPROXY_GATEWAY_SECRET)",
    )
    gateway.add_argument(
        "--forward-header",
        dest="forward_headers",
        action="append",
        metavar="NAME",
        help="a handshake header replayed on every POST (repeatable; default Origin and User-Agent)",
    )
    gateway.add_argument(
        "--max-message-size",
        metavar="SIZE",
        help="largest frame either way (default 128K; a client's larger frame closes it with 1009)",
    )
    gateway.add_argument("--idle-timeout", metavar="SECONDS", help="close a connection idle this long (default 600)")
    gateway.add_argument("--max-lifetime", metavar="SECONDS", help="close a connection this old (default 7200)")
    gateway.add_argument("--max-connections", metavar="N", help="connections at once (default 10000)")
    gateway.add_argument(
        "--max-connections-per-address", metavar="N", help="connections at once from one address (default 100)"
    )
    gateway.add_argument("--callback-rate", metavar="N", help="callback POSTs per second per connection (default 100)")
    gateway.add_argument(
        "--queue-frames",
        metavar="N",
        help="client frames waiting for their POST before the client is held back (default 32)",
    )
    gateway.add_argument("--queue-bytes", metavar="SIZE", help="the same in bytes (default 1M)")
    gateway.add_argument("--post-timeout", metavar="SECONDS", help="time one POST to the backend may take (default 10)")
    gateway.add_argument(
        "--retries",
        metavar="N",
        help="further attempts after a connection error, timeout or 5xx; then the client is "
        "closed with 1011 (default 3)",
    )
    gateway.add_argument(
        "--shutdown-grace", metavar="SECONDS", help="on SIGTERM, time the disconnect POSTs get (default 5)"
    )
    gateway.add_argument(
        "--admin-token",
        metavar="T",
        help="open /_rproxy/metrics (Prometheus) and /_rproxy/status.json to this bearer token, or "
        "its sha256: hash from rproxy hash-token ($RPROXY_ADMIN_TOKEN)",
    )
    gateway.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_const",
        const=False,
        help="do not log one line per connection",
    )


@dataclass(slots=True)
class GatewaySettings:
    config: GatewayConfig
    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    log_level: str | None


def gateway_config(settings: Mapping[str, Any], host: str | None = None) -> GatewayConfig:
    """Validated settings (GATEWAY_SCHEMA) → GatewayConfig; ``host`` for a bridge's gateway."""
    secret = settings.get("secret")
    config = GatewayConfig(
        base_url=settings["base_url"],
        allowlist=tuple(settings["allowlist"]),
        secret=secret.encode() if secret else None,
        forward_headers=tuple(settings["forward_headers"]),
        max_message_size=settings["max_message_size"],
        idle_timeout=settings["idle_timeout"],
        max_lifetime=settings["max_lifetime"],
        max_connections=settings["max_connections"],
        max_connections_per_address=settings["max_connections_per_address"],
        callback_rate=settings["callback_rate"],
        queue_frames=settings["queue_frames"],
        queue_bytes=settings["queue_bytes"],
        post_timeout=settings["post_timeout"],
        retries=settings["retries"],
        access_log=settings["access_log"],
        host=host,
    )
    if "shutdown_grace" in settings:
        config.shutdown_grace = settings["shutdown_grace"]
    config.admin_token = settings.get("admin_token")
    return config


def gateway_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> GatewaySettings:
    """Flags, environment and config file → validated settings (ConfigError names the culprit)."""
    environ = dict(os.environ if environ is None else environ)
    config_file = args.config or environ.get("RPROXY_CONFIG") or None
    flags = {key: getattr(args, key, None) for key in GATEWAY_FLAGS if key != "log_level"}
    file_values = load_file(
        config_file,
        aliases={"address": "listen", "cert": "tls_cert", "key": "tls_key", "forward_header": "forward_headers"},
    )
    values, origin = merge(flags, GATEWAY_ENV, file_values, environ, file=config_file, flag_names=GATEWAY_FLAGS)
    settings = validate(GATEWAY_COMMAND_SCHEMA, values, origin, GATEWAY_FLAGS)
    cert, key = settings.get("tls_cert"), settings.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigError("--cert and --key go together")
    ssl_context = None
    if cert and key:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"--cert/--key: cannot load: {getattr(err, 'strerror', None) or err}") from None
    host, port = settings["listen"]
    return GatewaySettings(gateway_config(settings), host, port, ssl_context, settings.get("log_level"))


async def _serve(settings: GatewaySettings, signals: Signals) -> None:
    gateway = Gateway(settings.config)
    try:
        await gateway.serve(settings.host, settings.port, settings.ssl_context)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror or str(err)
        raise OSError(err.errno, f"--address {settings.host}:{settings.port}: {reason}") from None
    scheme = "wss" if settings.ssl_context else "ws"
    _LOGGER.info(
        "gateway listening on %s:%d: clients connect to %s://HOST:%d/connect?f=FRAME_URL&d=DISCONNECT_URL; "
        "callbacks at %s/<id>; %d allowlist pattern(s)",
        settings.host,
        gateway.port,
        scheme,
        gateway.port,
        settings.config.callback_base,
        len(settings.config.allowlist),
    )
    try:
        await signals.stop.wait()
    finally:
        _LOGGER.info("stopping (disconnect POSTs get %gs)", settings.config.shutdown_grace)
        await gateway.stop()


def main(args: argparse.Namespace) -> int:
    settings = gateway_settings(args)
    setup_logging(log_level(args.log_level, settings.log_level))
    run(lambda signals: _serve(settings, signals))
    return EXIT_OK
