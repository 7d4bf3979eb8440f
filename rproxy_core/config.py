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

import copy
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

from .const import (
    DEFAULT_BRIDGE_HOST,
    DEFAULT_BRIDGE_PORT,
    DEFAULT_TUNNEL_NAME,
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_CREDENTIAL,
    MAX_PENDING_HANDSHAKES_PER_SOURCE,
    MAX_REQUESTS_PER_VISITOR,
    MAX_WEBSOCKETS_PER_VISITOR,
    REQUEST_TIMEOUT,
    SHUTDOWN_GRACE,
    VISITOR_WEBSOCKET_MESSAGE,
    WEBSOCKET_IDLE_TIMEOUT,
    WEBSOCKET_MESSAGE_RATE,
)
from .exceptions import ConfigError
from .headers import is_tunnel_name
from .transport.budget import DEFAULT_PROCESS_BUDGET, DEFAULT_TUNNEL_BUDGET

__all__ = [
    "AGENT_SCHEMA",
    "AGENT_SETTINGS",
    "BRIDGE_SETTINGS",
    "CA_FILE_SETTING",
    "INSECURE_SETTING",
    "KEY_SETTING",
    "LOG_LEVEL_SETTING",
    "PIN_SHA256_SETTING",
    "Setting",
    "TOKEN_FILE_SETTING",
    "TOKEN_SETTING",
    "check_agent_id",
    "check_target_url",
    "env_names",
    "flag_names",
    "key_aliases",
    "settings_schema",
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
class Setting:
    """One setting of a command, written once: everything else about it is made from this.

    ``check`` validates a value from any source (flag, variable or file: text, or what YAML
    made of it) and returns it in the form the command uses; ``default`` goes through it too.
    ``default=None`` means "not set" (and a key written without a value in a file is accepted).
    """

    #: The config-file key, and the key of the validated settings.
    key: str
    check: Callable[[Any], Any]
    help: str
    #: Flags, the first named in messages; none: a config-file-only setting.
    flags: tuple[str, ...] = ()
    #: Environment variables, the first one set wins.
    env: tuple[str, ...] = ()
    default: Any = None
    metavar: str | None = None
    #: The flag may repeat (each adds one value).
    many: bool = False
    #: The flag takes no value: it sets this one.
    const: Any = None
    #: The value is a credential: never echoed, and the docs say to keep it off command lines.
    secret: bool = False
    #: SIGHUP applies a change (others need a restart).
    reloads: bool = False
    #: Older spellings of the key in a config file.
    file_aliases: tuple[str, ...] = ()
    #: What an unset (None) default means, for the docs and --help.
    unset: str = ""
    #: Show the default as a size (1M, 512M, 1G).
    size: bool = False
    #: Required: the message when it is missing.
    required: str = ""
    #: The flag is ``rproxy``'s own (before the command), shared by every command.
    root: bool = False
    #: A valid value other than the default, as text: for the docs and the tests.
    example: str = ""

    @property
    def flag(self) -> str | None:
        return self.flags[0] if self.flags else None


def settings_schema(settings: Sequence[Setting]) -> vol.Schema:
    """The voluptuous schema of a settings table (defaults are validated like given values)."""
    fields: dict[Any, Any] = {}
    for setting in settings:
        marker: Any
        if setting.required:
            marker = vol.Required(setting.key, msg=setting.required)
        elif setting.default is None:
            marker = vol.Optional(setting.key)
        else:
            # A fresh copy each time: a default list must not be shared between validations.
            marker = vol.Optional(setting.key, default=lambda value=setting.default: copy.deepcopy(value))
        fields[marker] = setting.check
    return vol.Schema(fields)


def flag_names(settings: Sequence[Setting]) -> dict[str, str]:
    """Settings key → the flag messages name it by."""
    return {setting.key: setting.flags[0] for setting in settings if setting.flags}


def env_names(settings: Sequence[Setting]) -> dict[str, tuple[str, ...]]:
    """Settings key → its environment variables."""
    return {setting.key: setting.env for setting in settings if setting.env}


def key_aliases(settings: Sequence[Setting]) -> dict[str, str]:
    """Older config-file spellings → the key."""
    return {alias: setting.key for setting in settings for alias in setting.file_aliases}


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


def check_target_url(value: Any) -> URL:
    """A home app's URL: http(s), a host, no query or fragment (a path prefix is kept).

    The one rule, for the CLI's settings and ``AgentConfig.validate``.

    Raises:
        ValueError: the message quotes the value.
    """
    try:
        url = URL(str(value).strip())
        valid = url.scheme in ("http", "https") and bool(url.host)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"expected a URL without a query or fragment, got {value!r}")
    return url


