"""The integration passes mypy --strict against Home Assistant's own types (strict-typing rule)."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_finds_nothing_in_the_integration() -> None:
    """mypy --strict on custom_components/rproxy reports no error."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "tests/ha/mypy.ini"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
