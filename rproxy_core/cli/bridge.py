"""``rproxy bridge``: the public side, as a service on a VPS.

Settings come from flags, ``RPROXY_*`` variables and a YAML config file (in that order of
precedence). SIGTERM stops gracefully; SIGHUP re-reads the settings and applies the tokens
and the TLS certificate without dropping a tunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bridge import Bridge, BridgeConfig
from ..bridge.auth import TokenGrant, read_token_file
from ..bridge.config import TcpPort
from ..bridge.keys import KeyGrant, read_authorized_keys
from ..config import BRIDGE_SCHEMA, BRIDGE_SETTINGS, env_names, flag_names, key_aliases, load_file, merge, validate
from ..dial import certificate_sha256
from ..exceptions import ConfigError
from .common import EXIT_OK, Signals, log_level, run, setup_logging
from .gateway import gateway_config
from .options import add_arguments, flag_values
from .state import StateToken, agent_command, state_path, state_token

__all__ = ["BRIDGE_ENV", "BRIDGE_FLAGS", "add_parser", "bridge_config", "bridge_settings", "main"]

_LOGGER = logging.getLogger("rproxy.bridge")

#: Settings key → how the flag is written, and → its variables (both from BRIDGE_SETTINGS).
BRIDGE_FLAGS = flag_names(BRIDGE_SETTINGS)
BRIDGE_ENV = env_names(BRIDGE_SETTINGS)
#: Settings that only a restart changes (a reload logs that they differ).
_RESTART_ONLY = tuple(setting.key for setting in BRIDGE_SETTINGS if not setting.reloads)


def add_parser(commands: Any) -> None:
    bridge = commands.add_parser(
        "bridge",
        usage="%(prog)s [PORT [USER:PASS]] [options]",
        help="run the public side (on a VPS)",
        description="Serve agents on /_rproxy/connect and visitors on every other path, on one port. "
        "SIGTERM stops gracefully, SIGHUP reloads tokens and the TLS certificate.",
    )
    bridge.add_argument(
        "port",
        nargs="?",
        metavar="PORT",
        help="as --listen 0.0.0.0:PORT (node-rproxy's form: rproxy bridge 8080 user:password)",
    )
    bridge.add_argument(
        "userpass",
        nargs="?",
        metavar="USER:PASS",
        help="accept agents whose bridge URL is ws://USER:PASS@host (sent as HTTP Basic), as a "
        "--token; anyone who can list processes sees it: prefer --token-file on a shared machine",
    )
    bridge.add_argument(
        "--config",
        metavar="FILE",
        help="YAML (or JSON, or .toml) file with these settings; keys are the flag names "
        "with _ (--token is tokens) ($RPROXY_CONFIG)",
    )
    bridge.add_argument(
        "--check-config",
        metavar="FILE",
        help="validate FILE (with the flags and environment) and exit: 0 if usable, 2 if not",
    )
    add_arguments(bridge, BRIDGE_SETTINGS)


@dataclass(slots=True)
class BridgeSettings:
    """Validated settings, and what a reload needs to compare against."""

    config: BridgeConfig
    values: dict[str, Any]
    log_level: str | None
    #: The bare bridge's own token (no credential configured), else None.
    state: StateToken | None = None


def bridge_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BridgeSettings:
    """Flags, environment and config file → validated settings (ConfigError names the culprit)."""
    environ = dict(os.environ if environ is None else environ)
    config_file = getattr(args, "check_config", None) or args.config or environ.get("RPROXY_CONFIG") or None
    flags = flag_values(args, BRIDGE_SETTINGS)
    _positionals(args, flags)
    if flags["listen"] is None and not environ.get("RPROXY_LISTEN") and environ.get("PORT"):
        flags["listen"] = f"0.0.0.0:{environ['PORT']}"  # hosts such as Heroku give exactly one port
    file_values = load_file(config_file, aliases=key_aliases(BRIDGE_SETTINGS))
    values, origin = merge(flags, BRIDGE_ENV, file_values, environ, file=config_file, flag_names=BRIDGE_FLAGS)
    settings = validate(BRIDGE_SCHEMA, values, origin, BRIDGE_FLAGS)
    tokens: list[str | TokenGrant] = list(settings["tokens"])
    if settings.get("token_file"):
        tokens += read_token_file(settings["token_file"])
    authorized_keys: list[KeyGrant] = []
    if settings.get("authorized_keys"):
        authorized_keys = read_authorized_keys(settings["authorized_keys"])
    if settings["open_registration"] and not settings.get("domain"):
        raise ConfigError("--open-registration: needs --domain (each key's tunnel gets its own host name)")
    state = None
    if not tokens and not authorized_keys and not settings["open_registration"]:
        # No credential configured: the bridge's own, made on its first start (cli/state.py).
        # A --check-config only looks: it makes nothing.
        state = state_token(environ, create=not getattr(args, "check_config", None))
        if state is not None:
            tokens = [state.token]
    host, port = settings["listen"]
    cert, key = settings.get("tls_cert"), settings.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together")
    ssl_context = None
    if cert and key:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        load_certificate(ssl_context, cert, key)
    config = BridgeConfig(
        host=host,
        port=port,
        tokens=tokens,
        domain=settings.get("domain"),
        request_timeout=settings["request_timeout"],
        shutdown_grace=settings["shutdown_grace"],
        ssl_context=ssl_context,
        access_log=settings["access_log"],
        trusted_proxies=settings["trusted_proxies"],
        max_body_size=settings.get("max_body_size"),
        header_timeout=settings["header_timeout"],
        idle_timeout=settings["idle_timeout"],
        max_streams_per_tunnel=settings.get("max_streams_per_tunnel"),
        max_pending_handshakes=settings["max_pending_handshakes"],
        max_pending_handshakes_per_source=settings["max_pending_handshakes_per_source"],
        max_pending_handshakes_per_credential=settings["max_pending_handshakes_per_credential"],
        max_requests_per_visitor=settings["max_requests_per_visitor"],
        max_websockets_per_visitor=settings["max_websockets_per_visitor"],
        max_websocket_message=settings["max_websocket_message"],
        websocket_idle_timeout=settings["websocket_idle_timeout"],
        websocket_message_rate=settings["websocket_message_rate"],
        memory_budget=settings["memory_budget"],
        tunnel_memory_budget=settings["tunnel_memory_budget"],
        authorized_keys=authorized_keys,
        open_registration=settings["open_registration"],
        visitor_policies=settings["tunnels"],
        aliases=settings["aliases"],
        admin_token=settings.get("admin_token"),
        tcp_ports=[
            TcpPort(port["listen"][0], port["listen"][1], port["tunnel"], port["service"], tuple(port["allow"]))
            for port in settings["tcp_ports"]
        ],
        gateway=gateway_config(settings["gateway"], settings["gateway"]["host"]) if settings.get("gateway") else None,
    )
    return BridgeSettings(config, settings, settings.get("log_level"), state)


def _positionals(args: argparse.Namespace, flags: dict[str, Any]) -> None:
    """PORT and USER:PASS into ``flags``: each stands for its flag (--listen, --token), and not beside it."""
    port, userpass = getattr(args, "port", None), getattr(args, "userpass", None)
    if port is not None:
        if flags.get("listen") is not None:
            raise ConfigError("PORT and --listen: give one of them, not both")
        if not port.isdigit():
            raise ConfigError(f"PORT: expected a port number, got {port!r}")
        flags["listen"] = f"0.0.0.0:{port}"
    if userpass is not None:
        if flags.get("tokens"):
            raise ConfigError("USER:PASS and --token: give one of them, not both")
        user, colon, password = userpass.partition(":")
        if not user or not colon or not password:  # not echoed: it is a password
            raise ConfigError("USER:PASS: expected a user, a colon and a password, e.g. agent:s3cret")
        flags["tokens"] = [userpass]


def bridge_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BridgeConfig:
    """Turn parsed flags (plus environment and config file) into a BridgeConfig."""
    return bridge_settings(args, environ).config


def load_certificate(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load: {getattr(err, 'strerror', None) or err}") from None


def _log_fingerprint(cert: str) -> None:
    """Log the served certificate's SHA-256, the value agents pin with --pin-sha256."""
    try:
        pem = Path(cert).read_text(encoding="ascii", errors="replace")
        start = pem.index("-----BEGIN CERTIFICATE-----")
        end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(pem[start:end])
    except (OSError, ValueError) as err:
        _LOGGER.debug("no fingerprint for %s: %s", cert, err)
        return
    _LOGGER.info("TLS certificate SHA-256 (for agents' --pin-sha256): %s", certificate_sha256(der))


