"""Settings from flags, environment and a file: which wins, and how a bad one is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rproxy_core.config import AGENT_SCHEMA, load_file, merge, validate
from rproxy_core.exceptions import ConfigError

ENV = {"bridge": ("RPROXY_BRIDGE", "BRIDGE_URL"), "name": ("RPROXY_NAME",)}
BRIDGE = "wss://bridge.test"

# (flags, environment, file values, expected values, expected origins)
MERGES = [
    pytest.param({}, {}, {}, {}, {}, id="nothing"),
    pytest.param({"bridge": None, "services": []}, {}, {}, {}, {}, id="unset-flags-ignored"),
    pytest.param({}, {}, {"bridge": "f"}, {"bridge": "f"}, {"bridge": "bridge"}, id="file-only"),
    pytest.param(
        {}, {"RPROXY_BRIDGE": "e"}, {"bridge": "f"}, {"bridge": "e"}, {"bridge": "$RPROXY_BRIDGE"}, id="env-over-file"
    ),
    pytest.param(
        {"bridge": "x"},
        {"RPROXY_BRIDGE": "e"},
        {"bridge": "f"},
        {"bridge": "x"},
        {"bridge": "--bridge"},
        id="flag-over-env",
    ),
    pytest.param(
        {}, {"BRIDGE_URL": "second"}, {}, {"bridge": "second"}, {"bridge": "$BRIDGE_URL"}, id="second-env-name"
    ),
    pytest.param(
        {},
        {"RPROXY_BRIDGE": "first", "BRIDGE_URL": "second"},
        {},
        {"bridge": "first"},
        {"bridge": "$RPROXY_BRIDGE"},
        id="first-env-name-wins",
    ),
    pytest.param(
        {}, {"RPROXY_BRIDGE": "", "BRIDGE_URL": "b"}, {}, {"bridge": "b"}, {"bridge": "$BRIDGE_URL"}, id="empty-env"
    ),
    pytest.param(
        {"insecure": False, "agent_id": "a"},
        {},
        {"name": "n"},
        {"insecure": False, "agent_id": "a", "name": "n"},
        {"insecure": "--insecure", "agent_id": "--agent-id", "name": "name"},
        id="false-is-set-and-dashes",
    ),
]


@pytest.mark.parametrize(("flags", "environ", "file", "values", "origin"), MERGES)
def test_flags_beat_the_environment_which_beats_the_file(
    flags: dict[str, Any], environ: dict[str, str], file: dict[str, Any], values: dict[str, Any], origin: dict[str, str]
) -> None:
    """merge takes each key from its strongest source and says which one that was."""
    assert merge(flags, ENV, file, environ) == (values, origin)


def test_origins_name_the_file_and_the_keys_as_written(tmp_path: Path) -> None:
    """With a file: ``FILE: key`` as the user wrote the key (dashes kept), and the file itself under ``<file>``."""
    path = tmp_path / "agent.yaml"
    path.write_text("pin-sha256: x\nbridge: wss://b.test\n")
    values, origin = merge({"name": "n"}, ENV, load_file(str(path)), {}, file=str(path), flag_names={"name": "-n"})
    assert values == {"pin_sha256": "x", "bridge": "wss://b.test", "name": "n"}
    assert origin == {
        "pin_sha256": f"{path}: pin-sha256",
        "bridge": f"{path}: bridge",
        "name": "-n",
        "<file>": str(path),
    }


# (values, origin, the message)
INVALID = [
    pytest.param({}, {}, "--bridge: is required (the bridge's URL)", id="missing-flag-named"),
    pytest.param({"bridge": BRIDGE, "colour": 1}, {}, "--colour: unknown key", id="unknown"),
    pytest.param(
        {"bridge": BRIDGE, "colour": 1},
        {"<file>": "a.yaml"},
        "a.yaml: colour: unknown key",
        id="unknown-in-file",
    ),
    pytest.param(
        {"bridge": BRIDGE, "name": "Not A Label"},
        {"name": "$RPROXY_NAME"},
        "$RPROXY_NAME: ",
        id="bad-env",
    ),
    pytest.param(
        {"bridge": BRIDGE, "name": "Not A Label"},
        {"name": "a.yaml: name", "<file>": "a.yaml"},
        "a.yaml: name: ",
        id="bad-in-file",
    ),
    pytest.param(
        {
            "bridge": BRIDGE,
            "services": [{"name": "ssh", "target": "tcp://h:22"}, {"name": "ssh", "target": "tcp://h:23"}],
        },
        {"services": "a.yaml: services", "<file>": "a.yaml"},
        "a.yaml: services[1].name: 'ssh' is named twice",
        id="nested-path-in-file",
    ),
    pytest.param({"bridge": "ftp://x"}, {"bridge": "--bridge"}, "--bridge: ", id="bad-flag"),
]


@pytest.mark.parametrize(("values", "origin", "message"), INVALID)
def test_the_first_bad_setting_is_named_where_it_was_set(
    values: dict[str, Any], origin: dict[str, str], message: str
) -> None:
    """One line: the flag, variable or ``FILE: key[i].field`` of the first failure, then what is wrong."""
    with pytest.raises(ConfigError) as caught:
        validate(AGENT_SCHEMA, values, origin)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_valid_settings_come_back_with_the_schemas_defaults() -> None:
    result = validate(AGENT_SCHEMA, {"bridge": BRIDGE, "insecure": "true"}, {})
    assert result["bridge"] == BRIDGE
    assert (result["insecure"], result["services"], result["pin_sha256"]) == (True, [], [])
