"""The world's oracle: the score a model could at best learn, when the log is simulated.

A simulated log keeps its ground truth beside it (``LOG_DIR/truth/``, ``feedrank.data.world``).
The oracle ranks by the world's own position-free click utility, ``World.true_affinity`` (topic
match and quality) times ``World.freshness`` at the impression's time: what an impression would
get from a model that knew everything except the dice. Evaluation adds it as the ``oracle`` model,
so every model's figure can be read as a share of the oracle's lift over random,
``(metric - random) / (oracle - random)`` (``BootstrapTable.lift_share``), not only as a bare
number. Logs without truth (MIND, EB-NeRD, any ingest) simply have no oracle.

This module only asks the world; it holds no copy of its formulas.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa

from feedrank.data.schema import to_epoch_us
from feedrank.data.world import World, load_world
from feedrank.data.world.world import TRUTH_DIR

ORACLE = "oracle"


def load_truth(log_dir: str | Path) -> World | None:
    """The world behind ``log_dir``, or None when the log has no ``truth/`` (a real log)."""
    if not (Path(log_dir) / TRUTH_DIR / "world.json").is_file():
        return None
    return load_world(log_dir)


def oracle_scores(world: World, user_ids: pa.Array | pa.ChunkedArray, item_ids: pa.Array | pa.ChunkedArray,
                  ts_us: np.ndarray) -> np.ndarray:  # fmt: skip
    """Per impression: ``true_affinity(user, item) * freshness(item age at ts_us)`` (float64)."""
    users, items = world.user_index(user_ids), world.item_index(item_ids)
    age_h = world.item_age_h(items, np.asarray(ts_us, dtype=np.int64))
    return world.true_affinity(users, items).astype(np.float64) * world.freshness(age_h)


class CatalogueOracle:
    """Scores users against a fixed list of items at one time ``at`` (full-catalogue retrieval)."""

    def __init__(self, world: World, user_ids: pa.Array | pa.ChunkedArray, item_ids: pa.Array | pa.ChunkedArray,
                 at: dt.datetime):  # fmt: skip
        self.world = world
        self.users = world.user_index(user_ids)
        self.items = world.item_index(item_ids)
        self.freshness = world.freshness(world.item_age_h(self.items, np.full(self.items.shape, to_epoch_us(at))))

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        """[hi - lo, n_items] oracle scores of users ``lo:hi``."""
        affinity = self.world.true_affinity(self.users[lo:hi, None], self.items[None, :])
        return affinity.astype(np.float64) * self.freshness[None, :]