async def _reload(bridge: Bridge, current: BridgeSettings, args: argparse.Namespace) -> BridgeSettings:
    """Apply new tokens and certificate; a bad new config changes nothing and is logged."""
    try:
        fresh = bridge_settings(args)
    except ConfigError as err:
        _LOGGER.error("reload failed, the running settings stay: %s", err)
        return current
    old_context, new_context = bridge.config.ssl_context, fresh.config.ssl_context
    if (old_context is None) != (new_context is None):
        _LOGGER.warning("reload: turning TLS on or off needs a restart; the running setting stays")
    elif old_context is not None:
        # Loaded into the running context, so new connections get the new certificate and
        # established ones keep theirs.
        load_certificate(old_context, fresh.values["tls_cert"], fresh.values["tls_key"])
        _log_fingerprint(fresh.values["tls_cert"])
    # Each setter refuses to leave the bridge with no credential at all, so the kind the new
    # settings still have goes in first; tunnels of the other kind are untouched by it.
    if fresh.config.tokens:
        revoked = await bridge.set_tokens(fresh.config.tokens) + await bridge.set_keys(fresh.config.authorized_keys)
    else:
        revoked = await bridge.set_keys(fresh.config.authorized_keys) + await bridge.set_tokens(fresh.config.tokens)
    bridge.config.shutdown_grace = fresh.config.shutdown_grace
    changed = [key for key in _RESTART_ONLY if fresh.values.get(key) != current.values.get(key)]
    if changed:
        _LOGGER.warning("reload: %s changed; that takes a restart", ", ".join(changed))
    level = log_level(args.log_level, fresh.log_level)
    logging.getLogger().setLevel(level.upper())
    _LOGGER.info(
        "reloaded: %d token(s), %d key(s)%s%s",
        len(bridge.auth),
        len(bridge.keys),
        ", TLS certificate reloaded" if old_context is not None and new_context is not None else "",
        f", {revoked} tunnel(s) closed for a revoked token or key" if revoked else "",
    )
    fresh.config.ssl_context = old_context
    return fresh


