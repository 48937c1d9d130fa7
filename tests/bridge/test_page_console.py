"""The fleet console in headless Chromium with three real agents (``python -m edge_agent``
subprocesses, real Docker, real registry, real Mosquitto), two in group ``lab``:
issue 14, acceptance 1 (a group tag set from the page reaches both devices live; cleared;
check now; a rollback shows its reason) and 4 (axe-core finds no serious or critical
violation). ``CONSOLE_SCREENSHOTS=docs`` refreshes docs/console.png and
docs/console-detail.png.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.bridge.server import Bridge
from tests.bridge.support import TOKEN, AgentProcess, agents_behind_a_bridge
from tests.support.broker import Broker

pytestmark = [pytest.mark.broker, pytest.mark.stack]

GROUP = "lab"
UPDATE_TIMEOUT_S = 90
AXE = Path(os.environ.get("AXE_CACHE", "/var/cache/edge-agent/axe")) / \
    "node_modules/axe-core/axe.min.js"
# every update status the page shows on its way to the new tag, seen by a MutationObserver
WATCH_JS = """
window.__seen = new Set();
new MutationObserver(() => {
  for (const td of document.querySelectorAll('#devices td[data-field="update"]')) {
    window.__seen.add(td.closest('tr').dataset.device + ':' + td.firstChild.textContent);
    if (td.querySelector('progress')) window.__seen.add(td.closest('tr').dataset.device + ':progress');
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def fleet(broker: Broker) -> Iterator[tuple[Bridge, list[AgentProcess]]]:
    with agents_behind_a_bridge(broker, ("1.0", "2.0"), ("crash", "exits"), GROUP) as made:
        yield made


def test_the_console_drives_real_agents_live(  # noqa: PLR0915 - one operator's session
        fleet: tuple[Bridge, list[AgentProcess]], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - needs selenium
    from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: PLC0415

    from tests.bridge.browser import FleetPage, chromium  # noqa: PLC0415 - needs selenium

    bridge, agents = fleet
    first, second, third = agents
    shots = Path(os.environ["CONSOLE_SCREENSHOTS"]) if os.environ.get(
        "CONSOLE_SCREENSHOTS") else tmp_path
    with chromium(tmp_path / "profile") as driver:
        page = FleetPage(driver, bridge.url)
        page.open()
        page.enter_token(TOKEN)
        for agent in agents:
            page.wait_for_row(agent.device_id)
            page.wait_for_cell(agent.device_id, "running", "1.0", timeout=UPDATE_TIMEOUT_S)
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.ID, "link").text == "bridge: live", "no live stream")
        assert driver.find_element(By.ID, "broker").text == "broker: connected"
        # "no healthcheck" is not a verdict: the test images have one, so healthy shows
        page.wait_for_cell(first.device_id, "health", "healthy", timeout=30)
        driver.execute_script(WATCH_JS)

        def form(scope: str, target: str, tag: str = "") -> None:
            Select(driver.find_element(By.ID, "set-scope")).select_by_value(scope)
            for field, value in (("set-device", target), ("set-tag", tag)):
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)

        def confirm() -> None:
            WebDriverWait(driver, 10).until(lambda d: d.switch_to.alert).accept()

        def result(contains: str) -> str:
            WebDriverWait(driver, UPDATE_TIMEOUT_S, poll_frequency=0.2).until(
                lambda d: contains in d.find_element(By.ID, "set-result").text.lower(),
                f"the result never said {contains!r}")
            return str(driver.find_element(By.ID, "set-result").text)

        # a group tag from the page: both devices of the group update, live
        form("group", GROUP, "2.0")
        driver.find_element(By.ID, "set-submit").click()
        confirm()
        result("published")
        for agent in (first, second):
            page.wait_for_cell(agent.device_id, "running", "2.0", timeout=UPDATE_TIMEOUT_S)
            assert (page.cell(agent.device_id, "desired") or "").startswith("2.0 (group lab)")
        seen: list[str] = driver.execute_script("return Array.from(window.__seen)")
        for agent in (first, second):  # the update's steps arrived without a reload
            assert {f"{agent.device_id}:pulling", f"{agent.device_id}:progress"} & set(seen) \
                or f"{agent.device_id}:verifying" in seen, seen
        assert page.cell(third.device_id, "running") == "1.0"
        driver.set_window_size(1500, 1000)
        driver.execute_script("window.scrollTo(0, 0)")
        page.screenshot(shots / "console.png")

        # cleared: the group tag no longer drives them
        form("group", GROUP)
        driver.find_element(By.ID, "set-clear").click()
        confirm()
        result("cleared")
        def group_cleared(_driver: Any) -> bool:
            return all("group" not in (page.cell(a.device_id, "desired") or "group")
                       for a in (first, second))

        WebDriverWait(driver, 30, poll_frequency=0.2).until(group_cleared,
                                                             "the group tag stayed")

        # check now, from the device's detail: its last check moves
        driver.find_element(By.CSS_SELECTOR,
                            f'tr[data-device="{third.device_id}"] td[data-field="id"] button').click()

        def detail(field: str) -> str:
            # read in one step in the page: the live stream redraws the panel at any time
            return str(driver.execute_script(
                "const e = document.querySelector(arguments[0]);"
                "return e ? e.textContent.trim() : '';",
                f'#detail-fields dd[data-field="{field}"]'))

        WebDriverWait(driver, 10).until(lambda _d: detail("last_check") not in ("", "never"))
        before = detail("last_check")
        assert detail("agent_version") != ""
        assert detail("groups") == "none"
        driver.find_element(By.ID, "detail-check").click()
        result("published")
        WebDriverWait(driver, 30, poll_frequency=0.2).until(
            lambda _d: detail("last_check") not in (before, ""), "no new check")

        # a crashing image: rolled back, and the page says why
        form("device", first.device_id, "crash")
        driver.find_element(By.ID, "set-submit").click()
        text = result("failed (409)")
        assert "rolled_back" in text, text
        page.wait_for_cell(first.device_id, "running", "2.0", timeout=30)
        WebDriverWait(driver, 20, poll_frequency=0.2).until(
            lambda _d: (page.cell(first.device_id, "last_event") or "").startswith("rolled_back: "),
            "no rollback reason in the list")
        driver.find_element(By.CSS_SELECTOR,
                            f'tr[data-device="{first.device_id}"] td[data-field="id"] button').click()
        def rolled_back_row(_driver: Any) -> dict[str, str] | None:
            """The detail's rolled_back event, its cells read in one step in the page."""
            row: dict[str, str] | None = driver.execute_script(
                "for (const r of document.querySelectorAll('#detail-events tbody tr')) {"
                "  const cell = (f) => (r.querySelector('td[data-field=\"' + f + '\"]')"
                "                       || {textContent: ''}).textContent.trim();"
                "  if (cell('event') === 'rolled_back')"
                "    return {reason: cell('reason'), request_id: cell('request_id')};"
                "} return null;")
            return row

        rolled = WebDriverWait(driver, 20, poll_frequency=0.2).until(
            rolled_back_row, "no event in detail")
        assert rolled is not None and rolled["reason"]
        assert rolled["request_id"] != "-"
        driver.execute_script("document.getElementById('detail').scrollIntoView()")
        page.screenshot(shots / "console-detail.png")

        # acceptance 4: axe-core on the page as it stands (list, detail, forms)
        violations = run_axe(driver)
        serious = [v for v in violations if v.get("impact") in ("serious", "critical")]
        assert serious == [], [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3])
                               for v in serious]


def run_axe(driver: Any) -> list[dict[str, Any]]:
    """axe-core's violations for the page (axe injected by the test, not served)."""
    if not AXE.is_file():
        pytest.fail(f"axe-core is missing ({AXE}): scripts/stack installs it", pytrace=False)
    driver.execute_script(AXE.read_text())
    driver.set_script_timeout(60)
    outcome: dict[str, Any] = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']})"
        ".then((r) => done({violations: r.violations}), (e) => done({error: String(e)}));")
    assert "error" not in outcome, outcome
    violations: list[dict[str, Any]] = outcome["violations"]
    return violations
