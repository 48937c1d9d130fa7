"""The bridge with three real agents (``python -m edge_agent`` subprocesses, real Docker,
real registry, real Mosquitto with the repository's ACL): acceptance items 1, 3, 4, 6.

The three agents are shared by the tests of this module (they run in file order):
each has its own repository, container, app port, DEVICE_ID and MQTT user; the first
two are in group ``lab``. Images are the ``healthy`` test images (HEALTHCHECK every
1 s), so an update is verified within seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent import __version__
from edge_agent.bridge.server import Bridge
from tests.bridge.support import TOKEN, AgentProcess, ApiClient, agents_behind_a_bridge
from tests.support import wait_until
from tests.support.broker import Broker

pytestmark = [pytest.mark.broker, pytest.mark.stack]

VERSIONS = ("1.0", "2.0", "3.0")
GROUP = "lab"
UPDATE_TIMEOUT_S = 60


@dataclass
class Fleet:
    bridge: Bridge
    api: ApiClient
    agents: list[AgentProcess]

    def device(self, agent: AgentProcess) -> dict[str, Any]:
        response = self.api.get(f"/api/v1/devices/{agent.device_id}")
        return response.json() if response.status_code == 200 else {}

    def installed(self, agent: AgentProcess) -> str | None:
        state = self.device(agent).get("state") or {}
        update = state.get("update") or {}
        if update.get("status") != "idle":
            return None
        return state.get("installed_version")

    def wait_running(self, agent: AgentProcess, tag: str) -> None:
        """The bridge shows the device idle on ``tag`` and its container serves it."""
        def done() -> bool:
            return self.installed(agent) == tag and agent.serving() == tag
        try:
            wait_until(done, timeout=UPDATE_TIMEOUT_S, interval=0.2,
                       message=f"{agent.device_id} running {tag}")
        except TimeoutError:
            raise AssertionError(f"{agent.device_id} not on {tag}: {self.device(agent)}\n"
                                 f"{agent.log()[-4000:]}") from None


@pytest.fixture(scope="module")
def fleet(broker: Broker) -> Iterator[Fleet]:
    with (agents_behind_a_bridge(broker, VERSIONS, ("bad", "unhealthy"), GROUP)
          as (bridge, agents), ApiClient(bridge.url) as api):
        fleet = Fleet(bridge, api, agents)
        for agent in agents:
            fleet.wait_running(agent, "1.0")
        yield fleet


def test_put_wait_returns_200_once_the_agent_applied_it(fleet: Fleet) -> None:
    """Acceptance 1, with curl exactly as an operator would type it."""
    agent = fleet.agents[0]
    url = f"{fleet.bridge.url}/api/v1/devices/{agent.device_id}/tag?wait=60"
    result = subprocess.run(
        ["curl", "-sS", "-X", "PUT", "-H", f"Authorization: Bearer {TOKEN}",
         "-d", '{"tag":"2.0"}', "-w", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=90, check=True)
    body_text, _, status = result.stdout.rpartition("\n")
    assert status == "200", result.stdout
    body = json.loads(body_text)
    assert body["state"]["installed_version"] == "2.0"
    assert body["state"]["desired"] == {"tag": "2.0", "source": "device", "group": None,
                                        "request_id": body["request_id"]}
    assert agent.serving() == "2.0"

    # the same tag again: nothing has to change, and the answer is still 200
    again = fleet.api.put(f"/api/v1/devices/{agent.device_id}/tag?wait=60",
                          json={"tag": "2.0"})
    assert again.status_code == 200, again.text
    assert again.json()["state"]["desired"]["request_id"] == again.json()["request_id"]
    assert agent.serving() == "2.0"


def test_rolled_back_update_answers_409_with_the_reason(fleet: Fleet) -> None:
    """Acceptance 3: an image that turns unhealthy is rolled back; ?wait says so."""
    agent = fleet.agents[0]
    response = fleet.api.put(f"/api/v1/devices/{agent.device_id}/tag?wait=60",
                             json={"tag": "bad"})
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["event"] == "rolled_back", body
    assert body["error"].startswith("rolled_back: "), body
    assert agent.serving() == "2.0"


def test_fleet_and_group_tags_reach_every_subscribed_agent(fleet: Fleet) -> None:
    """Acceptance 4: the fleet route reaches all three agents, the group route its two."""
    first, second, third = fleet.agents
    # the first device's own override ("bad") would win over group and fleet
    assert fleet.api.delete(f"/api/v1/devices/{first.device_id}/tag").status_code == 200

    assert fleet.api.put("/api/v1/fleet/tag", json={"tag": "3.0"}).status_code == 202
    for agent in fleet.agents:
        fleet.wait_running(agent, "3.0")
        assert fleet.device(agent)["state"]["desired"]["source"] == "fleet"

    assert fleet.api.put(f"/api/v1/groups/{GROUP}/tag", json={"tag": "2.0"}).status_code == 202
    for agent in (first, second):
        fleet.wait_running(agent, "2.0")
        desired = fleet.device(agent)["state"]["desired"]
        assert (desired["source"], desired["group"]) == ("group", GROUP)
    assert fleet.installed(third) == "3.0" and third.serving() == "3.0"


def test_check_route_makes_the_agent_check(fleet: Fleet) -> None:
    agent = fleet.agents[2]
    before = fleet.device(agent)["state"]["update"]["last_check_at"]
    assert fleet.api.post(f"/api/v1/devices/{agent.device_id}/check").status_code == 202
    wait_until(lambda: fleet.device(agent)["state"]["update"]["last_check_at"] != before,
               timeout=30, message="a new check")


def test_fleet_page_sets_a_tag_in_chromium(fleet: Fleet, tmp_path: Path) -> None:
    """Acceptance 6: headless Chromium against the real bridge, broker and agents."""
    from tests.bridge.browser import FleetPage, chromium  # noqa: PLC0415 - needs selenium

    agent = fleet.agents[2]
    with chromium(tmp_path / "profile") as driver:
        page = FleetPage(driver, fleet.bridge.url)
        page.open()
        page.enter_token(TOKEN)
        for other in fleet.agents:
            page.wait_for_row(other.device_id)
        assert page.cell(agent.device_id, "running") == "3.0"
        assert page.cell(agent.device_id, "availability") == "online"
        # the agent's own version on the device id (docs/SELF-UPDATE.md)
        id_cell = driver.find_element(
            "css selector", f'tr[data-device="{agent.device_id}"] td[data-field="id"]')
        assert f"agent {__version__}" in (id_cell.get_attribute("title") or "")
        page.set_tag(agent.device_id, "1.0")
        page.wait_for_cell(agent.device_id, "running", "1.0", timeout=UPDATE_TIMEOUT_S)
        assert "1.0" in page.result_text()
        assert (page.cell(agent.device_id, "desired") or "").startswith("1.0 (device)")
        assert agent.serving() == "1.0"
        # FLEET_PAGE_SCREENSHOT=docs/fleet-page.png refreshes the documentation's picture
        target = os.environ.get("FLEET_PAGE_SCREENSHOT")
        page.screenshot(Path(target) if target else tmp_path / "fleet-page.png")


def test_stopped_agent_shows_offline(fleet: Fleet) -> None:
    agent = fleet.agents[2]
    agent.stop()  # a clean stop publishes offline itself
    wait_until(lambda: fleet.device(agent).get("online") is False, timeout=30,
               message="device offline")
    assert fleet.device(agent)["availability"] == "offline"
