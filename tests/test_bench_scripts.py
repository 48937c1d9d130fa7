"""The bench scripts run as modules from the repository root (``python -m bench.<name>``)
without editing ``sys.path``, and every page that shows how to run one shows that form."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

BENCHES = sorted(path.stem for path in (REPO_ROOT / "bench").glob("bench_*.py"))


def touches_sys_path(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "path"
               and isinstance(node.value, ast.Name) and node.value.id == "sys"
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def test_the_bench_list_is_read() -> None:
    """Guards the tests below against passing on an empty list."""
    assert {"bench_idle", "bench_mqtt_update", "bench_soak", "bench_rollout",
            "bench_wire"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_a_bench_runs_as_a_module_without_sys_path_edits(name: str) -> None:
    assert not touches_sys_path(REPO_ROOT / "bench" / f"{name}.py")
    # no PYTHONPATH either: ``-m`` from the root is all it takes
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout


def test_the_docs_run_the_benches_as_modules() -> None:
    pages = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"),
             *(REPO_ROOT / "bench").glob("*.py"), *(REPO_ROOT / "scripts").iterdir()]
    old_form = re.compile(r"python3? +(\./)?bench/\w+\.py")
    found = [f"{page.relative_to(REPO_ROOT)}: {match.group(0)}" for page in pages
             if page.is_file()
             for match in old_form.finditer(page.read_text(encoding="utf-8", errors="replace"))]
    assert found == []


def test_the_fleet_simulator_runs_as_a_module() -> None:
    """bench/fleet_sim.py is a CLI too (not a bench_* script): ``--help`` as a module."""
    done = subprocess.run([sys.executable, "-m", "bench.fleet_sim", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout


def test_the_scale_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """bench_scale end to end with 20 simulated devices (broker, bridge, page, rollout,
    broker restart): every figure of the table is there. Figures only, no timing."""
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_scale", "--devices", "20", "--update-s", "0.5",
         "--max-updating", "5", "--idle", "1", "--requests", "3", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rollout"]["state"] == "succeeded"
    assert report["rollout"]["peak_updating"] <= 5
    assert set(report) >= {"connect", "idle", "devices_api", "devices_api_filtered", "metrics",
                           "page", "rollout", "restart"}
    assert set(report["page"]) == {"token_to", "reload_to", "filter_s"}


def test_the_console_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """bench_console end to end with 20 simulated devices: load, filters, and the
    bridge's CPU with no page and with 2 pages open during tag activity. Figures only."""
    out = tmp_path / "console.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_console", "--devices", "20", "--update-s", "0.5",
         "--rate", "5", "--pages", "2", "--window", "2", "--filter-runs", "1",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["page"]["filter_s"]) == {"search_one", "version", "group",
                                               "status_online"}
    assert report["pages"]["streams_held"] == 2
    assert report["pages"]["tags_published"] > 0
    assert report["pages"]["pages_open"]["state_messages"] > 0
