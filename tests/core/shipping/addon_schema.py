"""What Home Assistant's Supervisor accepts in an add-on repository, as voluptuous schemas.

Written from the add-on developer documentation (developers.home-assistant.io, "Add-on
configuration" and "Create an add-on repository"): the keys of ``config.yaml``,
``build.yaml`` and ``repository.yaml`` with their types and allowed values, the option type
language (``str``, ``int(1,5)``, ``match(REGEX)``, ``list(a|b)``, a trailing ``?``...) and the
translation file. Unknown keys are errors, so a misspelt key fails here instead of being
silently ignored by the Supervisor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import voluptuous as vol

ARCHES = ("armhf", "armv7", "aarch64", "amd64", "i386")
STARTUPS = ("initialize", "system", "services", "application", "once")
BOOTS = ("auto", "manual", "manual_only")
STAGES = ("stable", "experimental", "deprecated")
ROLES = ("default", "homeassistant", "backup", "manager", "admin")
PRIVILEGES = (
    "BPF",
    "CHECKPOINT_RESTORE",
    "DAC_READ_SEARCH",
    "IPC_LOCK",
    "NET_ADMIN",
    "NET_RAW",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
)
MAP_TYPES = (
    "homeassistant_config",
    "addon_config",
    "ssl",
    "addons",
    "backup",
    "share",
    "media",
    "all_addon_configs",
    "data",
)

_SLUG = re.compile(r"^[a-z0-9_]+$")
_PORT_KEY = re.compile(r"^\d{1,5}/(tcp|udp)$", re.IGNORECASE)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def url(value: Any) -> str:
    """A URL with a scheme and a host, like the Supervisor's ``url`` option type."""
    if not isinstance(value, str):
        raise vol.Invalid(f"expected a URL, got {value!r}")
    parsed = urlparse(value)
    if not parsed.scheme or not parsed.netloc:
        raise vol.Invalid(f"expected a URL with a scheme and a host, got {value!r}")
    return value


def email(value: Any) -> str:
    if not isinstance(value, str) or not _EMAIL.match(value):
        raise vol.Invalid(f"expected an e-mail address, got {value!r}")
    return value


