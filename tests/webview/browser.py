"""A real headless Chromium for the web view tests, driven by Selenium through Debian's chromedriver.

The driver and browser paths are given explicitly and Selenium Manager is pointed at a path that
does not exist: should Selenium ever try to find or download a driver itself, the test fails at
once instead of reaching for the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
DESKTOP = (1280, 900)
PHONE = (390, 844)  # a common phone's CSS width


@contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}",
                 f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    previous = os.environ.get("SE_MANAGER_PATH")
    os.environ["SE_MANAGER_PATH"] = str(profile / "no-selenium-manager")
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    finally:
        if previous is None:
            os.environ.pop("SE_MANAGER_PATH", None)
        else:
            os.environ["SE_MANAGER_PATH"] = previous
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (reading the log empties it)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def set_viewport(driver: webdriver.Chrome, width: int, height: int, *, mobile: bool) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def screenshot(driver: webdriver.Chrome, path: Path, width: int, *, mobile: bool, max_height: int = 6000) -> None:
    """The whole page at ``width`` CSS pixels (up to ``max_height`` tall) as a PNG."""
    set_viewport(driver, width, PHONE[1] if mobile else DESKTOP[1], mobile=mobile)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    set_viewport(driver, width, min(height, max_height), mobile=mobile)
    path.write_bytes(driver.get_screenshot_as_png())
    set_viewport(driver, *DESKTOP, mobile=False)
