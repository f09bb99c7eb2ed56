"""Recall and speed of the flat, IVF, IVF-PQ and HNSW item indexes on a 1M- or 10M-item, dim-64 catalogue.

Prints, per index kind: build seconds, index size (serialised, ~ its memory) and bytes an item, the
process RSS added by the build, and for each search setting (IVF ``nprobe``, HNSW ``ef_search``,
IVF-PQ ``nprobe`` x re-rank depth ``refine_k_factor``) recall@k against exact search, single-query
latency p50/p99 in ms (one thread) at ``--k`` and at the serving depth ``--serving-k`` (the
pipeline's ``ann_candidates``), and batch QPS (all threads); then the cheapest setting that reaches
the recall target. Writes the same figures as JSON with ``--out``.

The item vectors are written chunk by chunk to a ``.npy`` file and memory-mapped (10M x 64 float32
is 2.56 GB), and the exact ground truth is a blocked brute-force scan over that file
(``feedrank.index.recall.exact_top_k``), so no step holds a second copy of the catalogue.

The vectors are a mixture of low-rank Gaussians, L2 normalised: ``--topics`` centres of uneven
popularity, items of a topic spread along ``--rank`` topic-specific directions (plus a little
isotropic noise), queries drawn fresh from the same mixture, as user vectors from a two-tower
model sit near the items they like. Uniform random vectors on the sphere would be the wrong test:
in 64 dimensions all their inner products concentrate near 0, nearest neighbours are barely nearer
than anything else, and every ANN structure looks bad. Learned embeddings are both clustered and of
low intrinsic dimension; ``--rank 64`` (isotropic topics: locally as hard as uniform) shows how
much the graph index (HNSW) depends on that, while IVF, which scans whole lists, barely does.

    .venv/bin/python benchmarks/index_recall_speed.py                   # ~5 min on 2 cores
    .venv/bin/python benchmarks/index_recall_speed.py --n 100000 --out /tmp/index.json
    .venv/bin/python benchmarks/index_recall_speed.py --rank 64 --hnsw-m 16   # the hard, isotropic case
    .venv/bin/python benchmarks/index_recall_speed.py --n 10000000 --kinds ivfpq --data-dir /tmp/idx10m
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from feedrank.config import to_dict
from feedrank.index import IndexConfig, ItemIndex, build_index
from feedrank.index.recall import exact_top_k, overlap_at_k


@dataclass
class Topics:
    """A mixture of low-rank Gaussians on the sphere: topic centres, per-topic spans, topic sizes."""

    centres: np.ndarray  # (topics, dim), unit norm
    spans: np.ndarray  # (topics, dim, rank): the directions items of a topic vary along
    weights: np.ndarray  # (topics,) topic popularity
    noise: float  # isotropic noise norm on top of the low-rank spread

    @classmethod
    def random(cls, rng: np.random.Generator, topics: int, dim: int, rank: int, spread: float, noise: float) -> Topics:
        centres = rng.standard_normal((topics, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        spans = rng.standard_normal((topics, dim, rank)).astype(np.float32) * (spread / np.sqrt(dim * rank))
        return cls(centres, spans, rng.dirichlet(np.full(topics, 0.5)), noise)

    def sample(self, rng: np.random.Generator, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """``n`` unit vectors (into ``out``, e.g. a memmap, if given); chunked so the (chunk, dim, rank)
        gather stays small."""
        dim, rank = self.spans.shape[1:]
        out = np.empty((n, dim), dtype=np.float32) if out is None else out
        for start in range(0, n, 20_000):
            m = min(20_000, n - start)
            topic = rng.choice(len(self.centres), size=m, p=self.weights)
            z = rng.standard_normal((m, rank)).astype(np.float32)
            x = self.centres[topic] + np.einsum("nij,nj->ni", self.spans[topic], z)
            x += (self.noise / np.sqrt(dim)) * rng.standard_normal((m, dim)).astype(np.float32)
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def latency_ms(index: ItemIndex, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 of one-query searches on one thread, the shape of a serving request.

    A server answers concurrent requests on separate threads, so one request gets one core; letting
    OpenMP split a single query over busy cores mostly measures thread wake-up and contention.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        index.search(queries[i : i + 1], k)
        times[i] = time.perf_counter() - start
    faiss.omp_set_num_threads(threads)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def index_mb(index: ItemIndex) -> float:
    """Size of the serialised FAISS index: its vectors, lists or graph, close to what it holds in RAM."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index.faiss_index, path)
        return os.path.getsize(path) / 2**20


def measure(index: ItemIndex, queries: np.ndarray, truth: np.ndarray, batch: np.ndarray, k: int, serving_k: int) -> dict:
    """recall@k against ``truth``, one-query latency at ``k`` and ``serving_k``, one batched search's throughput."""
    _, found = index.search(queries, k)
    p50, p99 = latency_ms(index, queries, k)
    serve_p50, serve_p99 = latency_ms(index, queries, serving_k)
    start = time.perf_counter()
    index.search(batch, k)
    qps = len(batch) / (time.perf_counter() - start)
    return {"recall": overlap_at_k(found, truth), "p50_ms": p50, "p99_ms": p99,
            "serving_p50_ms": serve_p50, "serving_p99_ms": serve_p99, "batch_qps": qps}


