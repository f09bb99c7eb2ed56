"""The saved model artifact that every stage after training loads: a *bundle*.

Evaluation, serving, the ANN index, a ranker that reuses two-tower vectors and the simulated A/B
test all need the same four things, so they travel together in one folder::

    BUNDLE/
      model.pt            the model's state_dict (loaded with ``weights_only``: it can never run code)
      bundle.json         kind, feedrank version, content version, created time, the full run config,
                          metrics, and the ids of the log and feature build it came from
      vocab/              ``Vocabularies.save``: the id -> index mappings the weights were trained with
      catalogue.parquet   one row per item vocabulary index (``CATALOGUE_SCHEMA``): what is needed to
                          embed every item without the log (categorical indices, content tokens,
                          creation time, training impressions and clicks)

The model is *rebuilt* from the saved config and the vocabulary sizes, never unpickled: a builder
per ``kind`` (``MODEL_BUILDERS``) turns ``(config dict, vocabularies)`` into an ``nn.Module`` whose
state_dict must match ``model.pt`` exactly. A new model kind registers one line there.

The content ``version`` is a sha256 over the weights (names, dtypes, shapes, bytes) and the config:
two bundles with the same version serve the same scores, and ``load_bundle`` recomputes it, so a
damaged ``model.pt`` is caught at load time rather than as quietly wrong scores.

A bundle is written to a temporary folder renamed into place: a crash mid-save leaves any previous
bundle at that path intact.

Example::

    path = save_bundle("runs/demo/bundle", kind="two_tower", model=model, config=to_dict(run_cfg),
                       vocabs=vocabs, catalogue=catalogue, metrics={"recall@10": 0.21})
    bundle = load_bundle(path)          # Bundle(kind='two_tower', version='3f1c...', ...)
    bundle.model.item_vectors(...)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

import feedrank
from feedrank.config import ConfigError, from_dict
from feedrank.data.schema import TS_TYPE, to_epoch_us
from feedrank.features.build import ITEM_CAT_INDEX_COLUMNS, FeatureConfig
from feedrank.features.counters import COUNTER_COLUMNS
from feedrank.features.latest import LatestRows
from feedrank.data.collate import pad_list
from feedrank.features.vocab import FIRST_ID, ITEM_CAT_COLUMNS, OOV, PAD, Vocabularies, lookup_quiet
from feedrank.fsutil import staged_dir
from feedrank.features.text import content_tokens, title_word_vectors
from feedrank.models.blend import BlendConfig, BlendModel
from feedrank.models.item2item import Item2ItemModel
from feedrank.models.ranker import Ranker, RankerConfig
from feedrank.models.towers import TitleBag
from feedrank.models.two_tower import TwoTower, TwoTowerConfig

BUNDLE_FORMAT = 1
MODEL_FILE = "model.pt"
META_FILE = "bundle.json"
VOCAB_DIR = "vocab"
CATALOGUE_FILE = "catalogue.parquet"

#: The counters a user tower may read: the user-side prefix of ``COUNTER_COLUMNS`` (the item
#: counters after them would leak the candidate into the user vector; see ``TwoTower``).
USER_COUNTER_COLUMNS = tuple(c for c in COUNTER_COLUMNS if c.startswith("user_"))
assert COUNTER_COLUMNS[: len(USER_COUNTER_COLUMNS)] == USER_COUNTER_COLUMNS, "user counters must come first"

CATALOGUE_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int64(), nullable=False),  # == row number
        pa.field("item_id", pa.string()),  # null for padding, OOV and hash-bucket rows
        *(pa.field(c, pa.int64(), nullable=False) for c in ITEM_CAT_INDEX_COLUMNS),
        # token indices of the latest row's content (its title, + abstract with features.content_fields)
        pa.field("title_tokens", pa.list_(pa.int64()), nullable=False),
        pa.field("created_ts", TS_TYPE),  # as logged; null when the source does not know it
        pa.field("first_seen_ts", TS_TYPE),  # first impression in the training window
        pa.field("train_impressions", pa.int64(), nullable=False),
        pa.field("train_clicks", pa.int64(), nullable=False),
    ]
)

_CATALOGUE_LOG_COLUMNS = ["item_id", "ts", "clicked", "created_ts", *ITEM_CAT_COLUMNS]


class BundleError(ValueError):
    """A bundle folder is incomplete, corrupt, or of a kind this code cannot build."""


# ------------------------------------------------------------------------------------------------
# model builders: kind -> (run config dict, vocabularies) -> nn.Module


def build_two_tower(config: dict[str, Any], vocabs: Vocabularies) -> TwoTower:
    """The two-tower model of a retrieval run config, sized by its vocabularies."""
    cfg = from_dict(TwoTowerConfig, config.get("two_tower"), "two_tower")
    return TwoTower(
        cfg,
        n_users=vocabs.n_users,
        n_items=vocabs.n_items,
        user_cat_sizes=vocabs.user_cat_sizes,
        item_cat_sizes=vocabs.item_cat_sizes,
        n_counters=len(USER_COUNTER_COLUMNS),
        n_tokens=vocabs.n_tokens,
    )


def build_ranker(config: dict[str, Any], vocabs: Vocabularies) -> Ranker:
    """The ranker of a ranking run config, sized by its vocabularies; it reads every counter (user
    counters first, then the item ones: the candidate is known when ranking)."""
    cfg = from_dict(RankerConfig, config.get("ranker"), "ranker")
    return Ranker(
        cfg,
        n_users=vocabs.n_users,
        n_items=vocabs.n_items,
        user_cat_sizes=vocabs.user_cat_sizes,
        item_cat_sizes=vocabs.item_cat_sizes,
        n_user_counters=len(USER_COUNTER_COLUMNS),
        n_item_counters=len(COUNTER_COLUMNS) - len(USER_COUNTER_COLUMNS),
        n_tokens=vocabs.n_tokens,
        cross_counters=(config.get("features") or {}).get("cross_counters", ()),
    )


def build_item2item(config: dict[str, Any], vocabs: Vocabularies) -> Item2ItemModel:
    """An empty item-to-item model over the vocabulary's items; its neighbour lists come from the
    state_dict it loads (their size is the fit's, not the config's)."""
    return Item2ItemModel(vocabs.n_items)


def build_blend(config: dict[str, Any], vocabs: Vocabularies) -> BlendModel:
    """A blend's parts, each built as its own kind would be (``blend.parts`` order); the weights and
    history lengths come from the state_dict it loads."""
    cfg = from_dict(BlendConfig, config.get("blend"), "blend")
    parts = {kind: build_two_tower(config, vocabs) if kind == "two_tower" else build_item2item(config, vocabs)
             for kind in cfg.parts}  # fmt: skip
    return BlendModel(parts, [0] * len(parts), cfg.normalise)


ModelBuilder = Callable[[dict[str, Any], Vocabularies], nn.Module]

#: Every model kind a bundle can hold. A new kind adds its builder here (one line).
MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "two_tower": build_two_tower,
    "ranker": build_ranker,
    "item2item": build_item2item,
    "blend": build_blend,
}


# ------------------------------------------------------------------------------------------------
# the catalogue


def build_catalogue(
    events: pa.Table | Iterable[pa.Table | pa.RecordBatch], vocabs: Vocabularies, content: Mapping[str, int] | None = None
) -> pa.Table:
    """One ``CATALOGUE_SCHEMA`` row per item vocabulary index, from training-window events.

    ``events`` is a table, or its rows as batches in log order (``feedrank.data.log.iter_event_batches``):
    either way they are folded one batch at a time (counts, first impressions, each item's latest
    row: ``feedrank.features.latest``), so memory is O(items + a batch), not O(rows). They need the
    columns ``item_id, ts, clicked, created_ts`` and the item categorical columns; the text columns
    are optional (without them, or without a token vocabulary, the content is empty).
    ``content`` (field -> words kept: ``FeatureConfig.content_lens()``, default titles only) says
    which text the ``title_tokens`` column holds (``feedrank.features.text.content_tokens``).
    An item's categorical indices, content and ``created_ts`` come from its *latest* row (metadata
    can be corrected over time; the latest is what serving would see). Padding and OOV rows carry
    the padding / OOV index in every categorical column; hash-bucket rows carry OOV categoricals;
    rows that are not items have empty content.
    """
    lens = dict(content) if content is not None else FeatureConfig().content_lens()
    n = vocabs.n_items
    impressions = np.zeros(n, np.int64)
    clicks = np.zeros(n, np.int64)
    first_seen = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    latest = LatestRows(n)
    if isinstance(events, pa.Table):
        _require_catalogue_columns(events)
    for batch in events.to_batches() if isinstance(events, pa.Table) else events:
        batch = _require_catalogue_columns(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch)
        kept = [*ITEM_CAT_COLUMNS, "created_ts", *(f for f in lens if f in batch.column_names)]
        idx = lookup_quiet(vocabs.items, batch["item_id"])
        ts = batch["ts"].cast(pa.int64()).to_numpy()
        clicked = batch["clicked"].to_numpy(zero_copy_only=False)
        impressions += np.bincount(idx, minlength=n)
        clicks += np.bincount(idx[clicked], minlength=n)
        np.minimum.at(first_seen, idx, ts)
        latest.add(idx, ts, batch.select(kept))
    rows, has_row = latest.result()
    null = lambda t: pa.nulls(n, t)  # noqa: E731
    column = lambda c, t: pc.if_else(pa.array(has_row), rows[c], null(t)) if rows is not None and c in rows.column_names else null(t)  # noqa: E731

    cats = {}
    for col, idx_col in zip(ITEM_CAT_COLUMNS, ITEM_CAT_INDEX_COLUMNS):
        values = lookup_quiet(vocabs.item_cats[col], column(col, pa.string()))
        cats[idx_col] = np.where(has_row, values, OOV)
        cats[idx_col][PAD] = PAD
    tokens = content_tokens(vocabs.tokens, pa.table({f: column(f, pa.string()) for f in lens}), lens)
    created = column("created_ts", TS_TYPE)
    item_ids = pa.array([None] * FIRST_ID + vocabs.items.ids + [None] * vocabs.items.hash_buckets, pa.string())
    seen = first_seen != np.iinfo(np.int64).max
    return pa.table(
        {
            "item_idx": np.arange(n, dtype=np.int64),
            "item_id": item_ids,
            **cats,
            "title_tokens": tokens,
            "created_ts": created.cast(TS_TYPE),
            "first_seen_ts": pa.array(np.where(seen, first_seen, 0), TS_TYPE, mask=~seen),
            "train_impressions": impressions.astype(np.int64),
            "train_clicks": clicks.astype(np.int64),
        },
        schema=CATALOGUE_SCHEMA,
    )


def _require_catalogue_columns(events: pa.Table) -> pa.Table:
    missing = [c for c in _CATALOGUE_LOG_COLUMNS if c not in events.column_names]
    if missing:
        raise ValueError(f"build_catalogue: events lack column(s) {missing}")
    return events


def catalogue_item_tokens(catalogue: pa.Table) -> torch.Tensor:
    """[n_items, T] int64: each item index's title tokens, right-padded with 0 (``T >= 1``)."""
    return torch.from_numpy(pad_list(catalogue["title_tokens"], "title_tokens"))