def _unique_arches(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise vol.Invalid("an architecture is listed twice")
    return value


_map_entry = vol.Any(
    # Older add-ons write "config:rw"; the documented form is a dict with a type.
    vol.Match(rf"^({'|'.join(MAP_TYPES)}|config)(:(rw|ro))?$"),
    {vol.Required("type"): vol.In(MAP_TYPES), vol.Optional("read_only"): bool, vol.Optional("path"): str},
)

CONFIG_SCHEMA = vol.Schema(
    {
        vol.Required("name"): vol.All(str, vol.Length(min=1)),
        vol.Required("version"): vol.All(str, vol.Length(min=1)),
        vol.Required("slug"): vol.All(str, vol.Match(_SLUG, msg="a slug is lower-case letters, digits and _")),
        vol.Required("description"): vol.All(str, vol.Length(min=1)),
        vol.Required("arch"): vol.All([vol.In(ARCHES)], vol.Length(min=1), _unique_arches),
        vol.Optional("machine"): [str],
        vol.Optional("url"): url,
        vol.Optional("startup"): vol.In(STARTUPS),
        vol.Optional("webui"): str,
        vol.Optional("boot"): vol.In(BOOTS),
        vol.Optional("ports"): {vol.Match(_PORT_KEY): vol.Any(None, vol.All(int, vol.Range(min=1, max=65535)))},
        vol.Optional("ports_description"): {vol.Match(_PORT_KEY): str},
        vol.Optional("host_network"): bool,
        vol.Optional("host_ipc"): bool,
        vol.Optional("host_dbus"): bool,
        vol.Optional("host_pid"): bool,
        vol.Optional("host_uts"): bool,
        vol.Optional("devices"): [str],
        vol.Optional("homeassistant"): str,
        vol.Optional("hassio_role"): vol.In(ROLES),
        vol.Optional("hassio_api"): bool,
        vol.Optional("homeassistant_api"): bool,
        vol.Optional("docker_api"): bool,
        vol.Optional("privileged"): [vol.In(PRIVILEGES)],
        vol.Optional("full_access"): bool,
        vol.Optional("apparmor"): vol.Any(bool, str),
        vol.Optional("map"): [_map_entry],
        vol.Optional("environment"): {str: str},
        vol.Optional("audio"): bool,
        vol.Optional("video"): bool,
        vol.Optional("gpio"): bool,
        vol.Optional("usb"): bool,
        vol.Optional("uart"): bool,
        vol.Optional("udev"): bool,
        vol.Optional("devicetree"): bool,
        vol.Optional("kernel_modules"): bool,
        vol.Optional("stdin"): bool,
        vol.Optional("legacy"): bool,
        vol.Optional("options"): dict,
        vol.Optional("schema"): vol.Any(False, dict),
        vol.Optional("image"): str,
        vol.Optional("codenotary"): email,
        vol.Optional("timeout"): vol.All(int, vol.Range(min=1)),
        vol.Optional("tmpfs"): bool,
        vol.Optional("discovery"): [str],
        vol.Optional("services"): [vol.Match(r"^[a-z_]+:(provide|want|need)$")],
        vol.Optional("auth_api"): bool,
        vol.Optional("ingress"): bool,
        vol.Optional("ingress_port"): vol.All(int, vol.Range(min=0, max=65535)),
        vol.Optional("ingress_entry"): str,
        vol.Optional("ingress_stream"): bool,
        vol.Optional("panel_icon"): str,
        vol.Optional("panel_title"): str,
        vol.Optional("panel_admin"): bool,
        vol.Optional("backup"): vol.In(("hot", "cold")),
        vol.Optional("backup_pre"): str,
        vol.Optional("backup_post"): str,
        vol.Optional("backup_exclude"): [str],
        vol.Optional("advanced"): bool,
        vol.Optional("stage"): vol.In(STAGES),
        vol.Optional("init"): bool,
        vol.Optional("watchdog"): str,
        vol.Optional("realtime"): bool,
        vol.Optional("journald"): bool,
        vol.Optional("breaking_versions"): [str],
        vol.Optional("ulimits"): {str: vol.Any(int, {vol.Required("soft"): int, vol.Required("hard"): int})},
    }
)

BUILD_SCHEMA = vol.Schema(
    {
        vol.Optional("build_from"): {vol.In(ARCHES): vol.All(str, vol.Length(min=1))},
        vol.Optional("args"): {str: str},
        vol.Optional("labels"): {str: str},
        vol.Optional("codenotary"): {vol.Optional("signer"): email, vol.Optional("base_image"): email},
    }
)

REPOSITORY_SCHEMA = vol.Schema(
    {
        vol.Required("name"): vol.All(str, vol.Length(min=1)),
        vol.Optional("url"): url,
        vol.Optional("maintainer"): str,
    }
)

_text = vol.All(str, vol.Length(min=1))
_translated = {vol.Required("name"): _text, vol.Required("description"): _text}
TRANSLATION_SCHEMA = vol.Schema(
    {
        vol.Optional("configuration"): {
            str: {**_translated, vol.Optional("fields"): {str: _translated}},
        },
        vol.Optional("network"): {vol.Match(_PORT_KEY): str},
    }
)


# The option type language.


@dataclass(frozen=True)
class OptionType:
    """One parsed type string such as ``int(1,10)?``."""

    text: str
    validator: Callable[[Any], Any]
    optional: bool


def _bounds(arguments: str, convert: Callable[[str], float]) -> tuple[float | None, float | None]:
    low, _, high = arguments.partition(",")
    return (convert(low) if low.strip() else None, convert(high) if high.strip() else None)


def _number(kind: type, arguments: str | None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # bool is an int in Python, but `true` is not a number to the user.
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise vol.Invalid(f"expected {kind.__name__}, got {value!r}")
        return value

    if arguments is None:
        return check
    low, high = _bounds(arguments, kind)
    return vol.All(check, vol.Range(min=low, max=high))


def _string(arguments: str | None) -> Callable[[Any], Any]:
    if arguments is None:
        return vol.All(str)
    low, high = _bounds(arguments, int)
    return vol.All(str, vol.Length(min=low, max=high))


def _choices(arguments: str) -> Callable[[Any], Any]:
    choices = arguments.split("|")
    if not all(choices):
        raise ValueError(f"empty choice in list({arguments})")
    return vol.In(choices)


def _match(arguments: str) -> Callable[[Any], Any]:
    pattern = re.compile(arguments)

    def check(value: Any) -> str:
        # The whole value must match, as a user reads "match(...)".
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise vol.Invalid(f"{value!r} does not match {arguments}")
        return value

    return check


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise vol.Invalid(f"expected a port 1-65535, got {value!r}")
    return value


def _device(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/dev/"):
        raise vol.Invalid(f"expected a device path under /dev, got {value!r}")
    return value


_TYPE = re.compile(r"^(?P<name>[a-z]+)(?:\((?P<arguments>.*)\))?(?P<optional>\?)?$", re.DOTALL)
_PLAIN: dict[str, Callable[[Any], Any]] = {
    "bool": bool,
    "email": email,
    "url": url,
    "password": vol.All(str),
    "port": _port,
    "device": _device,
}


def parse_type(text: str) -> OptionType:
    """Parse one type string of an add-on ``schema``; ValueError if it is not in the language."""
    found = _TYPE.match(text) if isinstance(text, str) else None
    if not found:
        raise ValueError(f"not an option type: {text!r}")
    name, arguments, optional = found["name"], found["arguments"], bool(found["optional"])
    validator: Callable[[Any], Any]
    if name in ("int", "float"):
        validator = _number(int if name == "int" else float, arguments)
    elif name == "str":
        validator = _string(arguments)
    elif name == "list" and arguments:
        validator = _choices(arguments)
    elif name == "match" and arguments:
        validator = _match(arguments)
    elif name == "device":
        validator = _device
    elif name in _PLAIN and arguments is None:
        validator = _PLAIN[name]
    else:
        raise ValueError(f"not an option type: {text!r}")
    return OptionType(text, validator, optional)


def _entry_validator(entry: Any, depth: int) -> Callable[[Any], Any]:
    """The validator of one schema entry: a type string, a one-item list, or a dict."""
    if isinstance(entry, str):
        return parse_type(entry).validator
    if depth >= 2:
        raise ValueError("options nest at most two levels deep")
    if isinstance(entry, list):
        if len(entry) != 1:
            raise ValueError("a list in the schema holds exactly one item type")
        return [_entry_validator(entry[0], depth + 1)]
    if isinstance(entry, dict):
        return vol.Schema(_fields(entry, depth + 1))
    raise ValueError(f"not an option schema: {entry!r}")


def _fields(schema: Mapping[str, Any], depth: int) -> dict[Any, Any]:
    fields: dict[Any, Any] = {}
    for key, entry in schema.items():
        optional = isinstance(entry, str) and parse_type(entry).optional
        marker = vol.Optional(key) if optional else vol.Required(key)
        fields[marker] = _entry_validator(entry, depth)
    return fields


def options_schema(schema: Mapping[str, Any]) -> vol.Schema:
    """What the Supervisor lets into ``/data/options.json`` for this add-on ``schema``."""
    return vol.Schema(_fields(schema, 0))


def _is_optional(entry: Any) -> bool:
    return isinstance(entry, str) and parse_type(entry).optional


def option_problems(options: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Disagreements between ``options`` (the defaults) and ``schema`` in one config.yaml.

    Our rule, stricter than the Supervisor's: every required option is listed in ``options``
    (``null`` when the user must fill it in), so the UI shows every field. Optional (``?``)
    entries must have no default: the documentation says a default makes them required.
    """
    problems: list[str] = []
    try:
        validators = {key: _entry_validator(entry, 0) for key, entry in schema.items()}
    except (ValueError, re.error) as err:
        return [f"schema: {err}"]
    for key in options:
        if key not in schema:
            problems.append(f"options.{key}: not in the schema")
    for key, entry in schema.items():
        if _is_optional(entry):
            if key in options:
                problems.append(f"schema.{key}: optional ('?') but has a default in options")
            continue
        if key not in options:
            problems.append(f"schema.{key}: required but missing from options")
            continue
        if options[key] is None:
            continue
        try:
            vol.Schema(validators[key])(options[key])
        except vol.Invalid as err:
            problems.append(f"options.{key}: {err}")
    return problems


def translation_problems(translations: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Options without a name and description, and translations of options that do not exist."""
    try:
        TRANSLATION_SCHEMA(dict(translations))
    except vol.Invalid as err:
        return [f"translations: {err}"]
    configuration = translations.get("configuration", {})
    problems = [f"translation of {key!r}: no such option" for key in configuration if key not in schema]
    for key, entry in schema.items():
        if key not in configuration:
            problems.append(f"option {key!r}: no name and description")
            continue
        nested = entry[0] if isinstance(entry, list) else entry
        if not isinstance(nested, dict):
            continue
        fields = configuration[key].get("fields", {})
        problems += [f"option {key}.{name}: no name and description" for name in nested if name not in fields]
        problems += [f"translation of {key}.{name}: no such field" for name in fields if name not in nested]
    return problems


def build_problems(config: Mapping[str, Any], build: Mapping[str, Any]) -> list[str]:
    """Architectures the add-on claims without a base image to build it from."""
    images = build.get("build_from", {})
    return [f"arch {arch!r}: no base image in build.yaml" for arch in config["arch"] if arch not in images]
