"""The HTTP face of the feed service: thin FastAPI routes over ``FeedService`` (all logic is there).

Routes::

    GET  /feed?user_id=U&k=20   the feed; stage timings in the ``Server-Timing`` header; an unknown
                                user gets the cold-start feed (200, never 404); k outside
                                [1, serving.k_max] or a user id that is not an id -> 422
    POST /events                one event object or a list of them (``EventIn``), sent as
                                ``Content-Type: application/json`` (else 415); see "Limits"
    GET  /healthz               model versions, index kind and size, cache backend status
    GET  /metrics               Prometheus text format (``feedrank.serving.metrics``)

Limits of ``POST /events``, checked in this order, each refusal a short message naming the problem:

- 400: a client that disconnects before sending the whole body (counted, nobody reads it);
- 413: a body over ``serving.max_body_bytes`` (before reading it when the client declares its
  length, while streaming when it does not) or more than ``serving.max_events_per_post`` events;
- 422: a body that is not UTF-8 JSON (``NaN`` and ``Infinity`` are not JSON), nests deeper than
  ``serving.limits.max_json_depth`` (counted before parsing, so a 2 KB ``[[[[...]]]]`` never
  reaches a recursive parser), or is neither an object nor a list;
- 422: a field that breaks ``EventIn``'s rules: strict JSON types (``"clicked": "yes"`` is refused),
  ids per ``feedrank.serving.validation.check_id`` (1..256 characters, not blank, no control
  characters), ``dwell_s`` finite in [0, ``serving.limits.max_dwell_s``] (24 h), ``ts`` an ISO-8601
  string within ``serving.limits.max_future_s`` (5 min) ahead and ``max_past_days`` (7) behind the
  service clock; an unknown item; nothing of a refused POST is logged.

Error bodies never echo the input: a 422 lists the first error (``{"field": "events[2].dwell_s",
"msg": ...}``) and how many more there were, every message cut short (a body stays under 300
bytes). Refusals are counted in ``/metrics`` (``feedrank_http_refused_total{route,status}``, and
the events of a refused POST in ``feedrank_events_total{outcome="rejected"}``).

Access (``feedrank.serving.access``), both off by default, on ``/feed`` and ``/events`` only
(``/healthz`` and ``/metrics`` stay open for probes and scrapers):

- ``serving.auth.api_key_env``: the environment variable holding an API key; requests without the
  key in ``serving.auth.header`` (``X-API-Key``) -> 401;
- ``serving.rate_limit``: a token bucket per client address (``burst`` at once, ``rate_per_s`` on
  average); over it -> 429 with ``Retry-After``. Off suits the default loopback bind; turn both on
  before exposing the port.

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
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from feedrank.bundle import load_bundle
from feedrank.config import from_dict, load_yaml
from feedrank.serving.access import ApiKeyCheck, RateLimiter
from feedrank.serving.balance import worker_connections
from feedrank.serving.config import ServingConfig
from feedrank.serving.inspector import mount_inspector, page_routes
from feedrank.serving.item2item import serving_parts
from feedrank.serving.items import add_item_routes
from feedrank.serving.loading import LoadingApp
from feedrank.serving.metrics import CONTENT_TYPE
from feedrank.serving.pipeline import EventError, FeedService, set_threads
from feedrank.serving.state import EventIn
from feedrank.serving.validation import EventContext, check_id, json_depth, short

SETTINGS_ENV = "FEEDRANK_SERVE_SETTINGS"
log = logging.getLogger(__name__)
_EVENTS = TypeAdapter(list[EventIn])
_DETAIL_BYTES = 160  # a string detail
_FIELD_BYTES, _MSG_BYTES = 48, 100  # one entry of a 422's list


class PayloadTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


def create_app(service: FeedService, compare: FeedService | None = None, log_dir: str | None = None) -> FastAPI:
    """The FastAPI app over ``service``; the service is closed (log flushed) at shutdown.

    Raises ``ValueError`` when ``serving.auth`` names an API key variable that is unset.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()
        if compare is not None:
            compare.close()

    app = FastAPI(title="feedrank", lifespan=lifespan)
    app.state.service = service
    cfg = service.cfg
    keys = ApiKeyCheck.from_config(cfg.auth)
    limiter = RateLimiter.from_config(cfg.rate_limit)

    async def access(request: Request) -> None:
        """429 / 401 before anything else of the request is read; the rate limit first, so guessing
        keys is rate limited too."""
        if limiter is not None:
            wait = limiter.wait_s(request.client.host if request.client else "unknown")
            if wait > 0:
                raise HTTPException(429, detail=f"rate limit of {cfg.rate_limit.rate_per_s:g} requests/s exceeded; "
                                                f"retry in {wait:.2f} s", headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
        if keys is not None and not keys.allows(request.headers.get(cfg.auth.header)):
            raise HTTPException(401, detail=f"missing or wrong API key in header {cfg.auth.header}")

    # No dependency at all while both are off (the default): FastAPI's dependency solving costs a
    # request more than the two checks it would skip.
    guarded = [Depends(access)] if limiter is not None or keys is not None else []

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        service.metrics.observe_refusal(_route(request), exc.status_code)
        detail = short(exc.detail, _DETAIL_BYTES) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_query(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI's 422 without the input and context it would echo (a 100 KB user id)."""
        service.metrics.observe_refusal(_route(request), 422)
        errors = list(exc.errors())
        first = errors[0]
        detail = [{"loc": [short(str(part), _FIELD_BYTES) for part in first["loc"]], "msg": _message(first)}]
        return JSONResponse({"detail": detail + _more(errors)}, status_code=422)

    @app.get("/feed", dependencies=guarded)
    async def feed(
        user_id: Annotated[str, Query(description="a user id (feedrank.serving.validation.check_id)"), AfterValidator(check_id)],
        k: int = Query(cfg.k_default, ge=1, le=cfg.k_max, description=f"items to return, 1..{cfg.k_max}"),
    ) -> Response:
        # On the event loop, not in the threadpool: a feed is a few milliseconds of CPU on one
        # intra-op thread, so a worker gains nothing from running feeds side by side, and the two
        # thread hand-offs a threadpool call costs (a wake-up each, long on a busy machine) were a
        # large part of the time outside the pipeline. Parallelism comes from workers.
        result = service.feed(user_id, k)
        # json.dumps of the plain dict: FastAPI's generic encoder walks every value (~1 ms a feed)
        return Response(json.dumps(result.to_dict()), media_type="application/json",
                        headers={"Server-Timing": result.server_timing()})

    @app.post("/events", dependencies=guarded)
    async def events(request: Request) -> dict:
        count = 1  # a body that cannot be read as events counts as one rejected event
        try:
            _require_json(request)
            payload = await _read_json(request, cfg.max_body_bytes, cfg.limits.max_json_depth)
            items = payload if isinstance(payload, list) else [payload]
            count = len(items)
            if count > cfg.max_events_per_post:
                raise PayloadTooLarge(f"{count} events in one request; at most {cfg.max_events_per_post}")
            try:
                parsed = _EVENTS.validate_python(items, context=EventContext(service.clock(), cfg.limits))
            except ValidationError as exc:
                raise HTTPException(422, detail=_describe(exc, single=not isinstance(payload, list))) from exc
        except HTTPException:
            service.metrics.events.labels("rejected").inc(count)
            raise
        if compare is not None:  # one event id for both services: a copy arriving on the bus is a retry
            parsed = [e if e.event_id else e.model_copy(update={"event_id": uuid.uuid4().hex}) for e in parsed]
        try:
            accepted = await run_in_threadpool(service.record_events, parsed)  # counts its own rejections
        except EventError as exc:
            raise HTTPException(422, detail=str(exc)) from exc
        if compare is not None:
            await run_in_threadpool(_mirror_events, compare, parsed)
        return {"accepted": accepted}

    add_item_routes(app, service, guarded)  # POST /items (feedrank.serving.items)

    @app.get("/healthz")
    def healthz() -> dict:
        return service.health()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(content=service.metrics.exposition(), media_type=CONTENT_TYPE)

    mount_inspector(app, service, compare, log_dir, guarded)
    return app


def _route(request: Request) -> str:
    """The matched route's path (``/events``), "" when none matched (a 404)."""
    return getattr(request.scope.get("route"), "path", "")


def _require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        got = repr(short(media, 40)) if media else "no Content-Type"
        raise HTTPException(415, detail=f"POST /events takes Content-Type: application/json, got {got}")


async def _read_json(request: Request, limit: int, max_depth: int) -> object:
    """The body as JSON, refusing (413) more than ``limit`` bytes before reading them when the
    client declares its length, and while streaming when it does not (chunked uploads); refusing
    (422) a body nested deeper than ``max_depth`` before parsing it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {short(declared, 20)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    except ClientDisconnect as exc:  # nobody reads the answer, but the request ends as a 4xx, not a crash
        raise HTTPException(400, detail="the client went away before sending the whole body") from exc
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(422, detail=f"body is not valid JSON: not UTF-8 at byte {exc.start}") from exc
    depth = json_depth(bytes(body))
    if depth > max_depth:
        raise HTTPException(422, detail=f"body nests {depth} levels deep; at most {max_depth} (a list of event objects is 2)")
    try:
        payload = json.loads(text, parse_constant=_not_json)
    except RecursionError as exc:  # a last resort: max_json_depth is set above the parser's limit
        raise HTTPException(422, detail="body nests too deeply to parse") from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of over 4300 digits
        raise HTTPException(422, detail=f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, (dict, list)):
        raise HTTPException(422, detail=f"body must be an event object or a list of them, got {type(payload).__name__}")
    return payload


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def _describe(exc: ValidationError, single: bool) -> list[dict]:
    """The first of pydantic's errors with a readable location (``dwell_s`` or ``events[2].dwell_s``),
    and how many more there were; never the input."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    index, *fields = errors[0]["loc"]
    event = "" if single else f"events[{index}]"
    where = ".".join([event, *map(str, fields)]).strip(".") or "body"
    return [{"field": short(where, _FIELD_BYTES), "msg": _message(errors[0])}, *_more(errors)]


def _message(error: dict) -> str:
    return short(error["msg"].removeprefix("Value error, "), _MSG_BYTES)


def _more(errors: list) -> list[dict]:
    return [{"field": "…", "msg": f"and {len(errors) - 1} more errors"}] if len(errors) > 1 else []


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
    quantize: str | None = None  # overrides serving.quantize
    compare: str | None = None  # a candidate two-tower bundle the inspector shows beside the serving one
    answer_while_loading: bool = False  # 503 "model still loading" until built (feedrank.serving.loading)
    item2item: str | None = None  # an item2item bundle: the item2item candidate source beside the ANN

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: json.dumps(dataclasses.asdict(self))}


def serving_config(settings: ServeSettings) -> ServingConfig:
    """The ``ServingConfig`` of ``settings``: the YAML's ``serving`` section (or defaults) plus overrides."""
    cfg = load_yaml(ServingConfig, settings.config, section="serving") if settings.config else ServingConfig()
    if settings.redis_url is not None:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, backend="redis", url=settings.redis_url))
    if settings.serving_log is not None:
        cfg = dataclasses.replace(cfg, event_log=dataclasses.replace(cfg.event_log, dir=settings.serving_log))
    if settings.quantize is not None:
        cfg = dataclasses.replace(cfg, quantize=settings.quantize)
    cfg.validate()
    return cfg


