"""Headless chromium for UI tests (Debian's ``chromium`` and ``chromium-driver``, driven by selenium).

    with chrome() as driver: ...
    facts = open_artifact("http://127.0.0.1:5000", experiment_id, run_id, "frontier.png", "shot.png")

No download at run time: the driver is the system's chromedriver, never Selenium Manager's.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

INSTALL = "apt-get install chromium chromium-driver"
REPO = Path(__file__).resolve().parents[1]

# The artifact's <img>: MLflow's image viewer shows a blob: URL of the fetched file (the biggest one on screen).
_IMAGE_FACTS = """
const path = arguments[0];
const shown = Array.from(document.images)
  .filter(i => i.src.startsWith('blob:') || i.src.includes(path) || i.src.includes(encodeURIComponent(path)))
  .map(i => ({src: i.src, complete: i.complete, natural_width: i.naturalWidth, natural_height: i.naturalHeight,
              width: i.getBoundingClientRect().width, height: i.getBoundingClientRect().height}))
  .sort((a, b) => b.width * b.height - a.width * a.height);
return shown.length ? shown[0] : null;
"""


def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver) paths; a missing one fails the test (not a skip: CI must install them)."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
    )
    if browser is None or driver is None:
        missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
        pytest.fail(f"{' and '.join(missing)} not found: the browser tests need `{INSTALL}` (Debian/Ubuntu)")
    return browser, driver


@contextmanager
def chrome(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless chromium session, closed at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def screenshot_path(name: str) -> Path:
    """Where a test's screenshot goes: ``$PYTEST_ARTIFACTS``, else ``<repo>/test-artifacts`` (git-ignored)."""
    folder = Path(os.environ.get("PYTEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def artifact_url(ui_url: str, experiment_id: str, run_id: str, artifact_path: str) -> str:
    """The MLflow UI's page of one artifact of a run, opened on it (MLflow 3's hash routes)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{artifact_path}"


def open_artifact(
    ui_url: str, experiment_id: str, run_id: str, artifact_path: str, screenshot: str | Path, timeout: float = 30
) -> dict[str, Any]:
    """Open an image artifact in the MLflow UI, wait until its ``<img>`` has loaded and is laid out, save a
    screenshot; returns the image's facts (``src``, ``complete``, ``natural_width``/``height``, rendered
    ``width``/``height``) with ``url`` and ``screenshot``. Fails with the last facts seen if it never shows."""
    url = artifact_url(ui_url, experiment_id, run_id, artifact_path)
    with chrome() as driver:
        driver.get(url)
        deadline, facts = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            facts = driver.execute_script(_IMAGE_FACTS, artifact_path)
            if facts and facts["complete"] and facts["natural_width"] > 0 and facts["width"] > 0:
                break
            time.sleep(0.25)
        driver.save_screenshot(str(screenshot))
        if not (facts and facts["complete"] and facts["natural_width"] > 0 and facts["width"] > 0):
            pytest.fail(f"{artifact_path} never rendered at {url} within {timeout} s (last: {facts}); see {screenshot}")
        return facts | {"url": url, "screenshot": str(screenshot)}


def page_text(url: str, expected: str, timeout: float = 30) -> tuple[str, str]:
    """Open ``url`` in a fresh session and wait until its text shows ``expected`` (or ``timeout`` passes): the
    page's text and the URL the app ended on."""
    with chrome() as driver:
        driver.get(url)
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            text = driver.execute_script("return document.body.innerText")
            if expected in text:
                break
            time.sleep(0.25)
        return text, driver.current_url
