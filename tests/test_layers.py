"""The package's layers hold: the protocol is docker-free and imports nothing from the
programs above it; the operator tools (bridge, edge-ctl) never load docker-py; the
programs do not import each other. Read from the code itself: the import statements
(static) and a fresh interpreter's ``sys.modules`` (dynamic)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edge_agent"
PROGRAMS = ("agent", "bridge", "ctl")


def modules_in(subpackage: str) -> list[str]:
    root = PACKAGE / subpackage
    return sorted(
        "edge_agent." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        .removesuffix(".__init__")
        for path in root.rglob("*.py") if path.name != "__main__.py"  # that one runs
    )


def imported_names(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (wherever it stands)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def loaded_by(*modules: str) -> list[str]:
    """The modules a fresh interpreter has loaded after importing ``modules``."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    loaded: list[str] = json.loads(out)
    return loaded


def test_the_module_lists_are_read() -> None:
    """Guards the tests below against passing on an empty list."""
    assert "edge_agent.protocol.mqtt" in modules_in("protocol")
    assert "edge_agent.ctl.cli" in modules_in("ctl")
    assert "edge_agent.bridge.server" in modules_in("bridge")
    assert "docker" in loaded_by("edge_agent.agent.engine")


def test_the_shared_operator_code_is_docker_free_and_stands_alone() -> None:
    """``registry_probe`` (the bridge's and edge-ctl's question to the registry): no
    docker-py, no requests, no program."""
    loaded = loaded_by("edge_agent.registry_probe")
    assert [m for m in loaded if m.split(".")[0] in ("docker", "requests")] == []
    assert [m for m in loaded if m.startswith(tuple(f"edge_agent.{p}" for p in PROGRAMS))] == []


@pytest.mark.parametrize("program", ["bridge", "ctl"])
def test_operator_tools_never_load_docker(program: str) -> None:
    loaded = loaded_by(*modules_in(program))
    assert [m for m in loaded if m == "docker" or m.startswith("docker.")] == []
    assert [m for m in loaded if m.startswith("edge_agent.agent")] == []


def test_the_agent_never_loads_prometheus_client() -> None:
    """prometheus-client is the bridge's optional dependency (the ``bridge`` extra)."""
    assert "prometheus_client" in loaded_by("edge_agent.bridge.metrics")  # the check works
    loaded = loaded_by(*modules_in("agent"), *modules_in("protocol"))
    assert [m for m in loaded if m.split(".")[0] == "prometheus_client"] == []
    for path in sorted((PACKAGE / "agent").rglob("*.py")):
        assert not {n for n in imported_names(path) if n.startswith("prometheus_client")}, path


def test_the_protocol_is_docker_free_and_stands_alone() -> None:
    loaded = loaded_by(*modules_in("protocol"))
    assert [m for m in loaded if m == "docker" or m.startswith("docker.")] == []
    above = [m for m in loaded if m.startswith(tuple(f"edge_agent.{p}" for p in PROGRAMS))]
    assert above == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "protocol").rglob("*.py")),
                         ids=lambda p: p.name)
def test_no_protocol_module_imports_a_program(path: Path) -> None:
    """Static: also imports inside functions, which the dynamic test does not run."""
    wrong = {name for name in imported_names(path)
             if name == "docker" or name.startswith("docker.")
             or name.startswith(tuple(f"edge_agent.{p}" for p in PROGRAMS))}
    assert wrong == set()


def test_the_rollout_package_is_operator_side_and_docker_free() -> None:
    """edge_agent.rollout runs in the bridge: no docker-py, nothing of the agent, and
    no program at all (the bridge imports it, not the other way round)."""
    modules = modules_in("rollout")
    assert "edge_agent.rollout.plan" in modules
    loaded = loaded_by(*modules)
    assert [m for m in loaded if m == "docker" or m.startswith("docker.")] == []
    assert [m for m in loaded if m.startswith(tuple(f"edge_agent.{p}" for p in PROGRAMS))] == []
    for path in sorted((PACKAGE / "rollout").rglob("*.py")):
        wrong = {n for n in imported_names(path) if n == "docker" or n.startswith("docker.")
                 or n.startswith(tuple(f"edge_agent.{p}" for p in PROGRAMS))}
        assert wrong == set(), path


@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_do_not_import_each_other(program: str) -> None:
    others = tuple(f"edge_agent.{p}" for p in PROGRAMS if p != program)
    for path in sorted((PACKAGE / program).rglob("*.py")):
        wrong = {n for n in imported_names(path) if n.startswith(others)}
        assert wrong == set(), path
