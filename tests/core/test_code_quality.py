"""The library passes its linters: ruff's rules and mypy --strict (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing_in_the_code() -> None:
    """ruff check reports no problem in the library, the integration or its tests."""
    result = _run("ruff", "check", "rproxy_core", "custom_components", "tests/ha")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing_in_the_library() -> None:
    """mypy --strict on rproxy_core reports no error."""
    result = _run("mypy", "--cache-dir", "/tmp/rproxy-mypy-cache")
    assert result.returncode == 0, result.stdout + result.stderr
