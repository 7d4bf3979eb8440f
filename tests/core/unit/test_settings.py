"""Every setting comes from one table (config.BRIDGE_SETTINGS / AGENT_SETTINGS): each one is
reachable by its flag, its variable and its config-file key with the same result, the embedded
Bridge/Agent defaults are the CLI's, and docs/CONFIGURATION.md is what the tables make."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rproxy_core.agent import AgentConfig
from rproxy_core.bridge import BridgeConfig
from rproxy_core.cli import _build_parser
from rproxy_core.cli.agent import agent_config
from rproxy_core.cli.bridge import bridge_config
from rproxy_core.cli.options import flag_values, render_docs
from rproxy_core.config import (
    AGENT_SETTINGS,
    BRIDGE_SETTINGS,
    Setting,
    TokenGrant,
    env_names,
    flag_names,
    key_aliases,
    load_file,
    merge,
    settings_schema,
    validate,
)

ROOT = Path(__file__).resolve().parents[3]
#: What the command needs besides the setting under test (a required bridge URL).
_BASE = {"bridge": [], "agent": ["--bridge", "wss://bridge.example.com"]}
_TABLES = {"bridge": BRIDGE_SETTINGS, "agent": AGENT_SETTINGS}


def _cases() -> list[tuple[str, Setting]]:
    return [
        (command, setting)
        for command, settings in _TABLES.items()
        for setting in settings
        if setting.flags and setting.example and not (command == "agent" and setting.key == "bridge")
    ]


def _settings(command: str, argv: list[str], environ: dict[str, str], file: Path | None) -> dict[str, object]:
    """The validated settings, as the command makes them: its real parser, merge and schema."""
    table = _TABLES[command]
    root = [a for a in argv if a.startswith("--log-level")]
    args = _build_parser().parse_args([*root, command, *_BASE[command], *[a for a in argv if a not in root]])
    path = str(file) if file else None
    values, origin = merge(
        flag_values(args, table),
        env_names(table),
        load_file(path, aliases=key_aliases(table)),
        environ,
        file=path,
        flag_names=flag_names(table),
    )
    return validate(settings_schema(table), values, origin, flag_names(table))


@pytest.mark.parametrize(("command", "setting"), _cases(), ids=lambda v: v if isinstance(v, str) else v.key)
def test_every_setting_is_reachable_by_flag_variable_and_file(command: str, setting: Setting, tmp_path: Path) -> None:
    default = _settings(command, [], {}, None).get(setting.key)
    file = tmp_path / "settings.yaml"
    file.write_text(yaml.safe_dump({setting.key: setting.example}))
    from_file = _settings(command, [], {}, file)[setting.key]
    assert from_file != default, f"{setting.key}: the example {setting.example!r} is the default"
    argv = [setting.flags[0]] if setting.const is not None else [f"{setting.flags[0]}={setting.example}"]
    if setting.const is not None:
        assert setting.const == from_file, f"{setting.key}: the flag sets {setting.const!r}, not the example"
    assert _settings(command, argv, {}, None)[setting.key] == from_file
    for name in setting.env:
        assert _settings(command, [], {name: setting.example}, None)[setting.key] == from_file, name


def test_every_table_entry_with_a_flag_has_an_example() -> None:
    missing = [s.key for _, s in _cases()]
    every = [s.key for table in _TABLES.values() for s in table if s.flags]
    # The bridge URL is the agent's required base; visitor_auth needs a scrypt hash (its own tests).
    assert sorted(set(every) - set(missing)) == ["bridge", "visitor_auth"]


def test_the_embedded_bridge_defaults_are_the_cli_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _build_parser().parse_args(["bridge", "--token", "s3cret"])
    assert bridge_config(args, {}) == BridgeConfig(tokens=[TokenGrant("s3cret")])


def test_the_embedded_agent_defaults_are_the_cli_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.env
    bridge, target = "wss://bridge.example.com", "http://127.0.0.1:8123"
    args = _build_parser().parse_args(["agent", "--bridge", bridge, "--token", "s3cret", "--target", target])
    assert agent_config(args, {}) == AgentConfig(bridge=bridge, token="s3cret", target=target)


def test_the_docs_tables_are_what_the_settings_tables_make() -> None:
    path = ROOT / "docs" / "CONFIGURATION.md"
    text = path.read_text(encoding="utf-8")
    assert render_docs(text) == text, "run: python -m rproxy_core.cli.options docs/CONFIGURATION.md"


def test_one_rule_for_agent_ids_and_targets() -> None:
    """The schema and AgentConfig.validate refuse with the same words."""
    from rproxy_core.exceptions import ConfigError

    bridge = "wss://bridge.example.com"
    with pytest.raises(ConfigError) as from_cli:
        validate(settings_schema(AGENT_SETTINGS), {"bridge": bridge, "agent_id": "x" * 129}, {})
    config = AgentConfig(bridge=bridge, token="t", target="http://127.0.0.1:1", agent_id="x" * 129)
    with pytest.raises(ConfigError) as embedded:
        config.validate()
    assert str(from_cli.value).split(": ", 1)[1] == str(embedded.value).split(": ", 1)[1]
    with pytest.raises(ConfigError) as from_cli:
        validate(settings_schema(AGENT_SETTINGS), {"bridge": bridge, "target": "http://h/?q=1"}, {})
    with pytest.raises(ConfigError) as embedded:
        AgentConfig(bridge=bridge, token="t", target="http://h/?q=1").validate()
    assert str(from_cli.value).split(": ", 1)[1] == str(embedded.value).split(": ", 1)[1]
