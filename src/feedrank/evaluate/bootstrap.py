"""Clustered bootstrap for offline metrics: a confidence interval for one model, and the paired
comparison "is model B better than model A on this holdout, and by how much?".

Why clustered: impressions of one request (and the requests of one user) are not independent, so
resampling rows would pretend we have far more evidence than we do and give intervals that are
too narrow. We resample whole *clusters* (requests, or users) with replacement; every row of a
drawn cluster comes along, and a cluster drawn twice counts as two separate lists (its groups get
fresh ids, so a ranking metric never merges the two copies into one list of doubled length).

Why paired: A and B are scored on the *same* resample in every replicate, so the variance that
both models share (which requests happen to be easy) cancels in the delta. Comparing two
independent intervals instead would be much less sensitive.

How, fast path: a group's GAUC, MRR, NDCG@k, ... depends on that group's rows only, and the
metric is a weighted mean of those per-group values. So the per-group values of every model are
computed once (one sort each, ``metrics.<name>_values``) and a replicate is the same mean with
each group weighted by how often its cluster was drawn: ``counts[R, n_groups] @ terms`` is one
matrix product for a chunk of replicates, every model and every metric (``metrics.weighted_means``).
Log loss and NE decompose too, as per-group sums of row losses, positives and rows. Because a
group's value is the same wherever it is drawn, this gives the *same* replicate values as
re-scoring the resampled rows, up to float rounding, not merely the same distribution.

Row path: metrics without such a decomposition (pooled ``auc``, ``ece``, and any plain callable)
gather each replicate's rows with one vectorised ``np.repeat`` over the drawn clusters' row ranges
and call the metric on them: one sort per replicate, model and metric. Both paths see the same
drawn clusters: the same seed draws the same clusters for every model and metric, which is what
makes all comparisons paired.

Metrics are given by name (``"auc"``, ``"gauc"``, ``"mrr"``, ``"ndcg@10"``, ``"recall@5"``,
``"log_loss"``, ...; see ``get_metric``), as a ``Metric``, or as any callable
``f(labels, scores, groups) -> float``.

Example::

    >>> import numpy as np
    >>> from feedrank.evaluate.bootstrap import paired_bootstrap
    >>> rng = np.random.default_rng(0)
    >>> groups = np.repeat(np.arange(200), 10)
    >>> labels = rng.integers(0, 2, groups.size)
    >>> weak, strong = labels + rng.normal(0, 2, groups.size), labels + rng.normal(0, 0.5, groups.size)
    >>> (result,) = paired_bootstrap(labels, weak, strong, groups, ["gauc"], n_resamples=200)
    >>> result.delta > 0 and result.ci[0] > 0 and result.p_value < 0.05
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feedrank.evaluate import metrics as M
from feedrank.progress import progress as progress_bar

MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def _single_mean(means: np.ndarray) -> np.ndarray:
    return means[:, 0]


@dataclass(frozen=True)
class GroupDecomposition:
    """A metric as a function of weighted means of per-group values, so that a bootstrap replicate
    only re-weights groups instead of re-sorting rows.

    ``parts(labels, scores, groups)`` returns the per-group values (``metrics.GroupValues``, over
    all of ``groups``); ``combine`` maps their means, [n_resamples, n_parts], to the metric,
    [n_resamples]. Most metrics are one mean (the default ``combine``); NE is two (log loss and
    base rate).
    """

    parts: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[M.GroupValues, ...]]
    combine: Callable[[np.ndarray], np.ndarray] = _single_mean


@dataclass(frozen=True)
class Metric:
    """A metric with the uniform signature ``fn(labels, scores, groups) -> float``.

    ``higher_is_better`` tells reports which way "best" and "improvement" point; ``uses_probs``
    marks metrics that need calibrated probabilities in [0, 1] rather than arbitrary scores.
    ``decomposition``, when given, must agree with ``fn`` and lets the bootstrap take its fast
    path; without it (pooled AUC, ECE, custom metrics) every replicate calls ``fn`` on its rows.
    """

    name: str
    fn: MetricFn
    higher_is_better: bool = True
    uses_probs: bool = False
    decomposition: GroupDecomposition | None = None


MetricLike = Metric | str | MetricFn


def _ungrouped(fn: Callable[..., float]) -> MetricFn:
    return lambda y, s, g: fn(y, s)


def _one_part(values: Callable[[np.ndarray, np.ndarray, np.ndarray], M.GroupValues]) -> GroupDecomposition:
    return GroupDecomposition(parts=lambda y, s, g: (values(y, s, g),))


def _ne_parts(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> tuple[M.GroupValues, ...]:
    return M.log_loss_values(y, p, g), M.base_rate_values(y, g)


def _ne_combine(means: np.ndarray) -> np.ndarray:
    return M.normalized_entropy_of(means[:, 0], means[:, 1])


_FIXED: dict[str, Metric] = {
    # Pooled AUC ranks all rows against each other: not a per-group quantity, so the row path.
    "auc": Metric("auc", _ungrouped(M.auc)),
    "gauc": Metric("gauc", M.group_auc, decomposition=_one_part(M.group_auc_values)),
    "mrr": Metric("mrr", M.mrr, decomposition=_one_part(M.mrr_values)),
    "log_loss": Metric(
        "log_loss", _ungrouped(M.log_loss), higher_is_better=False, uses_probs=True,
        decomposition=_one_part(M.log_loss_values),
    ),
    "ne": Metric(
        "ne", _ungrouped(M.normalized_entropy), higher_is_better=False, uses_probs=True,
        decomposition=GroupDecomposition(_ne_parts, _ne_combine),
    ),
    # ECE's |mean predicted - observed| per bin is not a sum over groups: the row path.
    "ece": Metric("ece", _ungrouped(M.expected_calibration_error), higher_is_better=False, uses_probs=True),
}  # fmt: skip
#: ``<name>@k`` metrics: the scalar function and its per-group values, both ``f(y, s, k, groups)``.
_AT_K: dict[str, tuple[Callable[..., float], Callable[..., M.GroupValues]]] = {
    "ndcg": (M.ndcg_at_k, M.ndcg_values),
    "dcg": (M.dcg_at_k, M.dcg_values),
    "recall": (M.recall_at_k, M.recall_values),
    "precision": (M.precision_at_k, M.precision_values),
    "hit": (M.hit_at_k, M.hit_values),
}


def _at_k(name: str, base: str, k: int) -> Metric:
    scalar, values = _AT_K[base]
    return Metric(
        name, lambda y, s, g: scalar(y, s, k, g), decomposition=_one_part(lambda y, s, g: values(y, s, k, g))
    )


def get_metric(name: str) -> Metric:
    """The metric called ``name``: one of ``auc gauc mrr log_loss ne ece`` or ``<m>@<k>`` with
    ``m`` in ``ndcg dcg recall precision hit`` (e.g. ``ndcg@10``)."""
    if name in _FIXED:
        return _FIXED[name]
    base, at, k = name.partition("@")
    if at and base in _AT_K and k.isdigit() and int(k) >= 1:
        return _at_k(name, base, int(k))
    known = ", ".join([*_FIXED, *(f"{m}@K" for m in _AT_K)])
    raise ValueError(f"unknown metric {name!r}; known: {known}")


def as_metric(metric: MetricLike) -> Metric:
    """Accept a ``Metric``, a name for ``get_metric`` or a callable ``f(labels, scores, groups)``."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return get_metric(metric)
    if callable(metric):
        return Metric(getattr(metric, "__name__", repr(metric)), metric)
    raise ValueError(f"a metric must be a name, a Metric or a callable, got {type(metric).__name__}")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """One model's metric on the full holdout with its percentile bootstrap interval."""

    metric: str
    value: float
    ci: tuple[float, float]
    level: float
    n_resamples: int  # replicates where the metric was defined (nan ones are dropped)

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci": list(self.ci), "level": self.level, "n_resamples": self.n_resamples}


