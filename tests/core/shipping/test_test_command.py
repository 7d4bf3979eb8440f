"""``scripts/test`` runs every step, cold or warm, and says how each one ended.

A fresh clone once failed one step (a cold mypy cache past pytest's limit) and, under
``set -e``, silently skipped the next one. The steps now run through ``run_steps``
(scripts/_env.sh), each in a process of its own, every one even after a failure, with a summary
at the end. These tests run that function with real bash and a runner of their own.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def _run_steps(tmp_path: Path, *steps: str) -> subprocess.CompletedProcess[str]:
    runner = tmp_path / "runner"
    # A step that fails under set -e half-way, one that passes, one that exits 3: each leaves a mark.
    runner.write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\n"
        f'echo "$1" >> {tmp_path}/ran\n'
        'case "$1" in fails) false; echo never ;; three) exit 3 ;; *) echo "step $1 ok" ;; esac\n'
    )
    runner.chmod(0o755)
    script = f'set -euo pipefail; source {ROOT}/scripts/_env.sh; run_steps {runner} "$@"'
    return subprocess.run(["bash", "-c", script, "bash", *steps], capture_output=True, text=True, timeout=60)


def test_every_step_runs_after_a_failure_and_each_verdict_is_summed_up(tmp_path: Path) -> None:
    result = _run_steps(tmp_path, "first step", "fails", "second step", "passes", "third step", "three")
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "ran").read_text().split() == ["fails", "passes", "three"]
    summary = result.stdout.split("rproxy: summary:\n", 1)[1]
    assert summary.splitlines() == [
        "  first step: FAILED (exit 1)",
        "  second step: passed",
        "  third step: FAILED (exit 3)",
    ]
    assert "never" not in result.stdout  # set -e held inside the failing step
    assert "=== second step ===" in result.stdout


def test_all_passing_steps_pass_with_a_summary(tmp_path: Path) -> None:
    result = _run_steps(tmp_path, "a", "passes", "b", "passes")
    assert result.returncode == 0
    assert result.stdout.rstrip().endswith("rproxy: summary:\n  a: passed\n  b: passed")


def test_the_test_command_runs_the_core_the_ha_and_the_ha_aiohttp_steps() -> None:
    """The whole run (no arguments) and ``scripts/test ha`` go through run_steps with every step."""
    text = (ROOT / "scripts/test").read_text()
    whole = re.search(r'\n  ""\)\n(.*?);;', text, re.S)
    assert whole is not None
    steps = re.findall(r'" (core|ha-suite|ha-aiohttp)\b', whole.group(1).replace("\\\n", " "))
    assert "run_steps" in whole.group(1) and steps == ["core", "ha-suite", "ha-aiohttp"]
    ha = re.search(r"\n  ha\)\n(.*?);;", text, re.S)
    assert ha is not None and "run_steps" in ha.group(1) and "ha-suite" in ha.group(1) and "ha-aiohttp" in ha.group(1)


def test_demo_after_the_tests_finds_its_packages_installed(tmp_path: Path) -> None:
    """.venv's stamp names test.txt and the run.txt it includes: ensure_venv for the demo's
    run.txt then installs nothing (it used to reinstall, under a running test suite too)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "requirements").mkdir()
    for name in ("scripts/_env.sh", "pyproject.toml", "requirements/run.txt", "requirements/test.txt"):
        (root / name).write_bytes((ROOT / name).read_bytes())
    python = root / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho installing anyway >&2\nexit 1\n")
    python.chmod(0o755)
    env_sh = root / "scripts/_env.sh"
    stamps = subprocess.run(
        [
            "bash",
            "-c",
            f'source {env_sh}; stamp_of "$ROOT/requirements/test.txt"; stamp_of "$ROOT/requirements/run.txt"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (root / ".venv/.rproxy-stamp").write_text(stamps)
    result = subprocess.run(
        ["bash", "-c", f'source {env_sh}; ensure_venv "$ROOT/requirements/run.txt"; echo fine'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "fine", "")
