"""The HTTP face of the feed service: thin FastAPI routes over ``FeedService`` (all logic is there).

Routes::

    GET  /feed?user_id=U&k=20   the feed; stage timings in the ``Server-Timing`` header; an unknown
                                user gets the cold-start feed (200, never 404); k outside
                                [1, serving.k_max] -> 422
    POST /events                one event object or a list of them (``EventIn``); a body over
                                ``serving.max_body_bytes`` or more than ``max_events_per_post``
                                events -> 413; malformed JSON or a bad field -> 422 naming it
                                (``events[2].dwell_s: ...``); an unknown item -> 422, nothing logged
    GET  /healthz               model versions, index kind and size, cache backend status
    GET  /metrics               Prometheus text format (``feedrank.serving.metrics``)

A cache fault never becomes a 500: the cache swallows it and the feed is computed from the user
tower (counted as ``error`` in ``/metrics``).

``uvicorn`` starts the app through ``app_from_env`` (a factory, so each worker process builds its
own service) with ``ServeSettings`` as JSON in ``FEEDRANK_SERVE_SETTINGS``; ``feedrank serve`` and
``feedrank.serving.demo`` set it. Several workers share one Redis cache and pass each other their
accepted events over it (``feedrank.serving.bus``).

Example::

    app = create_app(FeedService(load_bundle("runs/demo/bundle"), ServingConfig()))
    TestClient(app).get("/feed", params={"user_id": "u17", "k": 10}).json()["items"]
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError

from feedrank.bundle import load_bundle
from feedrank.config import from_dict, load_yaml
from feedrank.serving.config import ServingConfig
from feedrank.serving.metrics import CONTENT_TYPE
from feedrank.serving.pipeline import EventError, FeedService, set_threads
from feedrank.serving.state import EventIn

SETTINGS_ENV = "FEEDRANK_SERVE_SETTINGS"
_EVENTS = TypeAdapter(list[EventIn])


class PayloadTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


def create_app(service: FeedService) -> FastAPI:
    """The FastAPI app over ``service``; the service is closed (log flushed) at shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="feedrank", lifespan=lifespan)
    app.state.service = service
    cfg = service.cfg

    @app.get("/feed")
    def feed(
        user_id: str = Query(..., min_length=1, max_length=256),
        k: int = Query(cfg.k_default, ge=1, le=cfg.k_max, description=f"items to return, 1..{cfg.k_max}"),
    ) -> Response:
        result = service.feed(user_id, k)
        # json.dumps of the plain dict: FastAPI's generic encoder walks every value (~1 ms a feed)
        return Response(json.dumps(result.to_dict()), media_type="application/json",
                        headers={"Server-Timing": result.server_timing()})

    @app.post("/events")
    async def events(request: Request) -> dict:
        payload = await _read_json(request, cfg.max_body_bytes)
        items = payload if isinstance(payload, list) else [payload]
        if len(items) > cfg.max_events_per_post:
            raise PayloadTooLarge(f"{len(items)} events in one request; at most {cfg.max_events_per_post}")
        try:
            parsed = _EVENTS.validate_python(items)
        except ValidationError as exc:
            raise HTTPException(422, detail=_describe(exc, single=not isinstance(payload, list))) from exc
        try:
            accepted = await run_in_threadpool(service.record_events, parsed)
        except EventError as exc:
            raise HTTPException(422, detail=str(exc)) from exc
        return {"accepted": accepted}

    @app.get("/healthz")
    def healthz() -> dict:
        return service.health()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(content=service.metrics.exposition(), media_type=CONTENT_TYPE)

    return app


async def _read_json(request: Request, limit: int) -> object:
    """The body as JSON, refusing (413) more than ``limit`` bytes before reading them when the
    client declares its length, and while streaming when it does not (chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, detail=f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, (dict, list)):
        raise HTTPException(422, detail=f"body must be an event object or a list of them, got {type(payload).__name__}")
    return payload


def _describe(exc: ValidationError, single: bool) -> list[dict]:
    """Pydantic's errors with a readable location (``dwell_s`` or ``events[2].dwell_s``)."""
    out = []
    for error in exc.errors(include_url=False, include_input=False):
        index, *fields = error["loc"]
        event = "" if single else f"events[{index}]"
        where = ".".join([event, *map(str, fields)]).strip(".") or "body"
        out.append({"field": where, "msg": error["msg"]})
    return out


# ------------------------------------------------------------------------------------------------
# process entry point (uvicorn factory)


@dataclass
class ServeSettings:
    """What ``feedrank serve`` passes to each worker process."""

    bundle: str
    ranker: str | None = None
    log: str | None = None  # canonical log that seeds the user store
    config: str | None = None  # YAML with a ``serving`` section
    redis_url: str | None = None  # overrides the config: cache backend redis at this URL
    serving_log: str | None = None  # overrides serving.event_log.dir

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: json.dumps(dataclasses.asdict(self))}


def serving_config(settings: ServeSettings) -> ServingConfig:
    """The ``ServingConfig`` of ``settings``: the YAML's ``serving`` section (or defaults) plus overrides."""
    cfg = load_yaml(ServingConfig, settings.config, section="serving") if settings.config else ServingConfig()
    if settings.redis_url is not None:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, backend="redis", url=settings.redis_url))
    if settings.serving_log is not None:
        cfg = dataclasses.replace(cfg, event_log=dataclasses.replace(cfg.event_log, dir=settings.serving_log))
    cfg.validate()
    return cfg


def build_service(settings: ServeSettings) -> FeedService:
    """Load the bundles and build the service ``settings`` describe."""
    cfg = serving_config(settings)
    set_threads(cfg.torch_threads)
    ranker = load_bundle(settings.ranker) if settings.ranker else None
    return FeedService(load_bundle(settings.bundle), cfg, ranker=ranker, log_dir=settings.log)


def app_from_env() -> FastAPI:
    """uvicorn factory: the app of the ``ServeSettings`` JSON in ``FEEDRANK_SERVE_SETTINGS``."""
    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start the server with `feedrank serve`")
    return create_app(build_service(from_dict(ServeSettings, json.loads(raw), "serve settings")))
