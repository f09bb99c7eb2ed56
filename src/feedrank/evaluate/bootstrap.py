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

How: the metric functions in ``feedrank.evaluate.metrics`` take no row weights, so each replicate
gathers its row indices with one vectorised ``np.repeat`` over the drawn clusters' row ranges and
calls the metrics on the gathered rows. The Python loop is over replicates only; each replicate
costs one metric call (a sort) per model and metric. The same seed draws the same clusters for
every model and metric, which is what makes all comparisons paired.

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
from tqdm import tqdm

from feedrank.evaluate import metrics as M

MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Metric:
    """A metric with the uniform signature ``fn(labels, scores, groups) -> float``.

    ``higher_is_better`` tells reports which way "best" and "improvement" point; ``uses_probs``
    marks metrics that need calibrated probabilities in [0, 1] rather than arbitrary scores.
    """

    name: str
    fn: MetricFn
    higher_is_better: bool = True
    uses_probs: bool = False


MetricLike = Metric | str | MetricFn


def _at_k(fn: Callable[..., float], k: int) -> MetricFn:
    return lambda y, s, g: fn(y, s, k, g)


def _ungrouped(fn: Callable[..., float]) -> MetricFn:
    return lambda y, s, g: fn(y, s)


_FIXED: dict[str, Metric] = {
    "auc": Metric("auc", _ungrouped(M.auc)),
    "gauc": Metric("gauc", M.group_auc),
    "mrr": Metric("mrr", M.mrr),
    "log_loss": Metric("log_loss", _ungrouped(M.log_loss), higher_is_better=False, uses_probs=True),
    "ne": Metric("ne", _ungrouped(M.normalized_entropy), higher_is_better=False, uses_probs=True),
    "ece": Metric("ece", _ungrouped(M.expected_calibration_error), higher_is_better=False, uses_probs=True),
}
_AT_K: dict[str, Callable[..., float]] = {
    "ndcg": M.ndcg_at_k,
    "recall": M.recall_at_k,
    "precision": M.precision_at_k,
    "hit": M.hit_at_k,
}


def get_metric(name: str) -> Metric:
    """The metric called ``name``: one of ``auc gauc mrr log_loss ne ece`` or ``<m>@<k>`` with
    ``m`` in ``ndcg recall precision hit`` (e.g. ``ndcg@10``)."""
    if name in _FIXED:
        return _FIXED[name]
    base, at, k = name.partition("@")
    if at and base in _AT_K and k.isdigit() and int(k) >= 1:
        return Metric(name, _at_k(_AT_K[base], int(k)))
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
        return cls(order, sorted_groups, np.cumsum(sizes) - sizes, sizes)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Row ids of one resample and fresh group ids (a cluster drawn twice gives two lists)."""
        drawn = rng.integers(0, self.sizes.size, size=self.sizes.size)
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

    rng = np.random.default_rng(seed)
    replicates = np.empty((len(columns), len(resolved), n_resamples), dtype=np.float64)
    for r in tqdm(range(n_resamples), desc="bootstrap", disable=not progress):
        rows, rep_groups = layout.draw(rng)
        y_r = y[rows]
        for i, s in enumerate(columns.values()):
            s_r = s[rows]
            for k, metric in enumerate(resolved):
                replicates[i, k, r] = metric_or_nan(metric, y_r, s_r, rep_groups)
    return BootstrapTable(tuple(columns), resolved, values, replicates, level)


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
