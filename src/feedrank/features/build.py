"""Build point-in-time training examples from the canonical event log.

One example per impression row: who (user index and categorical indices), what (item index and
categorical indices), the user's last ``history_len`` engagements, the item's age, user and item
counters, the labels, and ``item_logq``. Every feature of a row is computed from rows *strictly
before* its timestamp (ties excluded, see ``feedrank.features.history``), so the examples replay
what a live system could have known at that moment:

- history: items the user engaged with (``clicked and not hidden``), most recent ``history_len``,
  oldest first, as item vocabulary indices; or, with ``history_mode: other_engagements`` (only for
  protocols without time, see ``FeatureConfig``), a seeded sample of the user's other engagements;
- counters (``COUNTER_COLUMNS``): user impressions and clicks, item impressions and clicks
  (log1p-scaled) and the item's smoothed CTR, see ``feedrank.features.counters``;
- with ``cross_counters`` (item categorical columns, e.g. ``[category]``), the user's impressions
  and clicks on items of the row's value of each (``cross_counter_columns``, log1p-scaled,
  ``CrossCounters``);
- item age in hours from ``created_ts``, or from the item's first impression in the log when
  ``created_ts`` is null;
- ``item_logq``: the item's smoothed share of training-window engagements (a loss correction,
  not a feature; the one column that is not point-in-time);
- ``item_tokens``: the words of the row's own (logged) content as token-vocabulary indices: its
  title's first ``title_len`` words, then, with ``content_fields: [title, abstract]``, its
  abstract's first ``abstract_len`` (``feedrank.features.text.content_tokens``): content that a
  new item has too.

``cutoff`` replays a past snapshot: rows at or after it are ignored as if not yet logged.
``split_at`` makes a time split: rows before it are ``train``, the rest ``test``. Test examples see
history and counters from every earlier row (training period and earlier test rows: what serving
would have seen), never a later one. Vocabularies and ``item_logq`` come from the training rows
only, so ids first seen in the test period map to OOV (or a hash bucket) and are counted.

Output directory (byte-identical for the same log and config, so builds can be cached and diffed)::

    OUT/manifest.json            source, cutoff, split, row/click/OOV counts, sha256 of every file
    OUT/vocab/                   ``Vocabularies.save``
    OUT/train/part-00000.parquet rows sorted by (ts, request_id, position, item_id, user_id);
    OUT/test/part-00000.parquet  ``rows_per_file`` rows per file, row groups of ``row_group_size``

The build streams: it reads the log twice in time-ordered chunks that never split a timestamp
(``feedrank.features.chunks``). The first pass counts (vocabularies, ``item_logq``, and with
``other_engagements`` the engaged rows each profile samples from); the second computes each
chunk's features from state carried over from earlier chunks (``PointInTimeCounters``,
``HistoryState``, first impressions) and appends the rows to the output files. Memory is one day
of the log plus one chunk plus O(users x history_len + items) (and O(users x values) per
``cross_counters`` column), not O(rows), and the output does
not depend on ``chunk_rows``. The output is written to a temporary folder renamed into place at the
end: a failed build leaves any previous build of ``OUT`` untouched.

Example::

    cfg = FeatureConfig(split_at="2024-01-08T00:00:00+00:00")
    build_features("runs/log", "runs/features", cfg)
    check_trainable("runs/features")             # raises on an empty or all-negative train split
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedrank.config import to_dict
from feedrank.data.log import EVENTS_DIR
from feedrank.data.schema import TS_TYPE, to_epoch_us
from feedrank.features.chunks import DEFAULT_CHUNK_ROWS, time_ordered_chunks
from feedrank.features.counters import (
    COUNTER_COLUMNS,
    CrossCounters,
    PointInTimeCounters,
    cross_counter_columns,
    item_age_hours,
    item_logq,
)
from feedrank.features.history import HistoryState, dense_rank
from feedrank.features.profile import ProfileSampler
from feedrank.features.text import check_content_fields, content_tokens
from feedrank.features.vocab import (
    ITEM_CAT_COLUMNS,
    USER_CAT_COLUMNS,
    Vocabularies,
    VocabCounter,
    VocabSpec,
    add_counts,
    lookup_quiet,
    stable_hash,
)
from feedrank.fsutil import sha256_file, staged_dir
from feedrank.progress import progress as progress_bar

SCHEMA_VERSION = 2  # 2: item_tokens
MANIFEST_FILE = "manifest.json"
VOCAB_DIR = "vocab"
SPLITS = ("train", "test")


def index_column(name: str) -> str:
    """Name of the example column holding the vocabulary index of log column ``name``."""
    return f"{name}_idx"


USER_CAT_INDEX_COLUMNS = tuple(index_column(c) for c in USER_CAT_COLUMNS)
ITEM_CAT_INDEX_COLUMNS = tuple(index_column(c) for c in ITEM_CAT_COLUMNS)
#: Log column -> the example column holding its vocabulary index.
_INDEX_COLUMNS = {"user_id": "user_idx", "item_id": "item_idx"} | {c: index_column(c) for c in (*USER_CAT_COLUMNS, *ITEM_CAT_COLUMNS)}

EXAMPLE_SCHEMA = pa.schema(
    [
        # raw identifiers, kept for evaluation joins and debugging (models read the indices)
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("request", pa.int64(), nullable=False),  # stable 63-bit hash of request_id
        pa.field("user_idx", pa.int64(), nullable=False),
        *(pa.field(c, pa.int64(), nullable=False) for c in USER_CAT_INDEX_COLUMNS),
        pa.field("item_idx", pa.int64(), nullable=False),
        *(pa.field(c, pa.int64(), nullable=False) for c in ITEM_CAT_INDEX_COLUMNS),
        pa.field("item_tokens", pa.list_(pa.field("token", pa.int64(), nullable=False)), nullable=False),
        pa.field("history", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
        pa.field("item_age_h", pa.float32(), nullable=False),
        *(pa.field(c, pa.float32(), nullable=False) for c in COUNTER_COLUMNS),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("clicked", pa.bool_(), nullable=False),
        pa.field("dwell_s", pa.float32(), nullable=False),
        pa.field("shared", pa.bool_(), nullable=False),
        pa.field("hidden", pa.bool_(), nullable=False),
        pa.field("item_logq", pa.float32(), nullable=False),
    ]
)


def example_schema(cross_counters: tuple[str, ...] | list[str] = ()) -> pa.Schema:
    """``EXAMPLE_SCHEMA`` plus the ``cross_counter_columns`` of ``cross_counters`` (a build's
    ``FeatureConfig.cross_counters``): the schema of that build's example files."""
    extra = [pa.field(c, pa.float32(), nullable=False) for c in cross_counter_columns(cross_counters)]
    return pa.schema(list(EXAMPLE_SCHEMA) + extra)


