"""The feed inspector: a plain HTML page at ``/`` and the JSON it reads under ``/inspect/``.

A person tuning a feed opens a user, reads their history, looks at the feed, clicks or hides an
item (a real ``POST /events``), looks again, and compares two bundles on the same user. The page
is static (``static/``: HTML, CSS, one script; no build step, no CDN) and every number it shows
comes from these routes, which only read ``FeedService`` state (no second pipeline):

    GET /inspect/users?kind=warm|cold[&seed=N]
                                        a random user id of that kind; warm users are those with a
                                        seeded history; ``seed`` makes the pick reproducible (the
                                        page passes ``/?seed=N`` on, so a test's random user is fixed)
    GET /inspect/user/{user_id}         history, newest first (title, category, publisher, age,
                                        dwell); 404 unknown; the world's true topic interests when
                                        the log has truth
    GET /inspect/feed?user_id=U&bundle=primary|compare
                                        ``FeedService.feed`` plus title, category and (with truth)
                                        each item's true utility for the user
    GET /inspect/meta                   whether a compare bundle and the world's truth exist, and
                                        the run's pages (``feedrank.serving.inspector.pages``)
    GET /run/report.html, /run/labs.html
                                        the run's evaluation report and labs page, when they exist

A history item's dwell is its click's ``dwell_s``: from the seeding log, and for clicks posted
since the start from the serving log (on disk at once with ``serving.event_log.durable``, the
default; else within ``flush_interval_s``). Truth is read through ``feedrank.data.world`` (serving
never imports evaluate/ or train/).
"""

from __future__ import annotations

import random
import uuid
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Path as PathParam, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator
from starlette.requests import Request
from starlette.routing import BaseRoute, Mount, Route

from feedrank.data.world.world import TRUTH_DIR, World, load_world
from feedrank.serving.inspector.dwell import clicked_dwell, dwell_index
from feedrank.serving.inspector.pages import RunPages
from feedrank.serving.pipeline import FeedService
from feedrank.serving.validation import check_id

STATIC = Path(__file__).parent / "static"
_US_PER_HOUR = 3_600_000_000
UserId = Annotated[str, AfterValidator(check_id)]


class Inspector:
    """Read-only views of one or two services for the page (``compare`` is the candidate bundle's)."""

    def __init__(self, service: FeedService, compare: FeedService | None = None, log_dir: str | None = None) -> None:
        self.service, self.compare, self.log_dir = service, compare, log_dir
        self.world: World | None = load_world(log_dir) if log_dir and (Path(log_dir) / TRUTH_DIR).is_dir() else None
        self.pages = RunPages.of_bundle(service.two_tower.path)

    @cached_property
    def titles(self) -> dict[str, str]:
        """Item id -> title, built on the first inspector request, not at every server's start."""
        return _titles(self.service)

    @cached_property
    def warm_users(self) -> list[str]:
        """The snapshot's users with a seeded history, sorted once (the snapshot does not change
        after start): a "random warm user" always has something to read and click against."""
        snap = self.service.store._snapshot
        lengths = np.diff(snap.history_offsets) if len(snap.history_offsets) else np.zeros(0, np.int64)
        return sorted(user for user, row in snap.row_of.items() if lengths[row] > 0)

    @cached_property
    def seeded_dwell(self) -> dict[tuple[str, str], float]:
        """(user, item) -> dwell of the last click in the seeding log, read on first use."""
        return dwell_index(self.log_dir) if self.log_dir else {}

    def random_user(self, kind: str, rng: random.Random) -> str:
        if kind == "cold":
            return f"new-{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}"
        if not self.warm_users:
            raise HTTPException(404, detail="the user store has no warm users with a history (serve with --log)")
        return rng.choice(self.warm_users)

    def user(self, user_id: str) -> dict[str, Any]:
        svc = self.service
        view = svc.store.view(user_id, svc.clock())
        if not view.stored and not svc.users.known(user_id):
            raise HTTPException(404, detail=f"unknown user {user_id!r}: no history; the feed is the cold-start feed")
        now_us = int(svc.clock().timestamp() * 1_000_000)
        live = clicked_dwell(svc.sink.root, user_id)
        history = []
        for row in view.history[::-1]:
            item = self._item(int(row), now_us)
            key = (user_id, item["item_id"])
            item["dwell_s"] = live.get(key, self.seeded_dwell.get(key))
            history.append(item)
        out: dict[str, Any] = {"user_id": user_id, "history": history, "impressions": view.impressions,
                               "clicks": view.clicks, "interests": None}  # fmt: skip
        world_user = self._world_user(user_id)
        if world_user is not None:
            topics = self.world.user_topics[world_user]
            top = np.argsort(-topics)[:5]
            out["interests"] = [{"topic": self.world.topic_names[t], "weight": round(float(topics[t]), 3)} for t in top]
        return out

    def feed(self, user_id: str, bundle: str, k: int | None) -> dict[str, Any]:
        svc = self.service if bundle == "primary" else self.compare
        if svc is None:
            raise HTTPException(404, detail="no compare bundle: start the server with --compare BUNDLE")
        result = svc.feed(user_id, k).to_dict()
        now_us = int(svc.clock().timestamp() * 1_000_000)
        rows = svc.items.many([item["item_id"] for item in result["items"]])
        world_user = self._world_user(user_id)
        utility = None
        if world_user is not None:
            idx = self.world.item_index([item["item_id"] for item in result["items"]])
            utility = self.world.true_affinity(np.int64(world_user), idx)
        for i, (item, row) in enumerate(zip(result["items"], rows)):
            item.update(self._item(int(row), now_us, svc))
            item["true_utility"] = None if utility is None else round(float(utility[i]), 4)
        return result

    def _item(self, row: int, now_us: int, svc: FeedService | None = None) -> dict[str, Any]:
        cat = (svc or self.service).catalogue
        born = int(cat.born_us[row])
        return {"item_id": str(cat.item_ids[row]), "title": self.titles.get(str(cat.item_ids[row]), ""),
                "category": cat.categories[row], "publisher": cat.publishers[row],
                "age_h": round((now_us - born) / _US_PER_HOUR, 1) if born < np.iinfo(np.int64).max else None}  # fmt: skip

    def _world_user(self, user_id: str) -> int | None:
        if self.world is None:
            return None
        try:
            return int(self.world.user_index([user_id])[0])
        except (KeyError, ValueError, IndexError):
            return None


