"""The evaluation report a person reads: one self-contained HTML page per run, plus its numbers.

Run directory layout (training and evaluation write it; this module only reads it)::

    RUN_DIR/
      eval/predictions.parquet   required; one row per holdout impression:
          request          id of the impression list (int or string); ranking metrics rank within it
          user_id          the user (int or string); the bootstrap resamples users, so each request
                           must belong to one user
          item_id          optional; kept for drill-down, the report does not read it
          label            clicked, 0/1
          history_len      the user's history length at impression time (integer >= 0)
          score__<model>   ranking score of <model> (float, any scale); one column per model, >= 1
          prob__<model>    optional: calibrated click probability of <model> in [0, 1], used for
                           log loss, ECE and the reliability diagram; needs a matching score__<model>
      eval/metrics.json          optional; when present its table is shown instead of being recomputed:
          {"models": {model: {metric: {"value": v, "ci": [lo, hi]}}},
           "comparisons": [{"a": .., "b": .., "metric": .., "delta": .., "ci": [lo, hi], "p": ..}],
           "holdout": {free-form description shown as key/value pairs},
           "slices": [{"slice": .., "share": .., "counts": {..}, "models": {model: {metric: cell}},
                       "lift_share": {model: {metric: cell}}}]}   (optional; shown as the slices table)
      train/<run>/metrics.jsonl  optional, one folder per trained model (train/retrieval, ...): JSON
                                 lines with at least {"step": int, "loss": float}; every other
                                 numeric key is plotted as a training curve too.

Outputs, side by side (default OUT = RUN_DIR/report.html)::

    OUT                    the page: inline CSS, figures embedded as base64 PNG, no scripts, no
                           external fonts or fetches (it opens offline and can be mailed around)
    <OUT stem>_files/*.png the same figures as files (report_files/ for report.html)
    <OUT stem>.json        the numbers behind the page, machine-readable (report.json)

Without metrics.json the table is computed here with a clustered bootstrap
(``feedrank.evaluate.bootstrap``): users are resampled, so the intervals account for both the
impressions of one request and the requests of one user being correlated. The comparisons put
the best model (by GAUC) against every other model, paired on the same resamples.

Example::

    from feedrank.evaluate.report import write_report
    path = write_report("runs/demo")          # runs/demo/report.html
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from feedrank.config import ConfigError, from_dict
from feedrank.evaluate.bootstrap import BootstrapTable, bootstrap_models, get_metric, metric_or_nan
from feedrank.evaluate.metrics import reliability_curve
from feedrank.fsutil import staged_file

PREDICTIONS = Path("eval/predictions.parquet")
METRICS = Path("eval/metrics.json")
TRAIN = Path("train")
SCORE_PREFIX, PROB_PREFIX = "score__", "prob__"
REQUIRED_COLUMNS = ("request", "user_id", "label", "history_len")

RANKING_METRICS = ("auc", "gauc", "mrr", "ndcg@5", "ndcg@10")
PROBABILITY_METRICS = ("log_loss", "ece")
PRIMARY_METRIC = "gauc"  # picks the "best" model that the comparisons test against the others
BUCKET_METRICS = ("auc", "ndcg@10")
#: (label, lowest history_len, highest + 1 or None): cold-start users apart from warm ones.
HISTORY_BUCKETS = (("cold (0)", 0, 1), ("1-4", 1, 5), ("5-19", 5, 20), ("20+", 20, None))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """The holdout as dense arrays; request and user ids are re-coded 0..n-1 (cheap to group)."""

    labels: np.ndarray  # [n] float64 0/1
    requests: np.ndarray  # [n] int64 codes
    users: np.ndarray  # [n] int64 codes
    history_len: np.ndarray  # [n] int64
    scores: dict[str, np.ndarray]  # model -> [n] float64
    probs: dict[str, np.ndarray]  # model -> [n] float64 in [0, 1], calibrated models only


def _first_rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return f"{rows.size} row(s), first at row {rows[0]}"


def _non_null(table: pa.Table, name: str, path: Path) -> pa.ChunkedArray:
    column = table.column(name)
    if column.null_count:
        nulls = pc.is_null(column).to_numpy(zero_copy_only=False)
        raise ValueError(f"{path}: column {name!r} has null values: {_first_rows(nulls)}")
    return column


def _numeric_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = _non_null(table, name, path)
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise ValueError(f"{path}: column {name!r} must be numeric, got type {kind}")
    values = column.to_numpy().astype(np.float64)
    if np.isnan(values).any():
        raise ValueError(f"{path}: column {name!r} contains NaN: {_first_rows(np.isnan(values))}")
    return values


def _id_codes(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """Dense 0..n-1 codes of an id column (int or string ids alike)."""
    ids = _non_null(table, name, path).to_numpy(zero_copy_only=False)
    return np.unique(ids, return_inverse=True)[1].ravel().astype(np.int64)


def _check_requests_within_users(requests: np.ndarray, users: np.ndarray, table: pa.Table, path: Path) -> None:
    """The bootstrap resamples users and keeps their requests whole: a request id shared by two
    users (ids restarting per day, say) would be split, so it is refused here."""
    user_of_request = np.full(int(requests.max()) + 1, -1, dtype=np.int64)
    user_of_request[requests] = users  # any one of the request's users
    mixed = user_of_request[requests] != users
    if mixed.any():
        row = int(np.flatnonzero(mixed)[0])
        request_id = table.column("request")[row].as_py()
        raise ValueError(
            f"{path}: request {request_id!r} (row {row}) appears under several user_id values; "
            "each request must belong to one user"
        )


def load_predictions(path: Path) -> Predictions:
    """Read and validate ``eval/predictions.parquet``; every problem names the file and column."""
    if not path.is_file():
        raise FileNotFoundError(f"predictions not found: expected {path} (layout: see feedrank.evaluate.report)")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; required: {', '.join(REQUIRED_COLUMNS)}"
        )
    models = [n.removeprefix(SCORE_PREFIX) for n in names if n.startswith(SCORE_PREFIX)]
    calibrated = [n.removeprefix(PROB_PREFIX) for n in names if n.startswith(PROB_PREFIX)]
    if not models:
        raise ValueError(f"{path}: no model scores: expected at least one '{SCORE_PREFIX}<model>' column")
    if "" in models or "" in calibrated:
        raise ValueError(f"{path}: a score/prob column has an empty model name ('{SCORE_PREFIX}' or '{PROB_PREFIX}')")
    orphans = sorted(set(calibrated) - set(models))
    if orphans:
        names = ", ".join(PROB_PREFIX + m for m in orphans)
        raise ValueError(f"{path}: column(s) {names} have no matching {SCORE_PREFIX}<model> column")

    score_columns = [SCORE_PREFIX + m for m in models]
    prob_columns = [PROB_PREFIX + m for m in calibrated]
    table = pq.read_table(path, columns=[*REQUIRED_COLUMNS, *score_columns, *prob_columns])
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows: the holdout is empty")

    labels = _numeric_column(table, "label", path)
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        raise ValueError(f"{path}: column 'label' must be 0/1: {_first_rows(bad)} are not")
    history = _numeric_column(table, "history_len", path)
    bad = (history < 0) | (history != np.floor(history))
    if bad.any():
        raise ValueError(f"{path}: column 'history_len' must hold integers >= 0: {_first_rows(bad)} do not")
    probs = {}
    for model, column in zip(calibrated, prob_columns):
        values = _numeric_column(table, column, path)
        bad = (values < 0) | (values > 1)
        if bad.any():
            raise ValueError(f"{path}: column {column!r} must lie in [0, 1]: {_first_rows(bad)} do not")
        probs[model] = values
    requests, users = _id_codes(table, "request", path), _id_codes(table, "user_id", path)
    _check_requests_within_users(requests, users, table, path)
    return Predictions(
        labels=labels,
        requests=requests,
        users=users,
        history_len=history.astype(np.int64),
        scores={m: _numeric_column(table, c, path) for m, c in zip(models, score_columns)},
        probs=probs,
    )


def _check_ci(ci: list[float] | None) -> None:
    if ci is not None and len(ci) != 2:
        raise ValueError(f"ci must be [low, high], got {len(ci)} value(s)")


@dataclass(frozen=True)
class MetricValue:
    """One cell of the metric table; ``value`` None means undefined (nan is not JSON)."""

    value: float | None
    ci: list[float] | None = None

    def validate(self) -> None:
        _check_ci(self.ci)


@dataclass(frozen=True)
class ComparisonRecord:
    """B against A on one metric: ``delta = B - A``."""

    a: str
    b: str
    metric: str
    delta: float | None
    ci: list[float] | None = None
    p: float | None = None
    value_a: float | None = None
    value_b: float | None = None

    def validate(self) -> None:
        _check_ci(self.ci)


@dataclass(frozen=True)
class SliceRecord:
    """One slice of the holdout (all, items seen in training or new, warm or cold users): every
    model's metrics there and, when the log has truth, each model's share of the oracle's lift over
    random, ``(metric - random) / (oracle - random)``."""

    slice: str
    share: float  # of the impressions (ranking) or relevant pairs (retrieval)
    models: dict[str, dict[str, MetricValue]]
    counts: dict[str, Any] = field(default_factory=dict)
    lift_share: dict[str, dict[str, MetricValue]] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsFile:
    """The schema of ``eval/metrics.json`` (strict: an unknown key fails, naming it)."""

    models: dict[str, dict[str, MetricValue]]
    comparisons: list[ComparisonRecord] = field(default_factory=list)
    holdout: dict[str, Any] = field(default_factory=dict)
    slices: list[SliceRecord] = field(default_factory=list)


def load_metrics(path: Path) -> MetricsFile:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    try:
        return from_dict(MetricsFile, data, "metrics")
    except ConfigError as exc:
        raise ValueError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class Curve:
    """One training run's scalars by step; nan where a line did not log that key."""

    path: Path
    steps: np.ndarray
    scalars: dict[str, np.ndarray]  # "loss" first


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_curve(path: Path) -> Curve:
    """Parse one ``metrics.jsonl``; a bad line fails with ``file:line`` and the key."""
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        for key in ("step", "loss"):
            if key not in record:
                raise ValueError(f"{path}:{lineno}: missing key {key!r}")
        if not isinstance(record["step"], int) or isinstance(record["step"], bool):
            raise ValueError(f"{path}:{lineno}: 'step' must be an integer, got {record['step']!r}")
        if not _is_number(record["loss"]):
            raise ValueError(f"{path}:{lineno}: 'loss' must be a number, got {record['loss']!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (expected JSON lines with 'step' and 'loss')")
    keys = ["loss", *sorted({k for r in records for k, v in r.items() if _is_number(v)} - {"step", "loss"})]
    scalars = {
        k: np.array([r[k] if _is_number(r.get(k)) else np.nan for r in records], dtype=np.float64) for k in keys
    }
    return Curve(path, np.array([r["step"] for r in records], dtype=np.int64), scalars)


