"""The Home Assistant add-on in addon/: what the Supervisor reads, the image's lints, and the start path.

The static files are checked against schemas written from the add-on documentation
(addon_schema.py); every checker is also shown a broken sample so a check that cannot fail
does not pass for one that works. The start script runs for real, outside a container, against
a real bridge and real home apps: the same code path the add-on's container runs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
import voluptuous as vol
import yaml

from tests.conftest import ROOT, TOKEN, running_bridge, text_app, wait_for_tunnel
from tests.core.shipping.addon_schema import (
    BUILD_SCHEMA,
    CONFIG_SCHEMA,
    REPOSITORY_SCHEMA,
    build_problems,
    option_problems,
    options_schema,
    parse_type,
    translation_problems,
)

ADDON = ROOT / "addon"
START_SCRIPT = ADDON / "run.sh"
VENV_BIN = Path(sys.executable).parent
DOMAIN = "example.test"
#: Settings a developer's shell may carry; the add-on's container has none of them.
OUTSIDE_SETTINGS = ("PORT", "REMOTE_URL", "LOCAL_URL", "AGENT_ID")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_yaml(ADDON / "config.yaml")


@pytest.fixture(scope="module")
def build() -> dict[str, Any]:
    return load_yaml(ADDON / "build.yaml")


@pytest.fixture(scope="module")
def translations() -> dict[str, Any]:
    return load_yaml(ADDON / "translations" / "en.yaml")


# What the Supervisor reads.


def test_repository_yaml_is_valid() -> None:
    """repository.yaml at the root makes the repository an add-on repository, pointing at the project."""
    repository = REPOSITORY_SCHEMA(load_yaml(ROOT / "repository.yaml"))
    assert repository["url"] == "https://github.com/rproxy-dev/rproxy"
    assert repository["maintainer"]


def test_config_yaml_is_valid_and_its_defaults_fit_its_schema(config: dict[str, Any]) -> None:
    """config.yaml has only documented keys with valid values; every default satisfies its type."""
    CONFIG_SCHEMA(config)
    assert config["slug"] == "rproxy"
    assert sorted(config["arch"]) == ["aarch64", "amd64", "armv7"]
    assert option_problems(config["options"], config["schema"]) == []
    assert set(config["schema"]) == {"bridge", "token", "name", "target", "services", "log_level", "insecure"}
    assert config["schema"]["token"] == "password"  # masked in the UI
    assert config["options"]["target"] == "http://homeassistant:8123"


def test_the_add_on_asks_for_no_access_it_does_not_use(config: dict[str, Any]) -> None:
    """The agent talks only to the bridge and its targets: no Supervisor or Home Assistant API, no host network."""
    for key in ("hassio_api", "homeassistant_api", "docker_api", "host_network", "full_access", "privileged"):
        assert key not in config, key


def test_build_yaml_is_valid_and_has_a_base_image_per_arch(config: dict[str, Any], build: dict[str, Any]) -> None:
    """build.yaml names a Home Assistant Python base image for every architecture config.yaml claims."""
    BUILD_SCHEMA(build)
    assert build_problems(config, build) == []
    for arch, image in build["build_from"].items():
        assert image.startswith(f"ghcr.io/home-assistant/{arch}-base-python:"), image


def test_versions_agree(config: dict[str, Any], build: dict[str, Any]) -> None:
    """config.yaml's version, the rproxy-core it installs (build.yaml) and pyproject.toml's version are one."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert config["version"] == project["version"] == build["args"]["RPROXY_VERSION"]
    dockerfile = (ADDON / "Dockerfile").read_text()
    assert '"rproxy-core[speed]==${RPROXY_VERSION}"' in dockerfile


def test_the_image_is_the_one_the_release_workflow_pushes(config: dict[str, Any]) -> None:
    """The Supervisor pulls config.yaml's image at the add-on's version; the release builds exactly that name."""
    workflow = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    pushed = re.search(r"--image (\S+)", workflow)
    registry = re.search(r"--docker-hub ghcr\.io/\$\{\{ github\.repository_owner \}\}", workflow)
    assert pushed and registry, "release.yml no longer says which image it pushes"
    owner = load_yaml(ROOT / "repository.yaml")["url"].rsplit("/", 2)[1]
    assert config["image"] == f"ghcr.io/{owner}/{pushed[1]}"


def test_every_option_has_a_name_and_description(config: dict[str, Any], translations: dict[str, Any]) -> None:
    """translations/en.yaml names and describes every option and nested service field, and nothing else."""
    assert translation_problems(translations, config["schema"]) == []
    assert set(translations["configuration"]["services"]["fields"]) == {"name", "target"}