def _titles(service: FeedService) -> dict[str, str]:
    cat = service.two_tower.catalogue
    if "title" not in cat.column_names:
        return {}
    return {i: t for i, t in zip(cat["item_id"].to_pylist(), cat["title"].to_pylist()) if i is not None}


async def _page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html")


def page_routes() -> list[BaseRoute]:
    """The page and its assets (no data): served by the app, and by ``LoadingApp`` while the
    models load, so the page can say so."""
    return [Route("/", _page, include_in_schema=False), Mount("/inspector", StaticFiles(directory=STATIC), name="inspector")]


def mount_inspector(app: FastAPI, service: FeedService, compare: FeedService | None = None,
                    log_dir: str | None = None, guarded: list | None = None) -> Inspector:  # fmt: skip
    """Add the page (``/``, ``/inspector/*``), its JSON routes (``/inspect/*``) and the run's pages
    (``/run/*``) to ``app``; the inspector is also ``app.state.inspector``.

    ``guarded`` (the app's API-key and rate-limit dependencies) applies to every ``/inspect/*``
    route as it does to ``/feed``: they read users' histories and feeds."""
    inspector = Inspector(service, compare, log_dir)
    app.state.inspector = inspector
    rng = random.Random()  # unseeded: a person pressing "random" wants someone new each time

    app.router.routes.extend(page_routes())

    @app.get("/inspect/meta", dependencies=guarded)
    def meta() -> dict:
        return {"compare": compare is not None, "truth": inspector.world is not None,
                "models": service.model_versions, "pages": inspector.pages.available(),
                "compare_models": compare.model_versions if compare is not None else None}  # fmt: skip

    @app.get("/inspect/users", dependencies=guarded)
    def users(kind: str = Query("warm", pattern="^(warm|cold)$"),
              seed: int | None = Query(None, ge=0, description="a fixed pick: the same seed, the same user")) -> dict:  # fmt: skip
        return {"user_id": inspector.random_user(kind, rng if seed is None else random.Random(seed))}

    @app.get("/inspect/user/{user_id}", dependencies=guarded)
    def user(user_id: Annotated[UserId, PathParam()]) -> dict:
        return inspector.user(user_id)

    @app.get("/inspect/feed", dependencies=guarded)
    def feed(user_id: Annotated[UserId, Query()], bundle: str = Query("primary", pattern="^(primary|compare)$"),
             k: int | None = Query(None, ge=1, le=service.cfg.k_max)) -> dict:  # fmt: skip
        return inspector.feed(user_id, bundle, k)

    @app.get("/run/{name}", include_in_schema=False)
    def run_page(name: str) -> FileResponse:
        return FileResponse(inspector.pages.file(name))

    return inspector