#: The columns the example pass reads; both passes add the config's content_fields (only the text it uses).
_LOG_COLUMNS = [
    "user_id", "item_id", "ts", "request_id", "position", "clicked", "dwell_s", "shared", "hidden",
    "created_ts", *USER_CAT_COLUMNS, *ITEM_CAT_COLUMNS,
]  # fmt: skip
#: The columns the counting pass reads (vocabularies, item_logq, profiles; the sort keys).
_COUNT_COLUMNS = ["user_id", "item_id", "ts", "request_id", "position", "clicked", "hidden",
                  *USER_CAT_COLUMNS, *ITEM_CAT_COLUMNS]  # fmt: skip
#: Log columns copied into the examples as they are.
_PASSED_COLUMNS = ("ts", "user_id", "item_id", "request_id", "position", "clicked", "dwell_s", "shared", "hidden")


class FeatureBuildError(ValueError):
    """The log cannot produce the requested examples (empty, nothing before the split, ...)."""


HistoryMode = Literal["point_in_time", "other_engagements"]


class NotTrainableError(ValueError):
    """A split has no examples or no positive labels, so training on it would be meaningless."""


@dataclass
class FeatureConfig:
    """Settings of one feature build (section ``features`` of a YAML config)."""

    history_len: int = 50
    # "point_in_time": the user's last history_len engagements strictly before the row (replays
    # serving; the only mode for time splits). "other_engagements": up to history_len of the user's
    # engagements anywhere in the built log except the row's own item, a seeded sample per row
    # (feedrank.features.profile). ONLY for protocols without time (random splits such as RecBole's
    # 80/10/10), where a point-in-time history teaches "what comes next" and the held-out items
    # are not next; it sees the future of each row, so split_at is refused with it. Counters and
    # item age stay point-in-time in both modes (they are clocks on a random split: switch them
    # off in the model, two_tower.user_counters: false and freshness_dim: 0).
    history_mode: HistoryMode = "point_in_time"
    history_seed: int = 0  # other_engagements: the sample's seed
    cutoff: str | None = None  # ISO-8601; only rows with ts < cutoff are used (naive = UTC)
    split_at: str | None = None  # ISO-8601; train = ts < split_at, test = the rest
    users: VocabSpec = field(default_factory=VocabSpec)
    items: VocabSpec = field(default_factory=VocabSpec)
    categorical: VocabSpec = field(default_factory=VocabSpec)
    tokens: VocabSpec = field(default_factory=VocabSpec)  # content words, counted once per item
    # The item text one title bag reads (feedrank.features.text): [title] (the default: builds and
    # bundles from before abstracts are unchanged) or [title, abstract].
    content_fields: list[str] = field(default_factory=lambda: ["title"])
    title_len: int = 16  # words kept per title (the first ones)
    abstract_len: int = 48  # words kept per abstract (the first ones), when content_fields has it
    ctr_prior: float = 0.05  # item CTR shrinkage target
    ctr_prior_weight: float = 20.0  # ... worth this many pseudo-impressions
    # item categorical columns (publisher, item_type, category) whose user x value counters are
    # built: the user's impressions and clicks on items of the row's value, strictly before the row
    cross_counters: list[str] = field(default_factory=list)
    rows_per_file: int = 1_000_000
    row_group_size: int = 65_536

    def content_lens(self) -> dict[str, int]:
        """Words kept per content field (``feedrank.features.text.content_tokens``'s ``lens``)."""
        return {name: getattr(self, f"{name}_len") for name in self.content_fields}

    def validate(self) -> None:
        if self.history_len < 0:
            raise ValueError(f"history_len must be >= 0, got {self.history_len}")
        if self.title_len < 1:
            raise ValueError(f"title_len must be >= 1, got {self.title_len}")
        if self.abstract_len < 1:
            raise ValueError(f"abstract_len must be >= 1, got {self.abstract_len}")
        check_content_fields(self.content_fields)
        if self.rows_per_file < 1 or self.row_group_size < 1:
            raise ValueError("rows_per_file and row_group_size must be >= 1")
        if self.rows_per_file * max(self.history_len, 1) >= 2**31:
            raise ValueError("rows_per_file * history_len must stay below 2**31 (int32 list offsets)")
        if not 0.0 <= self.ctr_prior <= 1.0 or self.ctr_prior_weight < 0:
            raise ValueError("ctr_prior must be in [0, 1] and ctr_prior_weight >= 0")
        if self.history_mode not in ("point_in_time", "other_engagements"):
            raise ValueError(f"history_mode must be 'point_in_time' or 'other_engagements', got {self.history_mode!r}")
        if self.history_mode == "other_engagements" and self.split_at is not None:
            raise ValueError("history_mode 'other_engagements' samples each user's engagements from the whole log, "
                             "future included: it is for random-split protocols, not with split_at (a time split)")  # fmt: skip
        cutoff, split_at = parse_ts(self.cutoff, "cutoff"), parse_ts(self.split_at, "split_at")
        if cutoff is not None and split_at is not None and split_at >= cutoff:
            raise ValueError(f"split_at ({self.split_at}) must be before cutoff ({self.cutoff})")
        for name in ("users", "items", "categorical", "tokens"):
            getattr(self, name).validate()
        unknown = [c for c in self.cross_counters if c not in ITEM_CAT_COLUMNS]
        if unknown or len(set(self.cross_counters)) != len(self.cross_counters):
            raise ValueError(f"cross_counters must be distinct item categorical columns {list(ITEM_CAT_COLUMNS)}, "
                             f"got {self.cross_counters}")  # fmt: skip


