"""The fleet page's Rollouts section in headless Chromium (Debian's chromium + chromedriver,
selenium): a real bridge process that drives rollouts (BRIDGE_DATA_DIR), a real Mosquitto,
and devices that are known but never answer, so that a rollout stays running while its
buttons are tried. The page's strings from the rollout document are text, its classes
from fixed lists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from edge_agent.protocol.topics import Topics
from tests.bridge.support import HTML, TOKEN, state_document, unique_prefix
from tests.support import wait_until
from tests.support.bridge_process import BridgeProcess
from tests.support.broker import Broker, MqttWatcher

pytestmark = pytest.mark.broker

DEVICES = ("page-a", "page-b")
ALLOWED_CLASSES = {"rollout", "rollout-actions", "waves", "rollout-devices",
                   "visually-hidden", "mono", "muted", "badge", "message", "bad", "ok", "warn",
                   "pulling", "neutral", "offline"}
CLASSES_JS = ("return Array.from(arguments[0].querySelectorAll('[class]'))"
              ".concat([arguments[0]]).map((e) => e.getAttribute('class') || '')")


@pytest.fixture
def bridge(broker: Broker, tmp_path: Path) -> Iterator[BridgeProcess]:
    topics = Topics(unique_prefix())
    devices = MqttWatcher(broker.settings("simulator", prefix=topics.prefix), []).start()
    for device_id in DEVICES:
        devices.publish(topics.availability(device_id), b"online", retain=True)
        devices.publish(topics.state(device_id),
                        json.dumps(state_document(device_id, "1.0")).encode(), retain=True)
    (tmp_path / "data").mkdir()
    process = BridgeProcess(broker, topics.prefix, TOKEN, tmp_path / "bridge.log",
                            data_dir=tmp_path / "data").start()
    try:
        # a rollout names devices the bridge has seen: wait for their retained states
        wait_until(lambda: {d["id"] for d in process.get("/api/v1/devices").json()["devices"]}
                   >= set(DEVICES), timeout=20, message="the bridge to list the devices")
        yield process
    finally:
        process.stop()
        print(process.log()[-4000:])
        devices.close()


def test_the_rollouts_section_shows_a_rollout_and_its_buttons_work(
        bridge: BridgeProcess, tmp_path: Path) -> None:
    from selenium.common.exceptions import (  # noqa: PLC0415 - needs selenium
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    from tests.bridge.browser import FleetPage, chromium  # noqa: PLC0415 - needs selenium

    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {TOKEN}"
    created = api.post(f"{bridge.url}/api/v1/rollouts", timeout=30, json={
        "tag": "2.0", "target": {"devices": list(DEVICES)}, "waves": [1], "max_updating": 1})
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    article = f'article[data-rollout="{rollout_id}"]'

    with chromium(tmp_path / "profile") as driver:
        page = FleetPage(driver, bridge.url)
        page.open()
        page.enter_token(TOKEN)

        def text(css: str) -> str | None:
            return page._text(f"{article} {css}")

        def wait_text(css: str, shown: str) -> None:
            WebDriverWait(driver, 20, poll_frequency=0.2).until(
                lambda _d: text(css) == shown, f"{css} of {rollout_id} never showed {shown}")

        def wait_state(state: str) -> None:
            wait_text('h3 [data-field="state"]', state)

        def button(action: str) -> Any:
            return driver.find_element(By.CSS_SELECTOR, f'{article} button[data-action="{action}"]')

        def on_button(action: str, use: Any) -> Any:
            """``use(button)``, found again if the section was redrawn in between (the
            page redraws a rollout whenever its document changes)."""
            return WebDriverWait(driver, 10, poll_frequency=0.1,
                                 ignored_exceptions=[StaleElementReferenceException]).until(
                lambda _d: [use(button(action))])[0]

        def press(action: str) -> None:
            on_button(action, lambda b: b.click())

        wait_state("running")
        assert rollout_id in (text("h3") or "")
        assert "tag 2.0 to 2 devices" in (text('[data-field="summary"]') or "")
        # the waves with their states, and every device with its outcome
        assert text('tr[data-wave="0"] td[data-field="wave"]') == "1 of 2"
        wait_text('tr[data-wave="0"] td[data-field="state"]', "running")
        assert text('tr[data-wave="1"] td[data-field="state"]') == "pending"
        headers = [th.get_attribute("textContent") for th in
                   driver.find_elements(By.CSS_SELECTOR, f"{article} table.rollout-devices th")]
        assert headers == ["Device", "Wave", "Outcome", "Previous tag", "Reason"]
        outcomes = driver.find_elements(
            By.CSS_SELECTOR, f'{article} tr[data-rollout-device] td[data-field="outcome"]')
        assert len(outcomes) == len(DEVICES)
        # the buttons have names that say which rollout they act on
        assert on_button("pause", lambda b: b.get_attribute("aria-label")) == (
            f"Pause rollout {rollout_id}")
        assert not on_button("resume", lambda b: b.is_enabled())

        press("pause")
        wait_state("paused")
        assert api.get(f"{bridge.url}/api/v1/rollouts/{rollout_id}",
                       timeout=30).json()["state"] == "paused"
        assert "is paused" in driver.find_element(By.ID, "rollout-result").text
        press("resume")
        wait_state("running")
        press("abort")
        driver.switch_to.alert.accept()  # abort asks first
        wait_state("aborted")
        assert api.get(f"{bridge.url}/api/v1/rollouts/{rollout_id}",
                       timeout=30).json()["state"] == "aborted"
        assert not any(on_button(a, lambda b: b.is_enabled()) for a in ("pause", "resume", "abort"))
        page.screenshot(tmp_path / "rollouts.png")


def test_a_hostile_rollout_document_is_text_with_fixed_classes(
        bridge: BridgeProcess, tmp_path: Path) -> None:
    """Whatever the document holds (reasons come from devices), app.js shows it as text
    and takes classes from its fixed lists."""
    from tests.bridge.browser import FleetPage, chromium  # noqa: PLC0415 - needs selenium

    device = {"device_id": HTML, "outcome": "failed x-evil", "reason": HTML,
              "previous_tag": HTML, "request_id": HTML}
    hostile: dict[str, Any] = {
        "id": HTML, "state": "running x-evil", "reason": HTML, "created_at": HTML,
        "spec": {"tag": HTML, "target": {"group": HTML}},
        "counts": {HTML: 1, "failed": "x"},
        "waves": [{"index": 0, "state": HTML, "started_at": HTML, "ended_at": 5,
                   "devices": [device, "not a device", None]}, "not a wave"],
    }
    with chromium(tmp_path / "profile") as driver:
        page = FleetPage(driver, bridge.url)
        page.open()
        for state in ("running x-evil", "constructor", "__proto__", None, HTML):
            hostile["state"] = state
            node = driver.execute_script("const r = renderRollout(arguments[0]);"
                                         "document.body.appendChild(r); return r;", hostile)
            tokens = {token for value in driver.execute_script(CLASSES_JS, node)
                      for token in value.split()}
            assert tokens <= ALLOWED_CLASSES, tokens - ALLOWED_CLASSES
            html = node.get_attribute("outerHTML") or ""
            assert "<img" not in html and "<script" not in html and "<b>" not in html
            assert re.search(r'class="[^"]*x-evil', html) is None
            assert HTML in (node.text or "") or HTML in html.replace("&lt;", "<")
            driver.execute_script("arguments[0].remove()", node)
        assert driver.title == "edge fleet"
