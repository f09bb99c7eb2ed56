"""What every lab shares: where it writes, the data and models it measures, and its result.

A lab is a module ``feedrank.labs.<name>`` with ``NAME``, ``TITLE`` and ``run(ctx) -> LabResult``.
It measures on feedrank's own models and data: the demo world by default (simulated once per
output folder and reused by every lab), or any canonical log given with ``--log``. Each lab writes
its plots into ``ctx.out`` (``OUT/<name>/``); ``write_result`` adds ``result.json`` beside them, and
the labs page (``OUT/index.html``) is built from those files.

Example::

    ctx = LabContext(root=Path("runs/labs"), name="attention", quick=True)
    batches = ctx.batches(n=4, batch_size=256)          # real Batches from the demo world's train split
    model = ctx.two_tower(history_encoder="transformer")
    result = LabResult(name="attention", title="...", summary="...", tables=[...], figures={...})
    write_result(ctx, result)                            # runs/labs/attention/result.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedrank.data.batch import Batch
from feedrank.features.vocab import Vocabularies

RESULT_FILE = "result.json"
DATA_DIR = "_data"  # under the labs root: the world and its features, shared by every lab

#: The demo world scaled for labs: the full demo world (configs/world_demo.yaml) and a quick one.
WORLD_SIZES = {False: {"users": 10_000, "items": 4_000, "days": 7}, True: {"users": 2_000, "items": 1_000, "days": 7}}
TINY_WORLD = {"users": 300, "items": 200, "days": 7}  # tests only (LabContext.tiny): every code path, in seconds
SPLIT_AT = "2024-01-07T00:00:00+00:00"  # the demo world's last day is the holdout
DEMO_CONFIG = Path(__file__).parents[3] / "configs" / "demo.yaml"  # the two-tower the labs measure


@dataclass
class Table:
    """A table a person reads: printed on the terminal and shown on the labs page."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class LabResult:
    """What a lab found. ``figures`` is the machine-readable record (``result.json``); ``summary``
    is the argument a person takes away, with the numbers in it; ``plots`` are PNG names in ``ctx.out``."""

    name: str
    title: str
    summary: str
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    quick: bool = False
    elapsed_s: float | None = None  # set by feedrank.labs.run_lab: the lab's wall time


