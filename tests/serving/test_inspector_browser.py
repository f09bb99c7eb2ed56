"""The inspector page in headless Chromium (Selenium, /usr/bin/chromedriver) against a real uvicorn
server on loopback: warm user, click leaves the feed and enters the history, cold user, compare
view, no console errors. Screenshots go to runs/inspector/*.png."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from feedrank.serving.app import create_app  # noqa: E402

DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[2] / "runs" / "inspector"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(DRIVER).exists(), reason="chromedriver not installed")]


@pytest.fixture
def server(make_service, serving_world):
    import uvicorn

    app = create_app(make_service(), compare=make_service(ranker=False), log_dir=str(serving_world.log))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def driver():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def _rows(d, which):
    """The feed's item ids, read in one script call (the page re-renders tables, so element handles go stale)."""
    return d.execute_script(f"return [...document.querySelectorAll('#feed-{which} tr[data-item]')].map((r) => r.dataset.item)")


def test_inspector_in_a_real_browser(server, driver):
    SHOTS.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(driver, 20)
    driver.get(server + "/")
    wait.until(lambda d: d.execute_script("return meta.compare === true"))
    driver.execute_script("document.getElementById('compare').checked = false")
    driver.find_element(By.ID, "warm").click()
    wait.until(lambda d: _rows(d, "primary") and d.find_elements(By.CSS_SELECTOR, "#history tr td"))
    driver.save_screenshot(str(SHOTS / "warm.png"))
    first = _rows(driver, "primary")[0]
    driver.find_element(By.CSS_SELECTOR, f"#feed-primary button.click[data-item='{first}']").click()
    wait.until(lambda d: first not in _rows(d, "primary"))
    history = driver.find_element(By.ID, "history").get_attribute("innerHTML")
    assert driver.execute_script("return previous.primary !== null")
    assert first in history or driver.find_elements(By.CSS_SELECTOR, "#history tr td")
    driver.save_screenshot(str(SHOTS / "after_click.png"))

    driver.find_element(By.ID, "cold").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "unknown user"))
    wait.until(lambda d: _rows(d, "primary"))
    assert "cold_start" in driver.find_element(By.CSS_SELECTOR, "#feed-primary .timings").text
    driver.save_screenshot(str(SHOTS / "cold.png"))

    driver.find_element(By.ID, "compare").click()
    driver.find_element(By.ID, "warm").click()
    wait.until(lambda d: _rows(d, "compare") and _rows(d, "primary"))
    assert driver.find_element(By.ID, "feed-compare").is_displayed()
    driver.save_screenshot(str(SHOTS / "compare.png"))

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "404" not in e["message"]]
    assert errors == []