# The checkers fail on broken samples.


def _broken(sample: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``sample`` with the key at ``path`` set to ``value`` (or removed, for ...)."""
    broken = copy.deepcopy(sample)
    where = broken
    for key in path[:-1]:
        where = where[key]
    if value is ...:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return broken


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("arch",), ["amd64", "x86"]),
        (("arch",), []),
        (("startup",), "later"),
        (("boot",), "always"),
        (("slug",), "R Proxy"),
        (("version",), 1),
        (("init",), "no"),
        (("hassio_api_access",), True),
        (("url",), "github.com/rproxy-dev"),
        (("name",), ...),
    ],
    ids=[
        "unknown-arch",
        "no-arch",
        "startup",
        "boot",
        "slug",
        "version-number",
        "init",
        "unknown-key",
        "url",
        "no-name",
    ],
)
def test_the_config_schema_rejects_a_broken_config(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    with pytest.raises(vol.Invalid):
        CONFIG_SCHEMA(_broken(config, path, value))


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("options", "colour"), "blue", "options.colour: not in the schema"),
        (("options", "name"), ..., "schema.name: required but missing from options"),
        (("options", "log_level"), "verbose", "options.log_level"),
        (("options", "name"), "My Home", "options.name"),
        (("options", "target"), "homeassistant:8123", "options.target"),
        (("options", "services"), [{"name": "cam"}], "options.services"),
        (("schema", "name"), "strr", "schema: not an option type: 'strr'"),
        (("schema", "log_level"), "list()", "schema: not an option type"),
        (("schema", "extra"), "str?", None),
        (("schema", "target"), "url?", "schema.target: optional ('?') but has a default in options"),
        (("schema", "services"), [[{"name": "str"}]], "schema: options nest at most two levels deep"),
    ],
    ids=[
        "option-without-schema",
        "schema-without-option",
        "bad-choice",
        "bad-match",
        "bad-url",
        "missing-nested-field",
        "unknown-type",
        "empty-list-type",
        "optional-entry-is-fine",
        "optional-with-default",
        "too-deep",
    ],
)
def test_option_problems_are_found(
    config: dict[str, Any], path: tuple[str, ...], value: Any, problem: str | None
) -> None:
    """Each mismatch between options and schema is reported; an optional-only schema entry is not one."""
    broken = _broken(config, path, value)
    problems = option_problems(broken["options"], broken["schema"])
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("configuration", "token"), ..., "option 'token': no name and description"),
        (
            ("configuration", "colour"),
            {"name": "Colour", "description": "Paint"},
            "translation of 'colour': no such option",
        ),
        (("configuration", "services", "fields", "target"), ..., "option services.target: no name and description"),
        (
            ("configuration", "services", "fields", "port"),
            {"name": "P", "description": "Port"},
            "translation of services.port: no such field",
        ),
        (("configuration", "name", "description"), ..., "translations:"),
    ],
    ids=["missing-option", "unknown-option", "missing-field", "unknown-field", "no-description"],
)
def test_translation_problems_are_found(
    config: dict[str, Any], translations: dict[str, Any], path: tuple[str, ...], value: Any, problem: str
) -> None:
    problems = translation_problems(_broken(translations, path, value), config["schema"])
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_build_and_repository_checks_fail_on_broken_samples(config: dict[str, Any], build: dict[str, Any]) -> None:
    assert build_problems(config, _broken(build, ("build_from", "armv7"), ...)) == [
        "arch 'armv7': no base image in build.yaml"
    ]
    with pytest.raises(vol.Invalid):
        BUILD_SCHEMA(_broken(build, ("build_from", "riscv"), "ghcr.io/x/riscv-base:1"))
    with pytest.raises(vol.Invalid):
        BUILD_SCHEMA(_broken(build, ("args", "RPROXY_VERSION"), 0.1))
    with pytest.raises(vol.Invalid):
        REPOSITORY_SCHEMA({"url": "https://github.com/rproxy-dev/rproxy"})


@pytest.mark.parametrize(
    ("type_text", "good", "bad"),
    [
        ("str", ["", "x"], [1, None]),
        ("str(2,4)", ["ab", "abcd"], ["a", "abcde"]),
        ("str(3,)", ["abc"], ["ab"]),
        ("bool", [True, False], ["true", 0]),
        ("int", [0, -5], [1.5, "1", True]),
        ("int(1,10)", [1, 10], [0, 11]),
        ("float(,1.5)", [1, 1.5, -2.0], [1.6, "1"]),
        ("email", ["me@example.com"], ["me@", "example.com"]),
        ("url", ["http://homeassistant:8123", "wss://bridge.example.com"], ["homeassistant:8123", "/path", 5]),
        ("password", ["s3cret"], [123]),
        ("port", [1, 65535], [0, 65536, "80"]),
        ("match(^[a-z]+$)", ["home"], ["Home", "home1"]),
        ("list(debug|info)", ["debug", "info"], ["warning", "Info"]),
        ("device(subsystem=tty)", ["/dev/ttyUSB0"], ["ttyUSB0"]),
        ("str?", ["x"], [3]),
    ],
)
def test_the_option_type_language(type_text: str, good: list[Any], bad: list[Any]) -> None:
    """Each documented type accepts what it should and refuses the rest."""
    option_type = parse_type(type_text)
    assert option_type.optional == type_text.endswith("?")
    for value in good:
        option_type.validator(value)
    for value in bad:
        with pytest.raises(vol.Invalid):
            vol.Schema(option_type.validator)(value)


@pytest.mark.parametrize("type_text", ["string", "int(", "list", "match()", "url(https)", "port?x", ""])
def test_a_type_outside_the_language_is_refused(type_text: str) -> None:
    with pytest.raises(ValueError):
        parse_type(type_text)


# Pictures for the store.


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def test_icon_is_square_and_logo_is_wide() -> None:
    """icon.png is 128x128; logo.png is wider than tall (the store shows it at about 250x100)."""
    assert png_size((ADDON / "icon.png").read_bytes()) == (128, 128)
    width, height = png_size((ADDON / "logo.png").read_bytes())
    assert width > height
    assert 200 <= width <= 500 and 2 <= width / height <= 3


def test_the_pictures_are_drawn_from_well_formed_svg_of_the_same_size() -> None:
    """The SVG sources parse as XML (Chromium renders an error page instead of a broken one) at the PNGs' sizes."""
    for name in ("icon", "logo"):
        svg = ElementTree.parse(ADDON / f"{name}.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
        assert (int(svg.attrib["width"]), int(svg.attrib["height"])) == png_size((ADDON / f"{name}.png").read_bytes())
    with pytest.raises(ElementTree.ParseError):
        ElementTree.fromstring("<svg><!-- chromium --headless --></svg>")


def test_png_size_refuses_what_is_not_a_png() -> None:
    with pytest.raises(ValueError):
        png_size((ADDON / "icon.svg").read_bytes())
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 300, 100)
    assert png_size(header) == (300, 100)


# Lints of the image and the start script.


def lint(tool: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / tool), str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile_and_flags_a_broken_one(tmp_path: Path) -> None:
    """No hadolint finding at any level in addon/Dockerfile; an unpinned install is flagged."""
    result = lint("hadolint", ADDON / "Dockerfile")
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        (ADDON / "Dockerfile").read_text().replace('"rproxy-core[speed]==${RPROXY_VERSION}"', "rproxy-core")
    )
    result = lint("hadolint", broken)
    assert result.returncode != 0 and "DL3013" in result.stdout, result.stdout


