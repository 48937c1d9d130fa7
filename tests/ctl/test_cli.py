"""edge-ctl's command line: the parser, the broker settings, usage errors and their exit
codes. No broker: every error here comes before edge-ctl connects (the ones from the
broker: test_session.py and test_commands.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.ctl.cli import build_parser, main, mqtt_settings
from edge_agent.ctl.errors import EXIT_OK, EXIT_USAGE
from tests.support import REPO_ROOT

# Nothing listens on port 1: a test that reached the broker would fail, not pass.
NO_BROKER = {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": "1"}


@pytest.fixture(autouse=True)
def mqtt_log_level() -> Iterator[None]:
    """main() quiets the MQTT layer, as a one-shot tool should; the tests that run after
    these in the same process (pytest-xdist) must still see its warnings."""
    quieted = logging.getLogger("edge_agent.protocol.mqtt")
    level = quieted.level
    yield
    quieted.setLevel(level)


@pytest.fixture
def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("MQTT_")]:
        monkeypatch.delenv(name)
    for name, value in NO_BROKER.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("no_broker")
def test_invalid_tag_is_a_usage_error_before_anything_is_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["set-tag", "not a tag", "--device", "dev1"]) == EXIT_USAGE
    assert "edge-ctl: invalid tag" in capsys.readouterr().err


@pytest.mark.usefixtures("no_broker")
@pytest.mark.parametrize("args", [
    ("set-tag", "2.0", "--device", "dev/+"),
    ("clear-tag", "--group", "lab#"),
    ("devices", "dev1", "../x"),
    ("set-tag", "2.0", "--device", "dev1", "--request-id", "has space"),
])
def test_ids_that_are_not_one_topic_level_are_usage_errors(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(list(args)) == EXIT_USAGE
    assert "must match" in capsys.readouterr().err


@pytest.mark.usefixtures("no_broker")
@pytest.mark.parametrize("args", [("set-tag", "2.0", "--fleet", "--wait"),
                                  ("set-tag", "2.0", "--group", "lab", "--wait"),
                                  ("check", "--fleet", "--wait")])
def test_wait_needs_a_device(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(args)) == EXIT_USAGE
    assert "--wait needs --device" in capsys.readouterr().err


@pytest.mark.usefixtures("no_broker")
def test_a_bad_setting_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MQTT_PORT", "not-a-port")
    assert main(["devices"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("edge-ctl: configuration error: MQTT_PORT")


def test_options_override_the_environment() -> None:
    args = build_parser().parse_args(["devices", "-H", "broker.lan", "-p", "8884", "-u", "ops",
                                      "--prefix", "plant"])
    settings = mqtt_settings(args, {"MQTT_HOST": "other", "MQTT_PORT": "1883",
                                    "MQTT_USERNAME": "x", "MQTT_PASSWORD": "pw"})
    assert (settings.host, settings.port, settings.username, settings.password,
            settings.topic_prefix) == ("broker.lan", 8884, "ops", "pw", "plant")
    # no MQTT_HOST at all (or a blank one): the broker on this machine
    assert mqtt_settings(argparse.Namespace(), {}).host == "localhost"
    assert mqtt_settings(argparse.Namespace(), {"MQTT_HOST": " "}).host == "localhost"


def test_a_password_file_replaces_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    args = build_parser().parse_args(["devices", "--password-file", str(secret)])
    settings = mqtt_settings(args, {"MQTT_HOST": "b", "MQTT_PASSWORD": "from-env"})
    assert settings.password == "from-file"


@pytest.mark.parametrize("module", ["edge_agent.ctl", "edge_agent.ctl.cli"])
def test_runs_as_a_module(module: str) -> None:
    """``python -m edge_agent.ctl`` and the console script's module both start edge-ctl."""
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                            text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout == f"edge-ctl {__version__}\n"


def test_the_console_script_is_main() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["edge-ctl"].partition(":")
    assert getattr(importlib.import_module(module), function) is main


@pytest.mark.parametrize("argv", [
    ["check", "--fleet", "--force"],
    ["check", "--device", "d", "--spread", "60"],
    ["set-tag", "2.0", "--device", "d", "--spread", "60"],
    ["set-tag", "2.0", "--fleet", "--spread", "86401"],
    ["set-tag", "2.0", "--group", "g", "--spread", "-1"],
])
def test_force_needs_a_device_and_spread_a_group_or_the_fleet(
    argv: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(argv) == EXIT_USAGE  # refused before any broker is asked
    assert "--force" in capsys.readouterr().err or "--spread" in argv
