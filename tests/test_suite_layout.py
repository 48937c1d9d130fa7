"""Test modules and benches share code through tests/support/ (and fixtures through a
conftest), never by importing a test module or a conftest: those are pytest's to load."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO_ROOT

SOURCES = sorted([*(REPO_ROOT / "tests").rglob("*.py"), *(REPO_ROOT / "bench").rglob("*.py")])


def is_pytest_module(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return module.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def pytest_modules_imported(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if is_pytest_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            found += [module for module in modules if is_pytest_module(module)]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(f"{'.' * node.level}{node.module or ''} (relative)")
    return found


def test_the_sources_are_read() -> None:
    """Guards the test below against passing on an empty list."""
    names = {path.relative_to(REPO_ROOT).as_posix() for path in SOURCES}
    assert {"tests/conftest.py", "tests/agent/test_link.py", "bench/common.py"} <= names
    assert pytest_modules_imported(REPO_ROOT / "tests" / "test_layers.py") == []
    assert is_pytest_module("tests.agent.test_link") and is_pytest_module("tests.conftest")


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    found = {path.relative_to(REPO_ROOT).as_posix(): pytest_modules_imported(path)
             for path in SOURCES}
    assert {path: modules for path, modules in found.items() if modules} == {}
