"""schemathesis against the running bridge's /openapi.json: no server error, no response
that breaks the schema, every check enabled (acceptance item 5).

Devices are simulated and answer every desired tag at once, so ``?wait`` requests get
real 200 answers with agent-shaped state to validate. One exception is configured,
for one operation: ``PUT /api/v1/devices/{id}/tag`` may answer 504, which the contract
(docs/PROTOCOL.md, section 9) prescribes when the device does not answer within ``wait`` seconds; schemathesis
sends waits as small as 5e-324 s, which nothing can meet. And a rollout spec that fits
the schema is still refused (400) when it names devices the bridge never saw, or waves
that do not fit the fleet: ``POST /api/v1/rollouts`` is not held to accepting every
schema-valid body, and the rollout routes may find no rollout to act on (no warnings
for those).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bridge.support import TOKEN, SimulatedDevices, running_bridge, unique_prefix
from tests.support.broker import Broker

pytestmark = pytest.mark.broker

CONFIG = """
[[operations]]
include-path = "/api/v1/devices/{id}/tag"
include-method = "PUT"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]

[[operations]]
include-operation-id = "createRollout"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409"]
warnings = false

[[operations]]
include-path-regex = "^/api/v1/rollouts/"
warnings = false

# an event stream never ends: tests/bridge/test_console_api.py reads it
[[operations]]
include-operation-id = "stream"
enabled = false
"""
MAX_EXAMPLES = "10"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    broker: Broker, tmp_path: Path
) -> None:
    schemathesis = shutil.which("schemathesis")
    assert schemathesis, "schemathesis is missing: pip install -e '.[dev]' (scripts/stack)"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    prefix = unique_prefix()
    devices = SimulatedDevices(broker, prefix, answer_any=True).start()
    try:
        devices.add(["dev1", "dev2"])
        with running_bridge(broker, prefix, max_wait_s=2,
                            data_dir=tmp_path / "bridge-data") as bridge:
            result = subprocess.run(
                [schemathesis, "--config-file", str(config), "run",
                 f"{bridge.url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
                 "--checks", "all", "--max-examples", MAX_EXAMPLES, "--request-timeout", "10"],
                cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
            )
    finally:
        devices.close()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20_000:]
    assert "No issues found" in output, output[-5_000:]
