"""Every dashboards/*.sql query against a real pipeline's output, and `saeflow sql` with them."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from dashboards.sql import DASHBOARDS, dashboards
from flows.cli import main
from tasks.support.sql import sql


def test_every_dashboard_is_listed_and_documented() -> None:
    names = dashboards()
    assert set(names) == {p.stem for p in DASHBOARDS.glob("*.sql")}
    assert {"dead_features", "l0_vs_explained_variance", "features_with_token",
            "nearest_clusters"} <= set(names)  # fmt: skip
    assert all(about for about in names.values())


def test_dead_features(study) -> None:
    run = study["trained"]["run_id"]
    freq = pq.read_table(study["features"]["path"])["freq"].to_pylist()
    rows = {r["run_id"]: r for r in sql("dead_features").to_pylist()}
    dead = sum(f == 0 for f in freq)
    assert rows[run]["d_sae"] == 64 and rows[run]["dead"] == dead
    assert rows[run]["dead_frac"] == pytest.approx(dead / 64, abs=1e-4)
    assert rows[run]["arch"] == "relu"


def test_l0_vs_explained_variance(study) -> None:
    rows = {r["run_id"]: r for r in sql("l0_vs_explained_variance").to_pylist()}
    got, m = rows[study["trained"]["run_id"]], study["metrics"]
    assert got["l0"] == pytest.approx(m["l0"])
    assert got["explained_variance"] == pytest.approx(m["explained_variance"])
    assert got["loss_recovered"] == pytest.approx(m["loss_recovered"])
    l0s = [r["l0"] for r in rows.values()]
    assert l0s == sorted(l0s)


def test_features_with_token(study) -> None:
    run = study["trained"]["run_id"]
    table = pq.read_table(study["features"]["path"]).to_pylist()
    feature = next(f for f in table if f["top_examples"])
    text = feature["top_examples"][0]["text"]
    token = text[text.index("«") + 1 : text.index("»")]
    rows = sql("features_with_token", [token]).to_pylist()
    hits = {(r["run_id"], r["feature_id"]): r for r in rows}
    want = sum(f"«{token}»" in e["text"] for e in feature["top_examples"])
    assert hits[(run, feature["feature_id"])]["hits"] == want
    assert all(f"«{token}»" in r["best_example"] for r in rows)
    assert sql("features_with_token", ["no such token"]).num_rows == 0


def test_nearest_clusters(study) -> None:
    run = study["trained"]["run_id"]
    rows = sql("nearest_clusters", [run]).to_pylist()
    assert sum(r["size"] for r in rows) == 64 and len(rows) <= math.ceil(math.sqrt(64))
    table = pq.read_table(study["features"]["path"]).to_pylist()
    for r in rows:
        members = [f for f in table if f["cluster_id"] == r["cluster_id"]]
        assert r["size"] == len(members)
        best = max(members, key=lambda f: (f["freq"], -f["feature_id"]))
        assert r["top_features"][0] == best["feature_id"]


def test_cli_runs_a_dashboard_with_a_parameter(study, capsys) -> None:
    run = study["trained"]["run_id"]
    assert main(["sql", "nearest_clusters", "--param", run, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cluster_id,size")
    assert main(["sql", "list"]) == 0
    assert "dead_features" in capsys.readouterr().out
    assert main(["sql", "missing.sql"]) == 1
    assert "no SQL file missing.sql" in capsys.readouterr().err


def test_examples_view_has_one_row_per_top_example(study) -> None:
    run = study["trained"]["run_id"]
    table = pq.read_table(study["features"]["path"]).to_pylist()
    n = sql("select count(*) as n from examples where run_id = $1", [run]).to_pylist()[0]["n"]
    assert n == sum(len(f["top_examples"]) for f in table)
    top = sql("select text, activation from examples where run_id = $1 and feature_id = $2 "
              "and rank = 1", [run, table[0]["feature_id"]]).to_pylist()  # fmt: skip
    if table[0]["top_examples"]:
        assert top[0]["text"] == table[0]["top_examples"][0]["text"]