def parse_ts(value: str | None, key: str) -> dt.datetime | None:
    """An ISO-8601 string as an aware UTC datetime (naive strings are taken as UTC)."""
    if value is None:
        return None
    try:
        ts = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{key}: not an ISO-8601 timestamp: {value!r}") from exc
    return ts.replace(tzinfo=dt.timezone.utc) if ts.tzinfo is None else ts.astimezone(dt.timezone.utc)


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    seconds: dict[str, float]  # wall time per stage; not in the manifest, which must be reproducible


def build_features(
    log_dir: str | Path,
    out_dir: str | Path,
    cfg: FeatureConfig | None = None,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> BuildResult:
    """Build examples, vocabularies and manifest for the log at ``log_dir`` into ``out_dir``.

    ``chunk_rows`` bounds the rows processed at once (memory, not output: the same log and config
    give byte-identical output at any chunk size, so it is not part of the config or manifest)."""
    cfg = cfg or FeatureConfig()
    cfg.validate()
    if chunk_rows < 1 or chunk_rows * max(cfg.history_len, 1) >= 2**31:
        raise ValueError(f"chunk_rows must be >= 1 and chunk_rows * history_len below 2**31, got {chunk_rows}")
    log_dir, out_dir = Path(log_dir), Path(out_dir)
    cutoff, split_at = parse_ts(cfg.cutoff, "cutoff"), parse_ts(cfg.split_at, "split_at")
    split_us = None if split_at is None else to_epoch_us(split_at)
    timer = _Timer()

    def chunks(columns: list[str]):
        try:
            yield from time_ordered_chunks(log_dir, columns, cutoff, chunk_rows)
        except FileNotFoundError as exc:
            raise FeatureBuildError(str(exc)) from exc
        except ValueError as exc:  # a null key column
            raise FeatureBuildError(str(exc)) from exc

    census = _Census.count(chunks([*_COUNT_COLUMNS, *cfg.content_fields]), split_us, cfg.history_mode == "other_engagements", cfg.content_fields)
    if census.rows == 0:
        raise FeatureBuildError(f"{log_dir}: the event log has no rows" + (f" before cutoff {cutoff.isoformat()}" if cutoff else ""))
    if census.train_rows == 0:
        raise FeatureBuildError(f"{log_dir}: no events before split_at {cfg.split_at}; first event at {census.first_ts}")
    vocabs = census.counter.vocabularies(cfg.users, cfg.items, cfg.categorical, cfg.tokens)
    timer.lap("count")

    with staged_dir(out_dir) as tmp:
        vocabs.save(tmp / VOCAB_DIR)
        examples = _Examples(census, vocabs, cfg)
        writers = {split: _SplitWriter(tmp, split, cfg) for split in ("train",) + (("test",) if split_at else ())}
        bar = progress_bar(total=census.rows, desc="features", unit="row", unit_scale=True, enabled=progress)
        for chunk in chunks([*_LOG_COLUMNS, *cfg.content_fields]):
            n_train = chunk.num_rows if split_us is None else int(np.searchsorted(_ts_us(chunk), split_us, side="left"))
            parts = {"train": (0, n_train), "test": (n_train, chunk.num_rows)}
            table = examples.chunk(chunk, {s: parts[s] for s in writers})
            for split, (lo, hi) in parts.items():
                if hi > lo:
                    writers[split].write(table.slice(lo, hi - lo))
            bar.update(chunk.num_rows)
        bar.close()
        splits = {}
        for split, writer in writers.items():
            splits[split] = writer.stats | {"oov": examples.oov[split], "files": writer.close()}
        manifest = _manifest(log_dir, cfg, vocabs, splits, tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    timer.lap("build")
    return BuildResult(out_dir, manifest, timer.laps)


def _ts_us(rows: pa.Table) -> np.ndarray:
    return rows["ts"].cast(pa.int64()).to_numpy()


@dataclass
class _Census:
    """The first pass: what the examples need from the whole log before the first row is written."""

    counter: VocabCounter  # vocabulary counts of the training rows; its coders cover every row
    item_engaged: np.ndarray  # training-window engagements per item code (item_logq)
    pool: tuple[np.ndarray, np.ndarray] | None  # (user, item) codes of every engaged row (profiles)
    rows: int
    train_rows: int
    first_ts: object

    @classmethod
    def count(cls, chunks, split_us: int | None, profiles: bool, text_fields: list[str]) -> _Census:
        counter = VocabCounter(text_fields)
        item_engaged = np.zeros(0, np.int64)
        pool: list[tuple[np.ndarray, np.ndarray]] = []
        rows = train_rows = 0
        first_ts = None
        for chunk in chunks:
            first_ts = chunk["ts"][0] if first_ts is None else first_ts
            n_train = chunk.num_rows if split_us is None else int(np.searchsorted(_ts_us(chunk), split_us, side="left"))
            in_train = np.arange(chunk.num_rows) < n_train
            codes = counter.add(chunk, in_train)
            engaged = _engaged(chunk)
            item_engaged = add_counts(item_engaged, codes["item_id"][engaged & in_train], len(counter.coders["item_id"]))
            if profiles:
                pool.append((codes["user_id"][engaged], codes["item_id"][engaged]))
            rows, train_rows = rows + chunk.num_rows, train_rows + n_train
        joined = tuple(np.concatenate([p[i] for p in pool]) if pool else np.zeros(0, np.int64) for i in (0, 1))
        return cls(counter, item_engaged, joined if profiles else None, rows, train_rows, first_ts)


def _engaged(rows: pa.Table) -> np.ndarray:
    return rows["clicked"].to_numpy() & ~rows["hidden"].to_numpy()


class _Examples:
    """The second pass: each time-ordered chunk's example rows, from state carried across chunks."""

    def __init__(self, census: _Census, vocabs: Vocabularies, cfg: FeatureConfig):
        self.vocabs, self.cfg = vocabs, cfg
        coders = census.counter.coders
        self.users, self.items = coders["user_id"], coders["item_id"]
        n_items = len(self.items)
        self.counters = PointInTimeCounters(cfg.ctr_prior, cfg.ctr_prior_weight)
        self.cross = CrossCounters(cfg.cross_counters, len(self.users), [len(vocabs.item_cats[c]) for c in cfg.cross_counters])
        self.schema = example_schema(cfg.cross_counters)
        self.first_seen = np.full(n_items, np.iinfo(np.int64).max, dtype=np.int64)
        self.logq = item_logq(census.item_engaged, census.counter.counts["item_id"] > 0)
        if census.pool is None:
            self.history: HistoryState | None = HistoryState(cfg.history_len)
            self.profiles: ProfileSampler | None = None
        else:
            item_idx = lookup_quiet(vocabs.items, self.items.ids)
            user, item = census.pool
            self.history, self.profiles = None, ProfileSampler(user, item, item_idx[item], cfg.history_len,
                                                               cfg.history_seed, n_items)  # fmt: skip
        self.oov: dict[str, dict[str, int]] = {}

    def chunk(self, rows: pa.Table, parts: dict[str, tuple[int, int]]) -> pa.Table:
        """The ``EXAMPLE_SCHEMA`` rows of one chunk; ``parts`` (split -> row range) for the OOV counts."""
        ts_us = _ts_us(rows)
        user_code, item_code = self.users.encode(rows["user_id"]), self.items.encode(rows["item_id"])
        rank, n_ranks = dense_rank(ts_us)
        clicked, engaged = rows["clicked"].to_numpy(), _engaged(rows)
        columns = self._lookup_indices(rows, parts)
        columns["item_tokens"] = content_tokens(self.vocabs.tokens, rows, self.cfg.content_lens())
        columns.update(self.counters.chunk(user_code, item_code, rank, n_ranks, clicked))
        values = [columns[index_column(c)] for c in self.cfg.cross_counters]
        columns.update(self.cross.chunk(user_code, values, rank, n_ranks, clicked))
        created = rows["created_ts"]
        columns["item_age_h"] = item_age_hours(ts_us, created.cast(pa.int64()).fill_null(0).to_numpy(),
                                               created.is_valid().to_numpy(zero_copy_only=False), item_code,
                                               self.first_seen)  # fmt: skip
        columns["item_logq"] = self.logq[item_code]
        columns["request"] = _request_hash(rows["request_id"])
        if self.profiles is not None:
            offsets, values = self.profiles.sample(user_code, item_code)
        else:
            offsets, values = self.history.chunk(user_code, rank, n_ranks, engaged, columns["item_idx"])
        arrays = {name: rows[name] for name in _PASSED_COLUMNS} | columns
        arrays["history"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))
        return pa.Table.from_pydict({f.name: arrays[f.name] for f in self.schema}).cast(self.schema)

    def _lookup_indices(self, rows: pa.Table, parts: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
        """Vocabulary indices of every id column; each split's OOV hits added to ``self.oov``."""
        found: dict[str, list[np.ndarray]] = {col: [] for col in _INDEX_COLUMNS.values()}
        for split, (lo, hi) in parts.items():
            self.vocabs.reset_oov_hits()
            part = rows.slice(lo, hi - lo)
            for name, vocab in self.vocabs.all().items():
                found[_INDEX_COLUMNS[name]].append(vocab.lookup(part[name]))
            totals = self.oov.setdefault(split, dict.fromkeys(self.vocabs.all(), 0))
            for name, hits in self.vocabs.oov_hits().items():
                totals[name] += hits
        self.vocabs.reset_oov_hits()
        return {col: np.concatenate(p) for col, p in found.items()}


def _request_hash(request_id: pa.ChunkedArray) -> np.ndarray:
    """A stable int64 per request id: the same request gets the same number in every build."""
    encoded = request_id.combine_chunks().dictionary_encode()
    hashes = (stable_hash(encoded.dictionary) >> np.uint64(1)).astype(np.int64)  # drop a bit: non-negative
    return hashes[encoded.indices.to_numpy()]


class _SplitWriter:
    """One split's Parquet files, appended to chunk by chunk: ``rows_per_file`` rows a file, row groups
    of ``row_group_size``, each written as one contiguous table, so the files are the same bytes
    whatever the chunks were."""

    def __init__(self, out: Path, split: str, cfg: FeatureConfig):
        self.out, self.split, self.cfg = out, split, cfg
        (out / split).mkdir()
        self.files: list[dict] = []
        self.stats = {"rows": 0, "clicks": 0, "engagements": 0}
        self._pending: list[pa.Table] = []
        self._n_pending = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, rows: pa.Table) -> None:
        self.stats["rows"] += rows.num_rows
        self.stats["clicks"] += int(pc.sum(rows["clicked"].cast(pa.int64())).as_py() or 0)
        self.stats["engagements"] += int(_engaged(rows).sum())
        self._pending.append(rows)
        self._n_pending += rows.num_rows
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        while self._n_pending:
            want = min(self.cfg.row_group_size, self.cfg.rows_per_file - self._file_rows)
            if self._n_pending < want and not final:
                return
            take = min(want, self._n_pending)
            rows = pa.concat_tables(self._pending)
            group = rows.slice(0, take).combine_chunks()
            self._pending, self._n_pending = [rows.slice(take)], self._n_pending - take
            if self._writer is None:
                path = self.out / self.split / f"part-{len(self.files):05d}.parquet"
                self._writer = pq.ParquetWriter(path, example_schema(self.cfg.cross_counters))
                self.files.append({"path": f"{self.split}/{path.name}", "rows": 0})
            self._writer.write_table(group, row_group_size=take)
            self._file_rows += take
            self.files[-1]["rows"] = self._file_rows
            if self._file_rows == self.cfg.rows_per_file:
                self._close_file()

    def _close_file(self) -> None:
        self._writer.close()
        self._writer, self._file_rows = None, 0

    def close(self) -> list[dict]:
        """Write what is left and close the last file; the split's files, in order."""
        self._drain(final=True)
        if self._writer is not None:
            self._close_file()
        return self.files


def _manifest(log_dir: Path, cfg: FeatureConfig, vocabs: Vocabularies, splits: dict, out: Path) -> dict:
    for split in splits.values():
        for f in split["files"]:
            f["sha256"] = sha256_file(out / f["path"])
    all_files = sorted(p for p in out.rglob("*") if p.is_file())
    content = hashlib.sha256()
    for p in all_files:
        content.update(p.relative_to(out).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return {
        "schema_version": SCHEMA_VERSION,
        "source_log": str(log_dir.resolve()),
        "source_hash": log_hash(log_dir),
        "cutoff": cfg.cutoff,
        "split_at": cfg.split_at,
        "history_len": cfg.history_len,
        "config": config_record(cfg),
        "columns": {
            "user_cats": list(USER_CAT_INDEX_COLUMNS),
            "item_cats": list(ITEM_CAT_INDEX_COLUMNS),
            "counters": list(COUNTER_COLUMNS),
        } | ({"cross_counters": list(cross_counter_columns(cfg.cross_counters))} if cfg.cross_counters else {}),
        "vocab_sizes": {name: len(v) for name, v in vocabs.all().items()} | {"title_tokens": vocabs.n_tokens},
        "splits": splits,
        "content_hash": content.hexdigest(),
    }


def config_record(cfg: FeatureConfig) -> dict:
    """``cfg`` as the manifest records it (and ``ensure_features`` compares it): without
    ``cross_counters`` when there are none, so a build without them has the manifest and bytes of
    builds made before the setting existed, and those stay reusable."""
    record = json.loads(json.dumps(to_dict(cfg)))
    if not cfg.cross_counters:
        del record["cross_counters"]
    return record


def log_hash(log_dir: Path) -> str:
    """sha256 over the event files' relative paths and bytes: identifies the exact source log."""
    h = hashlib.sha256()
    events = log_dir / EVENTS_DIR
    for p in sorted(events.rglob("*.parquet")):
        if not any(part.startswith(".") for part in p.relative_to(events).parts):  # skip in-flight writes
            h.update(p.relative_to(events).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


class _Timer:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now


def load_manifest(features_dir: str | Path) -> dict:
    path = Path(features_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no feature build at {features_dir}: expected {path}")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    return manifest


def split_files(features_dir: str | Path, split: str = "train") -> list[Path]:
    """The Parquet files of one split, in order."""
    manifest = load_manifest(features_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{features_dir}: no split {split!r}; built splits: {sorted(manifest['splits'])}")
    return [Path(features_dir) / f["path"] for f in manifest["splits"][split]["files"]]


def check_trainable(features_dir: str | Path, split: str = "train") -> dict:
    """Raise ``NotTrainableError`` unless ``split`` has rows and at least one click; return its stats.

    Called by the trainer before it starts: an all-negative split trains every model to predict
    "never clicked", which looks like a converged run instead of the data problem it is.
    """
    manifest = load_manifest(features_dir)
    stats = manifest["splits"].get(split)
    if stats is None:
        raise NotTrainableError(f"{features_dir}: no split {split!r}; built splits: {sorted(manifest['splits'])}")
    if stats["rows"] == 0:
        raise NotTrainableError(f"{features_dir}: split {split!r} has no examples")
    if stats["clicks"] == 0:
        raise NotTrainableError(
            f"{features_dir}: split {split!r} is all-negative ({stats['rows']} impressions, 0 clicks): nothing to learn"
        )
    return stats
