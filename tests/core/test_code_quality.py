"""The library passes its linters: ruff's rules and mypy --strict (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_finds_nothing_in_the_code() -> None:
    """ruff check reports no problem in the library, the integration or its tests."""
    result = _run("ruff", "check", "rproxy_core", "custom_components", "tests/ha")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(900)  # a cold cache on a busy machine takes minutes, a warm one seconds
def test_mypy_strict_finds_nothing_in_the_library() -> None:
    """mypy --strict on rproxy_core reports no error."""
    # The cache lives in this environment (.venv), not in a /tmp path shared by every checkout.
    result = _run("mypy", "--cache-dir", f"{sys.prefix}/mypy-cache", timeout=840)
    assert result.returncode == 0, result.stdout + result.stderr