def load_curves(train_dir: Path) -> dict[str, Curve]:
    """``train/<run>/metrics.jsonl`` for every run folder that has one, keyed by run name."""
    return {p.parent.name: load_curve(p) for p in sorted(train_dir.glob("*/metrics.jsonl"))}


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _value(x: float, ci: tuple[float, float] | None = None) -> MetricValue:
    interval = None if ci is None or not all(map(math.isfinite, ci)) else [float(ci[0]), float(ci[1])]
    return MetricValue(_finite_or_none(x), interval)


def _comparisons(table: BootstrapTable, best: str) -> list[ComparisonRecord]:
    out = []
    for other in (m for m in table.models if m != best):
        for c in table.compare(other, best):
            out.append(
                ComparisonRecord(
                    a=other, b=best, metric=c.metric, delta=_finite_or_none(c.delta),
                    ci=_value(c.delta, c.ci).ci, p=_finite_or_none(c.p_value),
                    value_a=_finite_or_none(c.value_a), value_b=_finite_or_none(c.value_b),
                )  # fmt: skip
            )
    return out


def compute_metrics(
    pred: Predictions, *, n_resamples: int = 500, level: float = 0.95, seed: int = 0, progress: bool = False
) -> MetricsFile:
    """The metric table and comparisons from predictions, with user-clustered bootstrap intervals.

    Ranking metrics use ``score__`` columns, probability metrics ``prob__`` columns; both runs
    share the seed, hence the resamples.
    """
    options = dict(n_resamples=n_resamples, level=level, seed=seed, clusters=pred.users, progress=progress)
    tables = [bootstrap_models(pred.labels, pred.scores, pred.requests, RANKING_METRICS, **options)]
    if pred.probs:
        tables.append(bootstrap_models(pred.labels, pred.probs, pred.requests, PROBABILITY_METRICS, **options))
    models: dict[str, dict[str, MetricValue]] = {m: {} for m in pred.scores}
    for table in tables:
        for model in table.models:
            for metric in table.metrics:
                interval = table.interval(model, metric.name)
                models[model][metric.name] = _value(interval.value, interval.ci)
    primary = {m: v[PRIMARY_METRIC].value for m, v in models.items()}
    best = max(pred.scores, key=lambda m: -math.inf if primary[m] is None else primary[m])
    comparisons = [c for table in tables if best in table.models for c in _comparisons(table, best)]
    return MetricsFile(models, comparisons)