def build_service(settings: ServeSettings) -> FeedService:
    """Load the bundles and build the service ``settings`` describe."""
    cfg = serving_config(settings)
    set_threads(cfg.torch_threads)
    ranker = load_bundle(settings.ranker) if settings.ranker else None
    two_tower, own_item2item = serving_parts(load_bundle(settings.bundle))  # a blend serves as its parts
    item2item = load_bundle(settings.item2item) if settings.item2item else own_item2item
    return FeedService(two_tower, cfg, ranker=ranker, log_dir=settings.log, item2item=item2item)


def _mirror_events(compare: FeedService, events: list[EventIn]) -> None:
    """The primary's accepted events into the inspector's compare service (its own event log), so
    a click on the page changes both feeds. An event the compare bundle cannot take (an item its
    catalogue lacks) is logged and skipped: the compare view never fails the real POST."""
    try:
        compare.record_events(events)
    except EventError as exc:
        log.warning("compare service did not take the events: %s", exc)


def build_compare(settings: ServeSettings) -> FeedService | None:
    """The inspector's second service over ``settings.compare`` (same config and log; its own event
    log folder, so the primary's log is written once), or None."""
    if settings.compare is None:
        return None
    cfg = serving_config(settings)
    cfg = dataclasses.replace(cfg, event_log=dataclasses.replace(cfg.event_log, dir=os.path.join(cfg.event_log.dir, "compare")))
    return FeedService(load_bundle(settings.compare), cfg, log_dir=settings.log)


def app_from_env() -> FastAPI | LoadingApp:
    """uvicorn factory: the app of the ``ServeSettings`` JSON in ``FEEDRANK_SERVE_SETTINGS``; with
    ``answer_while_loading`` it is built behind a ``LoadingApp`` (503 until ready)."""
    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start the server with `feedrank serve`")
    settings = from_dict(ServeSettings, json.loads(raw), "serve settings")

    def build() -> FastAPI:
        return create_app(build_service(settings), compare=build_compare(settings), log_dir=settings.log)

    if not settings.answer_while_loading:
        app = build()
        worker_connections()  # one of several workers, ready: counted in the connection shares, idle or not
        return app
    return LoadingApp(build, routes=page_routes(), what=f"bundle {settings.bundle}")
