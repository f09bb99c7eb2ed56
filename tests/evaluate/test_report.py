"""The HTML evaluation report: numbers against the metrics module, outputs, escaping,
metrics.json, history buckets, the CLI and clear errors on bad input.

``make_run`` is also loaded by test_report_browser.py (test modules cannot import each other
under importlib mode)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from feedrank.commands.report import register
from feedrank.evaluate.metrics import auc, group_auc, log_loss, ndcg_at_k
from feedrank.evaluate.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_columns(n_requests=200, size=8, seed=0):
    """A holdout with one good (calibrated), one weak and one random model; users have several
    requests and a history length in each bucket."""
    rng = np.random.default_rng(seed)
    request = np.repeat(np.arange(n_requests), size)
    request_user = rng.integers(0, n_requests // 2, n_requests)
    user = request_user[request]
    history_of_user = rng.choice([0, 3, 10, 50], n_requests // 2)
    label = (rng.random(request.size) < 0.25).astype(np.int64)
    good = 1.5 * label + rng.normal(0, 1, request.size)
    return {
        "request": request,
        "user_id": user,
        "item_id": rng.integers(0, 300, request.size),
        "label": label,
        "history_len": history_of_user[user],
        "score__good": good,
        "prob__good": 1 / (1 + np.exp(-(good - 1.5))),
        "score__weak": 0.3 * label + rng.normal(0, 1, request.size),
        "score__random": rng.random(request.size),
    }


def make_run(root: Path, columns=None, curves=True) -> Path:
    """A run directory in the documented layout."""
    (root / "eval").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(make_columns() if columns is None else columns), root / "eval" / "predictions.parquet")
    if curves:
        for run in ("retrieval", "ranking"):
            (root / "train" / run).mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"step": s, "loss": 1.0 / (1 + s), "lr": 0.001}) for s in range(0, 100, 10)]
            (root / "train" / run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    path = write_report(run, n_resamples=40)
    return run, path, json.loads((run / "report.json").read_text()), path.read_text()


def test_outputs_are_written_beside_the_page(built):
    run, path, report, page = built
    assert path == run / "report.html"
    for name in ("scores", "buckets", "training", "reliability"):
        png = (run / "report_files" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
        assert report["figures"][name] == str(run / "report_files" / f"{name}.png")
    assert page.count('src="data:image/png;base64,') == 4


def test_page_is_self_contained(built):
    _, _, _, page = built
    lowered = page.lower()
    for forbidden in ("<script", "<link", "http://", "https://", "@import", "url("):
        assert forbidden not in lowered


def test_numbers_match_the_metrics_module(built):
    run, _, report, page = built
    cols = pq.read_table(run / "eval" / "predictions.parquet").to_pydict()
    y, g = np.array(cols["label"]), np.array(cols["request"])
    good = report["models"]["good"]
    assert good["gauc"]["value"] == pytest.approx(group_auc(y, cols["score__good"], g), abs=1e-12)
    assert good["ndcg@10"]["value"] == pytest.approx(ndcg_at_k(y, cols["score__good"], 10, g), abs=1e-12)
    assert good["log_loss"]["value"] == pytest.approx(log_loss(y, cols["prob__good"]), abs=1e-12)
    assert "log_loss" not in report["models"]["weak"]  # no prob__weak column
    lo, hi = good["auc"]["ci"]
    assert lo < good["auc"]["value"] < hi
    assert report["source"] == "bootstrap" and report["bootstrap"]["cluster"] == "user_id"
    assert report["holdout"]["impressions"] == 1600 and report["holdout"]["requests"] == 200
    assert report["holdout"]["clicks"] == int(y.sum())
    assert f"{good['gauc']['value']:.4f}" in page


def test_best_model_is_highlighted_and_compared(built):
    _, _, report, page = built
    assert report["best"]["gauc"] == "good" and report["best"]["log_loss"] == "good"
    pairs = {(c["a"], c["b"], c["metric"]) for c in report["comparisons"]}
    assert ("random", "good", "gauc") in pairs and ("weak", "good", "ndcg@10") in pairs
    assert all(c["b"] == "good" for c in report["comparisons"])
    vs_random = next(c for c in report["comparisons"] if c["a"] == "random" and c["metric"] == "gauc")
    assert vs_random["delta"] > 0.1 and vs_random["ci"][0] > 0
    assert page.count('class="best"') == 7  # 5 ranking + 2 probability metrics, all won by "good"
    assert 'id="metrics-table"' in page and 'id="comparisons-table"' in page


def test_history_buckets_hand_checked(built):
    run, _, report, _ = built
    cols = pq.read_table(run / "eval" / "predictions.parquet").to_pydict()
    y, h, s, g = (np.array(cols[k]) for k in ("label", "history_len", "score__weak", "request"))
    buckets = {b["bucket"]: b for b in report["history_buckets"]}
    assert list(buckets) == ["cold (0)", "1-4", "5-19", "20+"]
    assert sum(b["impressions"] for b in buckets.values()) == y.size
    cold = h == 0
    assert buckets["cold (0)"]["impressions"] == int(cold.sum())
    assert buckets["cold (0)"]["models"]["weak"]["auc"] == pytest.approx(auc(y[cold], s[cold]), abs=1e-12)
    warm = h >= 20
    assert buckets["20+"]["models"]["weak"]["ndcg@10"] == pytest.approx(ndcg_at_k(y[warm], s[warm], 10, g[warm]), abs=1e-12)


def test_empty_bucket_keeps_its_row(tmp_path):
    cols = make_columns()
    cols["history_len"] = np.zeros_like(cols["history_len"])
    run = make_run(tmp_path, cols, curves=False)
    write_report(run, n_resamples=5)
    report = json.loads((run / "report.json").read_text())
    empty = report["history_buckets"][3]
    assert empty["impressions"] == 0 and empty["models"]["good"] == {"auc": None, "ndcg@10": None}
    assert "training" not in report["figures"] and report["training"] == {}


def test_text_from_data_is_escaped(tmp_path):
    cols = make_columns(n_requests=40)
    cols["score__<script>alert(1)</script>"] = cols.pop("score__random")
    run = make_run(tmp_path, cols, curves=False)
    page = write_report(run, n_resamples=5).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_metrics_json_is_used_when_present(tmp_path):
    run = make_run(tmp_path, make_columns(n_requests=40), curves=False)
    metrics = {
        "models": {"good": {"gauc": {"value": 0.7123, "ci": [0.70, 0.72]}}, "weak": {"gauc": {"value": 0.6, "ci": [0.58, 0.62]}}},
        "comparisons": [{"a": "weak", "b": "good", "metric": "gauc", "delta": 0.1123, "ci": [0.1, 0.12], "p": 0.0004}],
        "holdout": {"split": "last day", "days": 1},
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run).read_text()
    report = json.loads((run / "report.json").read_text())
    assert report["source"] == "metrics.json" and report["bootstrap"] is None
    assert report["models"]["good"]["gauc"] == {"value": 0.7123, "ci": [0.70, 0.72]}
    assert report["best"] == {"gauc": "good"} and report["holdout"]["split"] == "last day"
    assert "0.7123" in page and "+0.1123" in page and "&lt; 0.001" in page and "last day" in page


def test_out_option_places_files_beside_it(tmp_path):
    run = make_run(tmp_path / "run", make_columns(n_requests=40), curves=False)
    path = write_report(run, tmp_path / "pages" / "demo.html", n_resamples=5)
    assert path == tmp_path / "pages" / "demo.html" and path.is_file()
    assert (tmp_path / "pages" / "demo.json").is_file()
    assert (tmp_path / "pages" / "demo_files" / "scores.png").is_file()
    assert not (run / "report.html").exists()


# ----------------------------------------------------------------------------- bad input


def test_missing_run_dir_and_missing_predictions(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"eval/predictions\.parquet"):
        write_report(tmp_path)


def _bad_run(tmp_path, **changes):
    cols = make_columns(n_requests=40)
    for key, value in changes.items():
        if value is None:
            cols.pop(key)
        else:
            cols[key] = value
    return make_run(tmp_path, cols, curves=False)


def test_nan_score_names_the_column(tmp_path):
    weak = make_columns(n_requests=40)["score__weak"].copy()
    weak[[7, 9]] = np.nan
    with pytest.raises(ValueError, match=r"column 'score__weak' contains NaN: 2 row\(s\), first at row 7"):
        write_report(_bad_run(tmp_path, score__weak=weak))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(label=None), "missing column(s) 'label'"),
        (dict(score__good=None, score__weak=None, score__random=None, prob__good=None), "no model scores"),
        (dict(prob__good=None, prob__other=np.full(320, 0.5)), "prob__other have no matching score__"),
        (dict(label=np.full(320, 2)), "column 'label' must be 0/1"),
        (dict(prob__good=np.full(320, 1.5)), "column 'prob__good' must lie in"),
        (dict(history_len=np.full(320, -1)), "column 'history_len' must hold integers >= 0"),
        (dict(score__weak=np.array(["x"] * 320)), "column 'score__weak' must be numeric"),
        (dict(label=np.zeros(320, dtype=np.int64)), "auc is undefined"),
    ],
)
def test_bad_predictions_name_the_problem(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_report(_bad_run(tmp_path, **changes), n_resamples=5)


def test_request_shared_by_two_users_is_refused(tmp_path):
    cols = make_columns(n_requests=40)
    cols["user_id"] = cols["user_id"].copy()
    cols["user_id"][17] = 999  # row 17 is in request 2 (8 rows per request)
    with pytest.raises(ValueError, match=r"request 2 \(row \d+\) appears under several user_id values"):
        write_report(make_run(tmp_path, cols, curves=False))


def test_empty_holdout(tmp_path):
    cols = {k: v[:0] for k, v in make_columns(n_requests=40).items()}
    with pytest.raises(ValueError, match="holdout is empty"):
        write_report(make_run(tmp_path, cols, curves=False))


def test_null_id_names_the_column(tmp_path):
    cols = make_columns(n_requests=40)
    cols["user_id"] = pa.array([None if i == 3 else int(u) for i, u in enumerate(cols["user_id"])])
    with pytest.raises(ValueError, match=r"column 'user_id' has null values: 1 row\(s\), first at row 3"):
        write_report(make_run(tmp_path, cols, curves=False))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"step": 0, "loss": 1.0}', "{oops"], r"metrics\.jsonl:2: not valid JSON"),
        (['{"step": 0}'], r"metrics\.jsonl:1: missing key 'loss'"),
        (['{"step": 0.5, "loss": 1.0}'], r"metrics\.jsonl:1: 'step' must be an integer"),
        ([""], "no records"),
    ],
)
def test_bad_training_curve_names_file_and_line(tmp_path, lines, message):
    run = make_run(tmp_path, make_columns(n_requests=40), curves=False)
    (run / "train" / "ranking").mkdir(parents=True)
    (run / "train" / "ranking" / "metrics.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        write_report(run, n_resamples=5)


def test_bad_metrics_json_names_the_key(tmp_path):
    run = make_run(tmp_path, make_columns(n_requests=40), curves=False)
    (run / "eval" / "metrics.json").write_text(json.dumps({"models": {"good": {"gauc": {"value": 0.7, "cl": [0, 1]}}}}))
    with pytest.raises(ValueError, match=r"metrics\.json: metrics\.models\.good\.gauc: unknown key\(s\) 'cl'"):
        write_report(run)
    (run / "eval" / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match=r"metrics\.json: not valid JSON"):
        write_report(run)


def test_failure_leaves_the_previous_report_untouched(tmp_path):
    run = make_run(tmp_path, make_columns(n_requests=40), curves=False)
    before = write_report(run, n_resamples=5).read_bytes()
    cols = make_columns(n_requests=40)
    cols["score__good"][0] = np.nan
    pq.write_table(pa.table(cols), run / "eval" / "predictions.parquet")
    with pytest.raises(ValueError, match="score__good"):
        write_report(run, n_resamples=5)
    assert (run / "report.html").read_bytes() == before


# ----------------------------------------------------------------------------- CLI


def _app():
    app = typer.Typer()

    @app.callback()
    def main():
        pass

    register(app)
    return app


def test_cli_prints_the_path(tmp_path):
    run = make_run(tmp_path / "run", make_columns(n_requests=40), curves=False)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(_app(), ["report", str(run), "--out", str(out), "--resamples", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert out.is_file()


def test_cli_bad_input_exits_2_with_the_reason(tmp_path):
    result = CliRunner().invoke(_app(), ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: predictions not found" in result.output and "eval/predictions.parquet" in result.output
