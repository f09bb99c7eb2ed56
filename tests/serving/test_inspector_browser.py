"""The inspector page in headless Chromium (Selenium, Debian's /usr/bin/chromedriver; nothing is
downloaded) against a real uvicorn server on loopback: a named warm user, a click that leaves the
feed and enters the history, a hide, the seeded random buttons (a cold user, then a warm one in the
compare view), the overloaded state, a model still loading, no console errors. Screenshots go to runs/inspector/*.png.

Every wait is a ``WebDriverWait`` on a concrete DOM condition (the page marks each drawn load on
``#feeds`` with ``data-user`` and a rising ``data-loads``), with generous timeouts for a loaded
machine; the random users come from ``/?seed=N``, so every run opens the same users.
"""

from __future__ import annotations

import random
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
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from feedrank.data.log import read_events  # noqa: E402
from feedrank.serving.app import create_app  # noqa: E402
from feedrank.serving.config import EventLogConfig, RateLimitConfig  # noqa: E402
from feedrank.serving.inspector import page_routes  # noqa: E402
from feedrank.serving.loading import LoadingApp  # noqa: E402

DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[2] / "runs" / "inspector"
WAIT_S = 60  # a condition that holds within a second on an idle machine; only a hang guard
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(DRIVER).exists(), reason="chromedriver not installed "
                                                   "(apt-get install chromium-driver)")]  # fmt: skip


