"""Headless Debian Chromium driven by selenium (chromedriver from ``chromium-driver``).

No browser or driver is downloaded: both come from Debian's packages (scripts/stack
installs them). A missing one fails the test with the install command.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

REAL_BINARY = Path("/usr/lib/chromium/chromium")  # the Debian launcher script wraps this
ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1500,560",
)


def chromium_paths() -> tuple[str, str]:
    browser = str(REAL_BINARY) if REAL_BINARY.is_file() else shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("Chromium or chromedriver is missing: apt-get install chromium "
                    "chromium-driver (scripts/stack installs them)", pytrace=False)
    return browser, driver


@contextmanager
def chromium(profile_dir: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium with its own profile directory."""
    browser, driver_path = chromium_paths()
    profile_dir.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = browser
    for arg in ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile_dir}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class FleetPage:
    """The fleet page at ``/``, by the element ids and data attributes of index.html."""

    def __init__(self, driver: WebDriver, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def open(self) -> None:
        self.driver.get(f"{self.base_url}/")

    def enter_token(self, token: str) -> None:
        self.driver.find_element(By.ID, "token").send_keys(token)
        self.driver.find_element(By.ID, "token-save").click()

    def _text(self, css: str) -> str | None:
        try:
            elements = self.driver.find_elements(By.CSS_SELECTOR, css)
            return elements[0].text if elements else None
        except StaleElementReferenceException:  # the table was just re-rendered
            return None

    def cell(self, device_id: str, field: str) -> str | None:
        return self._text(f'tr[data-device="{device_id}"] td[data-field="{field}"]')

    def wait_for_row(self, device_id: str, timeout: float = 20) -> None:
        WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda _d: self.cell(device_id, "id") == device_id,
            f"no row for {device_id}")

    def wait_for_cell(self, device_id: str, field: str, text: str, timeout: float) -> None:
        WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda _d: self.cell(device_id, field) == text,
            f"{field} of {device_id} never showed {text!r}")

    def set_tag(self, device_id: str, tag: str) -> None:
        self.driver.find_element(By.ID, "set-device").send_keys(device_id)
        self.driver.find_element(By.ID, "set-tag").send_keys(tag)
        self.driver.find_element(By.ID, "set-submit").click()

    def result_text(self, timeout: float = 60) -> str:
        """The set-tag form's result, once the request has finished."""
        def finished(driver: WebDriver) -> bool:
            classes = driver.find_element(By.ID, "set-result").get_attribute("class") or ""
            enabled = driver.find_element(By.ID, "set-submit").is_enabled()
            return enabled and ("ok" in classes.split() or "bad" in classes.split())

        WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            finished, "the set-tag request never finished")
        return str(self.driver.find_element(By.ID, "set-result").text)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
