"""``rproxy status``: what a bridge is carrying, as a table in the terminal (or its JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from typing import Any

import aiohttp
from yarl import URL

from ..config import CA_FILE_SETTING, INSECURE_SETTING, PIN_SHA256_SETTING
from ..const import STATUS_JSON_PATH
from ..dial import bridge_tls_context, check_bridge_access, get_json, pinned_sha256, untrusted_message
from ..exceptions import AuthenticationError, ConfigError, RproxyConnectionError
from .common import EXIT_OK, EXIT_RUNTIME
from .options import add_arguments

__all__ = ["add_parser", "format_status", "main"]

_TIMEOUT = 10.0


def add_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show a bridge's tunnels, agents and traffic (needs its admin token)",
        description="Ask a bridge what it carries: tunnels, their agents, requests and bytes.",
    )
    status.add_argument("--bridge", metavar="URL", help="the bridge, e.g. https://bridge.example.com ($RPROXY_BRIDGE)")
    status.add_argument("--admin-token", metavar="T", help="the bridge's admin token ($RPROXY_ADMIN_TOKEN)")
    status.add_argument("--json", action="store_true", help="print the bridge's status JSON instead of tables")
    # Declared once for the agent, rproxy tcp and rproxy status (config.py).
    add_arguments(status, (CA_FILE_SETTING, PIN_SHA256_SETTING, INSECURE_SETTING), with_env=False)


def _status_url(bridge: str) -> URL:
    url = URL(bridge.strip())
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    return url.with_scheme(scheme).with_path(url.path.rstrip("/") + STATUS_JSON_PATH).with_query(None)


async def _fetch(args: argparse.Namespace, bridge: str, token: str) -> dict[str, Any]:
    tls = bridge_tls_context(args.ca_file, pinned_sha256(tuple(args.pin_sha256 or ())))
    url = _status_url(bridge)
    try:
        async with aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar()) as session:
            status, data = await get_json(
                session, url, tls=tls, timeout=_TIMEOUT, what="status", headers={"Authorization": f"Bearer {token}"}
            )
    except ssl.SSLCertVerificationError as err:
        raise RproxyConnectionError(untrusted_message(err, args.ca_file)) from None
    if status == 401:
        raise AuthenticationError("the bridge refused the admin token (401)")
    if status == 404:
        raise RproxyConnectionError("the bridge has no status endpoint (404): start it with --admin-token")
    if status != 200:
        raise RproxyConnectionError(f"the bridge answered HTTP {status}")
    if not isinstance(data, dict) or not isinstance(data.get("tunnels"), list):
        raise RproxyConnectionError("the bridge's status is not what this rproxy understands")
    return data


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _cell(value: Any) -> str:
    """Text an agent chose (its id, software) fit for one cell: no control characters."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def format_status(status: dict[str, Any], bridge: str) -> str:
    """The status JSON as the terminal shows it: a summary line, tunnels, agents."""
    tunnels = status["tunnels"]
    lines = [
        f"bridge {bridge} (rproxy {_cell(status.get('version', '?'))}), "
        f"up {_duration(status.get('uptime_seconds', 0))}, "
        f"{status.get('visitor_connections', 0)} visitor connection(s)"
    ]
    rows: list[tuple[str, ...]] = [
        ("TUNNEL", "AGENTS", "STREAMS", "REQUESTS", "4XX", "5XX", "FROM AGENTS", "TO AGENTS", "RESETS")
    ]
    for tunnel in tunnels:
        requests = tunnel.get("requests", {})
        rows.append(
            (
                _cell(tunnel["name"]),
                str(len(tunnel["agents"])),
                str(sum(a.get("streams", 0) for a in tunnel["agents"])),
                str(sum(requests.values())),
                str(requests.get("4xx", 0)),
                str(requests.get("5xx", 0)),
                _size(tunnel.get("bytes_from_agents", 0)),
                _size(tunnel.get("bytes_to_agents", 0)),
                str(tunnel.get("stream_resets", 0)),
            )
        )
    lines += ["", _table(rows) if tunnels else "no tunnels yet"]
    agents: list[tuple[str, ...]] = [("AGENT", "TUNNEL", "ADDRESS", "CONNECTED", "PROTOCOL", "RTT")]
    now = time.time()
    for tunnel in tunnels:
        for agent in tunnel["agents"]:
            rtt = agent.get("rtt_ms")
            agents.append(
                (
                    _cell(agent.get("id", "")),
                    _cell(tunnel["name"]),
                    _cell(agent.get("address", "")),
                    _duration(now - agent.get("connected_since", now)) + " ago",
                    _cell(agent.get("protocol", "")),
                    f"{rtt:.1f} ms" if isinstance(rtt, (int, float)) else "-",
                )
            )
    if len(agents) > 1:
        lines += ["", _table(agents)]
    failures = status.get("handshake_failures") or {}
    if failures:
        lines += ["", "agents refused: " + ", ".join(f"{_cell(k)} {v}" for k, v in sorted(failures.items()))]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    bridge = args.bridge or os.environ.get("RPROXY_BRIDGE") or ""
    token = args.admin_token or os.environ.get("RPROXY_ADMIN_TOKEN") or ""
    if not bridge:
        raise ConfigError("--bridge: the bridge's URL is required")
    if not token:
        raise ConfigError("--admin-token: the bridge's admin token is required")
    if URL(bridge.strip()).scheme not in ("http", "https", "ws", "wss"):
        raise ConfigError(f"--bridge {bridge!r}: expected http://, https://, ws:// or wss://")
    check_bridge_access(bridge, args.ca_file, tuple(args.pin_sha256 or ()), bool(args.insecure), "the admin token")
    try:
        status = asyncio.run(_fetch(args, bridge, token))
    except AuthenticationError:
        raise  # exit 3: the token is wrong
    except RproxyConnectionError as err:  # unreachable, or no status endpoint: exit 1
        print(f"rproxy status: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status, str(_status_url(bridge).origin())))
    sys.stdout.flush()
    return EXIT_OK