@dataclass(frozen=True)
class Comparison:
    """B against A on one metric. ``delta = value_b - value_a`` (for a lower-is-better metric a
    negative delta is an improvement). ``p_value`` is the two-sided bootstrap share:
    ``2 * min(#(delta* <= 0), #(delta* >= 0))``, each count + 1 over ``n_resamples + 1`` so that
    a finite number of replicates never claims p = 0, capped at 1."""

    metric: str
    value_a: float
    value_b: float
    delta: float
    ci: tuple[float, float]
    p_value: float
    level: float
    higher_is_better: bool
    n_resamples: int

    @property
    def b_better(self) -> bool:
        """B improves on A and the interval of the delta excludes 0."""
        lo, hi = self.ci
        return lo > 0 if self.higher_is_better else hi < 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value_a": self.value_a,
            "value_b": self.value_b,
            "delta": self.delta,
            "ci": list(self.ci),
            "p": self.p_value,
            "level": self.level,
            "higher_is_better": self.higher_is_better,
            "n_resamples": self.n_resamples,
        }


@dataclass(frozen=True)
class BootstrapTable:
    """Point values and replicate values of every (model, metric), all on the same resamples."""

    models: tuple[str, ...]
    metrics: tuple[Metric, ...]
    values: np.ndarray  # [n_models, n_metrics] on the full holdout
    replicates: np.ndarray = field(repr=False)  # [n_models, n_metrics, n_resamples], nan = undefined
    level: float = 0.95

    def _index(self, model: str, metric: str) -> tuple[int, int]:
        if model not in self.models:
            raise KeyError(f"unknown model {model!r}; have {', '.join(self.models)}")
        names = [m.name for m in self.metrics]
        if metric not in names:
            raise KeyError(f"unknown metric {metric!r}; have {', '.join(names)}")
        return self.models.index(model), names.index(metric)

    def interval(self, model: str, metric: str) -> Interval:
        i, k = self._index(model, metric)
        reps = self.replicates[i, k]
        reps = reps[~np.isnan(reps)]
        return Interval(metric, float(self.values[i, k]), _percentile_ci(reps, self.level), self.level, reps.size)

    def lift_share(self, model: str, metric: str, oracle: str, random: str) -> Interval:
        """``model``'s share of ``oracle``'s lift over ``random``, ``(m - r) / (o - r)``, with its
        percentile interval from the same replicates (1 = as good as the oracle, 0 = random).
        nan where the oracle does not beat random (the share is then meaningless)."""
        (im, k), (io, _), (ir, _) = (self._index(x, metric) for x in (model, oracle, random))
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = self.values[io, k] - self.values[ir, k]
            value = (self.values[im, k] - self.values[ir, k]) / gap if gap > 0 else float("nan")
            gaps = self.replicates[io, k] - self.replicates[ir, k]
            reps = np.where(gaps > 0, (self.replicates[im, k] - self.replicates[ir, k]) / gaps, np.nan)
        reps = reps[~np.isnan(reps)]
        return Interval(metric, float(value), _percentile_ci(reps, self.level), self.level, reps.size)

    def compare(self, a: str, b: str) -> list[Comparison]:
        """B against A on every metric, paired replicate by replicate."""
        out = []
        for metric in self.metrics:
            ia, k = self._index(a, metric.name)
            ib, _ = self._index(b, metric.name)
            deltas = self.replicates[ib, k] - self.replicates[ia, k]
            deltas = deltas[~np.isnan(deltas)]
            value_a, value_b = float(self.values[ia, k]), float(self.values[ib, k])
            out.append(
                Comparison(
                    metric=metric.name,
                    value_a=value_a,
                    value_b=value_b,
                    delta=value_b - value_a,
                    ci=_percentile_ci(deltas, self.level),
                    p_value=_two_sided_p(deltas),
                    level=self.level,
                    higher_is_better=metric.higher_is_better,
                    n_resamples=deltas.size,
                )
            )
        return out


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[float, float]:
    if reps.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def _two_sided_p(deltas: np.ndarray) -> float:
    if deltas.size == 0:
        return float("nan")
    at_most_zero = np.count_nonzero(deltas <= 0)
    at_least_zero = np.count_nonzero(deltas >= 0)
    return float(min(1.0, 2 * (min(at_most_zero, at_least_zero) + 1) / (deltas.size + 1)))


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clusters:
    """Rows laid out cluster by cluster (and group by group inside a cluster)."""

    order: np.ndarray  # [n] row ids sorted by (cluster, group)
    group_codes: np.ndarray  # [n] group code of each row in ``order``
    starts: np.ndarray  # [n_clusters] first position of each cluster in ``order``
    sizes: np.ndarray  # [n_clusters] rows per cluster
    group_cluster: np.ndarray  # [n_groups] the cluster of each group code

    @classmethod
    def build(cls, groups: np.ndarray, clusters: np.ndarray) -> _Clusters:
        group_codes = np.unique(groups, return_inverse=True)[1].ravel()
        cluster_codes = np.unique(clusters, return_inverse=True)[1].ravel()
        order = np.lexsort((group_codes, cluster_codes))
        sorted_groups, sorted_clusters = group_codes[order], cluster_codes[order]
        # Rows are sorted by (cluster, group), so a group inside one cluster forms one run.
        runs = 1 + np.count_nonzero(
            (sorted_groups[1:] != sorted_groups[:-1]) | (sorted_clusters[1:] != sorted_clusters[:-1])
        )
        if runs != group_codes.max() + 1:
            raise ValueError("every group must lie inside one cluster: some group ids appear under several cluster ids")
        sizes = np.bincount(cluster_codes)
        group_cluster = np.empty(runs, dtype=np.int64)
        group_cluster[sorted_groups] = sorted_clusters
        return cls(order, sorted_groups, np.cumsum(sizes) - sizes, sizes, group_cluster)

    @property
    def n_clusters(self) -> int:
        return self.sizes.shape[0]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Cluster indices of one resample: ``n_clusters`` draws with replacement."""
        return rng.integers(0, self.n_clusters, size=self.n_clusters)

    def rows(self, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row ids of the drawn clusters and fresh group ids (a cluster drawn twice gives two lists)."""
        sizes = self.sizes[drawn]
        out_starts = np.cumsum(sizes) - sizes
        # Position j of the output copies position starts[c] + (j - out_start of c) of ``order``.
        positions = np.arange(int(sizes.sum())) + np.repeat(self.starts[drawn] - out_starts, sizes)
        codes = self.group_codes[positions]
        new_group = np.empty(positions.size, dtype=bool)
        new_group[0] = True
        np.not_equal(codes[1:], codes[:-1], out=new_group[1:])
        new_group[out_starts] = True  # every drawn copy starts new groups
        return self.order[positions], np.cumsum(new_group) - 1


