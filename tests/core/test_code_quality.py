"""The library passes its linters: ruff's rules and mypy --strict (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_finds_nothing_in_the_code() -> None:
    """ruff check (imports sorted, lines within the limit) reports nothing anywhere in the tree."""
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_whole_tree_is_in_ruff_format() -> None:
    """Every Python file is as `ruff format` writes it: run `ruff format .` before committing."""
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(900)  # a cold cache on a busy machine takes minutes, a warm one seconds
def test_mypy_strict_finds_nothing_in_the_library() -> None:
    """mypy --strict on rproxy_core reports no error."""
    # The cache lives in this environment (.venv), not in a /tmp path shared by every checkout.
    result = _run("mypy", "--cache-dir", f"{sys.prefix}/mypy-cache", timeout=840)
    assert result.returncode == 0, result.stdout + result.stderr