def test_shellcheck_passes_the_start_script_and_flags_a_broken_one(tmp_path: Path) -> None:
    result = lint("shellcheck", START_SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "run.sh"
    broken.write_text(START_SCRIPT.read_text().replace('"$options_file"', "$options_file"))
    result = lint("shellcheck", broken)
    assert result.returncode != 0 and "SC2086" in result.stdout, result.stdout


def test_the_image_runs_the_start_script_without_s6(config: dict[str, Any]) -> None:
    """The script the Dockerfile copies is the command; the s6 entrypoint is cleared, so Docker's init is PID 1."""
    lines = [line.strip() for line in (ADDON / "Dockerfile").read_text().splitlines()]
    assert "COPY run.sh /usr/bin/rproxy-addon" in lines
    assert 'CMD ["/usr/bin/rproxy-addon"]' in lines
    assert "ENTRYPOINT []" in lines
    assert config["init"] is True
    assert START_SCRIPT.stat().st_mode & 0o111, "run.sh must be executable"
    assert START_SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")


# The start path, as the container runs it.


def addon_env(options_file: Path) -> dict[str, str]:
    """The container's view: no rproxy settings in the environment, rproxy on PATH, the options file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPROXY_") and k not in OUTSIDE_SETTINGS}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RPROXY_ADDON_OPTIONS"] = str(options_file)
    return env


def write_options(path: Path, config: dict[str, Any], **values: Any) -> Path:
    """An options.json as the Supervisor writes it: every key of the schema, checked against it."""
    options = {**config["options"], **values}
    options_schema(config["schema"])(options)
    path.write_text(json.dumps(options))
    return path


@contextmanager
def started_addon(options_file: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The start script running in its own session; killed at the end if still alive."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(START_SCRIPT)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=addon_env(options_file),
            cwd="/",
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def run_addon(options_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(START_SCRIPT)], capture_output=True, text=True, timeout=60, env=addon_env(options_file), cwd="/"
    )


def home_app(label: str) -> AbstractAsyncContextManager[str]:
    """A web app that answers with ``label``, the path and the visitor address Home Assistant would see."""
    return text_app(lambda request: f"{label} {request.path} for {request.headers.get('X-Forwarded-For')}")


async def visit(bridge_url: str, host: str, path: str) -> tuple[int, str]:
    port = bridge_url.rsplit(":", 1)[1]
    async with (
        aiohttp.ClientSession() as session,
        session.get(bridge_url + path, headers={"Host": f"{host}:{port}"}) as response,
    ):
        return response.status, await response.text()


async def test_the_start_script_publishes_home_assistant_and_a_service(config: dict[str, Any], tmp_path: Path) -> None:
    """Options as the Supervisor writes them bring up the tunnel with its service, over one
    connection; no token in the log; SIGTERM exits 0."""
    async with (
        running_bridge(domain=DOMAIN) as bridge,
        home_app("home assistant") as hass_url,
        home_app("printer") as printer_url,
    ):
        options = write_options(
            tmp_path / "options.json",
            config,
            bridge=bridge.url,
            token=TOKEN,
            name="house",
            target=hass_url,
            services=[{"name": "printer", "target": printer_url}],
            log_level="debug",
        )
        log = tmp_path / "addon.log"
        with started_addon(options, log) as addon:
            await wait_for_tunnel(bridge, "house", timeout=30)
            assert len(bridge.registry.connections()) == 1
            # exec: the shell is gone, rproxy itself is the process the Supervisor signals.
            command_line = Path(f"/proc/{addon.pid}/cmdline").read_bytes().split(b"\0")
            assert b"agent" in command_line and not any(b"run.sh" in part for part in command_line), command_line

            assert await visit(bridge.url, f"house.{DOMAIN}", "/lovelace") == (
                200,
                "home assistant /lovelace for 127.0.0.1",
            )
            assert await visit(bridge.url, f"printer.house.{DOMAIN}", "/jobs") == (200, "printer /jobs for 127.0.0.1")

            started = time.monotonic()
            addon.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(addon.wait, 15)
            assert exit_code == 0
            assert time.monotonic() - started < 10
        async with asyncio.timeout(10):
            while bridge.registry.tunnels():
                await asyncio.sleep(0.05)
    output = log.read_text()
    assert f"tunnel 'house' is up: http://house.{DOMAIN}:" in output, output
    assert f"service 'printer' is up: http://printer.house.{DOMAIN}:" in output, output
    assert TOKEN not in output


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_options_file_is_one_line_and_exit_code_2(kind: str, tmp_path: Path) -> None:
    options = tmp_path / "options.json"
    if kind == "directory":
        options.mkdir()
    result = run_addon(options)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(options) in lines[0] and "error" in lines[0], result.stderr
    assert result.stdout == ""


def test_a_bad_option_value_is_one_line_naming_the_key(config: dict[str, Any], tmp_path: Path) -> None:
    """rproxy itself checks the options: a bad service name gives exit code 2 and one line naming it."""
    options = tmp_path / "options.json"
    values = {
        **config["options"],
        "bridge": "ws://127.0.0.1:1",
        "token": TOKEN,
        "services": [{"name": "Bad Name", "target": "http://127.0.0.1:2"}],
    }
    options.write_text(json.dumps(values))
    result = run_addon(options)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "services[0].name" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert TOKEN not in result.stdout + result.stderr


async def test_a_token_the_bridge_refuses_is_reported_without_printing_it(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """A wrong token ends the add-on with exit code 3 and a line saying so; the token is not shown."""
    wrong_token = "wrong-token-" + "y" * 16
    async with running_bridge() as bridge:
        options = write_options(
            tmp_path / "options.json", config, bridge=bridge.url, token=wrong_token, target="http://127.0.0.1:1"
        )
        result = await asyncio.to_thread(run_addon, options)
    assert result.returncode == 3, result
    assert "refused the agent token" in result.stderr.strip().splitlines()[-1], result.stderr
    assert wrong_token not in result.stdout + result.stderr
