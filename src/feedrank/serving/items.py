"""Publishing new items to a running server (``POST /items``): validated, embedded, indexed, journaled.

News lives on items that did not exist when the model was trained. A published item is outside the
two-tower's vocabulary, so it is embedded as an unknown ID (OOV) plus its *content*: publisher,
category and type (looked up in the bundle's vocabularies; an unknown value is OOV), the words of
its content fields (title, and abstract when the bundle's ``features.content_fields`` has it:
``feedrank.features.text.content_tokens``, the catalogue's own rule) and its age at publish time.
With a content-aware item tower (``two_tower.title_dim > 0``) that vector puts a new article near
the users whose history is about its words, so it reaches them through the ANN index, not only
through the fresh-candidate pool. (An ID-only tower gives every published item of one publisher,
category and type the same vector: publishing still works, the vector is just not personal.)

Four parts, each with one job:

- ``ItemIn``: one item of a POST body, checked like ``POST /events`` events (strict types, ids by
  ``check_id``, ``created_ts`` within the ``serving.limits`` window of server time, a title of at
  most ``MAX_TITLE_CHARS`` characters and an abstract of at most ``MAX_ABSTRACT_CHARS``, both without
  control characters). An abstract is kept in the journal whatever the model reads, so a later
  bundle that reads abstracts embeds it after a restart.
- ``ItemJournal``: the published items, persisted: one Parquet file per POST under
  ``serving.event_log.dir``/``published_items/`` (``JOURNAL_SCHEMA``: the canonical ``ITEM_SCHEMA``
  plus ``published_ts``; a file written before ``abstract`` existed reads with null abstracts), written under a hidden name, fsynced and renamed into place before the
  POST returns. At startup the service reads every file, in publish order, and publishes the items
  again, so a restart keeps them; while it runs it reads the files other workers write (every
  ``store.catch_up_interval_s``, and before applying other workers' events, which may be about them).
- ``SharedLock``: feeds search the index side by side; a publish's ``add`` waits for none to be.
- ``item_inputs``: a published item's model inputs in a model's vocabularies (item index OOV,
  categorical indices, content tokens), for the two-tower and for the ranker alike.

Limits: ``MAX_ITEMS_PER_POST`` items per POST; the body size and JSON depth limits of
``POST /events`` apply. An ``item_id`` already in the catalogue (trained or published) is not
published again: the POST acknowledges it as ``known`` (a retried POST is harmless).

Example::

    service.publish_items([ItemIn(item_id="n1", title="Storm hits the coast", category="weather")])
    # {'published': 1, 'known': 0}; the next feed may show n1 with source "ann"
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from feedrank.bundle import Bundle
from feedrank.config import from_dict
from feedrank.data.collate import pad_list
from feedrank.data.schema import ITEM_SCHEMA, MAX_ABSTRACT_CHARS, TS_TYPE, conform
from feedrank.features.build import FeatureConfig
from feedrank.features.text import content_tokens
from feedrank.features.vocab import ITEM_CAT_COLUMNS, OOV, lookup_quiet
from feedrank.fsutil import staged_file
from feedrank.serving.validation import EventContext, check_id, check_ts, check_ts_text

log = logging.getLogger(__name__)

MAX_ITEMS_PER_POST = 1000
MAX_TITLE_CHARS = 1000
JOURNAL_DIR = "published_items"
JOURNAL_SCHEMA = ITEM_SCHEMA.append(pa.field("published_ts", TS_TYPE, nullable=False))
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ItemIn(BaseModel):
    """One ``POST /items`` item (the canonical ``ITEM_SCHEMA``'s columns); see the module docstring.

    ``created_ts`` defaults to the server's clock (published now); ``publisher``, ``item_type`` and
    ``category`` are ids (``check_id``) or null; ``title`` and ``abstract`` are free text, at most
    ``MAX_TITLE_CHARS`` and ``MAX_ABSTRACT_CHARS`` characters.
    """

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(strict=True)
    title: str | None = Field(None, strict=True, max_length=MAX_TITLE_CHARS)
    abstract: str | None = Field(None, strict=True, max_length=MAX_ABSTRACT_CHARS)
    publisher: str | None = Field(None, strict=True)
    item_type: str | None = Field(None, strict=True)
    category: str | None = Field(None, strict=True)
    created_ts: dt.datetime | None = None

    @field_validator("item_id", "publisher", "item_type", "category")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value)

    @field_validator("title", "abstract")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and _CONTROL.search(value):
            raise ValueError("must not contain control characters or line separators (NUL, CR, LF, TAB, U+2028, ...)")
        return value

    @field_validator("created_ts", mode="before")
    @classmethod
    def _ts_is_text(cls, value: object) -> object:
        return check_ts_text(value)

    @field_validator("created_ts")
    @classmethod
    def _ts_window(cls, value: dt.datetime | None, info: ValidationInfo) -> dt.datetime | None:
        return None if value is None else check_ts(value, info.context)


def items_table(items: list[ItemIn], now: dt.datetime) -> pa.Table:
    """``JOURNAL_SCHEMA`` rows of ``items`` published at ``now`` (``created_ts`` defaults to ``now``)."""
    return pa.table({
        "item_id": [i.item_id for i in items],
        **{c: pa.array([getattr(i, c) for i in items], pa.string()) for c in ("publisher", "item_type")},
        "created_ts": pa.array([i.created_ts or now for i in items], TS_TYPE),
        "title": pa.array([i.title for i in items], pa.string()),
        "abstract": pa.array([i.abstract for i in items], pa.string()),
        "category": pa.array([i.category for i in items], pa.string()),
        "published_ts": pa.array([now] * len(items), TS_TYPE),
    }, schema=JOURNAL_SCHEMA)  # fmt: skip


class ItemJournal:
    """The published items on disk (module docstring): one durable file per POST, read back in
    order. ``read_new`` returns the files not read or written by this process yet: at startup all of
    them, later those other workers wrote (``start`` polls for them)."""

    def __init__(self, serving_log_dir: str | Path) -> None:
        self.root = Path(serving_log_dir) / JOURNAL_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, table: pa.Table) -> Path:
        """Persist ``table`` (``JOURNAL_SCHEMA``); returns once the file is fsynced and in place."""
        # time_ns first: file names sort in publish order (the uuid keeps two workers apart)
        final = self.root / f"part-{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
        with self._lock:
            self._seen.add(final.name)
        with staged_file(final, durable=True) as tmp:
            pq.write_table(table.cast(JOURNAL_SCHEMA), tmp)
        return final

    def read_new(self) -> pa.Table:
        """The items of every file not seen yet, in publish order (hidden temporary files skipped)."""
        with self._lock:
            files = sorted(p for p in self.root.glob("part-*.parquet") if p.name not in self._seen)
            self._seen.update(p.name for p in files)
        if not files:
            return JOURNAL_SCHEMA.empty_table()
        return pa.concat_tables(conform(pq.read_table(f), JOURNAL_SCHEMA).cast(JOURNAL_SCHEMA) for f in files)

    def start(self, on_items: Callable[[pa.Table], None], interval_s: float) -> None:
        """``on_items(read_new())`` every ``interval_s`` on a daemon thread (items other workers
        published); a failure is logged, never fatal."""
        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    table = self.read_new()
                    if table.num_rows:
                        on_items(table)
                except Exception:  # keep following: the next poll retries
                    log.exception("published items: catching up failed")

        self._thread = threading.Thread(target=run, name="feedrank-item-journal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)


class SharedLock:
    """Many readers at once or one writer: feeds search the ANN index side by side, and a publish's
    ``add`` (which may move FAISS's storage) waits until none is searching. A waiting writer stops
    new readers, so a steady stream of feeds cannot hold a publish off."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class ItemInputs:
    """A model's inputs for published items: item index (OOV), categorical indices, content tokens."""

    item: torch.Tensor  # [N] int64, all OOV: the model never trained on these ids
    item_cats: torch.Tensor  # [N, n_item_cats] int64
    tokens: torch.Tensor  # [N, T] int64 content-token indices, right-padded with 0


def item_inputs(bundle: Bundle, table: pa.Table) -> ItemInputs:
    """The inputs of ``table``'s items (``JOURNAL_SCHEMA``) in ``bundle``'s vocabularies, by the
    rules the bundle's catalogue was built with (``bundle.build_catalogue``)."""
    vocabs, n = bundle.vocabs, table.num_rows
    cats = np.stack([lookup_quiet(vocabs.item_cats[c], table[c]) for c in ITEM_CAT_COLUMNS], axis=1).reshape(n, -1)
    lens = from_dict(FeatureConfig, bundle.config.get("features"), "features").content_lens()  # a bundle from before abstracts: titles
    tokens = pad_list(content_tokens(vocabs.tokens, table, lens), "title_tokens")
    return ItemInputs(torch.full((n,), OOV, dtype=torch.long), torch.from_numpy(cats.astype(np.int64)), torch.from_numpy(tokens))


def item_vectors(bundle: Bundle, inputs: ItemInputs, age_h: np.ndarray) -> np.ndarray:
    """[N, dim] float32 two-tower vectors of published items ``age_h`` hours old."""
    model = bundle.model.eval()
    extra = [inputs.tokens] if getattr(model, "reads_titles", False) else []
    with torch.no_grad():
        return model.item_vectors(inputs.item, inputs.item_cats, torch.from_numpy(age_h.astype(np.float32)), *extra).numpy()


# ------------------------------------------------------------------------------------------------
# the HTTP route


def add_item_routes(app: FastAPI, service, dependencies: list) -> None:
    """``POST /items`` on ``app`` (``feedrank.serving.app``): a JSON item object or a list of them,
    the body limits of ``POST /events``; 422 names the first bad field, 413 a body or list too big."""
    from feedrank.serving import app as http  # here: app imports this module

    adapter = TypeAdapter(list[ItemIn])
    cfg = service.cfg

    @app.post("/items", dependencies=dependencies)
    async def items(request: Request) -> dict:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise HTTPException(415, detail=f"POST /items takes Content-Type: application/json, got {media or 'none'!r}")
        payload = await http._read_json(request, cfg.max_body_bytes, cfg.limits.max_json_depth)
        rows = payload if isinstance(payload, list) else [payload]
        if len(rows) > MAX_ITEMS_PER_POST:
            raise http.PayloadTooLarge(f"{len(rows)} items in one request; at most {MAX_ITEMS_PER_POST}")
        try:
            parsed = adapter.validate_python(rows, context=EventContext(service.clock(), cfg.limits))
        except ValidationError as exc:
            detail = http._describe(exc, single=not isinstance(payload, list))
            raise HTTPException(422, detail=[{**d, "field": d["field"].replace("events[", "items[", 1)} for d in detail]) from exc
        try:
            return await run_in_threadpool(service.publish_items, parsed)
        except ValueError as exc:  # EventError: an empty list
            raise HTTPException(422, detail=str(exc)) from exc
