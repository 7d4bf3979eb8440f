"""Settings from flags, environment and an optional TOML file, validated with voluptuous.

Precedence: command-line flag, then environment variable, then config file, then default.
Every error names the flag (or the file key) it is about, in one line.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import voluptuous as vol
from yarl import URL

from .exceptions import ConfigError
from .headers import is_tunnel_name

__all__ = ["parse_listen", "load_file", "merge", "BRIDGE_SCHEMA", "AGENT_SCHEMA", "validate"]


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    text = str(value).strip()
    host = "0.0.0.0"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise vol.Invalid("expected [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
        host = host or "0.0.0.0"
    else:
        port_text = text
    try:
        port = int(port_text)
    except ValueError:
        raise vol.Invalid(f"expected HOST:PORT, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise vol.Invalid(f"port {port} is out of range 0-65535")
    return host, port


def _url(schemes: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        url = URL(str(value).strip())
        if url.scheme not in schemes or not url.host:
            raise vol.Invalid(f"expected a {' or '.join(s + '://' for s in schemes)} URL with a host, got {value!r}")
        return str(value).strip()

    return check


def _tunnel_name(value: Any) -> str:
    if not isinstance(value, str) or not is_tunnel_name(value):
        raise vol.Invalid(f"{value!r} is not a lower-case DNS label (a-z, 0-9, -)")
    return value


def _domain(value: Any) -> str:
    text = str(value).strip().strip(".").lower()
    labels = text.split(".")
    if not text or not all(is_tunnel_name(label) for label in labels):
        raise vol.Invalid(f"{value!r} is not a domain name")
    return text


def _tokens(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise vol.Invalid("expected one or more non-empty tokens")
    return [v.strip() for v in value]


def _networks(value: Any) -> list[IPv4Network | IPv6Network]:
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, list):
        raise vol.Invalid("expected a list of addresses or CIDR networks")
    networks: list[IPv4Network | IPv6Network] = []
    for item in value:
        try:
            networks.append(ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise vol.Invalid(f"{item!r} is not an IP address or CIDR network") from None
    return networks


_seconds = vol.All(vol.Coerce(float), vol.Range(min=0.1, max=86400, msg="expected seconds between 0.1 and 86400"))

BRIDGE_SCHEMA = vol.Schema(
    {
        vol.Optional("listen", default="0.0.0.0:8080"): parse_listen,
        vol.Optional("domain"): vol.Any(None, _domain),
        vol.Optional("token", default=[]): _tokens,
        vol.Optional("token_file"): vol.Any(None, str),
        vol.Optional("request_timeout", default=30.0): _seconds,
        vol.Optional("tls_cert"): vol.Any(None, str),
        vol.Optional("tls_key"): vol.Any(None, str),
        vol.Optional("access_log", default=True): bool,
        vol.Optional("trusted_proxy", default=[]): _networks,
    }
)

AGENT_SCHEMA = vol.Schema(
    {
        vol.Required("bridge", msg="is required (the bridge's URL)"): _url(("ws", "wss", "http", "https")),
        vol.Required("token", msg="is required"): vol.All(str, vol.Length(min=1, msg="must not be empty")),
        vol.Required("target", msg="is required (the home app's URL)"): _url(("http", "https")),
        vol.Optional("name", default="home"): _tunnel_name,
        vol.Optional("agent_id"): vol.Any(None, vol.All(str, vol.Length(min=1, max=128))),
    }
)


def load_file(path: str | None) -> dict[str, Any]:
    """Read a TOML config file (keys are the long flag names with ``_`` for ``-``)."""
    if not path:
        return {}
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML: {err}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def merge(
    flags: Mapping[str, Any],
    env_names: Mapping[str, tuple[str, ...]],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the three sources; return the values and, per key, where each came from."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in file_values.items():
        values[key] = value
        origin[key] = f"key {key!r} in the config file"
    for key, names in env_names.items():
        for name in names:
            if environ.get(name):
                values[key] = environ[name]
                origin[key] = f"${name}"
                break
    for key, value in flags.items():
        if value is not None and value != []:
            values[key] = value
            origin[key] = "--" + key.replace("_", "-")
    return values, origin


def validate(schema: vol.Schema, values: dict[str, Any], origin: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``schema``; a failure becomes ConfigError naming the flag, variable or key."""
    try:
        return dict(schema(values))
    except vol.MultipleInvalid as err:
        first = err.errors[0]
        key = str(first.path[0]) if first.path else "?"
        where = origin.get(key, "--" + key.replace("_", "-"))
        if first.error_message.startswith("extra keys"):
            raise ConfigError(f"{where}: unknown setting") from None
        raise ConfigError(f"{where}: {first.error_message}") from None