def holdout_summary(pred: Predictions) -> dict[str, Any]:
    return {
        "impressions": int(pred.labels.size),
        "requests": int(pred.requests.max()) + 1,
        "users": int(pred.users.max()) + 1,
        "clicks": int(pred.labels.sum()),
        "ctr": float(pred.labels.mean()),
        "cold_users": int(np.unique(pred.users[pred.history_len == 0]).size),
    }


def history_buckets(pred: Predictions) -> list[dict[str, Any]]:
    """AUC and NDCG@10 per model within each history-length bucket (cold vs warm users).

    Empty buckets keep their row (zero impressions, metrics None) so the table always shows
    the same four buckets.
    """
    metrics = [get_metric(name) for name in BUCKET_METRICS]
    uppers = [upper for _, _, upper in HISTORY_BUCKETS[:-1]]
    bucket_of_row = np.searchsorted(uppers, pred.history_len, side="right")
    rows = []
    for index, (label, _, _) in enumerate(HISTORY_BUCKETS):
        mask = bucket_of_row == index
        y, g = pred.labels[mask], pred.requests[mask]
        values = {
            model: {m.name: _finite_or_none(metric_or_nan(m, y, s[mask], g)) if mask.any() else None for m in metrics}
            for model, s in pred.scores.items()
        }
        rows.append(
            {
                "bucket": label,
                "impressions": int(mask.sum()),
                "requests": int(np.unique(g).size),
                "users": int(np.unique(pred.users[mask]).size),
                "ctr": float(y.mean()) if mask.any() else None,
                "models": values,
            }
        )
    return rows


