"""A real headless browser for the page tests: Debian's chromium driven by Selenium through chromedriver (both from
`make test`'s setup). By hand, it screenshots a trace page:

    .venv/bin/python tests/browser.py data/runs/<run>/trace.html docs/trace-page.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def chromium() -> webdriver.Chrome:
    """Headless chromium with the page's console log readable; a clear error when the browser is missing."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise RuntimeError("the page tests need chromium and chromedriver: `make test` installs them (Debian packages"
                           " chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def screenshot(page: Path, png: Path) -> Path:
    browser = chromium()
    try:
        browser.get(Path(page).resolve().as_uri())
        browser.save_screenshot(str(png))
    finally:
        browser.quit()
    return png


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