def attach_titles(model: nn.Module, catalogue: pa.Table, start_words: bool = False) -> None:
    """Give a model that reads titles the title tokens of every item index (its history lookups
    need them, ``ItemTower.embed_history``); models without titles are left alone. ``start_words``
    (a training task, before training) also sets every title bag's word vectors to the catalogue
    titles' co-occurrence vectors (``feedrank.features.text``). A ranker that matches its history's
    categoricals (``ranker.history_match``) gets every item index's categorical indices the same way."""
    tokens = catalogue_item_tokens(catalogue)
    for module in model.modules():
        if hasattr(module, "attach_titles") and getattr(module, "reads_titles", False):
            module.attach_titles(tokens)
        if getattr(module, "reads_history_cats", False):
            module.attach_item_cats(catalogue_item_cats(catalogue))
        if start_words and isinstance(module, TitleBag):
            n_tokens, dim = module.bag.weight.shape
            module.start_from(torch.from_numpy(title_word_vectors(tokens.numpy(), n_tokens, dim)))


def catalogue_item_cats(catalogue: pa.Table) -> torch.Tensor:
    """[n_items, n_item_cats] int64: each item index's categorical indices (``attach_catalogue``)."""
    return torch.from_numpy(np.stack([catalogue[c].to_numpy() for c in ITEM_CAT_INDEX_COLUMNS], axis=1).astype(np.int64))