@dataclass
class LabContext:
    """One lab's run: its output folder, the data it measures on, the device and the size."""

    root: Path  # the labs output folder (OUT); this lab writes into OUT/<name>
    name: str
    log: Path | None = None  # a canonical event log; None = the demo world, simulated under OUT/_data
    device: str = "cpu"
    quick: bool = False
    seed: int = 0
    tiny: bool = False  # tests only: the tiny world and each lab's smallest sizes; implies quick

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.tiny:
            self.quick = True

    def scaled(self, full: Any, quick: Any, tiny: Any = None) -> Any:
        """A size by run mode: ``full``, ``quick`` (``--quick``), or ``tiny`` (tests; ``quick`` if None).

        Example: ``lengths = ctx.scaled(full=[50, 200, 1000], quick=[50, 200, 500], tiny=[8, 16])``."""
        if self.tiny and tiny is not None:
            return tiny
        return quick if self.quick else full

    @property
    def out(self) -> Path:
        path = self.root / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def world_log(self) -> Path:
        """The log every lab measures on: ``--log``, else the demo world simulated once (per size)."""
        if self.log is not None:
            return self.log
        from feedrank.data.simulate import SUMMARY_FILE, simulate
        from feedrank.data.world import WorldConfig

        path = self.root / DATA_DIR / ("world_tiny" if self.tiny else "world_quick" if self.quick else "world")
        if not (path / SUMMARY_FILE).is_file():
            sizes = TINY_WORLD if self.tiny else WORLD_SIZES[self.quick]
            simulate(WorldConfig(**sizes, seed=self.seed), path, progress=False)
        return path

    def split_at(self) -> str:
        """The holdout boundary: the demo world's last day, or the start (UTC) of ``--log``'s last day."""
        if self.log is None:
            return SPLIT_AT
        import datetime as dt

        import pyarrow.compute as pc

        from feedrank.data.log import read_events

        last = pc.max(read_events(self.log, columns=["ts"])["ts"]).as_py()
        if last is None:
            raise ValueError(f"{self.log}: the log has no events")
        return dt.datetime.combine(last.date(), dt.time(), tzinfo=dt.timezone.utc).isoformat()

    def feature_config(self):
        """The labs' point-in-time features: train up to the last day, test on it, histories of 50."""
        from feedrank.features.build import FeatureConfig

        return FeatureConfig(split_at=self.split_at(), history_len=50)

    def features_dir(self) -> Path:
        """``feature_config()``'s features of ``world_log()``, built once."""
        from feedrank.features.reuse import ensure_features

        path = self.world_log().parent / f"{self.world_log().name}_features"
        ensure_features(self.world_log(), path, self.feature_config(), progress=False)
        return path

    @cached_property
    def vocabs(self) -> Vocabularies:
        from feedrank.features.build import VOCAB_DIR

        return Vocabularies.load(self.features_dir() / VOCAB_DIR)

    def rows(self, n: int, split: str = "train") -> pa.Table:
        """The last ``n`` example rows of ``split`` (fewer when the split is smaller): the latest rows
        have the longest point-in-time histories, which is what the encoders are measured on."""
        from feedrank.features.build import split_files

        tables, total = [], 0
        for file in reversed(split_files(self.features_dir(), split)):
            tables.append(pq.read_table(file))
            total += tables[-1].num_rows
            if total >= n:
                break
        return pa.concat_tables(tables[::-1]).slice(max(0, total - n))

    def batches(self, n: int, batch_size: int, max_history: int = 30, split: str = "train",
                clicked_only: bool = False) -> list[Batch]:  # fmt: skip
        """``n`` real Batches of ``batch_size`` rows (fewer when the split runs out), collated as
        training does: checked against the vocabularies, histories cut to ``max_history`` (30: the
        demo two-tower's ``max_history_len``). ``clicked_only`` packs only the clicked rows of each
        slice, as the retrieval task does for its softmax losses (the rows they train on)."""
        from feedrank.data.collate import Collator
        from feedrank.train.retrieval import clicked_rows
        from feedrank.train.task import batch_limits

        rows = self.rows(n * batch_size, split)
        collate = Collator(max_history=max_history, limits=batch_limits(self.vocabs),
                           keep=clicked_rows if clicked_only else None)
        return [collate(rows.slice(i, batch_size)) for i in range(0, rows.num_rows - batch_size + 1, batch_size)]

    def long_histories(self, batch_size: int, length: int):
        """``[B, length]`` item indices and their bool mask for sequence-length sweeps: the real
        histories of the train split's latest rows joined end to end (a long-lived user's length,
        real items), the last quarter of every other row padded so masking is always exercised."""
        import numpy as np
        import torch

        pool = torch.cat([b.history[b.history_mask] for b in self.batches(n=4, batch_size=256, max_history=50)])
        if pool.numel() == 0:
            raise ValueError(f"{self.world_log()}: the train split has no histories to build long histories from")
        history = torch.from_numpy(np.resize(pool.numpy(), batch_size * length)).view(batch_size, length)
        mask = torch.ones(batch_size, length, dtype=torch.bool)
        mask[1::2, length - length // 4 :] = False
        return history.masked_fill(~mask, 0), mask

    def two_tower(self, **overrides: Any):
        """A fresh two-tower sized by this data's vocabularies: ``configs/demo.yaml``'s model plus
        ``overrides`` (``TwoTowerConfig`` fields), seeded by ``ctx.seed``. A model that reads titles
        gets the training window's titles attached, as ``feedrank train retrieval`` attaches them
        (without the word-vector start: a lab measures the architecture, not the initialisation)."""
        import torch

        from feedrank.bundle import attach_titles, build_two_tower
        from feedrank.config import to_dict
        from feedrank.train.retrieval import load_run_config
        from feedrank.train.task import training_catalogue

        cfg = load_run_config(DEMO_CONFIG)
        cfg = dataclasses.replace(cfg, two_tower=dataclasses.replace(cfg.two_tower, **overrides))
        torch.manual_seed(self.seed)
        model = build_two_tower(to_dict(cfg), self.vocabs)
        if any(getattr(module, "reads_titles", False) for module in model.modules()):
            attach_titles(model, training_catalogue(self.world_log(), self.vocabs, self.feature_config()))
        return model


class SavedTensors:
    """Exact bytes autograd saves for backward, as unique storages (``saved_tensors_hooks``).

    Two saved tensors that share a storage (a view and its base, one tensor saved by two ops) count
    once; storages in ``exclude`` (the weights, the input: memory that exists anyway) not at all.
    Non-reentrant ``torch.utils.checkpoint`` saves its inputs through these hooks too, so the count
    of a checkpointed region is what it really keeps. Tensors saved without storage (sparse,
    functional wrappers) raise, rather than silently counting zero.

    Example::

        with SavedTensors(exclude=model.parameters()) as saved:
            loss = model(x).sum()
        saved.bytes, saved.largest          # then loss.backward() as usual
    """

    def __init__(self, exclude: Any = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, tuple[int, list[tuple[int, ...]]]] = {}  # data_ptr -> (nbytes, shapes saved)
        self._hooks: Any = None

    def _pack(self, t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._storages.setdefault(storage.data_ptr(), (storage.nbytes(), []))[1].append(tuple(t.shape))
        return t

    @property
    def storages(self) -> list[tuple[int, list[tuple[int, ...]]]]:
        """Each unique saved storage: its bytes and the shapes of the tensors saved from it."""
        return list(self._storages.values())

    def __enter__(self) -> SavedTensors:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(nbytes for nbytes, _ in self._storages.values())

    @property
    def largest(self) -> int:
        return max((nbytes for nbytes, _ in self._storages.values()), default=0)


def median_seconds(fn: Any, reps: int, warmup: int = 1, device: str = "cpu", budget_s: float | None = None) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` (CUDA: synchronised).

    ``budget_s``: stop adding reps once they have taken that long (at least one always runs), so
    a sweep's largest sizes do not dominate a lab's run time."""
    import statistics
    import time

    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    while len(times) < max(1, reps) and (budget_s is None or not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_result(ctx: LabContext, result: LabResult) -> Path:
    """``OUT/<name>/result.json``: the result as JSON (every figure, table and plot name)."""
    from feedrank.fsutil import staged_file

    path = ctx.out / RESULT_FILE
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return path


def read_result(path: Path) -> LabResult:
    """A ``LabResult`` back from its ``result.json``."""
    raw = json.loads(Path(path).read_text())
    raw["tables"] = [Table(**t) for t in raw.get("tables", [])]
    return LabResult(**raw)


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Measure with ``n`` torch intra-op threads, then restore the setting.

    Why the labs measure CPU timings with one: on a few shared cores an OpenMP parallel region of 2
    threads waits for whichever thread the scheduler has parked, and timings turn into scheduler
    noise (the two-tower's eager training step took 2 ms with 1 thread and 600 ms with 2 under load).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
