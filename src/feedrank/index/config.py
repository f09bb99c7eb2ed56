"""Typed settings of the item index: which FAISS structure, its knobs, the recall gate and when to rebuild.

Loaded like every other config (``feedrank.config.from_dict`` / ``load_yaml(IndexConfig, path,
section="index")``), so an unknown key fails naming it. The defaults come from the 1M-item,
dim-64 benchmark (``benchmarks/index_recall_speed.py``, 2 cores): IVF with ``nprobe=16`` kept
recall@100 >= 0.95 on both its clustered data sets at ~0.1 ms a query, with half the memory and
build time of HNSW, which needed ``M=32`` and ``ef_search=256`` to pass 0.95 on the easier one and
never reached it on the harder one with ``M=16``. Other catalogues need their own check, which is
why ``publish`` measures recall instead of trusting these numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

IndexKind = Literal["flat", "ivf", "ivfpq", "hnsw"]


@dataclass
class RebuildPolicy:
    """When a published index is stale enough to rebuild from fresh item vectors.

    Fresh items can be ``add``-ed to a live index, but IVF assigns them to centroids trained without
    them and HNSW links them into a graph built for the old catalogue, so recall erodes as their
    share grows; age bounds how long the index lags behind item-tower retraining.
    """

    max_age_hours: float = 24.0
    max_fresh_share: float = 0.1

    def validate(self) -> None:
        if not self.max_age_hours > 0:
            raise ValueError(f"max_age_hours must be > 0, got {self.max_age_hours}")
        if not 0 <= self.max_fresh_share <= 1:
            raise ValueError(f"max_fresh_share must be in [0, 1], got {self.max_fresh_share}")


@dataclass
class IndexConfig:
    """How to build, search and gate an item index (metric: inner product on L2-normalised vectors).

    ``nlist`` None means ``round(4 * sqrt(n))`` lists, the usual rule of thumb that balances the cost
    of scanning centroids against the cost of scanning lists. ``ivf_train_per_list`` caps the
    k-means sample (FAISS's default of 256 points per list makes training on 1M items cost minutes
    on two cores for little recall). ``ivfpq`` stores each item as ``pq_m`` sub-quantizer codes of
    ``pq_nbits`` bits (``pq_m * pq_nbits / 8`` bytes an item instead of ``4 * dim``): the kind that
    keeps a 10M-item catalogue small; its codes are lossy, so recall is always measured against the
    raw vectors. ``refine_k_factor`` > 0 (ivfpq only) re-ranks the top ``k * refine_k_factor`` PQ
    candidates by exact inner product over raw vectors kept in RAM (FAISS ``IndexRefineFlat``): PQ
    alone misses the 0.95 recall floor on clustered vectors, the re-rank buys it back for
    ``4 * dim`` more bytes an item. 0 means no re-rank.
    """

    kind: IndexKind = "ivf"
    metric: Literal["inner_product"] = "inner_product"
    nlist: int | None = None
    nprobe: int = 16
    ivf_train_per_list: int = 64
    pq_m: int = 16
    pq_nbits: int = 8
    refine_k_factor: int = 0
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 256
    recall_floor: float = 0.95
    recall_k: int = 100
    recall_sample: int = 1000
    seed: int = 0
    rebuild: RebuildPolicy = field(default_factory=RebuildPolicy)

    def validate(self) -> None:
        positive = {
            "nprobe": self.nprobe,
            "ivf_train_per_list": self.ivf_train_per_list,
            "pq_m": self.pq_m,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "recall_k": self.recall_k,
            "recall_sample": self.recall_sample,
        }
        if self.nlist is not None:
            positive["nlist"] = self.nlist
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 1 <= self.pq_nbits <= 16:
            raise ValueError(f"pq_nbits must be in [1, 16], got {self.pq_nbits}")
        if self.refine_k_factor < 0:
            raise ValueError(f"refine_k_factor must be >= 0 (0 = no re-rank), got {self.refine_k_factor}")
        if self.refine_k_factor and self.kind != "ivfpq":
            raise ValueError(f"refine_k_factor re-ranks PQ codes and needs kind ivfpq, got kind {self.kind}")
        if not 0 <= self.recall_floor <= 1:
            raise ValueError(f"recall_floor must be in [0, 1], got {self.recall_floor}")

    def check_dim(self, dim: int) -> None:
        """IVF-PQ splits each vector into ``pq_m`` equal sub-vectors, so ``dim`` must divide by it."""
        if self.kind == "ivfpq" and dim % self.pq_m:
            raise ValueError(f"ivfpq needs dim divisible by pq_m: dim={dim} is not a multiple of pq_m={self.pq_m}")

    def lists_for(self, n: int) -> int:
        """Number of IVF lists for a catalogue of ``n`` items; k-means needs at least one item per list."""
        if self.nlist is None:
            return max(1, min(round(4 * math.sqrt(n)), n))
        if self.nlist > n:
            raise ValueError(f"nlist={self.nlist} is more than the {n} items to cluster; lower nlist or leave it unset")
        return self.nlist
