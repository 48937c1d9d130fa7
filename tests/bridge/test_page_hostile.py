"""The fleet page in headless Chromium (Debian's chromium + chromedriver, selenium) with a
device that publishes markup and made-up CSS class names: real bridge, real Mosquitto.

Device strings are always text, and class names come from the page's fixed lists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.protocol.topics import Topics
from tests.bridge.support import (
    HTML,
    TOKEN,
    hostile_states,
    running_bridge,
    state_document,
    unique_prefix,
)
from tests.support.broker import Broker, MqttWatcher

pytestmark = pytest.mark.broker

# every class the page may give an element (app.js and style.css)
ALLOWED_CLASSES = {
    "mono", "badge", "muted", "warn", "ok", "bad", "is-offline", "neutral", "link", "visually-hidden",
    "online", "offline", "unknown",
    "idle", "checking", "available", "pulling", "installing", "verifying", "rolling_back",
    "error", "healthy", "unhealthy", "starting", "running", "created", "restarting",
    "paused", "exited", "dead", "removing", "missing",
}
CLASSES_JS = ("return Array.from(arguments[0].querySelectorAll('[class]'))"
              ".concat([arguments[0]]).map((e) => e.getAttribute('class') || '')")


@pytest.fixture
def publisher(broker: Broker) -> Iterator[tuple[MqttWatcher, Topics]]:
    prefix = unique_prefix()
    client = MqttWatcher(broker.settings("simulator", prefix=prefix), []).start()
    yield client, Topics(prefix)
    client.close()


def class_tokens(values: list[str]) -> set[str]:
    return {token for value in values for token in value.split()}


def test_hostile_device_strings_render_as_text_with_fixed_classes(
    broker: Broker, publisher: tuple[MqttWatcher, Topics], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - needs selenium

    from tests.bridge.browser import FleetPage, chromium  # noqa: PLC0415 - needs selenium

    client, topics = publisher
    good = state_document("good", "1.0")
    markup = hostile_states()["markup"]
    for device_id, payload in (("good", json.dumps(good).encode()), ("evil", markup)):
        client.publish(topics.availability(device_id), b"online", retain=True)
        client.publish(topics.state(device_id), payload, retain=True)
    with running_bridge(broker, topics.prefix) as bridge, chromium(tmp_path / "p") as driver:
        client.publish(topics.events("evil"), json.dumps(
            {"event": "rolled_back", "reason": HTML, "ts": HTML}).encode())
        page = FleetPage(driver, bridge.url)
        page.open()
        page.enter_token(TOKEN)
        page.wait_for_row("good")
        page.wait_for_row("evil")
        page.wait_for_cell("evil", "last_event", f"rolled_back: {HTML}", timeout=20)

        table = driver.find_element(By.ID, "devices")
        tokens = class_tokens(driver.execute_script(CLASSES_JS, table))
        assert tokens <= ALLOWED_CLASSES, tokens - ALLOWED_CLASSES
        assert driver.find_elements(By.CSS_SELECTOR, "#devices img, #devices script, "
                                                     "#devices b") == []
        assert driver.title == "edge fleet"
        # the device's strings are on the page as text, markup and all
        assert HTML in (page.cell("evil", "update") or "")
        assert page.cell("good", "running") == "1.0"
        assert page.cell("good", "health") == "healthy"

        # whatever the API delivers, app.js itself takes classes from its fixed lists
        hostile: dict[str, Any] = {
            "id": "x", "online": True, "availability": "online x-evil", "last_seen": HTML,
            "state": {
                "update": {"status": "idle x-evil", "last_error": HTML, "progress": 50},
                "running": {"health": '"><img src=x>', "status": "running x-evil",
                            "tag": HTML},
                "desired": {"tag": HTML, "source": HTML, "request_id": HTML},
                "fallback": {"active": True, "requested_tag": HTML, "reason": HTML},
                "image": HTML,
            },
            "last_event": {"event": HTML, "reason": HTML, "ts": HTML},
        }
        for health in ('"><img src=x>', "idle x-evil", "constructor", "__proto__", None):
            hostile["state"]["running"]["health"] = health
            row = driver.execute_script("const r = renderDevice(arguments[0]);"
                                        "document.body.appendChild(r); return r;", hostile)
            tokens = class_tokens(driver.execute_script(CLASSES_JS, row))
            assert tokens <= ALLOWED_CLASSES, (health, tokens - ALLOWED_CLASSES)
            html = row.get_attribute("outerHTML") or ""
            assert "<img" not in html and "<script" not in html and "<b>" not in html
            assert re.search(r'class="[^"]*x-evil', html) is None
            driver.execute_script("arguments[0].remove()", row)
        assert driver.title == "edge fleet"


SCRIPT = ('<img src=x onerror="window.__pwned=1;alert(1)">'
          '<script>window.__pwned=2;alert(2)</script><iframe src="javascript:alert(3)"></iframe>')


def test_a_device_with_script_in_every_field_runs_none_in_the_console(
    broker: Broker, publisher: tuple[MqttWatcher, Topics], tmp_path: Path
) -> None:
    """Issue 14, acceptance 3: list, overview, detail and events of a device whose every
    string is markup: no alert, no element of its making, no console error."""
    from selenium.common.exceptions import NoAlertPresentException  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - needs selenium
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    from tests.bridge.browser import FleetPage, chromium  # noqa: PLC0415 - needs selenium

    client, topics = publisher
    state = state_document("evil", "1.0")

    def poison(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: poison(v) for k, v in node.items()}
        if isinstance(node, list):
            return [poison(v) for v in node] or [SCRIPT]
        return SCRIPT if isinstance(node, str) else node

    evil = poison(state)
    evil["device_id"] = "evil"
    evil["groups"] = ["lab"]  # an id the bridge accepts; every other string is markup
    evil["running"]["tag"] = "1.0"
    evil["update"].update({"last_error": SCRIPT, "progress": 30.0})
    evil["fallback"] = {"active": True, "requested_tag": SCRIPT, "reason": SCRIPT}
    client.publish(topics.availability("evil"), b"online", retain=True)
    client.publish(topics.state("evil"), json.dumps(evil).encode(), retain=True)
    with running_bridge(broker, topics.prefix) as bridge, chromium(tmp_path / "p") as driver:
        page = FleetPage(driver, bridge.url)
        page.open()
        page.enter_token(TOKEN)
        page.wait_for_row("evil")
        for n in range(3):
            client.publish(topics.events("evil"), json.dumps(
                {"event": "rolled_back", "reason": SCRIPT, "error": SCRIPT, "tag": SCRIPT,
                 "request_id": f"r{n}", "ts": SCRIPT}).encode())
        page.wait_for_cell("evil", "last_event", f"rolled_back: {SCRIPT}", timeout=20)
        driver.find_element(By.CSS_SELECTOR, 'tr[data-device="evil"] td[data-field="id"] button'
                            ).click()
        WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(
            By.CSS_SELECTOR, "#detail-events tbody tr")) >= 1, "no events in the detail")
        assert SCRIPT in driver.find_element(By.ID, "detail").text
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 - raises when no alert is open
        assert driver.execute_script("return window.__pwned") is None
        assert driver.find_elements(By.CSS_SELECTOR, "main img, main script, main iframe") == []
        # (network errors are the bridge's: no favicon, no rollouts in this bridge)
        errors = [e for e in driver.get_log("browser")  # type: ignore[attr-defined]
                  if e.get("level") == "SEVERE" and e.get("source") != "network"]
        assert errors == [], errors