def _target(value: Any) -> str:
    """The home app: an http(s) URL, or ``zeroconf:NAME`` for an app announced over mDNS."""
    text = str(value).strip()
    if text.lower().startswith(ZEROCONF_TARGET_PREFIX):
        name = text[len(ZEROCONF_TARGET_PREFIX) :].strip()
        if not name or not name.isprintable():
            raise vol.Invalid(f"expected zeroconf:NAME with the name of an announced app, got {value!r}")
        return ZEROCONF_TARGET_PREFIX + name
    try:
        check_target_url(text)
    except ValueError as err:
        raise vol.Invalid(str(err)) from None
    return text


def _text(what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise vol.Invalid(f"expected {what}, got {value!r}")
        return value.strip()

    return check


def check_agent_id(value: Any) -> str:
    """An agent's id as it shows in logs: the one rule, for the CLI's settings and ``AgentConfig``.

    Raises:
        ValueError: not 1-128 printable characters (the message quotes the value).
    """
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or not value.isprintable():
        raise ValueError(f"expected 1-128 printable characters, got {value!r}")
    return value


def _agent_id(value: Any) -> str:
    try:
        return check_agent_id(value)
    except ValueError as err:
        raise vol.Invalid(str(err)) from None


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


#: ``--log-level`` is ``rproxy``'s own flag (before the command); every command reads the
#: variable and the file key the same way.
LOG_LEVEL_SETTING = Setting(
    "log_level",
    _optional(_log_level),
    "log verbosity: " + ", ".join(LOG_LEVELS),
    ("--log-level",),
    ("RPROXY_LOG_LEVEL",),
    metavar="LEVEL",
    reloads=True,
    unset="info",
    root=True,
    example="debug",
)


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


#: The bridge's settings, one entry each: its flag, variables, config-file key, check, default
#: and help. The argparse arguments, the environment mapping, ``BRIDGE_SCHEMA`` and the tables
#: in docs/CONFIGURATION.md are made from it; the defaults are ``BridgeConfig``'s (both read
#: const.py), which tests/core/unit/test_settings.py holds them to.
BRIDGE_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        parse_listen,
        "address to listen on (0.0.0.0:$PORT when only $PORT is set)",
        ("--listen",),
        ("RPROXY_LISTEN",),
        default=f"{DEFAULT_BRIDGE_HOST}:{DEFAULT_BRIDGE_PORT}",
        metavar="HOST:PORT",
        example="127.0.0.1:9000",
    ),
    Setting(
        "domain",
        _optional(_domain),
        "serve tunnel NAME at NAME.D",
        ("--domain",),
        ("RPROXY_DOMAIN",),
        metavar="D",
        example="example.com",
    ),
    Setting(
        "tokens",
        vol.All(_one_or_many, [_token_grant]),
        "an agent token to accept (repeatable); in a file also {token, name} or {token, names}, "
        "and a sha256: hash from rproxy hash-token",
        ("--token",),
        ("RPROXY_TOKEN",),
        default=[],
        metavar="T",
        many=True,
        secret=True,
        reloads=True,
        file_aliases=("token",),
        example="s3cret-token",
    ),
    Setting(
        "token_file",
        _optional(_text("a file name")),
        "file with one accepted agent token per line, optionally followed by the tunnel names it may serve",
        ("--token-file",),
        ("RPROXY_TOKEN_FILE",),
        metavar="F",
        reloads=True,
        example="/etc/rproxy/tokens",
    ),
    Setting(
        "request_timeout",
        _seconds(0.1, 86400),
        "time the home app has to answer before the visitor gets 504",
        ("--request-timeout",),
        ("RPROXY_REQUEST_TIMEOUT",),
        default=REQUEST_TIMEOUT,
        metavar="SECONDS",
        example="20",
    ),
    Setting(
        "shutdown_grace",
        _seconds(0, 3600),
        "on SIGTERM, time requests in flight get to finish",
        ("--shutdown-grace",),
        ("RPROXY_SHUTDOWN_GRACE",),
        default=SHUTDOWN_GRACE,
        metavar="SECONDS",
        reloads=True,
        example="3",
    ),
    Setting(
        "tls_cert",
        _optional(_text("a file name")),
        "PEM certificate chain: serve HTTPS and WSS",
        ("--tls-cert",),
        ("RPROXY_TLS_CERT",),
        metavar="F",
        reloads=True,
        example="/etc/rproxy/cert.pem",
    ),
    Setting(
        "tls_key",
        _optional(_text("a file name")),
        "PEM private key for --tls-cert",
        ("--tls-key",),
        ("RPROXY_TLS_KEY",),
        metavar="F",
        reloads=True,
        example="/etc/rproxy/key.pem",
    ),
    Setting(
        "access_log",
        _boolean,
        "log one line per visitor request (--no-access-log: do not)",
        ("--no-access-log",),
        ("RPROXY_ACCESS_LOG",),
        default=True,
        const=False,
        example="false",
    ),
    Setting(
        "trusted_proxies",
        _networks,
        "a load balancer or proxy in front of the bridge whose X-Forwarded-For/-Proto the bridge believes "
        "(repeatable; comma-separated in the variable)",
        ("--trusted-proxy",),
        ("RPROXY_TRUSTED_PROXIES",),
        default=[],
        metavar="CIDR",
        many=True,
        file_aliases=("trusted_proxy",),
        example="10.0.0.0/8",
    ),
    Setting(
        "max_body_size",
        _optional(_byte_size),
        "largest visitor request body, e.g. 10M, 512K or bytes; larger gets 413",
        ("--max-body-size",),
        ("RPROXY_MAX_BODY_SIZE",),
        metavar="SIZE",
        unset="no limit",
        example="10M",
    ),
    Setting(
        "header_timeout",
        _seconds(0.5, 3600),
        "time a visitor has to send a request head before getting 408",
        ("--header-timeout",),
        ("RPROXY_HEADER_TIMEOUT",),
        default=HEADER_TIMEOUT,
        metavar="SECONDS",
        example="5",
    ),
    Setting(
        "idle_timeout",
        _seconds(1, 86400),
        "close a kept-alive visitor connection idle this long",
        ("--idle-timeout",),
        ("RPROXY_IDLE_TIMEOUT",),
        default=IDLE_TIMEOUT,
        metavar="SECONDS",
        example="30",
    ),
    Setting(
        "max_streams_per_tunnel",
        _optional(_count(1, 1 << 20)),
        "requests in flight at once per tunnel, over all its agents; more get 503",
        ("--max-streams-per-tunnel",),
        ("RPROXY_MAX_STREAMS_PER_TUNNEL",),
        metavar="N",
        unset="each agent's own limit",
        example="100",
    ),
    Setting(
        "max_pending_handshakes",
        _count(1, 100_000),
        "agents connecting but not through their handshake at once; more get 503",
        ("--max-pending-handshakes",),
        ("RPROXY_MAX_PENDING_HANDSHAKES",),
        default=MAX_PENDING_HANDSHAKES,
        metavar="N",
        example="32",
    ),
    Setting(
        "max_pending_handshakes_per_source",
        _count(1, 100_000),
        "of those, most from one address (an IPv6 /64 counts as one)",
        ("--max-pending-handshakes-per-source",),
        ("RPROXY_MAX_PENDING_HANDSHAKES_PER_SOURCE",),
        default=MAX_PENDING_HANDSHAKES_PER_SOURCE,
        metavar="N",
        example="4",
    ),
    Setting(
        "max_pending_handshakes_per_credential",
        _count(1, 100_000),
        "of those, most with one agent token or key",
        ("--max-pending-handshakes-per-credential",),
        ("RPROXY_MAX_PENDING_HANDSHAKES_PER_CREDENTIAL",),
        default=MAX_PENDING_HANDSHAKES_PER_CREDENTIAL,
        metavar="N",
        example="4",
    ),
    Setting(
        "max_requests_per_visitor",
        _count(1, 1 << 20),
        "requests in flight at once from one visitor address (an IPv6 /64 counts as one) to one tunnel; more get 429",
        ("--max-requests-per-visitor",),
        ("RPROXY_MAX_REQUESTS_PER_VISITOR",),
        default=MAX_REQUESTS_PER_VISITOR,
        metavar="N",
        example="64",
    ),
    Setting(
        "max_websockets_per_visitor",
        _count(1, 1 << 20),
        "WebSockets open at once from one visitor address (an IPv6 /64 counts as one) to one tunnel; more get 429",
        ("--max-websockets-per-visitor",),
        ("RPROXY_MAX_WEBSOCKETS_PER_VISITOR",),
        default=MAX_WEBSOCKETS_PER_VISITOR,
        metavar="N",
        example="64",
    ),
    Setting(
        "max_websocket_message",
        _byte_size,
        "largest WebSocket message a visitor may send, e.g. 1M; larger closes the socket with 1009",
        ("--max-websocket-message",),
        ("RPROXY_MAX_WEBSOCKET_MESSAGE",),
        default=VISITOR_WEBSOCKET_MESSAGE,
        metavar="SIZE",
        size=True,
        example="4M",
    ),
    Setting(
        "websocket_idle_timeout",
        _seconds(1, 86400),
        "ping a visitor WebSocket silent this long; close it if it does not answer within half that again",
        ("--websocket-idle-timeout",),
        ("RPROXY_WEBSOCKET_IDLE_TIMEOUT",),
        default=WEBSOCKET_IDLE_TIMEOUT,
        metavar="SECONDS",
        example="60",
    ),
    Setting(
        "websocket_message_rate",
        _count(1, 10_000_000),
        "WebSocket messages a visitor may send per second; more closes the socket with 1008",
        ("--websocket-message-rate",),
        ("RPROXY_WEBSOCKET_MESSAGE_RATE",),
        default=WEBSOCKET_MESSAGE_RATE,
        metavar="N",
        example="500",
    ),
    Setting(
        "memory_budget",
        _byte_size,
        "bytes all tunnels together may hold for visitors who do not read; when spent, new requests get 503",
        ("--memory-budget",),
        ("RPROXY_MEMORY_BUDGET",),
        default=DEFAULT_PROCESS_BUDGET,
        metavar="SIZE",
        size=True,
        example="256M",
    ),
    Setting(
        "tunnel_memory_budget",
        _byte_size,
        "the same for each agent's tunnel",
        ("--tunnel-memory-budget",),
        ("RPROXY_TUNNEL_MEMORY_BUDGET",),
        default=DEFAULT_TUNNEL_BUDGET,
        metavar="SIZE",
        size=True,
        example="64M",
    ),
    Setting(
        "authorized_keys",
        _optional(_text("a file name")),
        "agent keys accepted: lines 'ed25519 KEY NAME...' as rproxy keygen prints them, NAME * for any name",
        ("--authorized-keys",),
        ("RPROXY_AUTHORIZED_KEYS",),
        metavar="FILE",
        reloads=True,
        example="/etc/rproxy/authorized_keys",
    ),
    Setting(
        "open_registration",
        _boolean,
        "accept any agent key, serving it under a name derived from the key (needs --domain)",
        ("--open-registration",),
        ("RPROXY_OPEN_REGISTRATION",),
        default=False,
        const=True,
        example="true",
    ),
    Setting(
        "admin_token",
        _optional(_accepted_token),
        "open /_rproxy/metrics (Prometheus) and /_rproxy/status.json to this bearer token, or its sha256: "
        "hash from rproxy hash-token; without it they do not exist",
        ("--admin-token",),
        ("RPROXY_ADMIN_TOKEN",),
        metavar="T",
        secret=True,
        example="admin-s3cret",
    ),
    Setting(
        "tunnels",
        _tunnel_policies,
        "visitor protection per tunnel: allow, auth, rate_limit, failed_logins (docs/BRIDGE.md, Visitor protection)",
        default={},
    ),
    Setting("aliases", _aliases, "more host names, each mapped to TUNNEL or SERVICE.TUNNEL", default={}),
    Setting(
        "tcp_ports",
        vol.All(_port_list, [_TCP_PORT]),
        "extra public TCP ports, each {listen, tunnel, service, allow}",
        default=[],
    ),
    Setting("gateway", _optional(_gateway_section), "a WebSocket-to-POST gateway on one host name (docs/GATEWAY.md)"),
    LOG_LEVEL_SETTING,
)
BRIDGE_SCHEMA = settings_schema(BRIDGE_SETTINGS)


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