#: Seconds between looks at the token and authorized-keys files for edits.
_WATCH_INTERVAL = 1.0


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


async def _watch_credential_files(paths: Callable[[], list[str]], reload: asyncio.Event) -> None:
    """Reload when the token file or the authorized-keys file is edited, as SIGHUP would.

    A change counts once the file has stayed the same for one more look: an editor that
    truncates and rewrites in place would otherwise be caught half-way, and a file read empty
    would revoke every agent, which then stops for good.
    """
    seen = {path: _file_state(path) for path in paths()}
    pending: dict[str, tuple[int, int, int] | None] = {}
    while True:
        await asyncio.sleep(_WATCH_INTERVAL)
        now = {path: _file_state(path) for path in paths()}
        settled = [path for path, state in now.items() if path in pending and pending[path] == state]
        pending = {path: state for path, state in now.items() if state != seen.get(path, state) and path not in settled}
        if settled:
            _LOGGER.info("%s changed: reloading", ", ".join(settled))
            seen.update({path: now[path] for path in settled})
            reload.set()
        seen.update({path: state for path, state in now.items() if path not in seen})


async def _serve(settings: BridgeSettings, args: argparse.Namespace, signals: Signals) -> None:
    bridge = Bridge(settings.config)
    await bridge.start()
    if settings.values.get("tls_cert"):
        _log_fingerprint(settings.values["tls_cert"])
    signals.on_second_stop = bridge.hurry
    stop = asyncio.ensure_future(signals.stop.wait())
    reload = asyncio.ensure_future(signals.reload.wait())
    current = [settings]
    watcher = asyncio.ensure_future(
        _watch_credential_files(
            lambda: [path for key in ("token_file", "authorized_keys") if (path := current[0].values.get(key))],
            signals.reload,
        )
    )
    try:
        while not stop.done():
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            if reload.done() and not stop.done():
                signals.reload.clear()
                settings = current[0] = await _reload(bridge, settings, args)
                reload = asyncio.ensure_future(signals.reload.wait())
    finally:
        for task in (stop, reload, watcher):
            task.cancel()
        await asyncio.gather(stop, reload, watcher, return_exceptions=True)
        _LOGGER.info("stopping (grace period %gs; a second signal stops at once)", bridge.config.shutdown_grace)
        await bridge.stop()


def _announce_state_token(settings: BridgeSettings) -> None:
    """Say where the bare bridge's token is; on its first start, on a terminal, print the
    agent's command with it (once: a log or a journal never gets the token)."""
    state = settings.state
    if state is None:
        return
    config = settings.config
    command, insecure = agent_command(config.host, config.port, state.token, tls=config.ssl_context is not None)
    if state.created and sys.stdout.isatty():
        print(
            f"\nNo agent token was given: this bridge made one and keeps it in {state.path} (mode 0600).\n"
            "At home, with your web app's address instead of http://127.0.0.1:8080 (and this server's "
            "public name or address, if the agent knows it by another), run:\n\n"
            f"    {command}\n",
            flush=True,
        )
        if insecure:
            print(
                "(--insecure: this bridge has no TLS, so the token and all traffic would cross the network in "
                "clear text; put TLS in front, see docs/BRIDGE.md, and use wss:// instead)\n",
                flush=True,
            )
        return
    _LOGGER.info(
        '%s agent token is in %s (mode 0600): give the agent --token "$(cat %s)"',
        "no credential given: a new" if state.created else "no credential given: this bridge's",
        state.path,
        state.path,
    )


def main(args: argparse.Namespace) -> int:
    settings = bridge_settings(args)
    if args.check_config:
        config = settings.config
        state_note = ""
        if settings.state is None and not config.tokens and not config.authorized_keys and not config.open_registration:
            state_note = f", no credential: the first start makes an agent token in {state_path(os.environ)}"
        print(
            f"{args.check_config}: OK: listen {config.host}:{config.port}, {len(config.tokens)} token(s)"
            + (f", domain {config.domain}" if config.domain else "")
            + (", TLS" if config.ssl_context else "")
            + state_note
        )
        return EXIT_OK
    setup_logging(log_level(args.log_level, settings.log_level))
    _announce_state_token(settings)
    run(lambda signals: _serve(settings, args, signals), reload=True)
    return EXIT_OK
