"""`saeflow sql`: DuckDB views over a real MLflow store and feature Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dashboards.sql import connect, query, render
from tasks.support import tracking


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    monkeypatch.setenv("SAEFLOW_HOME", str(tmp_path))
    exp = tracking.ensure_experiment("m/blocks.0.resid_post")
    parent = tracking.start_run(exp, "pipeline")
    ids = []
    for d_sae, lr in [(8, 0.9), (16, 0.95)]:
        run = tracking.start_run(
            exp, f"relu-{d_sae}", parent_run_id=parent, tags={"cache_key": "abc"}
        )
        tracking.log_params(run, {"sae.d_sae": d_sae, "sae.arch": "relu"})
        tracking.log_history(run, [(s, {"train/loss": 1.0 / (s + 1)}) for s in range(3)])
        tracking.log_metrics(run, {"eval/loss_recovered": lr})
        feats = pa.table(
            {
                "feature_id": pa.array(range(d_sae), pa.int32()),
                "freq": [0.0] * 2 + [0.1] * (d_sae - 2),
            }
        )
        out = tmp_path / "features" / f"run_id={run}"
        out.mkdir(parents=True)
        pq.write_table(feats, out / "feature_stats.parquet")
        ids.append(run)
    return tmp_path, ids


def test_views_join_features_to_runs(store) -> None:
    home, ids = store
    con = connect(home / "features", tracking.runs_table(), tracking.metrics_table())
    t = query(
        con,
        "select r.sae_d_sae, count(*) as n, sum((f.freq = 0)::int) as dead, "
        "any_value(r.eval_loss_recovered) as lr from features f join runs r "
        "using (run_id) group by all order by 1",
    )
    assert t.to_pylist() == [
        {"sae_d_sae": 8, "n": 8, "dead": 2, "lr": 0.9},
        {"sae_d_sae": 16, "n": 16, "dead": 2, "lr": 0.95},
    ]
    runs = query(
        con,
        "select run_name, parent_run_id, cache_key from runs "
        "where parent_run_id is not null order by run_name",
    ).to_pylist()
    assert [r["run_name"] for r in runs] == ["relu-16", "relu-8"]
    assert {r["cache_key"] for r in runs} == {"abc"}
    steps = query(
        con,
        "select step, value from metrics where run_id = ? and key = 'train/loss' order by step",
        [ids[0]],
    ).to_pylist()
    assert steps == [
        {"step": 0, "value": 1.0},
        {"step": 1, "value": 0.5},
        {"step": 2, "value": pytest.approx(1 / 3)},
    ]


def test_empty_store_has_typed_views(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEFLOW_HOME", str(tmp_path))
    con = connect(tmp_path / "features", tracking.runs_table())
    assert query(con, "select count(*) as n from features").to_pylist() == [{"n": 0}]
    assert "feature_id" in query(con, "select * from features").column_names


def test_render_formats() -> None:
    t = pa.table({"a": [1, 2], "b": ["x" * 100, None]})
    text = render(t, "table", max_width=10)
    assert "xxxxxxxxx…" in text and text.endswith("(2 rows)")
    assert render(t, "csv").splitlines()[0] == "a,b"
    assert json.loads(render(t, "json"))[1] == {"a": 2, "b": None}
    with pytest.raises(ValueError, match="not one of table, csv, json"):
        render(t, "xml")


def test_runs_and_metrics_views_read_every_page(store, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow answers a search a page at a time: every page is read (3 runs in pages of 1)."""
    from tasks.support.sql import sql

    whole = sql("select run_id from runs order by run_id").column("run_id").to_pylist()
    monkeypatch.setattr(tracking, "PAGE", 1)
    assert sql("select run_id from runs order by run_id").column("run_id").to_pylist() == whole
    assert len(whole) == 3
    steps = sql("select count(*) as n from metrics where key = 'train/loss'").column("n")
    assert steps.to_pylist() == [6]  # 3 steps of each of the 2 SAE runs


def test_a_query_past_its_time_or_memory_bound_stops_naming_it(store) -> None:
    from tasks.support.sql import sql

    endless = "select count(*) from range(1000000000) a, range(1000000000) b"
    with pytest.raises(TimeoutError, match=r"ran past 1 s and was stopped \(saeflow sql --timeout"):
        sql(endless, timeout=1.0)
    hungry = "select list(range) from range(100000000)"
    with pytest.raises(MemoryError, match=r"memory_limit=.*\(saeflow sql --memory-limit SIZE\)"):
        sql(hungry, memory_limit="20MB")
    with pytest.raises(ValueError, match="bad SQL limits"):
        sql("select 1", memory_limit="lots")


def test_saeflow_sql_points_at_a_tracking_uri(store, capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    home, _ = store
    other = tracking.ensure_experiment("elsewhere", uri=f"sqlite:///{home}/other.db")
    tracking.start_run(other, "far-run", uri=f"sqlite:///{home}/other.db")
    code = main(
        ["sql", "select run_name from runs", "--tracking-uri", f"sqlite:///{home}/other.db"]
    )
    assert code == 0 and "far-run" in capsys.readouterr().out
    assert (
        main(["sql", endless := "select count(*) from range(100000000000)", "--timeout", "0.5"])
        == 1
    )
    assert "ran past 0.5 s" in capsys.readouterr().err and endless


def test_a_long_query_is_sql_not_a_dashboard_file_name(store) -> None:
    """Any text that is not a ready query's name is SQL: a query longer than a file name could
    be was taken for one (OSError: File name too long)."""
    from tasks.support.sql import sql

    long = "select 1 as one" + " " * 300 + "-- " + "x" * 300
    assert sql(long).column("one").to_pylist() == [1]


def test_cli_parameters_stay_the_strings_typed(store, capsys: pytest.CaptureFixture) -> None:
    """`--param ' 8'` is the token " 8" (it was turned into the integer 8, and '007' into 7);
    compared with a number column DuckDB casts it."""
    from flows.cli import main

    for typed in (" 8", "007", "1_0"):
        assert main(["sql", "select $1 as v", "--param", typed, "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"v": typed}]
    assert main(["sql", "select count(*) as n from runs where sae_d_sae = $1", "--param", "8",
                 "--format", "json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == [{"n": 1}]