#: The credential and TLS settings ``rproxy agent``, ``rproxy tcp`` and ``rproxy status`` share:
#: each declared once, with one action (cli/options.py adds them to each command).
TOKEN_SETTING = Setting(
    "token",
    _optional(_agent_token),
    "agent token the bridge accepts; every user of this machine can read it in ps, so prefer --token-file",
    ("--token",),
    ("RPROXY_TOKEN",),
    metavar="T",
    secret=True,
    example="s3cret-token",
)
TOKEN_FILE_SETTING = Setting(
    "token_file",
    _optional(_text("a file name")),
    "read the agent token from the first line of FILE (keep it mode 600)",
    ("--token-file",),
    ("RPROXY_TOKEN_FILE",),
    metavar="FILE",
    example="/etc/rproxy/agent-token",
)
KEY_SETTING = Setting(
    "key",
    _optional(_text("a file name")),
    "instead of --token: the agent's private key from rproxy keygen; without --name the tunnel is named "
    "after the key, as an --open-registration bridge wants",
    ("--key",),
    ("RPROXY_KEY",),
    metavar="FILE",
    example="/etc/rproxy/agent.key",
)
CA_FILE_SETTING = Setting(
    "ca_file",
    _optional(_text("a file name")),
    "PEM file of the CAs to trust for a wss:// or https:// bridge instead of the system's, e.g. a private CA",
    ("--ca-file",),
    ("RPROXY_CA_FILE",),
    metavar="FILE",
    example="/etc/rproxy/ca.pem",
)
PIN_SHA256_SETTING = Setting(
    "pin_sha256",
    vol.All(_pin_list, [parse_sha256_pin]),
    "accept the wss:// or https:// bridge only with this certificate: its SHA-256 fingerprint (openssl x509 "
    "-noout -fingerprint -sha256), colons optional; enough on its own, e.g. for a self-signed certificate; "
    "repeatable, to rotate certificates (comma-separated in the variable)",
    ("--pin-sha256",),
    ("RPROXY_PIN_SHA256",),
    default=[],
    metavar="HEX",
    many=True,
    example="ab" * 32,
)
INSECURE_SETTING = Setting(
    "insecure",
    _boolean,
    "allow plain ws:// or http:// to a bridge that is not on this machine (a LAN bridge without TLS): the "
    "credential and all traffic travel unencrypted; certificates of a wss:// bridge are still checked",
    ("--insecure",),
    ("RPROXY_INSECURE",),
    default=False,
    const=True,
    example="true",
)