def write_vectors(topics: Topics, rng: np.random.Generator, n: int, path: Path) -> np.ndarray:
    """``n`` item vectors written chunk by chunk to the ``.npy`` file ``path``, returned memory-mapped."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, topics.centres.shape[1]))
    topics.sample(rng, n, out=out)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def sweep(kind: str, args: argparse.Namespace) -> list[dict]:
    """The search settings tried for ``kind``: one knob, or (nprobe, refine_k_factor) pairs for IVF-PQ."""
    if kind == "flat":
        return [{}]
    if kind == "ivf":
        return [{"nprobe": v} for v in args.nprobe]
    if kind == "hnsw":
        return [{"ef_search": v} for v in args.ef_search]
    return [{"nprobe": p, "refine_k_factor": r} for r in args.refine for p in args.nprobe]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8, help="directions items of a topic vary along")
    parser.add_argument("--spread", type=float, default=1.0, help="norm of the low-rank spread (centres have norm 1)")
    parser.add_argument("--noise", type=float, default=0.3, help="norm of the isotropic noise")
    parser.add_argument("--queries", type=int, default=200, help="queries for recall and latency")
    parser.add_argument("--batch", type=int, default=1000, help="queries in the batch-QPS search")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--serving-k", type=int, default=400, help="latency also at this depth (ann_candidates)")
    parser.add_argument("--target", type=float, default=0.95, help="recall@k to reach")
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "ivfpq", "hnsw"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 12, 16, 24, 32, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[100, 128, 192, 256, 384, 512])
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4 sqrt(n))")
    parser.add_argument("--train-per-list", type=int, default=IndexConfig.ivf_train_per_list, help="IVF k-means sample a list")
    parser.add_argument("--pq-m", type=int, default=IndexConfig.pq_m)
    parser.add_argument("--refine", type=int, nargs="+", default=[4, 8, 16], help="IVF-PQ re-rank depths k_factor")
    parser.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=IndexConfig.ef_construction)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="where to write vectors.npy (default: a deleted temp dir)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="feedrank-index-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        run(args, data_dir)


def run(args: argparse.Namespace, data_dir: Path) -> None:
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    topics = Topics.random(rng, args.topics, args.dim, args.rank, args.spread, args.noise)
    vectors = write_vectors(topics, rng, args.n, data_dir / "vectors.npy")
    queries = topics.sample(rng, args.queries)
    batch = topics.sample(rng, args.batch)
    ids = np.char.add("i", np.arange(args.n).astype(str)).astype(object)
    generated = time.perf_counter() - start
    truth = exact_top_k(vectors, queries, args.k)
    print(f"{args.n:,} x {args.dim} vectors ({args.topics} topics of rank {args.rank}, memory-mapped "
          f"{vectors.nbytes / 2**30:.2f} GiB), {args.queries} queries, recall@{args.k}, {args.threads} threads; "
          f"data {generated:.1f} s, exact truth {time.perf_counter() - start - generated:.1f} s, "
          f"RSS {rss_mb():.0f} MB", flush=True)

    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "kinds": {}}
    for kind in args.kinds:
        before = rss_mb()
        settings = sweep(kind, args)
        cfg = IndexConfig(kind=kind, nlist=args.nlist, ivf_train_per_list=args.train_per_list, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                          pq_m=args.pq_m, **({"refine_k_factor": args.refine[0]} if kind == "ivfpq" and args.refine[0] else {}))
        index = build_index(vectors, ids, cfg, model_version="benchmark")
        rss_added, size = rss_mb() - before, index_mb(index)
        label = {"flat": "", "ivf": f"nlist={cfg.lists_for(args.n)}", "hnsw": f"M={cfg.hnsw_m} efC={cfg.ef_construction}",
                 "ivfpq": f"nlist={cfg.lists_for(args.n)} m={cfg.pq_m}x{cfg.pq_nbits}b + raw re-rank"}[kind]
        print(f"\n{kind} {label}: build {index.build_seconds:.1f} s, index {size:.0f} MB = "
              f"{size * 2**20 / args.n:.1f} B/item (raw vectors {vectors.nbytes / 2**20:.0f} MB), "
              f"process RSS +{rss_added:.0f} MB", flush=True)
        points = []
        for setting in settings:
            if setting:
                index.tune(**setting)
            point = {**setting, **measure(index, queries, truth, batch, args.k, args.serving_k)}
            points.append(point)
            knobs = " ".join(f"{name}={value:<4}" for name, value in setting.items()) or "exact"
            print(f"  {knobs} recall {point['recall']:.4f}  p50/p99 {point['p50_ms']:6.2f}/{point['p99_ms']:6.2f} ms "
                  f"(k={args.serving_k}: {point['serving_p50_ms']:6.2f}/{point['serving_p99_ms']:6.2f})  "
                  f"batch {point['batch_qps']:8.0f} q/s", flush=True)
        good = [p for p in points if p["recall"] >= args.target]
        best = min(good, key=lambda p: p["serving_p50_ms"]) if good else None
        if kind != "flat":
            chosen = {k: v for k, v in best.items() if k in settings[0]} if best else "none tried"
            print(f"  -> cheapest setting with recall >= {args.target}: {chosen}", flush=True)
        results["kinds"][kind] = {"build_s": index.build_seconds, "index_mb": size, "bytes_per_item": size * 2**20 / args.n,
                                  "rss_added_mb": rss_added, "config": to_dict(index.cfg), "points": points, "best": best}
        del index

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