def calibration(pred: Predictions, n_bins: int = 10) -> dict[str, dict[str, Any]]:
    out = {}
    for model, p in pred.probs.items():
        curve = reliability_curve(pred.labels, p, n_bins=n_bins)
        filled = curve.counts > 0
        out[model] = {
            "edges": curve.edges.tolist(),
            "mean_predicted": [float(x) if f else None for x, f in zip(curve.mean_predicted, filled)],
            "observed_rate": [float(x) if f else None for x, f in zip(curve.observed_rate, filled)],
            "counts": curve.counts.tolist(),
        }
    return out


def training_summary(curves: Mapping[str, Curve]) -> dict[str, dict[str, Any]]:
    """Last logged values and the lowest loss per run (a diverged run logs NaN losses)."""
    summary = {}
    for run, curve in curves.items():
        loss = curve.scalars["loss"]
        summary[run] = {
            "file": str(curve.path),
            "points": int(curve.steps.size),
            "last_step": int(curve.steps[-1]),
            "last": {k: _finite_or_none(v[-1]) for k, v in curve.scalars.items()},
            "min_loss": _finite_or_none(float(np.min(loss, initial=np.inf, where=~np.isnan(loss)))),
        }
    return summary


def best_per_metric(models: Mapping[str, Mapping[str, MetricValue]]) -> dict[str, str]:
    """The best model per metric, for metrics whose direction is known (``get_metric``)."""
    best = {}
    for metric in dict.fromkeys(k for row in models.values() for k in row):
        try:
            higher = get_metric(metric).higher_is_better
        except ValueError:
            continue  # a metric this module does not know: no direction, no highlight
        cells = {m: row.get(metric) for m, row in models.items()}
        scored = {m: cell.value for m, cell in cells.items() if cell is not None and cell.value is not None}
        if scored:
            best[metric] = (max if higher else min)(scored, key=scored.__getitem__)
    return best


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot state, the Agg canvas renders PNG)
# --------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, list[Any]]:
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def figure_training(curves: Mapping[str, Curve]) -> bytes:
    keys = list(dict.fromkeys(k for c in curves.values() for k in c.scalars))
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys):
        for run, curve in curves.items():
            if key in curve.scalars:
                ax.plot(curve.steps, curve.scalars[key], label=run, linewidth=1.2)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def figure_reliability(pred: Predictions) -> bytes:
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for model, p in pred.probs.items():
        curve = reliability_curve(pred.labels, p, n_bins=10)
        filled = curve.counts > 0
        ax.plot(curve.mean_predicted[filled], curve.observed_rate[filled], marker="o", label=model)
    ax.set(xlabel="mean predicted probability", ylabel="observed click rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("reliability diagram (10 uniform bins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def figure_scores(pred: Predictions) -> bytes:
    fig, axes = _grid(len(pred.scores))
    positive = pred.labels == 1
    for ax, (model, s) in zip(axes, pred.scores.items()):
        finite = s[np.isfinite(s)]
        bins = np.linspace(finite.min(), finite.max(), 41) if finite.size and finite.min() < finite.max() else 40
        for mask, name, color in ((~positive, "negatives", "tab:blue"), (positive, "positives", "tab:orange")):
            values = s[mask & np.isfinite(s)]
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.55, color=color, label=f"{name} ({values.size:,})")
        ax.set(title=model, xlabel="score", ylabel="density")
        ax.legend(fontsize=8)
    return _png(fig)


def figure_buckets(buckets: Sequence[Mapping[str, Any]], models: Sequence[str]) -> bytes:
    fig, axes = _grid(len(BUCKET_METRICS), ncols=2, size=(5.6, 3.6))
    x = np.arange(len(buckets))
    width = 0.8 / len(models)
    for ax, metric in zip(axes, BUCKET_METRICS):
        for i, model in enumerate(models):
            heights = [np.nan if b["models"][model][metric] is None else b["models"][model][metric] for b in buckets]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, label=model)
        ax.set_xticks(x, [f"{b['bucket']}\n{b['impressions']:,} imp." for b in buckets])
        ax.set(title=f"{metric} by user history length", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    # One legend above both panels: inside an axes it would hide the bars, which start at 0.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(models), 6), fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1150px; padding: 0 1rem; color: #1d2430; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #dde2ea; }
.meta { color: #5b6575; font-size: 0.9rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.35rem 0.7rem; border-bottom: 1px solid #e6e9ef; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f5f8; font-weight: 600; }
td.best { background: #e3f4e6; font-weight: 700; }
tr.significant td { background: #eef6ff; }
.ci { display: block; color: #6b7587; font-size: 0.78rem; font-weight: 400; }
img { max-width: 100%; border: 1px solid #e6e9ef; margin: 0.5rem 0; }
.note { color: #5b6575; font-size: 0.88rem; max-width: 60rem; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float | None, digits: int = 4) -> str:
    return "&mdash;" if x is None else f"{x:.{digits}f}"


def _ci(ci: Sequence[float] | None, digits: int = 4) -> str:
    return "" if ci is None else f'<span class="ci">[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]</span>'


def _p(p: float | None) -> str:
    return "&mdash;" if p is None else ("&lt; 0.001" if p < 0.001 else f"{p:.3f}")


def _table(
    table_id: str, headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = ()
) -> str:
    """Cells are already-escaped HTML; headers are plain text and escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    classes = list(row_classes) or [""] * len(rows)
    body = "".join(
        (f'<tr class="{css}">' if css else "<tr>") + "".join(cells) + "</tr>" for css, cells in zip(classes, rows)
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metrics_html(models: Mapping[str, Mapping[str, MetricValue]], best: Mapping[str, str]) -> str:
    metrics = list(dict.fromkeys(k for cells in models.values() for k in cells))
    rows = []
    for model, cells in models.items():
        row = [f"<td>{_e(model)}</td>"]
        for metric in metrics:
            cell = cells.get(metric)
            css = ' class="best"' if best.get(metric) == model else ""
            text = "&mdash;" if cell is None else _num(cell.value) + _ci(cell.ci)
            row.append(f"<td{css}>{text}</td>")
        rows.append(row)
    return _table("metrics-table", ["model", *metrics], rows)


def _comparisons_html(comparisons: Sequence[ComparisonRecord]) -> str:
    rows, classes = [], []
    for c in comparisons:
        try:
            higher = get_metric(c.metric).higher_is_better
        except ValueError:
            higher = None
        significant = c.ci is not None and higher is not None and (c.ci[0] > 0 if higher else c.ci[1] < 0)
        classes.append("significant" if significant else "")
        sign = "" if c.delta is None or c.delta < 0 else "+"
        rows.append([
            f"<td>{_e(c.b)} vs {_e(c.a)}</td>", f"<td>{_e(c.metric)}</td>",
            f"<td>{_num(c.value_a)}</td>", f"<td>{_num(c.value_b)}</td>",
            f"<td>{sign}{_num(c.delta)}{_ci(c.ci)}</td>", f"<td>{_p(c.p)}</td>",
        ])  # fmt: skip
    return _table("comparisons-table", ["B vs A", "metric", "A", "B", "delta (B - A)", "p"], rows, classes)


def _key_values_html(table_id: str, values: Mapping[str, Any]) -> str:
    rows = [
        [f"<td>{_e(k)}</td>", f"<td>{_e(f'{v:.4f}' if isinstance(v, float) else v)}</td>"] for k, v in values.items()
    ]
    return _table(table_id, ["", "value"], rows)


def _buckets_html(buckets: Sequence[Mapping[str, Any]], models: Sequence[str]) -> str:
    headers = ["history length", "impressions", "users", "CTR"] + [f"{m} {k}" for m in models for k in BUCKET_METRICS]
    rows = [
        [f"<td>{_e(b['bucket'])}</td>", f"<td>{b['impressions']:,}</td>", f"<td>{b['users']:,}</td>"]
        + [f"<td>{_num(b['ctr'])}</td>"]
        + [f"<td>{_num(b['models'][m][k])}</td>" for m in models for k in BUCKET_METRICS]
        for b in buckets
    ]
    return _table("history-table", headers, rows)


def _slices_html(slices: Sequence[SliceRecord]) -> str:
    """One row per (slice, model): the slice's size, each metric and, with an oracle, the model's
    share of the oracle's lift over random on it."""
    metrics = list(dict.fromkeys(k for s in slices for cells in s.models.values() for k in cells))
    lifted = list(dict.fromkeys(k for s in slices for cells in s.lift_share.values() for k in cells))
    headers = ["slice", "share", "counts", "model", *metrics, *(f"share of oracle lift: {k}" for k in lifted)]
    rows = []
    for s in slices:
        counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in s.counts.items())
        for model, cells in s.models.items():
            values = [f"<td>{_num(cells[k].value) + _ci(cells[k].ci) if k in cells else '&mdash;'}</td>" for k in metrics]
            share = s.lift_share.get(model, {})
            lifts = [f"<td>{_num(share[k].value, 3) + _ci(share[k].ci, 3) if k in share else '&mdash;'}</td>" for k in lifted]
            rows.append([f"<td>{_e(s.slice)}</td>", f"<td>{s.share:.1%}</td>", f"<td>{_e(counts)}</td>",
                         f"<td>{_e(model)}</td>", *values, *lifts])  # fmt: skip
    return _table("slices-table", headers, rows)


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="fig-{name}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def render_html(report: Mapping[str, Any], metrics: MetricsFile, figures: Mapping[str, bytes]) -> str:
    bucket_models = list(report["history_buckets"][0]["models"])
    source = (
        "read from eval/metrics.json"
        if report["source"] == METRICS.name
        else f"computed here: {report['bootstrap']['level']:.0%} percentile intervals from "
        f"{report['bootstrap']['n_resamples']} bootstrap resamples of users (seed {report['bootstrap']['seed']})"
    )
    sections = [
        f"<h1>feedrank evaluation report</h1>"
        f'<p class="meta">run <code>{_e(report["run_dir"])}</code> &middot; generated {_e(report["generated"])}</p>',
        "<h2>Holdout</h2>" + _key_values_html("holdout-table", report["holdout"]),
        f"<h2>Metrics</h2><p class=\"note\">Metric values with confidence intervals ({_e(source)}). "
        "The best model per metric is highlighted (lower is better for log_loss and ece).</p>"
        + _metrics_html(metrics.models, report["best"]),
    ]
    if metrics.comparisons:
        sections.append(
            '<h2>Comparisons</h2><p class="note">Paired bootstrap: both models scored on the same resamples. '
            "Highlighted rows: the interval of the delta excludes 0 in B's favour. p is the two-sided share of "
            "resamples where the delta crosses 0; with N resamples it cannot go below 2/(N+1).</p>"
            + _comparisons_html(metrics.comparisons)
        )
    if metrics.slices:
        sections.append(
            '<h2>Slices and the oracle</h2><p class="note">Each model on the whole holdout and on its slices: '
            "items seen in training against new items, warm users (in the training vocabulary) against cold "
            "ones. With the world's truth, <em>share of oracle lift</em> is (model - random) / (oracle - random): "
            "1 is as good as the world's own click utility, 0 no better than a random order.</p>"
            + _slices_html(metrics.slices)
        )
    if "training" in figures:
        sections.append("<h2>Training curves</h2>" + _img("training", figures["training"], "training curves"))
    if "reliability" in figures:
        sections.append(
            '<h2>Calibration</h2><p class="note">Observed click rate against mean predicted probability per bin; '
            "points on the diagonal are perfectly calibrated.</p>"
            + _img("reliability", figures["reliability"], "reliability diagram")
        )
    sections.append(
        '<h2>Score distributions</h2><p class="note">Positives against negatives per model: the less they overlap, '
        "the better the model separates clicks.</p>" + _img("scores", figures["scores"], "score distributions")
    )
    sections.append(
        '<h2>Cold vs warm users</h2><p class="note">AUC and NDCG@10 by the user\'s history length at impression '
        "time; &mdash; marks a bucket where the metric is undefined.</p>"
        + _buckets_html(report["history_buckets"], bucket_models)
        + _img("buckets", figures["buckets"], "metrics by history length")
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>feedrank report: {_e(Path(report['run_dir']).name)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(f'<section>{s}</section>' for s in sections)}</body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a staged file so an interrupted run never leaves a half-written page."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    n_resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Build the report of ``run_dir`` (layout in the module docstring) and return the HTML path.

    Everything is read and computed before anything is written, so bad input fails with a clear
    message and leaves an earlier report untouched.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir} (expected it to contain {PREDICTIONS})")
    out = run_dir / "report.html" if out is None else Path(out)
    pred = load_predictions(run_dir / PREDICTIONS)
    metrics_path = run_dir / METRICS
    if metrics_path.is_file():
        metrics, source, bootstrap = load_metrics(metrics_path), METRICS.name, None
    else:
        try:
            metrics = compute_metrics(pred, n_resamples=n_resamples, level=level, seed=seed, progress=progress)
        except ValueError as exc:
            raise ValueError(f"{run_dir / PREDICTIONS}: {exc}") from exc
        source = "bootstrap"
        bootstrap = {"n_resamples": n_resamples, "level": level, "seed": seed, "cluster": "user_id"}
    curves = load_curves(run_dir / TRAIN)
    buckets = history_buckets(pred)

    figures = {"scores": figure_scores(pred), "buckets": figure_buckets(buckets, list(pred.scores))}
    if curves:
        figures["training"] = figure_training(curves)
    if pred.probs:
        figures["reliability"] = figure_reliability(pred)
    files_dir = out.with_name(out.stem + "_files")
    report = {
        "run_dir": str(run_dir),
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": source,
        "bootstrap": bootstrap,
        "holdout": {**holdout_summary(pred), **metrics.holdout},
        "models": {m: {k: asdict(v) for k, v in cells.items()} for m, cells in metrics.models.items()},
        "best": best_per_metric(metrics.models),
        "comparisons": [asdict(c) for c in metrics.comparisons],
        "slices": [asdict(s) for s in metrics.slices],
        "history_buckets": buckets,
        "calibration": calibration(pred),
        "training": training_summary(curves),
        "figures": {name: str(files_dir / f"{name}.png") for name in figures},
    }
    page = render_html(report, metrics, figures)

    out.parent.mkdir(parents=True, exist_ok=True)
    files_dir.mkdir(exist_ok=True)
    for name, png in figures.items():
        _write_atomic(files_dir / f"{name}.png", png)
    _write_atomic(out.with_suffix(".json"), (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    _write_atomic(out, page.encode())
    return out
