"""The protocol package stays sans-I/O: none of its modules imports an I/O or event-loop library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rproxy_core.protocol

FORBIDDEN = {"asyncio", "aiohttp", "websockets", "socket", "selectors", "ssl", "trio", "anyio"}
PROTOCOL_DIR = Path(rproxy_core.protocol.__file__).parent
PACKAGE_DIR = PROTOCOL_DIR.parent
MODULES = sorted(PROTOCOL_DIR.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, anywhere in the file (relative ones resolved)."""
    package = ["rproxy_core", *path.parent.relative_to(PACKAGE_DIR).parts]
    return imports_of(path.read_text(encoding="utf-8"), package)


def imports_of(source: str, package: list[str]) -> set[str]:
    """Absolute names of every module ``source`` imports, as if it lived in ``package``."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            # ``from x import y`` may import the submodule x.y.
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in {
            "__import__",
            "import_module",
        }:
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value)
    return names


def forbidden_in(names: set[str]) -> set[str]:
    """The forbidden top-level packages among ``names``."""
    return {name for name in names if name.split(".")[0] in FORBIDDEN}


def test_the_protocol_package_has_the_expected_modules():
    """The scan covers the protocol modules (guards against an empty glob)."""
    expected = {"__init__.py", "frames.py", "heads.py", "windows.py", "stream.py", "events.py", "mux.py"}
    assert {p.name for p in MODULES} >= expected


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_protocol_module_imports_asyncio_aiohttp_websockets_or_socket(path):
    """No module under rproxy_core/protocol/ imports asyncio, aiohttp, websockets, socket or similar."""
    assert forbidden_in(imported_modules(path)) == set()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_modules_only_reach_outside_the_package_for_io_free_helpers(path):
    """Inside rproxy_core, protocol modules import only the protocol package, exceptions and typing."""
    allowed = ("rproxy_core.protocol", "rproxy_core.exceptions", "rproxy_core.typing")
    internal = {name for name in imported_modules(path) if name.split(".")[0] == "rproxy_core"}
    assert {name for name in internal if not name.startswith(allowed) and name != "rproxy_core"} == set()


@pytest.mark.parametrize("name", ["exceptions.py", "typing.py"])
def test_the_helpers_the_protocol_imports_are_io_free_too(name):
    """rproxy_core.exceptions and rproxy_core.typing, which the protocol imports, import nothing forbidden."""
    names = imported_modules(PACKAGE_DIR / name)
    assert forbidden_in(names) == set()
    allowed = ("rproxy_core.exceptions", "rproxy_core.typing")
    assert {n for n in names if n.startswith("rproxy_core.") and not n.startswith(allowed)} == set()


def test_the_scanner_catches_every_spelling_of_an_import():
    """Sanity check of the scanner: nested, aliased, from-, relative and dynamic imports are all seen."""
    source = (
        "import os\n"
        "import asyncio.tasks\n"
        "def f():\n    from socket import socket\n"
        "try:\n    import aiohttp as h\nexcept ImportError:\n    pass\n"
        "import importlib\nimportlib.import_module('websockets')\n"
        "from ..transport import connection\n"
        "from . import frames\n"
    )
    names = imports_of(source, ["rproxy_core", "protocol"])
    assert forbidden_in(names) == {"asyncio.tasks", "socket", "socket.socket", "aiohttp", "websockets"}
    assert {"rproxy_core.transport", "rproxy_core.transport.connection", "rproxy_core.protocol.frames"} <= names
