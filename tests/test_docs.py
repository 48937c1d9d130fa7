"""The README keeps its promises: every setting documented with its default."""

from __future__ import annotations

from edge_agent.agent.config import SETTINGS
from tests.support import REPO_ROOT


def test_readme_table_lists_every_setting_with_default() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for setting in SETTINGS:
        assert f"| `{setting.name}` | {setting.default} |" in readme, setting.name


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "scripts/test" in readme.split("## How it works")[0]
    assert "scripts/test" in (REPO_ROOT / ".ci" / "run").read_text()