#: ``rproxy agent``'s settings (see ``BRIDGE_SETTINGS``); the defaults are ``AgentConfig``'s.
AGENT_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bridge",
        _url(("ws", "wss", "http", "https")),
        "the bridge, e.g. wss://bridge.example.com",
        ("--bridge",),
        ("RPROXY_BRIDGE", "REMOTE_URL"),
        metavar="URL",
        required="is required (the bridge's URL)",
        example="wss://bridge.example.com",
    ),
    # One of token, token file and key is required (checked by the agent's CLI, which names them).
    TOKEN_SETTING,
    TOKEN_FILE_SETTING,
    KEY_SETTING,
    # Required unless there are services (checked by the agent's CLI, which names both).
    Setting(
        "target",
        _optional(_target),
        "the home app, e.g. http://127.0.0.1:8123, or zeroconf:NAME for an app announced on the LAN",
        ("--target",),
        ("RPROXY_TARGET", "LOCAL_URL"),
        metavar="URL",
        example="http://127.0.0.1:8123",
    ),
    Setting(
        "services",
        vol.All(_service_list, [_service_entry], _unique_names),
        "one more service over the same tunnel (repeatable): a web app (http://..., zeroconf:NAME), visited as "
        "NAME.<tunnel>.<domain>, or a TCP service (tcp://192.168.1.5:22) reached with rproxy tcp; the agent "
        "connects to nothing else (comma-separated in the variable; in a file a list of {name, target} or a "
        "mapping of name to URL)",
        ("--service",),
        ("RPROXY_SERVICES",),
        default=[],
        metavar="NAME=URL",
        many=True,
        example="ssh=tcp://192.168.1.5:22",
    ),
    # No default here: with a key and no name, the agent takes the name derived from the key.
    Setting(
        "name",
        _optional(_tunnel_name),
        "tunnel name, a DNS label",
        ("--name",),
        ("RPROXY_NAME",),
        metavar="NAME",
        unset=f"{DEFAULT_TUNNEL_NAME}, or with --key the key's own name",
        example="cabin",
    ),
    Setting(
        "agent_id",
        _optional(_agent_id),
        "this agent's identity in logs, e.g. mac@home",
        ("--agent-id",),
        ("RPROXY_AGENT_ID", "AGENT_ID"),
        metavar="ID",
        unset="host name",
        example="mac@home",
    ),
    CA_FILE_SETTING,
    PIN_SHA256_SETTING,
    INSECURE_SETTING,
    Setting(
        "visitor_allow",
        vol.All(_networks, lambda networks: [str(n) for n in networks]),
        "ask the bridge to admit visitors only from these addresses (repeatable; the bridge's own tunnels: "
        "config wins; comma-separated in the variable)",
        ("--visitor-allow",),
        ("RPROXY_VISITOR_ALLOW",),
        default=[],
        metavar="CIDR",
        many=True,
        example="192.0.2.0/24",
    ),
    Setting(
        "visitor_auth",
        vol.All(_pin_list, [_visitor_login]),
        "ask the bridge to require HTTP basic auth: a user and the scrypt hash of its password (see "
        "docs/BRIDGE.md, Visitor protection); repeatable",
        ("--visitor-auth",),
        ("RPROXY_VISITOR_AUTH",),
        default=[],
        metavar="USER:HASH",
        many=True,
        example="",  # a hash is made by the test (scrypt): see tests/core/unit/test_settings.py
    ),
    LOG_LEVEL_SETTING,
)
AGENT_SCHEMA = settings_schema(AGENT_SETTINGS)

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
