"""The integration passes mypy --strict against Home Assistant's own types (strict-typing rule)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# A cold cache (a fresh clone, a new .venv-ha) takes mypy over a minute on a busy machine, a
# warm one a second: past pytest.ini's 60 s per test, so this test has a limit of its own.
@pytest.mark.timeout(900)
def test_mypy_strict_finds_nothing_in_the_integration() -> None:
    """mypy --strict on custom_components/rproxy reports no error."""
    # The cache lives in this environment (.venv-ha), not in a /tmp path shared by every
    # checkout: its state, warm or cold, is this environment's own.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "tests/ha/mypy.ini", "--cache-dir", f"{sys.prefix}/mypy-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
