"""Settings from flags, environment and a config file, validated with voluptuous.

Precedence: command-line flag, then environment variable, then config file, then default.
Config files are YAML (JSON is YAML too, so a Home Assistant add-on's ``options.json`` reads
as is) or, by the ``.toml`` suffix, TOML. Their keys are the long flag names with ``_`` for
``-`` (a few flags that repeat have a plural key: ``--token`` is ``tokens``).

Every mistake becomes one line naming where it is, e.g. ``bridge.yaml: tokens[2].name:
expected a DNS label (a-z, 0-9, -), got 'Bad_Name'``, or ``--listen: ...``, or
``$RPROXY_LISTEN: ...``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import voluptuous as vol
import yaml
from yarl import URL

from .exceptions import ConfigError
from .headers import is_tunnel_name

__all__ = [
    "AGENT_SCHEMA",
    "FileSettings",
    "BRIDGE_SCHEMA",
    "GATEWAY_COMMAND_SCHEMA",
    "GATEWAY_SCHEMA",
    "LOG_LEVELS",
    "TCP_TARGET_PREFIX",
    "TOKEN_HASH_PREFIX",
    "ZEROCONF_TARGET_PREFIX",
    "TokenGrant",
    "agent_token",
    "check_token_entry",
    "load_file",
    "merge",
    "parse_listen",
    "parse_sha256_pin",
    "parse_tcp_target",
    "validate",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """An accepted agent token and the tunnel names it may serve (None: any name)."""

    token: str
    names: frozenset[str] | None = None

    def allows(self, name: str) -> bool:
        return self.names is None or name in self.names

    def __repr__(self) -> str:  # never the secret itself, whatever prints it
        names = "any" if self.names is None else ",".join(sorted(self.names))
        return f"TokenGrant(token=<{len(self.token)} chars>, names={names})"


#: An accepted token written as its SHA-256 (``rproxy hash-token``), so that a leaked config or
#: token file hands nobody an agent's credential.
TOKEN_HASH_PREFIX = "sha256:"
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def check_token_entry(text: str) -> str:
    """An accepted-token entry as the bridge keeps it: a clear token, or ``sha256:`` + 64 hex digits.

    A hash is returned in lower case. Raises ValueError for a malformed hash; the message never
    repeats the entry (it may be a token with a typo).
    """
    if text[: len(TOKEN_HASH_PREFIX)].lower() != TOKEN_HASH_PREFIX:
        return text
    if not _TOKEN_HASH.fullmatch(text.lower()):
        raise ValueError("expected sha256: and 64 hex digits, as rproxy hash-token prints them")
    return text.lower()


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


#: ``--target zeroconf:NAME``: the web app announced on the LAN under NAME (mDNS).
ZEROCONF_TARGET_PREFIX = "zeroconf:"
TCP_TARGET_PREFIX = "tcp://"


def parse_tcp_target(target: str) -> tuple[str, int]:
    """``tcp://host:port`` → (host, port); IPv6 hosts in brackets (``tcp://[fd00::5]:22``).

    Raises:
        ValueError: not that form (the message names the target, never more).
    """
    rest = target.strip()[len(TCP_TARGET_PREFIX) :] if target.strip().lower().startswith(TCP_TARGET_PREFIX) else None
    problem = f"{target!r}: expected tcp://HOST:PORT, e.g. tcp://192.168.1.5:22"
    if not rest or any(c in rest for c in "/?#@ \t\r\n"):
        raise ValueError(problem)
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]")
        if not port_text.startswith(":"):
            raise ValueError(problem)
        port_text = port_text[1:]
    else:
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            raise ValueError(f"{target!r}: write an IPv6 address in brackets, e.g. tcp://[fd00::5]:22")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(problem)
    return host, int(port_text)


def _target(value: Any) -> str:
    """The home app: an http(s) URL, or ``zeroconf:NAME`` for an app announced over mDNS."""
    text = str(value).strip()
    if text.lower().startswith(ZEROCONF_TARGET_PREFIX):
        name = text[len(ZEROCONF_TARGET_PREFIX) :].strip()
        if not name or not name.isprintable():
            raise vol.Invalid(f"expected zeroconf:NAME with the name of an announced app, got {value!r}")
        return ZEROCONF_TARGET_PREFIX + name
    return _url(("http", "https"))(value)


def _text(what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise vol.Invalid(f"expected {what}, got {value!r}")
        return value.strip()

    return check


def _agent_id(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or not value.isprintable():
        raise vol.Invalid(f"expected 1-128 printable characters, got {value!r}")
    return value


def _tunnel_name(value: Any) -> str:
    if not isinstance(value, str) or not is_tunnel_name(value):
        raise vol.Invalid(f"expected a DNS label (a-z, 0-9, -), got {value!r}")
    return value


def _domain(value: Any) -> str:
    text = str(value).strip().strip(".").lower()
    labels = text.split(".")
    if not text or not all(is_tunnel_name(label) for label in labels):
        raise vol.Invalid(f"expected a domain name, got {value!r}")
    return text


def _secret_text(value: Any) -> str:
    """A token: like ``_text``, but a refusal names only the type (the value may be the secret)."""
    if not isinstance(value, str):
        raise vol.Invalid(f"expected a token (text; quote it in YAML), got {type(value).__name__}")
    if not value.strip():
        raise vol.Invalid("expected a non-empty token")
    return value.strip()


def _accepted_token(value: Any) -> str:
    try:
        return check_token_entry(_secret_text(value))
    except ValueError as err:
        raise vol.Invalid(str(err)) from None


def agent_token(value: Any) -> str:
    """A token as an agent presents it (vol.Invalid if it is empty or a hash; never echoing it)."""
    return _agent_token(value)


def _agent_token(value: Any) -> str:
    token = _secret_text(value)
    if _TOKEN_HASH.fullmatch(token.lower()):  # the bridge could never accept it: it reads it as a hash
        raise vol.Invalid("this is a token's hash, for the bridge's token list; the agent needs the token itself")
    return token


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """None (a key written without a value) or what ``check`` accepts, with ``check``'s message."""

    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _one_or_many(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


_TOKEN_ENTRY = vol.Schema(
    {
        vol.Required("token", msg="is required (the secret an agent presents)"): _accepted_token,
        vol.Exclusive("name", "names", msg="give either name or names"): _tunnel_name,
        vol.Exclusive("names", "names", msg="give either name or names"): vol.All(
            _one_or_many, vol.Length(min=1, msg="expected at least one tunnel name"), [_tunnel_name]
        ),
    }
)


def _token_grant(value: Any) -> TokenGrant:
    """A token: a plain string (any tunnel name), or ``{token, name}`` / ``{token, names}``.

    Each token may be written as its hash, ``sha256:HEX``.
    """
    if isinstance(value, str):
        return TokenGrant(_accepted_token(value))
    if not isinstance(value, dict):
        raise vol.Invalid(f"expected a token, or a mapping with token and name, got {type(value).__name__}")
    if set(value) - {"token", "name", "names"}:
        # Not named: ``tokens: {SECRET: garage}`` makes the token itself the unknown key.
        raise vol.Invalid("unknown key in a token entry (only token, name and names; not shown, it may be a token)")
    entry = _TOKEN_ENTRY(value)
    if "name" in entry:
        return TokenGrant(entry["token"], frozenset({entry["name"]}))
    if "names" in entry:
        return TokenGrant(entry["token"], frozenset(entry["names"]))
    return TokenGrant(entry["token"])


def _visitor_login(value: Any) -> tuple[str, str]:
    """``USER:HASH``, a visitor login the agent asks the bridge to require."""
    from .policy import parse_password_hash

    user, colon, hashed = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not user or not colon:
        raise vol.Invalid("expected USER:HASH (a user name, a colon, the scrypt hash of the password)")
    try:
        parse_password_hash(hashed)
    except ValueError as err:
        raise vol.Invalid(str(err)) from None
    return user, hashed


def _tunnel_policies(value: Any) -> Any:
    """``tunnels:``, visitor protection per tunnel (imported here, on first use)."""
    from .policy import parse_tunnel_policies

    return parse_tunnel_policies(value)


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


def _aliases(value: Any) -> dict[str, tuple[str, str]]:
    """``aliases:``: host name → ``TUNNEL`` or ``SERVICE.TUNNEL``, as (tunnel, service)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise vol.Invalid(
            "expected host names mapped to TUNNEL or SERVICE.TUNNEL, e.g. garden.example.com: garden.home"
        )
    aliases: dict[str, tuple[str, str]] = {}
    for host, route in value.items():
        name = _domain(host)
        parts = str(route).strip().lower().split(".") if isinstance(route, str) else []
        if not 1 <= len(parts) <= 2 or not all(is_tunnel_name(part) for part in parts):
            raise vol.Invalid(f"expected TUNNEL or SERVICE.TUNNEL (DNS labels), got {route!r}", path=[host])
        aliases[name] = (parts[-1], parts[0] if len(parts) == 2 else "")
    return aliases


_TCP_PORT = vol.Schema(
    {
        vol.Required("listen", msg="is required (HOST:PORT or PORT)"): parse_listen,
        vol.Required("tunnel", msg="is required (the tunnel whose service this port reaches)"): _tunnel_name,
        vol.Required("service", msg="is required (the agent's TCP service)"): _tunnel_name,
        # No default: a port open to the whole internet must be asked for (0.0.0.0/0).
        vol.Required("allow", msg="is required: the client addresses allowed (0.0.0.0/0 and ::/0 for anyone)"): vol.All(
            _networks, vol.Length(min=1, msg="expected at least one address or network")
        ),
    }
)


def _port_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise vol.Invalid("expected a list of ports, each with listen, tunnel, service and allow")
    return value


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise vol.Invalid(f"expected true or false, got {value!r}")


def parse_sha256_pin(value: Any) -> str:
    """A certificate's SHA-256 fingerprint, with or without colons, any case → lower-case hex."""
    text = str(value).strip().replace(":", "").lower() if isinstance(value, str) else ""
    if len(text) != 64 or not all(c in "0123456789abcdef" for c in text):
        raise vol.Invalid(
            f"expected the SHA-256 fingerprint of the bridge's certificate, 64 hex digits (colons allowed, as "
            f"openssl x509 -noout -fingerprint -sha256 prints it), got {value!r}"
        )
    return text


def _pin_list(value: Any) -> list[Any]:
    """Pins as a list, or one string of them separated by commas or spaces (an environment variable)."""
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value if isinstance(value, list) else [value]


def _log_level(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in LOG_LEVELS:
        raise vol.Invalid(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return text


def _seconds(low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise vol.Invalid(f"expected seconds, got {value!r}") from None
        if not low <= seconds <= high:
            raise vol.Invalid(f"expected seconds between {low:g} and {high:g}, got {value!r}")
        return seconds

    return check


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _byte_size(value: Any) -> int:
    """Bytes: ``1048576``, ``512K``, ``10M``, ``1G`` (binary multiples; a trailing B or iB is allowed)."""
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (text[:-1], text[-1]) if text[-1:] in _SIZE_SUFFIXES else (text, "")
    if isinstance(value, bool) or not number.isdigit() or int(number) < 1:
        raise vol.Invalid(f"expected a size in bytes such as 1048576, 512K or 10M, got {value!r}")
    return int(number) * _SIZE_SUFFIXES[suffix]


def _count(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or not low <= int(text) <= high:
            raise vol.Invalid(f"expected a whole number from {low} to {high}, got {value!r}")
        return int(text)

    return check


def _regex(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise vol.Invalid(f"expected a regular expression, got {value!r}")
    if len(value) > 1000:
        raise vol.Invalid("expected a regular expression of at most 1000 characters")
    try:
        re.compile(value)
    except re.error as err:
        raise vol.Invalid(f"not a regular expression ({err}): {value!r}") from None
    return value


def _regex_list(value: Any) -> list[Any]:
    """Regexes as a list, or one string of them separated by white space (an environment variable)."""
    if isinstance(value, str):
        return value.split()
    return value if isinstance(value, list) else [value]


#: Fields the gateway writes itself, or that describe the POST rather than the client.
_UNFORWARDABLE = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "expect",
    }
)


def _header_name(value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}", text):
        raise vol.Invalid(f"expected a header field name, got {value!r}")
    if text in _UNFORWARDABLE or text.startswith(("x-ws-proxy-", "sec-websocket-")):
        raise vol.Invalid(f"{text} is not replayed (the gateway writes it, or it belongs to the handshake)")
    return text


def _rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = 0.0
    if not 0.1 <= rate <= 100_000 or isinstance(value, bool):
        raise vol.Invalid(f"expected callbacks per second from 0.1 to 100000, got {value!r}")
    return rate


#: The gateway's settings (docs/GATEWAY.md), as ``rproxy gateway`` and a bridge's ``gateway:`` share them.
GATEWAY_SCHEMA = vol.Schema(
    {
        vol.Required("base_url", msg="is required (the public URL the callback URLs start with)"): _url(
            ("http", "https")
        ),
        vol.Optional("allowlist", default=[]): vol.All(_regex_list, [_regex]),
        vol.Optional("secret"): _optional(_secret_text),
        vol.Optional("forward_headers", default=["origin", "user-agent"]): vol.All(_pin_list, [_header_name]),
        vol.Optional("max_message_size", default=128 << 10): _byte_size,
        vol.Optional("idle_timeout", default=600.0): _seconds(0.1, 86400 * 7),
        vol.Optional("max_lifetime", default=7200.0): _seconds(0.1, 86400 * 30),
        vol.Optional("max_connections", default=10_000): _count(1, 10_000_000),
        vol.Optional("max_connections_per_address", default=100): _count(1, 10_000_000),
        vol.Optional("callback_rate", default=100.0): _rate,
        vol.Optional("queue_frames", default=32): _count(1, 100_000),
        vol.Optional("queue_bytes", default=1 << 20): _byte_size,
        vol.Optional("post_timeout", default=10.0): _seconds(0.1, 3600),
        vol.Optional("retries", default=3): _count(0, 20),
        vol.Optional("access_log", default=True): _boolean,
    }
)

#: ``rproxy gateway``: the shared settings plus its own port, TLS and log level.
GATEWAY_COMMAND_SCHEMA = GATEWAY_SCHEMA.extend(
    {
        vol.Optional("listen", default="0.0.0.0:8080"): parse_listen,
        vol.Optional("tls_cert"): _optional(_text("a file name")),
        vol.Optional("tls_key"): _optional(_text("a file name")),
        vol.Optional("shutdown_grace", default=5.0): _seconds(0, 3600),
        vol.Optional("admin_token"): _optional(_accepted_token),
        vol.Optional("log_level"): _optional(_log_level),
    }
)

#: A bridge's ``gateway:`` section: the shared settings and the host name it answers on.
_BRIDGE_GATEWAY = GATEWAY_SCHEMA.extend(
    {vol.Required("host", msg="is required (the host name of the bridge's port the gateway answers on)"): _domain}
)


def _gateway_section(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise vol.Invalid("expected a mapping with host, base_url and allowlist")
    return dict(_BRIDGE_GATEWAY({str(k).replace("-", "_"): v for k, v in value.items()}))


BRIDGE_SCHEMA = vol.Schema(
    {
        vol.Optional("listen", default="0.0.0.0:8080"): parse_listen,
        vol.Optional("domain"): _optional(_domain),
        vol.Optional("tokens", default=[]): vol.All(_one_or_many, [_token_grant]),
        vol.Optional("token_file"): _optional(_text("a file name")),
        vol.Optional("request_timeout", default=30.0): _seconds(0.1, 86400),
        vol.Optional("shutdown_grace", default=10.0): _seconds(0, 3600),
        vol.Optional("tls_cert"): _optional(_text("a file name")),
        vol.Optional("tls_key"): _optional(_text("a file name")),
        vol.Optional("access_log", default=True): _boolean,
        vol.Optional("trusted_proxies", default=[]): _networks,
        vol.Optional("max_body_size"): _optional(_byte_size),
        vol.Optional("header_timeout", default=10.0): _seconds(0.5, 3600),
        vol.Optional("idle_timeout", default=75.0): _seconds(1, 86400),
        vol.Optional("max_streams_per_tunnel"): _optional(_count(1, 1 << 20)),
        vol.Optional("max_pending_handshakes", default=64): _count(1, 100_000),
        vol.Optional("max_pending_handshakes_per_source", default=8): _count(1, 100_000),
        vol.Optional("max_pending_handshakes_per_credential", default=8): _count(1, 100_000),
        vol.Optional("max_requests_per_visitor", default=256): _count(1, 1 << 20),
        vol.Optional("max_websockets_per_visitor", default=256): _count(1, 1 << 20),
        vol.Optional("max_websocket_message", default=1 << 20): _byte_size,
        vol.Optional("websocket_idle_timeout", default=120.0): _seconds(1, 86400),
        vol.Optional("websocket_message_rate", default=20_000): _count(1, 10_000_000),
        vol.Optional("memory_budget", default=1 << 30): _byte_size,
        vol.Optional("tunnel_memory_budget", default=512 << 20): _byte_size,
        vol.Optional("authorized_keys"): _optional(_text("a file name")),
        vol.Optional("open_registration", default=False): _boolean,
        vol.Optional("tunnels", default={}): _tunnel_policies,
        vol.Optional("admin_token"): _optional(_accepted_token),
        vol.Optional("aliases", default={}): _aliases,
        vol.Optional("tcp_ports", default=[]): vol.All(_port_list, [_TCP_PORT]),
        vol.Optional("gateway"): _optional(_gateway_section),
        vol.Optional("log_level"): _optional(_log_level),
    }
)


def _service_target(value: Any) -> str:
    """A service: a web app (as ``target``) or a TCP service, ``tcp://host:port``."""
    text = str(value).strip()
    if text.lower().startswith(TCP_TARGET_PREFIX):
        try:
            parse_tcp_target(text)
        except ValueError as err:
            raise vol.Invalid(str(err)) from None
        return text
    try:
        return _target(value)
    except vol.Invalid:
        raise vol.Invalid(f"expected an http(s):// URL, zeroconf:NAME or tcp://HOST:PORT, got {value!r}") from None


_SERVICE = vol.Schema(
    {
        vol.Required("name", msg="is required (the service's name, a DNS label)"): _tunnel_name,
        vol.Required("target", msg="is required (the service's URL)"): _service_target,
    }
)


def _service_entry(value: Any) -> dict[str, Any]:
    """``{name, target}``, or ``NAME=URL`` as ``--service`` writes it."""
    if isinstance(value, str):
        name, equals, target = value.partition("=")
        if not equals:
            raise vol.Invalid(f"expected NAME=URL, e.g. ssh=tcp://192.168.1.5:22, got {value!r}")
        value = {"name": name.strip(), "target": target.strip()}
    return dict(_SERVICE(value))


def _service_list(value: Any) -> list[Any]:
    """Services as a list, a mapping of name to URL, or NAME=URL strings (comma-separated in a variable)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [{"name": name, "target": target} for name, target in value.items()]
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise vol.Invalid(f"expected a list of services (each a name and a target), got {type(value).__name__}")
    return value


def _unique_names(services: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: set[str] = set()
    for index, service in enumerate(services):
        if service["name"] in seen:
            raise vol.Invalid(f"{service['name']!r} is named twice", path=[index, "name"])
        seen.add(service["name"])
    return services


AGENT_SCHEMA = vol.Schema(
    {
        vol.Required("bridge", msg="is required (the bridge's URL)"): _url(("ws", "wss", "http", "https")),
        # One of token and key is required (checked by the agent's CLI, which names both).
        vol.Optional("token"): _optional(_agent_token),
        vol.Optional("token_file"): _optional(_text("a file name")),
        vol.Optional("key"): _optional(_text("a file name")),
        # Required unless there are services (checked by the agent's CLI, which names both).
        vol.Optional("target"): _optional(_target),
        # No default here: with a key and no name, the agent takes the name derived from the key.
        vol.Optional("name"): _optional(_tunnel_name),
        vol.Optional("agent_id"): _optional(_agent_id),
        vol.Optional("services", default=[]): vol.All(_service_list, [_service_entry], _unique_names),
        vol.Optional("log_level"): _optional(_log_level),
        vol.Optional("ca_file"): _optional(_text("a file name")),
        vol.Optional("pin_sha256", default=[]): vol.All(_pin_list, [parse_sha256_pin]),
        vol.Optional("insecure", default=False): _boolean,
        vol.Optional("visitor_allow", default=[]): vol.All(_networks, lambda networks: [str(n) for n in networks]),
        vol.Optional("visitor_auth", default=[]): vol.All(_pin_list, [_visitor_login]),
    }
)

#: Keys of older config files (before the plural keys), still read.
_KEY_ALIASES = {"token": "tokens", "trusted_proxy": "trusted_proxies"}


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false, so a tunnel named ``no`` or ``on``
    stays a name instead of turning into False or True (YAML 1.1's yes/no/on/off)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class FileSettings(dict[str, Any]):
    """Settings read from a file, by canonical key; ``spelling`` has each key as written."""

    def __init__(self) -> None:
        super().__init__()
        self.spelling: dict[str, str] = {}


def load_file(path: str | None, aliases: Mapping[str, str] | None = None) -> FileSettings:
    """Read a config file: YAML or JSON, or TOML when the name ends in ``.toml``.

    Keys may be written with ``-`` or ``_``; ``aliases`` renames older key spellings.
    """
    values = FileSettings()
    if not path:
        return values
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8")) if path.endswith(".toml") else yaml.load(raw, Loader=_YamlLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return values
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top, got {type(data).__name__}")
    for key, value in data.items():
        name = str(key).replace("-", "_")
        canonical = (aliases or {}).get(name, name)
        values[canonical] = value
        values.spelling[canonical] = str(key)
    return values


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    return str(problem)


def merge(
    flags: Mapping[str, Any],
    env_names: Mapping[str, tuple[str, ...]],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    *,
    file: str | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the three sources; return the values and, per key, where each came from.

    The origin of a key is ``--flag``, ``$VARIABLE`` or ``FILE: key`` (``key`` alone when the
    file's name is not given); a key that was not set anywhere has none.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    spelling = getattr(file_values, "spelling", {})
    for key, value in file_values.items():
        values[key] = value
        written = spelling.get(key, key)
        origin[key] = f"{file}: {written}" if file else written
    for key, names in env_names.items():
        for name in names:
            if environ.get(name):
                values[key] = environ[name]
                origin[key] = f"${name}"
                break
    for key, value in flags.items():
        if value is not None and value != []:
            values[key] = value
            origin[key] = (flag_names or {}).get(key) or "--" + key.replace("_", "-")
    if file:
        origin[_FILE] = file
    return values, origin


#: Origin entry holding the config file's name (not a settings key: those are identifiers).
_FILE = "<file>"


def _path_text(path: Sequence[Any]) -> str:
    """``['tokens', 2, 'name']`` → ``tokens[2].name``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def validate(
    schema: vol.Schema, values: dict[str, Any], origin: Mapping[str, str], flag_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Apply ``schema``; the first failure becomes a one-line ConfigError naming where it is."""
    try:
        return dict(schema(values))
    except vol.MultipleInvalid as err:
        first = min(err.errors, key=lambda e: [str(p) for p in e.path])
        path = list(first.path)
        key = str(path[0]) if path else ""
        file = origin.get(_FILE)
        where = origin.get(key)
        if where is not None and file and where.startswith(f"{file}: "):
            rest = _path_text(path[1:])  # ``tokens[2].name``, with the key as written
            where += rest if rest.startswith("[") or not rest else "." + rest
        elif where is None:  # unknown or missing: with a file, say where in it
            where = (
                f"{file}: {_path_text(path)}" if file else (flag_names or {}).get(key) or "--" + key.replace("_", "-")
            )
        message = first.error_message
        if message.startswith("extra keys not allowed"):
            message = "unknown key"
        elif message == "required key not provided":
            message = "is required"
        raise ConfigError(f"{where}: {message}") from None
