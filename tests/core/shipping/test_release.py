"""What a release ships: the version check, the wheel and sdist, the HACS zip, and the workflow that runs them.

The release workflow (.github/workflows/release.yml) cannot run here; its steps can. These tests
run the very commands it runs (scripts/release-check, ``python -m build``, scripts/hacs-zip) on
this checkout, or on a copy of it when a file has to be broken.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import ROOT

RELEASE_CHECK = ROOT / "scripts" / "release-check"
HACS_ZIP = ROOT / "scripts" / "hacs-zip"
INTEGRATION = ROOT / "custom_components" / "rproxy"
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION: str = PYPROJECT["version"]

#: Everything of the checkout a build or the version check could read; caches and environments are not.
COPY_IGNORED = shutil.ignore_patterns(
    ".venv*",
    ".git",
    ".tools",
    "node_modules",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "test-artifacts",
    ".coverage",
)


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def release_check(tag: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, root / "scripts" / "release-check", tag)


def copy_checkout(tmp_path: Path) -> Path:
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORED)
    return copy


def single_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# scripts/release-check


def test_release_check_accepts_the_tag_of_the_current_version() -> None:
    result = release_check(f"v{VERSION}")
    assert result.returncode == 0, result.stderr
    assert single_line(result.stdout) == f"release-check: v{VERSION} matches all 7 version places"
    assert result.stderr == ""


def test_release_check_refuses_another_tag_with_one_line() -> None:
    result = release_check("v999.0.0")
    assert result.returncode == 1
    line = single_line(result.stderr)
    assert "v999.0.0" in line and VERSION in line
    assert result.stdout == ""


@pytest.mark.parametrize("tag", ["0.1.0", "release-1", "v", ""])
def test_release_check_refuses_a_malformed_tag_as_a_usage_error(tag: str) -> None:
    result = release_check(tag)
    assert result.returncode == 2
    assert single_line(result.stderr).startswith("usage: release-check")


def _edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path} should contain {old!r} exactly once"
    path.write_text(text.replace(old, new))


def _edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _edit_yaml(path: Path, change: Any) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


BUMPED = "9.8.7"

#: For each place a version is declared: how to make it disagree, and what the error names.
DISAGREEMENTS: dict[str, tuple[Any, str]] = {
    "pyproject": (
        lambda root: _edit_text(root / "pyproject.toml", f'version = "{VERSION}"', f'version = "{BUMPED}"'),
        "pyproject.toml version",
    ),
    "library": (
        lambda root: _edit_text(
            root / "rproxy_core/_version.py", f'__version__ = "{VERSION}"', f'__version__ = "{BUMPED}"'
        ),
        "rproxy_core/_version.py __version__",
    ),
    "manifest": (
        lambda root: _edit_json(
            root / "custom_components/rproxy/manifest.json", lambda data: data.update(version=BUMPED)
        ),
        "custom_components/rproxy/manifest.json version",
    ),
    "requirement": (
        lambda root: _edit_json(
            root / "custom_components/rproxy/manifest.json",
            lambda data: data.update(requirements=[f"rproxy-core=={BUMPED}"]),
        ),
        "custom_components/rproxy/manifest.json rproxy-core requirement",
    ),
    "addon": (
        lambda root: _edit_yaml(root / "addon/config.yaml", lambda data: data.update(version=BUMPED)),
        "addon/config.yaml version",
    ),
    "addon-build": (
        lambda root: _edit_yaml(root / "addon/build.yaml", lambda data: data["args"].update(RPROXY_VERSION=BUMPED)),
        "addon/build.yaml args.RPROXY_VERSION",
    ),
    "bridge-image": (
        lambda root: _edit_text(
            root / "contrib/docker/Dockerfile", f"ARG RPROXY_VERSION={VERSION}", f"ARG RPROXY_VERSION={BUMPED}"
        ),
        "contrib/docker/Dockerfile ARG RPROXY_VERSION",
    ),
}


@pytest.mark.parametrize("place", DISAGREEMENTS)
def test_one_disagreeing_version_fails_naming_its_file(place: str, tmp_path: Path) -> None:
    """In a copy of the checkout, one place declares another version: the check names that place only."""
    root = copy_checkout(tmp_path)
    assert release_check(f"v{VERSION}", root).returncode == 0  # the copy itself is consistent
    edit, named = DISAGREEMENTS[place]
    edit(root)
    result = release_check(f"v{VERSION}", root)
    assert result.returncode == 1
    line = single_line(result.stderr)
    assert f"{named} is {BUMPED}" in line
    assert line.count(" is ") == 1  # the six other places agree and are not mentioned


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda root: (root / "addon/build.yaml").unlink(), "addon/build.yaml: cannot read"),
        (
            lambda root: (root / "addon/config.yaml").write_text("version: [unclosed\n"),
            "addon/config.yaml: not valid YAML",
        ),
        (
            lambda root: (root / "addon/config.yaml").write_text("version: 0.1\n"),
            "expected a version string, found 0.1",
        ),
        (
            lambda root: _edit_json(
                root / "custom_components/rproxy/manifest.json", lambda data: data.update(requirements=[])
            ),
            "exactly one rproxy-core==VERSION",
        ),
    ],
    ids=["missing-file", "broken-yaml", "unquoted-version", "no-requirement"],
)
def test_an_unreadable_version_place_fails_naming_it(damage: Any, named: str, tmp_path: Path) -> None:
    root = copy_checkout(tmp_path)
    damage(root)
    result = release_check(f"v{VERSION}", root)
    assert result.returncode == 1
    assert named in single_line(result.stderr)
    assert "Traceback" not in result.stderr


# python -m build: the wheel and sdist PyPI gets


def _setuptools_is_new_enough() -> None:
    """``--no-isolation`` builds with .venv's setuptools: it must satisfy pyproject's build requirement."""
    from importlib.metadata import version

    build_requirement = Requirement(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"][0])
    assert build_requirement.specifier.contains(version("setuptools")), (
        f"setuptools {version('setuptools')} in .venv does not satisfy {build_requirement}: "
        "requirements/test.txt must pin a setuptools that does"
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``python -m build`` of a copy of the checkout, as the release runs it: the sdist, then a wheel
    built from that sdist. Also a wheel built straight from the tree, to compare with.

    ``--no-isolation``: the build backend comes from .venv, not from the internet.
    """
    _setuptools_is_new_enough()
    tmp = tmp_path_factory.mktemp("build")
    source = copy_checkout(tmp)
    out = tmp / "release"
    result = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    direct = tmp / "direct"
    result = run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", direct, source, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = out.glob("rproxy_core-*.tar.gz")
    (wheel,) = out.glob("rproxy_core-*.whl")
    (direct_wheel,) = direct.glob("rproxy_core-*.whl")
    return {"sdist": sdist, "wheel": wheel, "direct_wheel": direct_wheel}


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def wheel_text(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(suffix)]
        return archive.read(name).decode()


