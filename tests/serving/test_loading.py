"""``LoadingApp``: 503 "model still loading" until the real app is built, its page meanwhile,
the real app's lifespan run (the service closed at shutdown), a failed build reported."""

from __future__ import annotations

import threading

from fastapi import FastAPI
from fastapi.testclient import TestClient

from feedrank.serving.inspector import page_routes
from feedrank.serving.loading import LoadingApp

WAIT_S = 60


def _blocked_app(release: threading.Event, closed: list[str]):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_):
        yield
        closed.append("closed")

    def build() -> FastAPI:
        assert release.wait(WAIT_S), "the test never released the build"
        app = FastAPI(lifespan=lifespan)
        app.get("/healthz")(lambda: {"ok": True})
        return app

    return build


def test_answers_503_until_built_then_serves_the_app_and_shuts_it_down():
    release, closed = threading.Event(), []
    loading = LoadingApp(_blocked_app(release, closed), routes=page_routes(), what="bundle b1")
    with TestClient(loading) as client:
        busy = client.get("/healthz")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["detail"].startswith("model still loading (bundle b1, ")
        assert client.post("/events", json={}).status_code == 503
        page = client.get("/")  # the page itself is there, so it can say what is going on
        assert page.status_code == 200 and "feedrank inspector" in page.text
        assert client.get("/inspector/inspector.js").status_code == 200
        release.set()
        assert loading.loaded.wait(WAIT_S) and loading.failed is None
        assert client.get("/healthz").json() == {"ok": True}
        assert closed == []
    assert closed == ["closed"]  # the built app's lifespan ran to its end


def test_a_failed_build_is_reported_and_handed_to_on_failure():
    failures: list[BaseException] = []

    def build() -> FastAPI:
        raise ValueError("bundle b2: model.pt is missing")

    loading = LoadingApp(build, what="bundle b2", on_failure=failures.append)
    with TestClient(loading) as client:
        assert loading.loaded.wait(WAIT_S)
        assert [str(f) for f in failures] == ["bundle b2: model.pt is missing"]
        refused = client.get("/feed")
        assert refused.status_code == 503
        assert refused.json()["detail"] == "the service failed to load: bundle b2: model.pt is missing"


def test_serve_settings_answer_while_loading_wraps_the_app(serving_world, tmp_path, monkeypatch):
    from feedrank.serving.app import ServeSettings, app_from_env

    config = tmp_path / "serving.yaml"
    config.write_text(f"serving:\n  index: {{kind: flat}}\n  event_log: {{dir: '{tmp_path / 'slog'}'}}\n")
    for wait, kind in ((False, FastAPI), (True, LoadingApp)):
        settings = ServeSettings(bundle=str(serving_world.two_tower.path), config=str(config), answer_while_loading=wait)
        monkeypatch.setenv(*settings.to_env().popitem())
        app = app_from_env()
        assert isinstance(app, kind)
        if isinstance(app, LoadingApp):
            with TestClient(app) as client:
                assert app.loaded.wait(WAIT_S) and app.failed is None
                assert client.get("/healthz").status_code == 200
        else:
            app.state.service.close()