def catalogue_age_hours(catalogue: pa.Table, at: dt.datetime) -> np.ndarray:
    """[n_items] float32 age of each item at ``at``: from ``created_ts``, else its first impression.

    The same rule as the feature builder's ``item_age_h``, so the item tower sees ages on the scale
    it was trained on; never negative; 0 for rows with neither (padding, OOV, buckets).
    """
    at_us = to_epoch_us(at)
    return (np.maximum(at_us - catalogue_born_us(catalogue, missing=at_us), 0) / 3.6e9).astype(np.float32)


def catalogue_born_us(catalogue: pa.Table, missing: int) -> np.ndarray:
    """[n_items] int64 epoch microseconds each item was born: ``created_ts``, else its first training
    impression (the feature builder's rule for ``item_age_h``); ``missing`` for rows with neither."""
    born = pc.coalesce(catalogue["created_ts"], catalogue["first_seen_ts"]).cast(pa.int64())
    return born.fill_null(missing).to_numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------------
# save / load


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, CPU) and everything needed to use it."""

    path: Path
    kind: str
    model: nn.Module
    config: dict[str, Any]
    vocabs: Vocabularies
    catalogue: pa.Table
    meta: dict[str, Any]  # the whole bundle.json

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})


def catalogue_vectors(model: nn.Module, catalogue: pa.Table, at: dt.datetime, rows: np.ndarray,
                      chunk: int = 8192) -> torch.Tensor:  # fmt: skip
    """[len(rows), dim] item vectors of catalogue ``rows`` (item indices) at time ``at``: eval mode,
    no gradients, in chunks (the item tower's activations for a large catalogue at once are big).
    The titles are passed only to a model that reads them (``reads_titles``), so any object with
    ``item_vectors(item_idx, item_cats, item_age_h)`` serves as an ID-only model."""
    cats, ages = catalogue_item_cats(catalogue), torch.from_numpy(catalogue_age_hours(catalogue, at))
    tokens = catalogue_item_tokens(catalogue) if getattr(model, "reads_titles", False) else None
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    model.eval()
    with torch.no_grad():
        return torch.cat([model.item_vectors(part, cats[part], ages[part], *([] if tokens is None else [tokens[part]]))
                          for part in idx.split(chunk)])  # fmt: skip


def popularity_scores(catalogue: pa.Table, rows: np.ndarray) -> np.ndarray:
    """[len(rows)] float32 popularity score of catalogue ``rows``: distinct values ordering by training
    clicks, then training impressions, then vocabulary index (so no ties, and a deterministic list)."""
    clicks = catalogue["train_clicks"].to_numpy()[rows]
    imps = catalogue["train_impressions"].to_numpy()[rows]
    position = np.empty(len(rows), dtype=np.int64)
    position[np.lexsort((rows, -imps, -clicks))] = np.arange(len(rows))
    return (len(rows) - position).astype(np.float32)


def content_version(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """sha256 over the weights (name, dtype, shape, bytes, in name order) and the canonical config."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def save_bundle(
    path: str | Path,
    *,
    kind: str,
    model: nn.Module,
    config: dict[str, Any],
    vocabs: Vocabularies,
    catalogue: pa.Table,
    metrics: dict[str, Any] | None = None,
    sources: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle to ``path`` atomically (replacing one already there) and return ``path``.

    ``config`` is the full run config as a plain dict (``feedrank.config.to_dict``); ``sources``
    identifies the inputs (log hash, feature-build hash, ...); ``metrics`` are the evaluation results.
    """
    if kind not in MODEL_BUILDERS:
        raise BundleError(f"unknown bundle kind {kind!r}; known kinds: {sorted(MODEL_BUILDERS)}")
    if catalogue.schema != CATALOGUE_SCHEMA or catalogue.num_rows != vocabs.n_items:
        raise BundleError(
            f"catalogue must have CATALOGUE_SCHEMA and one row per item index ({vocabs.n_items}), "
            f"got {catalogue.num_rows} rows with columns {catalogue.column_names}"
        )
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": BUNDLE_FORMAT,
        "kind": kind,
        "feedrank_version": feedrank.__version__,
        "version": content_version(state, config),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "metrics": metrics or {},
        "sources": sources or {},
    }
    with staged_dir(path) as tmp:
        torch.save(state, tmp / MODEL_FILE)
        vocabs.save(tmp / VOCAB_DIR)
        pq.write_table(catalogue, tmp / CATALOGUE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def load_bundle(path: str | Path) -> Bundle:
    """Load the bundle at ``path``: rebuild its model, load the weights, check the version."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model bundle at {path}")
    for name in (META_FILE, MODEL_FILE, CATALOGUE_FILE, VOCAB_DIR):
        if not (path / name).exists():
            raise BundleError(f"{path}: incomplete bundle, {name} is missing")
    meta = _read_meta(path / META_FILE)
    kind = meta["kind"]
    if kind not in MODEL_BUILDERS:
        raise BundleError(f"{path / META_FILE}: unknown bundle kind {kind!r}; this feedrank builds {sorted(MODEL_BUILDERS)}")
    try:
        vocabs = Vocabularies.load(path / VOCAB_DIR)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path / VOCAB_DIR}: cannot read the vocabularies: {exc}") from exc
    try:
        catalogue = pq.read_table(path / CATALOGUE_FILE)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BundleError(f"{path / CATALOGUE_FILE}: not a readable Parquet file: {exc}") from exc
    if catalogue.schema != CATALOGUE_SCHEMA or catalogue.num_rows != vocabs.n_items:
        raise BundleError(f"{path / CATALOGUE_FILE}: expected {vocabs.n_items} rows of CATALOGUE_SCHEMA, "
                          f"got {catalogue.num_rows} rows with columns {catalogue.column_names}")
    try:
        state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError on bad bytes
        raise BundleError(f"{path / MODEL_FILE}: corrupt or truncated weights: {exc}") from exc
    if content_version(state, meta["config"]) != meta["version"]:
        raise BundleError(f"{path}: the weights or config do not match the recorded version {meta['version'][:12]}; "
                          "the bundle was modified or damaged")
    try:
        model = MODEL_BUILDERS[kind](meta["config"], vocabs)
        model.load_state_dict(state, strict=True)
        attach_titles(model, catalogue)
    except (ConfigError, RuntimeError, ValueError) as exc:
        raise BundleError(f"{path}: cannot rebuild the {kind} model from its config and vocabularies: {exc}") from exc
    model.eval()
    return Bundle(path=path, kind=kind, model=model, config=meta["config"], vocabs=vocabs, catalogue=catalogue, meta=meta)


def _read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{file}: expected a JSON object")
    missing = sorted({"format", "kind", "version", "config"} - set(meta))
    if missing:
        raise BundleError(f"{file}: missing key(s) {missing}")
    if meta["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{file}: bundle format {meta['format']!r}, this code reads {BUNDLE_FORMAT}")
    return meta