#: Cells of the [replicates, groups] count matrix per chunk of replicates: 32 MB of float64, so
#: memory stays flat however many resamples are asked for.
_CHUNK_CELLS = 2**22


@dataclass(frozen=True)
class _GroupTerms:
    """Per-group values of every decomposable (model, metric), computed once on the full holdout."""

    parts: list[M.GroupValues]  # all parts of all slots, over the dense group codes 0..G-1
    slots: list[tuple[int, int, slice, Callable[[np.ndarray], np.ndarray]]]  # model, metric, parts, combine

    @classmethod
    def build(
        cls, y: np.ndarray, columns: Sequence[np.ndarray], metrics: Sequence[Metric], groups: np.ndarray
    ) -> _GroupTerms:
        parts: list[M.GroupValues] = []
        slots = []
        for i, s in enumerate(columns):
            for k, metric in enumerate(metrics):
                if metric.decomposition is not None:
                    new = metric.decomposition.parts(y, s, groups)
                    slots.append((i, k, slice(len(parts), len(parts) + len(new)), metric.decomposition.combine))
                    parts.extend(new)
        return cls(parts, slots)

    def fill(self, replicates: np.ndarray, group_counts: np.ndarray) -> None:
        """Write the metrics of a chunk of replicates, ``replicates[model, metric, r]``, from how
        often each group counts in each replicate (``group_counts[r, group]``)."""
        means = M.weighted_means(self.parts, group_counts)
        for i, k, part_slice, combine in self.slots:
            replicates[i, k] = combine(means[:, part_slice])