class LoopbackServer:
    """``app`` under uvicorn in a thread, on a socket bound and listening before the thread starts
    (no port race; a browser that connects early waits in the backlog)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:  # uvicorn sets this once it serves; no event to wait on
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT_S)
        self.sock.close()


@pytest.fixture
def driver():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(WAIT_S)
    d.set_script_timeout(WAIT_S)
    yield d
    d.quit()


def _rows(d, where: str) -> list[str]:
    """The item ids of a table's rows, read in one script call (the page re-renders its tables,
    so element handles would go stale)."""
    return d.execute_script(f"return [...document.querySelectorAll('{where} tr[data-item]')].map((r) => r.dataset.item)")


def _loads(d) -> int:
    return int(d.execute_script("return document.getElementById('feeds').dataset.loads || '0'"))


def _drawn(d, user: str, after: int) -> bool:
    """A load of ``user`` newer than load number ``after`` is on the page."""
    feeds = d.find_element(By.ID, "feeds")
    return feeds.get_attribute("data-user") == user and _loads(d) > after


def _severe(d, allowed: list[str]) -> list[dict]:
    """SEVERE console entries, less the failed requests the test provoked on purpose (each entry of
    ``allowed`` is a URL fragment plus status, e.g. ``/inspect/user/new-1 404``)."""
    def expected(message: str) -> bool:
        return any(url in message and f"status of {status}" in message for url, status in (a.rsplit(" ", 1) for a in allowed))

    return [e for e in d.get_log("browser") if e["level"] == "SEVERE" and not expected(e["message"])]


def _open_page(d, url: str) -> WebDriverWait:
    wait = WebDriverWait(d, WAIT_S)
    d.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    return wait


def test_inspector_in_a_real_browser(make_service, serving_world, tmp_path, driver):
    SHOTS.mkdir(parents=True, exist_ok=True)
    compare = make_service(ranker=False, event_log=EventLogConfig(dir=str(tmp_path / "compare_log")))
    app = create_app(make_service(), compare=compare, log_dir=str(serving_world.log))
    inspector = app.state.inspector
    # the warm user with the longest history: a named user, so the main flow never depends on a pick
    store = inspector.service.store
    named = max(inspector.warm_users, key=lambda u: (len(store.view(u, inspector.service.clock()).history), u))
    seed = 3
    with LoopbackServer(app) as server:
        wait = _open_page(driver, f"{server.url}/?seed={seed}")
        driver.execute_script("document.getElementById('compare').checked = false")

        # a named warm user: history and feed
        driver.find_element(By.ID, "user").send_keys(named)
        driver.find_element(By.ID, "open").click()
        wait.until(lambda d: _drawn(d, named, 0) and _rows(d, "#feed-primary") and _rows(d, "#history"))
        assert driver.find_element(By.ID, "status").text == f"user {named}"
        assert "true interests:" in driver.find_element(By.ID, "interests").text  # the log has the world's truth
        assert "true utility" in driver.find_element(By.CSS_SELECTOR, "#feed-primary table").text
        driver.save_screenshot(str(SHOTS / "warm.png"))

        # a click: a real POST /events; the item leaves the feed and heads the history, with its dwell
        first, seen = _rows(driver, "#feed-primary")[0], _loads(driver)
        driver.find_element(By.CSS_SELECTOR, f"#feed-primary button.click[data-item='{first}']").click()
        wait.until(lambda d: _drawn(d, named, seen))
        assert first not in _rows(driver, "#feed-primary")
        assert _rows(driver, "#history")[0] == first
        newest = driver.find_element(By.CSS_SELECTOR, "#history tr[data-item]").text
        assert newest.replace("\xa0", " ").endswith("30 s"), newest  # the page posts dwell_s 30 with a click
        gone = driver.execute_script("return [...document.querySelectorAll('#feed-primary .gone-list li')].map((r) => r.dataset.item)")
        assert first in gone  # "what changed": the clicked item is listed as gone since the last load
        driver.save_screenshot(str(SHOTS / "after_click.png"))

        # a hide: the item leaves the feed but not into the history; the serving log has it as hidden
        hidden, seen = _rows(driver, "#feed-primary")[1], _loads(driver)
        driver.find_element(By.CSS_SELECTOR, f"#feed-primary button.hide[data-item='{hidden}']").click()
        wait.until(lambda d: _drawn(d, named, seen))
        assert hidden not in _rows(driver, "#feed-primary") and _rows(driver, "#history")[0] == first
        logged = read_events(inspector.service.sink.root, columns=["item_id", "clicked", "hidden", "dwell_s", "position"]).to_pylist()
        assert sorted(logged, key=lambda r: r["hidden"]) == [
            {"item_id": first, "clicked": True, "hidden": False, "dwell_s": 30.0, "position": 0},
            {"item_id": hidden, "clicked": False, "hidden": True, "dwell_s": 0.0, "position": 1}]

        # "random cold user" (the page's first seeded press: seed + 0): an unknown user, a cold-start feed
        cold = inspector.random_user("cold", random.Random(seed))
        seen = _loads(driver)
        driver.find_element(By.ID, "cold").click()
        wait.until(lambda d: _drawn(d, cold, seen))
        assert "unknown user" in driver.find_element(By.ID, "status").text
        assert _rows(driver, "#feed-primary") and not _rows(driver, "#history")
        assert "cold_start" in driver.find_element(By.CSS_SELECTOR, "#feed-primary .timings").text
        driver.save_screenshot(str(SHOTS / "cold.png"))

        # "random warm user" (the second press: seed + 1) in the compare view: two feeds side by side
        warm = inspector.random_user("warm", random.Random(seed + 1))
        driver.find_element(By.ID, "compare").click()
        wait.until(lambda d: _drawn(d, cold, seen + 1) and _rows(d, "#feed-compare"))  # the toggle reloads
        seen = _loads(driver)
        driver.find_element(By.ID, "warm").click()
        wait.until(lambda d: _drawn(d, warm, seen) and _rows(d, "#feed-compare") and _rows(d, "#history"))
        assert driver.find_element(By.ID, "feed-compare").is_displayed()
        primary, other = set(_rows(driver, "#feed-primary")), set(_rows(driver, "#feed-compare"))
        both = set(driver.execute_script("return [...document.querySelectorAll('#feed-primary tr.both')].map((r) => r.dataset.item)"))
        assert both == primary & other
        driver.save_screenshot(str(SHOTS / "compare.png"))

        assert _severe(driver, [f"/inspect/user/{cold} 404"]) == []


def test_an_overloaded_server_is_shown_as_such(make_service, serving_world, driver):
    """Over the rate limit the server answers 429; the page says the server is overloaded."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    # 3 requests at once, then one per 1000 s: meta, the user, the feed pass; the click is refused
    limit = RateLimitConfig(enabled=True, rate_per_s=0.001, burst=3)
    app = create_app(make_service(rate_limit=limit), log_dir=str(serving_world.log))
    user = app.state.inspector.warm_users[0]
    with LoopbackServer(app) as server:
        wait = _open_page(driver, f"{server.url}/")
        driver.find_element(By.ID, "user").send_keys(user)
        driver.find_element(By.ID, "open").click()
        wait.until(lambda d: _drawn(d, user, 0) and _rows(d, "#feed-primary"))
        first = _rows(driver, "#feed-primary")[0]
        driver.find_element(By.CSS_SELECTOR, f"#feed-primary button.click[data-item='{first}']").click()
        wait.until(lambda d: "server overloaded (429)" in d.find_element(By.ID, "status").text)
        assert "busy" in driver.find_element(By.ID, "status").get_attribute("class")
        assert "retry in" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(SHOTS / "overloaded.png"))
        assert _severe(driver, ["/events 429"]) == []


def test_a_model_still_loading_is_shown_until_the_service_is_ready(make_service, serving_world, driver):
    """``feedrank serve`` (one process) answers 503 while it builds the service; the page says so,
    keeps asking, and works once the service is up."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    release = threading.Event()

    def build():
        assert release.wait(WAIT_S * 2), "the test never released the build"
        return create_app(make_service(), log_dir=str(serving_world.log))

    loading = LoadingApp(build, routes=page_routes(), what="bundle two_tower")
    with LoopbackServer(loading) as server:
        wait = WebDriverWait(driver, WAIT_S)
        driver.get(f"{server.url}/")
        wait.until(lambda d: "model still loading (bundle two_tower" in d.find_element(By.ID, "status").text)
        assert "service unavailable (503)" in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") is None
        driver.save_screenshot(str(SHOTS / "loading.png"))
        release.set()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        user = loading.app.state.inspector.warm_users[0]
        driver.find_element(By.ID, "user").send_keys(user)
        driver.find_element(By.ID, "open").click()
        wait.until(lambda d: _drawn(d, user, 0) and _rows(d, "#feed-primary"))
        assert _severe(driver, ["/inspect/meta 503"]) == []
