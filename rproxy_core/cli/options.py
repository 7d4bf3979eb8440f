"""Command-line flags, ``--help`` and the docs' option tables, made from the settings tables.

A setting is written once, as a ``config.Setting`` in ``BRIDGE_SETTINGS`` or
``AGENT_SETTINGS``; this module turns those records into argparse arguments and into the
tables of docs/CONFIGURATION.md. After changing a setting, regenerate the docs with::

    python -m rproxy_core.cli.options docs/CONFIGURATION.md

(``--check`` instead of writing: exit 1 when the file is out of date).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import AGENT_SETTINGS, BRIDGE_SETTINGS, Setting

__all__ = ["add_arguments", "default_text", "flag_values", "render_docs", "settings_table"]


def _size_text(value: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)


def default_text(setting: Setting) -> str:
    """The default as a person writes it (``10``, ``1M``, ``true``), or what unset means."""
    value = setting.default
    if value is None:
        return setting.unset or "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if setting.size and isinstance(value, int):
        return _size_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)) and not value:
        return "none"
    return str(value)


def _help(setting: Setting, *, with_env: bool) -> str:
    notes = []
    if setting.default not in (None, [], {}) or setting.unset:
        notes.append(f"default {default_text(setting)}")
    if with_env and setting.env:
        notes.append(", ".join(f"${name}" for name in setting.env))
    text = setting.help + (f" ({'; '.join(notes)})" if notes else "")
    return text.replace("%", "%%")  # argparse formats help with %


def add_arguments(parser: Any, settings: Sequence[Setting], *, with_env: bool = True) -> None:
    """Add each setting's flag to ``parser`` (or an argument group); ``with_env``: --help names
    the variables (a command that does not read them passes False).

    Every flag stores None when absent, so that a variable or the file can still set it.
    """
    for setting in settings:
        if not setting.flags or setting.root:
            continue
        kwargs: dict[str, Any] = {"dest": setting.key, "help": _help(setting, with_env=with_env)}
        if setting.const is not None:
            kwargs.update(action="store_const", const=setting.const)
        else:
            kwargs.update(action="append" if setting.many else "store", metavar=setting.metavar or "VALUE")
        parser.add_argument(*setting.flags, **kwargs)


def flag_values(args: argparse.Namespace, settings: Sequence[Setting]) -> dict[str, Any]:
    """Settings key → what its flag gave (None: not given)."""
    return {setting.key: getattr(args, setting.key, None) for setting in settings if setting.flags}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table(settings: Sequence[Setting]) -> str:
    """A Markdown table of ``settings``: key, flag, variables, default, meaning."""
    rows = ["| key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for setting in settings:
        flag = ", ".join(f"`{flag}`" for flag in setting.flags) or "(file only)"
        if setting.root:
            flag += " (before the command)"
        env = ", ".join(f"`{name}`" for name in setting.env) or "—"
        meaning = setting.help[:1].upper() + setting.help[1:] + "."
        if setting.secret:
            meaning += " A secret: prefer the variable or the file to the flag, which `ps` shows."
        if setting.reloads:
            meaning += " SIGHUP applies a change."
        rows.append(f"| `{setting.key}` | {flag} | {env} | {_cell(default_text(setting))} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


#: The tables in docs/CONFIGURATION.md, each between its two markers.
_TABLES = {"bridge": BRIDGE_SETTINGS, "agent": AGENT_SETTINGS}


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- settings:{name} (made by python -m rproxy_core.cli.options; edit config.py instead) -->\n",
        f"<!-- end settings:{name} -->\n",
    )


def render_docs(text: str) -> str:
    """``text`` with every generated table replaced by what the settings tables make now.

    Raises:
        ValueError: a table's markers are missing.
    """
    for name, settings in _TABLES.items():
        begin, end = _markers(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"no {begin.strip()} ... {end.strip()} in the file")
        text = text[: start + len(begin)] + settings_table(settings) + text[stop:]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rproxy_core.cli.options", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the Markdown file with the tables (docs/CONFIGURATION.md)")
    parser.add_argument("--check", action="store_true", help="do not write: exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = args.file.read_text(encoding="utf-8")
    fresh = render_docs(text)
    if args.check:
        if fresh != text:
            print(f"{args.file}: out of date; run python -m rproxy_core.cli.options {args.file}", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        args.file.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