def test_build_names_the_files_after_the_version(built: dict[str, Path]) -> None:
    assert built["sdist"].name == f"rproxy_core-{VERSION}.tar.gz"
    assert built["wheel"].name == f"rproxy_core-{VERSION}-py3-none-any.whl"


def test_the_wheel_holds_the_library_and_nothing_else(built: dict[str, Path]) -> None:
    names = wheel_names(built["wheel"])
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "rproxy_core").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert len(sources) > 20
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert "rproxy_core/py.typed" in names
    assert "rproxy_core/bridge/status.html" in names  # the status page, read at run time
    dist_info = f"rproxy_core-{VERSION}.dist-info/"
    assert f"{dist_info}licenses/LICENSE" in names
    unexpected = {n for n in names if not n.startswith(("rproxy_core/", dist_info))}
    assert not unexpected, unexpected
    assert not {n for n in names if n.startswith(("tests/", "custom_components/", "addon/", "contrib/", "scripts/"))}
    assert not {n for n in names if "__pycache__" in n or n.endswith(".pyc")}


def test_the_wheel_declares_the_rproxy_command(built: dict[str, Path]) -> None:
    entry_points = wheel_text(built["wheel"], ".dist-info/entry_points.txt")
    assert re.search(r"^\[console_scripts\]\s*^rproxy = rproxy_core\.cli:main$", entry_points, re.MULTILINE)


def test_the_wheel_requires_exactly_pyprojects_dependencies(built: dict[str, Path]) -> None:
    metadata = Parser().parsestr(wheel_text(built["wheel"], ".dist-info/METADATA"))
    assert metadata["Name"] == "rproxy-core"
    assert metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == PYPROJECT["requires-python"]

    def keyed(requirements: list[str]) -> dict[tuple[str, str], SpecifierSet]:
        parsed = [Requirement(r) for r in requirements]
        return {(r.name.lower(), str(r.marker or "")): r.specifier for r in parsed}

    declared = list(PYPROJECT["dependencies"])
    for extra, requirements in PYPROJECT["optional-dependencies"].items():
        for requirement in requirements:
            parsed = Requirement(requirement)
            marker = f"({parsed.marker}) and " if parsed.marker else ""
            declared.append(f'{parsed.name}{parsed.specifier}; {marker}extra == "{extra}"')
    assert keyed(metadata.get_all("Requires-Dist") or []) == keyed(declared)
    assert metadata.get_all("Provides-Extra") == list(PYPROJECT["optional-dependencies"])


def test_the_sdist_builds_the_same_wheel(built: dict[str, Path]) -> None:
    """The release's wheel is built from its sdist: it has every file a wheel straight from the tree has."""
    assert wheel_names(built["wheel"]) == wheel_names(built["direct_wheel"])
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", "rproxy_core/py.typed", "rproxy_core/cli/__init__.py"} <= names


