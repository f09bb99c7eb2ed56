"""ingest(): day-by-day writing, catalogue merging, manifest; and the CLI commands on top of it."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.commands.ingest import FORMATS
from feedrank.data.ingest import MANIFEST_FILE, ingest, validate_log
from feedrank.data.log import EVENTS_DIR, read_events, read_items
from feedrank.data.readers import READERS, ColumnMap, distinct_names, read_mind

runner = CliRunner()


def test_ingest_manifest_and_catalogue_merge(tmp_path, rfx):
    log = tmp_path / "log"
    ingest(read_mind(rfx.write_mind(tmp_path / "train")), log)
    other_news = [line.replace("N1\t", "N7\t") for line in rfx.MIND_NEWS[:1]] + rfx.MIND_NEWS[1:]
    dev = rfx.write_mind(tmp_path / "dev", behaviors=[rfx.MIND_BEHAVIORS[2]], news=other_news)
    done = ingest(read_mind(dev), log)
    # N1 came only with train, N7 only with dev: the catalogue keeps both.
    assert sorted(read_items(log)["item_id"].to_pylist()) == ["N1", "N2", "N3", "N7"]
    # dev's only impression day (2019-11-14) replaced train's partition for that day.
    assert done.run["replaced_days"] == ["2019-11-14"]
    saved = json.loads((log / MANIFEST_FILE).read_text())
    assert saved == done.manifest
    run = saved["ingests"][-1]
    assert run["rows_read"] == 3 and run["users"] == 1 and run["clicks"] == 2 and run["ok"]
    # The manifest describes the log on disk: train's 2019-11-15 stays, and both ingests are listed.
    assert saved["days"] == ["2019-11-14", "2019-11-15"] and saved["rows"] == read_events(log).num_rows
    assert [r["source"].split("/")[-1] for r in saved["ingests"]] == ["train", "dev"]
    assert saved["items_in_catalogue"] == 4


def test_ingest_sorts_each_day_by_time(tmp_path, rfx):
    ingest(read_mind(rfx.write_mind(tmp_path / "s")), tmp_path / "log")
    ts = pc.cast(read_events(tmp_path / "log")["ts"], pa.int64()).to_numpy()
    assert (ts[1:] >= ts[:-1]).all()


def test_cli_ingest_mind_train_and_dev(tmp_path, rfx):
    train = rfx.write_mind(tmp_path / "MINDsmall_train")
    dev = rfx.write_mind(tmp_path / "MINDsmall_dev")
    res = runner.invoke(app, ["ingest", "mind", str(train), str(dev), "--out", str(tmp_path / "log")])
    assert res.exit_code == 0, res.output
    assert "16/16 rows, 2 users, 3 items" in res.output
    requests = set(read_events(tmp_path / "log")["request_id"].to_pylist())
    assert {"MINDsmall_train-1", "MINDsmall_dev-1"} <= requests
    assert (tmp_path / "log" / MANIFEST_FILE).is_file()


def test_cli_bad_input_exit_2_and_skip(tmp_path, rfx):
    split = rfx.write_mind(tmp_path / "s", behaviors=[rfx.MIND_BEHAVIORS[0], "2\tU2\tbad time\t\tN1-0"])
    res = runner.invoke(app, ["ingest", "mind", str(split), "--out", str(tmp_path / "log")])
    assert res.exit_code == 2 and "behaviors.tsv:2: time not in MIND format" in res.output
    assert not (tmp_path / "log").exists()
    res = runner.invoke(app, ["ingest", "mind", str(split), "--out", str(tmp_path / "log"), "--skip-bad-rows"])
    assert res.exit_code == 0 and "1 bad row(s) skipped" in res.output
    # --map belongs to the tabular format only: the other formats do not offer it.
    res = runner.invoke(app, ["ingest", "mind", str(split), "--out", str(tmp_path / "x"), "--map", "user_id=u"])
    assert res.exit_code == 2 and "No such option" in res.output


def test_cli_tabular_refused_day_exit_1_and_no_validate(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("uid,article,t,click,dwell\nu1,a1,2024-01-01T10:00:00,1,2\nu1,a2,2024-01-02T10:00:00,1,-1\n")
    args = ["ingest", "tabular", str(path), "--map", "user_id=uid", "--map", "item_id=article", "--map", "ts=t",
            "--map", "clicked=click", "--map", "dwell_s=dwell"]  # fmt: skip
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "log")])
    assert res.exit_code == 1 and "REFUSED day 2024-01-02" in res.output and "negative dwell_s" in res.output
    assert read_events(tmp_path / "log").num_rows == 1
    # --no-validate writes every day unchecked, says so, and records it; validate then reports the bad day.
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "raw"), "--no-validate"])
    assert res.exit_code == 0 and read_events(tmp_path / "raw").num_rows == 2
    assert f"without validation: check them with `feedrank validate {tmp_path / 'raw'}`" in res.output
    assert json.loads((tmp_path / "raw" / MANIFEST_FILE).read_text())["ingests"][-1]["validated"] is False
    res = runner.invoke(app, ["validate", str(tmp_path / "raw")])
    assert res.exit_code == 1 and "2024-01-02: 1 rows: 1 rule(s) violated" in res.output
    assert not validate_log(tmp_path / "raw")["2024-01-02"].ok and validate_log(tmp_path / "raw")["2024-01-01"].ok


def test_cli_map_file_and_unknown_key(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("uid,article,t\nu1,a1,2024-01-01\n")
    (tmp_path / "m.yaml").write_text("user_id: uid\nitem_id: article\nts: t\n")
    res = runner.invoke(app, ["ingest", "tabular", str(path), "--map-file", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "log")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ingest", "tabular", str(path), "--map", "usr=uid", "--out", str(tmp_path / "log")])
    assert res.exit_code == 2 and "'usr'" in res.output


def test_cli_validate_valid_and_missing(tmp_path, rfx):
    ingest(read_mind(rfx.write_mind(tmp_path / "s")), tmp_path / "log")
    res = runner.invoke(app, ["validate", str(tmp_path / "log")])
    assert res.exit_code == 0 and "2/2 day(s) valid" in res.output
    res = runner.invoke(app, ["validate", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no event log" in res.output


def test_validate_log_reports_a_corrupted_partition(tmp_path, rfx):
    log = tmp_path / "log"
    ingest(read_mind(rfx.write_mind(tmp_path / "s")), log)
    day = log / EVENTS_DIR / "date=2019-11-15"
    table = pq.read_table(next(day.glob("*.parquet")))
    pq.write_table(table, day / "part-99999.parquet")  # every row now appears twice
    report = validate_log(log)["2019-11-15"]
    assert report.violations[0].rule.startswith("duplicate row") and report.violations[0].count == table.num_rows


DUPLICATED = "uid,article,t,click\nu1,a1,2024-01-01T10:00:00,1\nu1,a1,2024-01-01T10:00:00,0\nu2,a2,2024-01-01T11:00:00,0\n"
TABULAR = ["--map", "user_id=uid", "--map", "item_id=article", "--map", "ts=t", "--map", "clicked=click"]


def test_cli_dedupe_keeps_the_first_of_duplicated_rows(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(DUPLICATED)
    res = runner.invoke(app, ["ingest", "tabular", str(path), *TABULAR, "--out", str(tmp_path / "refused")])
    assert res.exit_code == 1 and "REFUSED day 2024-01-01" in res.output and "rerun with --dedupe" in res.output
    res = runner.invoke(app, ["ingest", "tabular", str(path), *TABULAR, "--out", str(tmp_path / "log"), "--dedupe"])
    assert res.exit_code == 0, res.output
    assert "1 duplicate row(s) dropped" in res.output
    events = read_events(tmp_path / "log")
    first = [r for r in events.to_pylist() if r["item_id"] == "a1"]
    assert events.num_rows == 2 and len(first) == 1 and first[0]["clicked"] is True  # the first row is kept
    assert json.loads((tmp_path / "log" / MANIFEST_FILE).read_text())["ingests"][-1]["duplicates_dropped"] == 1
    assert runner.invoke(app, ["validate", str(tmp_path / "log")]).exit_code == 0
    # --dedupe with --no-validate writes what validate then accepts.
    res = runner.invoke(app, ["ingest", "tabular", str(path), *TABULAR, "--out", str(tmp_path / "raw"), "--dedupe",
                              "--no-validate"])  # fmt: skip
    assert res.exit_code == 0 and runner.invoke(app, ["validate", str(tmp_path / "raw")]).exit_code == 0


def test_refused_ingest_keeps_the_manifest_describing_the_log(tmp_path, rfx):
    log = tmp_path / "log"
    ingest(read_mind(rfx.write_mind(tmp_path / "train")), log)
    path = tmp_path / "e.csv"
    path.write_text(DUPLICATED.replace("2024-01-01", "2019-11-15"))
    res = runner.invoke(app, ["ingest", "tabular", str(path), *TABULAR, "--out", str(log)])
    assert res.exit_code == 1
    saved = json.loads((log / MANIFEST_FILE).read_text())
    assert saved["days"] == ["2019-11-14", "2019-11-15"] and saved["rows"] == read_events(log).num_rows == 8
    assert [r["ok"] for r in saved["ingests"]] == [True, False]
    assert saved["ingests"][-1]["rows_written"] == 0 and saved["ingests"][-1]["days_written"] == []
    assert "log now: 2 day(s), 8 rows" in res.output


def test_manifest_of_an_older_version_becomes_the_first_ingest(tmp_path, rfx):
    log = tmp_path / "log"
    log.mkdir()
    (log / MANIFEST_FILE).write_text(json.dumps({"source": "mind:old", "rows_written": 8, "days": ["2019-11-14"]}))
    done = ingest(read_mind(rfx.write_mind(tmp_path / "train")), log)
    assert [r["source"] for r in done.manifest["ingests"]][0] == "mind:old" and len(done.manifest["ingests"]) == 2


def test_cli_same_source_twice_is_refused_and_shared_names_are_told_apart(tmp_path, rfx):
    train = rfx.write_mind(tmp_path / "MINDsmall_train")
    (tmp_path / "link").symlink_to(train)
    res = runner.invoke(app, ["ingest", "mind", str(train), str(tmp_path / "link"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "given twice" in res.output and not (tmp_path / "x").exists()
    a, b = rfx.write_mind(tmp_path / "a" / "train"), rfx.write_mind(tmp_path / "b" / "train")
    res = runner.invoke(app, ["ingest", "mind", str(a), str(b), "--out", str(tmp_path / "log")])
    assert res.exit_code == 0, res.output
    requests = set(read_events(tmp_path / "log")["request_id"].to_pylist())
    assert {"a/train-1", "b/train-1", "hist-a/train-U1", "hist-b/train-U1"} <= requests
    # One folder keeps the plain folder name as its prefix.
    assert distinct_names([tmp_path / "MINDsmall_train", tmp_path / "MINDsmall_dev"]) == ["MINDsmall_train", "MINDsmall_dev"]


def test_cli_each_format_has_its_own_help():
    mind = runner.invoke(app, ["ingest", "mind", "--help"])
    assert mind.exit_code == 0 and "behaviors.tsv" in mind.output and "news.tsv" in mind.output
    assert "--map" not in mind.output and "--dedupe" in mind.output
    tabular = runner.invoke(app, ["ingest", "tabular", "--help"])
    assert "--map-file" in tabular.output
    # The help names every canonical column the mapping accepts.
    assert all(f.name in " ".join(tabular.output.split()) for f in dataclasses.fields(ColumnMap))
    assert "behaviors.parquet" in runner.invoke(app, ["ingest", "ebnerd", "--help"]).output
    assert "u.data" in runner.invoke(app, ["ingest", "movielens", "--help"]).output
    assert set(FORMATS) | {"tabular"} == set(READERS)
