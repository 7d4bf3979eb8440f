"""The rooms stay apart: the import contract in pyproject.toml holds, and it can break.

Two checks, for two ways of getting it wrong. ``lint-imports`` (import-linter) reads every
import statement, also the ones in functions and under TYPE_CHECKING, and holds them to the
contracts. The subprocess check runs the real imports with ``rproxy_core.bridge`` made
unimportable, which also catches what a static reading cannot: an import through
``importlib`` or a package face that loads a sibling.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_contracts_are_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("planted", "source", "contract"),
    [
        (
            "rproxy_core/agent/sneaky.py",
            "from ..bridge.keys import ChallengeStore",
            "neutral rooms never import the bridge",
        ),
        (
            "custom_components/rproxy/sneaky.py",
            "from rproxy_core.bridge.keys import ChallengeStore",
            "integration never",
        ),
        (
            "rproxy_core/protocol/sneaky.py",
            "from ..transport import TunnelConnection",
            "protocol imports nothing above",
        ),
    ],
)
def test_import_contracts_catch_a_forbidden_import(tmp_path: Path, planted: str, source: str, contract: str) -> None:
    # A copy of the tree with one forbidden import added (in a function: still an import): it must break.
    for tree in ("rproxy_core", "custom_components"):
        shutil.copytree(ROOT / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / planted).write_text(f"def helper() -> None:\n    {source}  # noqa: F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert len(broken) >= 1 and any(contract in line for line in broken), result.stdout
    module = planted.removesuffix(".py").replace("/", ".")
    assert f"{module} -> " in result.stdout


#: Run in a fresh interpreter: a finder first on sys.meta_path refuses rproxy_core.bridge and
#: everything under it, then the agent's entry points are imported and what got loaded printed.
_BLOCKED_BRIDGE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoBridge(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rproxy_core.bridge" or name.startswith("rproxy_core.bridge."):
                raise ImportError(f"{name} is not importable in this test")
            return None

    sys.meta_path.insert(0, NoBridge())
    import rproxy_core
    import rproxy_core.agent
    loaded_by_agent = sorted(name for name in sys.modules if name.split(".")[0] in ("aiohttp", "prometheus_client"))
    import rproxy_core.client.tcp
    import rproxy_core.cli.agent
    import rproxy_core.cli.keygen
    import rproxy_core.cli.status
    import rproxy_core.cli.tcp
    from rproxy_core import Agent, AgentConfig
    from rproxy_core.cli.agent import agent_config
    try:
        from rproxy_core import Bridge
    except ImportError:
        bridge = "refused"
    else:
        bridge = "imported"
    print(json.dumps({"loaded_by_agent": loaded_by_agent, "modules": sorted(sys.modules), "bridge": bridge}))
    """
)


def test_the_agent_side_imports_without_the_bridge() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_BRIDGE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # The finder was really in the way: asking for the bridge failed.
    assert report["bridge"] == "refused"
    assert not [name for name in report["modules"] if name.startswith("rproxy_core.bridge")]
    assert "prometheus_client" not in report["modules"]
    # aiohttp.web does load, for real reasons: the in-process session takes Home Assistant's
    # web.BaseRunner, and the transport's frame socket also wraps server-side WebSockets. Inside
    # Home Assistant aiohttp.web is loaded anyway. What only the bridge needs stays out:
    assert "prometheus_client" not in report["loaded_by_agent"]
    assert "rproxy_core.gateway" not in report["modules"]