# scripts/hacs-zip


def integration_files(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_hacs_zip_has_the_integration_at_its_root(tmp_path: Path) -> None:
    output = tmp_path / "rproxy.zip"
    result = run(sys.executable, HACS_ZIP, output)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(output) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
        assert archive.testzip() is None
    expected = integration_files(INTEGRATION)
    assert {"__init__.py", "manifest.json", "config_flow.py", "translations/en.json"} <= expected
    assert names == expected
    assert manifest["version"] == VERSION
    assert manifest == json.loads((INTEGRATION / "manifest.json").read_text())


def test_hacs_zip_leaves_out_byte_caches_and_is_reproducible(tmp_path: Path) -> None:
    """In a copy with compiled files planted, the zip skips them; two runs give the same bytes."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(HACS_ZIP, root / "scripts" / "hacs-zip")
    shutil.copytree(INTEGRATION, root / "custom_components" / "rproxy", ignore=COPY_IGNORED)
    planted = root / "custom_components" / "rproxy"
    (planted / "__pycache__").mkdir()
    (planted / "__pycache__" / "const.cpython-313.pyc").write_bytes(b"\0")
    (planted / "stale.pyc").write_bytes(b"\0")
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    for output in (first, second):
        result = run(sys.executable, root / "scripts" / "hacs-zip", output)
        assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
    assert names == sorted(integration_files(INTEGRATION))
    assert first.read_bytes() == second.read_bytes()


def test_hacs_json_asks_for_the_zip_hacs_zip_makes() -> None:
    """hacs.json uses only keys HACS knows, and names the file the release attaches."""
    hacs = json.loads((ROOT / "hacs.json").read_text())
    known = {
        "content_in_root",
        "country",
        "filename",
        "hacs",
        "hide_default_branch",
        "homeassistant",
        "persistent_directory",
        "render_readme",
        "zip_release",
        "name",
    }
    assert set(hacs) <= known
    assert hacs["zip_release"] is True
    assert hacs["filename"] == "rproxy.zip"
    assert hacs["content_in_root"] is False


# .github/workflows/release.yml: it runs the steps above, and publishes with least privilege


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True
    data["on"] = data.pop(True)
    return data


def steps_run(job: dict[str, Any]) -> list[str]:
    return [" ".join(step["run"].split()) for step in job["steps"] if "run" in step]


def test_the_workflow_runs_on_version_tags_and_calls_the_tested_scripts(workflow: dict[Any, Any]) -> None:
    assert workflow["on"] == {"push": {"tags": ["v*"]}}
    runs = steps_run(workflow["jobs"]["build"])
    assert 'python scripts/release-check "$GITHUB_REF_NAME"' in runs
    assert runs.index('python scripts/release-check "$GITHUB_REF_NAME"') < runs.index(
        "python -m build --outdir dist/python"
    )
    assert "python scripts/hacs-zip dist/hacs/rproxy.zip" in runs


def test_the_workflow_publishes_in_order_with_least_privilege(workflow: dict[Any, Any]) -> None:
    jobs = workflow["jobs"]
    assert workflow["permissions"] == {}
    assert jobs["build"]["permissions"] == {"contents": "read"}
    assert jobs["pypi"]["needs"] == "build"
    assert jobs["pypi"]["permissions"] == {"id-token": "write"}
    assert jobs["pypi"]["environment"]["name"] == "pypi"
    assert any(step.get("uses", "").startswith("pypa/gh-action-pypi-publish@") for step in jobs["pypi"]["steps"])
    assert jobs["github-release"]["needs"] == "pypi"
    assert jobs["github-release"]["permissions"] == {"contents": "write"}
    assert any("gh release create" in run for run in steps_run(jobs["github-release"]))
    # The add-on image pip-installs rproxy-core==VERSION: only once it is on PyPI.
    assert jobs["addon"]["needs"] == "pypi"
    assert jobs["addon"]["permissions"] == {"contents": "read", "packages": "write"}


def test_the_workflow_builds_the_addon_for_every_architecture_it_declares(workflow: dict[Any, Any]) -> None:
    declared = yaml.safe_load((ROOT / "addon" / "config.yaml").read_text())["arch"]
    assert sorted(workflow["jobs"]["addon"]["strategy"]["matrix"]["arch"]) == sorted(declared)


def test_every_action_is_pinned_to_a_commit_with_its_version_named() -> None:
    """A tag can be moved to other code; a commit cannot. The comment says which release it is."""
    uses = re.findall(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", WORKFLOW.read_text(), flags=re.MULTILINE)
    assert len(uses) >= 8
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), action
        assert re.fullmatch(r"\s*# v?\d+(\.\d+)+", comment), f"{action}: {comment!r}"