def _column(x: Any, name: str, n: int | None) -> np.ndarray:
    arr = M._to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"length mismatch: labels has {n} rows but {name} has {arr.shape[0]}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN: {M._first_bad(np.isnan(arr))}")
    return arr


def metric_or_nan(metric: Metric, y: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
    """``metric`` on these rows, or nan where it is undefined (it raised ``ValueError``).

    A replicate (or a slice of the holdout) can legitimately make a metric undefined, e.g. when it
    holds one class only: that value becomes nan instead of failing the whole evaluation. Real
    input errors surface earlier, in the point estimate on the full data, which is not guarded.
    """
    try:
        return float(metric.fn(y, s, g))
    except ValueError:
        return float("nan")


def bootstrap_models(
    labels: Any,
    scores: Mapping[str, Any],
    groups: Any,
    metrics: Sequence[MetricLike],
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    clusters: Any = None,
    progress: bool = False,
) -> BootstrapTable:
    """Every metric of every model on the full data and on ``n_resamples`` cluster resamples.

    ``groups`` are the lists the ranking metrics rank within (request ids). ``clusters`` are the
    units resampled (default: ``groups``; pass user ids to also account for the correlation
    between one user's requests). Each group must lie inside one cluster for the resample to keep
    it whole. The same ``seed`` gives the same resamples whatever the models and metrics.

    Metrics with a ``decomposition`` (gauc, mrr, ndcg/recall/precision/hit@k, log_loss, ne) take
    the fast path: per-group values once, then a re-weighting per replicate, in chunks of
    replicates. The others (auc, ece, custom callables) re-score the resampled rows.
    """
    if groups is None:
        raise ValueError("groups is required: the bootstrap resamples whole groups (requests or users)")
    if not scores:
        raise ValueError("scores is empty: give at least one model's scores")
    n_resamples = M._positive_int(n_resamples, "n_resamples")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    y = _column(labels, "labels", None)
    n = y.shape[0]
    g = _column(groups, "groups", n)
    c = g if clusters is None else _column(clusters, "clusters", n)
    columns = {name: _column(s, f"scores[{name!r}]", n) for name, s in scores.items()}
    resolved = tuple(as_metric(m) for m in metrics)
    if not resolved:
        raise ValueError("metrics is empty: give at least one metric")

    layout = _Clusters.build(g, c)
    dense_groups = np.empty(n, dtype=np.int64)
    dense_groups[layout.order] = layout.group_codes
    values = np.array([[m.fn(y, s, dense_groups) for m in resolved] for s in columns.values()], dtype=np.float64)

    terms = _GroupTerms.build(y, list(columns.values()), resolved, dense_groups)
    on_rows = [k for k, m in enumerate(resolved) if m.decomposition is None]
    rng = np.random.default_rng(seed)
    replicates = np.empty((len(columns), len(resolved), n_resamples), dtype=np.float64)
    chunk = max(1, _CHUNK_CELLS // max(layout.n_clusters, layout.group_cluster.shape[0]))
    with progress_bar(total=n_resamples, desc="bootstrap", unit="resample", enabled=progress) as bar:
        for start in range(0, n_resamples, chunk):
            stop = min(start + chunk, n_resamples)
            cluster_counts = np.zeros((stop - start, layout.n_clusters))
            for r in range(start, stop):
                drawn = layout.draw(rng)
                if terms.slots:
                    cluster_counts[r - start] = np.bincount(drawn, minlength=layout.n_clusters)
                if on_rows:
                    rows, rep_groups = layout.rows(drawn)
                    y_r = y[rows]
                    for i, s in enumerate(columns.values()):
                        s_r = s[rows]
                        for k in on_rows:
                            replicates[i, k, r] = metric_or_nan(resolved[k], y_r, s_r, rep_groups)
                bar.update()
            if terms.slots:
                # A group counts as often as its cluster was drawn (each group lies in one cluster).
                terms.fill(replicates[:, :, start:stop], cluster_counts[:, layout.group_cluster])
    return BootstrapTable(tuple(columns), resolved, values, replicates, level)


def _precomputed(y: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
    raise ValueError("this metric's per-group values were computed outside the bootstrap: it has no row function")


def bootstrap_values(
    values: Mapping[str, Mapping[str, M.GroupValues]],
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> BootstrapTable:
    """The bootstrap of metrics whose per-group values are already known: ``values[model][metric]``.

    Why: a full-catalogue retrieval metric of a user comes from ranking the whole catalogue for
    that user, not from rows a ``Metric`` could re-score, but it is still a mean over users; so the
    users are the clusters, each drawn with replacement, and a replicate re-weights the users'
    values exactly as the fast path of ``bootstrap_models`` does (same draws for the same seed and
    number of groups). Every model must give the same metrics over the same groups; all metrics
    count as higher-is-better (recall, NDCG, MRR, ...).
    """
    n_resamples = M._positive_int(n_resamples, "n_resamples")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if not values:
        raise ValueError("values is empty: give at least one model's per-group values")
    models = tuple(values)
    names = tuple(values[models[0]])
    if not names or any(tuple(values[m]) != names for m in models):
        raise ValueError(f"every model needs the same metrics; have {[list(values[m]) for m in models]}")
    parts = [values[m][name] for m in models for name in names]
    slots = [(i, k, slice(i * len(names) + k, i * len(names) + k + 1), _single_mean)
             for i in range(len(models)) for k in range(len(names))]  # fmt: skip
    terms = _GroupTerms(parts, slots)
    n_groups = parts[0].group_ids.shape[0]
    point = np.empty((len(models), len(names), 1))
    terms.fill(point, np.ones((1, n_groups)))
    rng = np.random.default_rng(seed)
    replicates = np.empty((len(models), len(names), n_resamples), dtype=np.float64)
    chunk = max(1, _CHUNK_CELLS // max(n_groups, 1))
    with progress_bar(total=n_resamples, desc="bootstrap", unit="resample", enabled=progress) as bar:
        for start in range(0, n_resamples, chunk):
            stop = min(start + chunk, n_resamples)
            counts = np.stack([np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
                               for _ in range(start, stop)]).astype(np.float64)  # fmt: skip
            terms.fill(replicates[:, :, start:stop], counts)
            bar.update(stop - start)
    metrics = tuple(Metric(name, _precomputed) for name in names)
    return BootstrapTable(models, metrics, point[:, :, 0], replicates, level)


def bootstrap_ci(
    labels: Any,
    scores: Any,
    groups: Any,
    metric: MetricLike,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    clusters: Any = None,
) -> Interval:
    """One model's ``metric`` with its percentile interval from a clustered bootstrap."""
    table = bootstrap_models(
        labels, {"model": scores}, groups, [metric],
        n_resamples=n_resamples, level=level, seed=seed, clusters=clusters,
    )  # fmt: skip
    return table.interval("model", table.metrics[0].name)


def paired_bootstrap(
    labels: Any,
    scores_a: Any,
    scores_b: Any,
    groups: Any,
    metrics: Sequence[MetricLike],
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    clusters: Any = None,
) -> list[Comparison]:
    """B against A on each metric, both scored on the same cluster resamples."""
    table = bootstrap_models(
        labels, {"a": scores_a, "b": scores_b}, groups, metrics,
        n_resamples=n_resamples, level=level, seed=seed, clusters=clusters,
    )  # fmt: skip
    return table.compare("a", "b")
