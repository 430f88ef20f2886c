"""`saeflow scaling` on the tiny model: a 3 × 2 × 2 grid from one cache, its child runs, the
fits on the parent run and in SQL, the feature splits and the report."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY

GRID = [
    "scaling.d_sae=[16,32,64]",
    "scaling.tokens=[8192,16384]",
    "scaling.lr=[0.001,0.004]",
    "scaling.n_boot=200",
]


@pytest.fixture(scope="module")
def scaled(prefect_server, tiny_model, saeflow_home: Path) -> dict:
    from flows.pipeline import scaling

    state = scaling([*TINY, *GRID], experiment="scaling-test", return_state=True)
    return {"result": state.result(), "flow_run_id": state.state_details.flow_run_id}


def test_the_grid_trains_one_child_run_per_cell_from_one_cache(scaled) -> None:
    from tasks.support import tracking
    from tests.flows.test_stages import task_states

    result = scaled["result"]
    parent = result["study"]["parent_run_id"]
    c = tracking.client()
    children = c.search_runs(
        [result["study"]["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert len(children) == 12 == len(result["jobs"])
    assert {r.info.status for r in children} == {"FINISHED"}
    cells = {(r.data.params["sae.d_sae"], r.data.params["train.tokens"], r.data.params["train.lr"])
             for r in children}  # fmt: skip
    assert len(cells) == 12
    assert all("eval/fvu" in r.data.metrics for r in children)
    assert len({j["train_cache"]["key"] for j in result["jobs"]}) == 1  # one cache
    states = task_states(scaled["flow_run_id"], {"train_saes", "fit_scaling", "scaling_report"})
    assert len(states["train_saes"]) == 2  # one read of the cache per token count
    assert states["fit_scaling"] == ["Completed"] and states["feature_splits"] == ["Completed"]


def test_fits_are_on_the_parent_run_and_in_sql(scaled) -> None:
    from tasks.support import tracking
    from tasks.support.sql import sql

    result = scaled["result"]
    parent = result["study"]["parent_run_id"]
    fits = {f["quantity"]: f for f in result["scaling"]["fits"]}
    assert set(fits) == {"loss", "fvu", "d_sae", "tokens", "lr"}
    for f in fits.values():
        assert math.isfinite(f["exponent"]) and f["n_points"] >= 3
        assert f["exponent_lo"] <= f["exponent"] + 1e-9 <= f["exponent_hi"] + 2e-9
    assert fits["loss"]["exponent"] < 0  # more compute, less loss: it trained
    logged = tracking.client().get_run(parent).data.metrics
    assert logged["scaling/loss_exponent"] == pytest.approx(fits["loss"]["exponent"])
    assert logged["scaling/recommended_d_sae"] == pytest.approx(fits["d_sae"]["at_budget"])
    budget = logged["scaling/budget"]
    points = pq.read_table(Path(result["scaling"]["dir"]) / "points.parquet").to_pylist()
    assert budget == pytest.approx(10 * max(p["compute"] for p in points))
    assert len(points) == 12 and sum(p["best_lr"] for p in points) == 6
    # compute ∝ d_sae · tokens here: budgets 16·8k … 64·16k are 4 bins of ×2, one SAE each
    assert sum(p["frontier"] for p in points) == 4
    rows = sql("scaling_fits", [parent]).to_pylist()
    assert {r["quantity"] for r in rows} == set(fits)
    assert (
        sql("select count(*) as n from scaling_points where study = $1", [parent]).to_pylist()[0][
            "n"
        ]
        == 12
    )


def test_features_split_between_consecutive_widths(scaled) -> None:
    from tasks.support.sql import sql

    result = scaled["result"]
    parent = result["study"]["parent_run_id"]
    splits = pq.read_table(result["scaling"]["path"]).to_pylist()
    pairs = {(r["small_d_sae"], r["large_d_sae"]) for r in splits}
    assert pairs == {(16, 32), (32, 64)}
    for small, large in pairs:
        rows = [r for r in splits if (r["small_d_sae"], r["large_d_sae"]) == (small, large)]
        children = [r["child"] for r in rows]
        assert len(children) == len(set(children)) <= large  # one parent per child
        assert all(r["cos"] >= 0.5 and 0 <= r["parent"] < small for r in rows)
    families = sql("split_families", [parent]).to_pylist()
    assert all(f["n_children"] >= 2 and len(f["children"]) == f["n_children"] for f in families)


def test_the_report_shows_the_fits_and_the_recommendation(scaled) -> None:
    from tasks.support import tracking

    result = scaled["result"]
    page = Path(result["scaling"]["report"]).read_text()
    assert page.count("<svg") == 5 and "recommend d_sae" in page
    parent = result["study"]["parent_run_id"]
    logged = {a.path for a in tracking.client().list_artifacts(parent, "scaling")}
    assert logged == {"scaling/points.parquet", "scaling/fits.parquet", "scaling/splits.parquet"}
    reports = {a.path for a in tracking.client().list_artifacts(parent, "report")}
    assert f"report/scaling-{parent}.html" in reports


def test_a_grid_too_small_to_fit_fails_before_any_work(prefect_server, saeflow_home: Path) -> None:
    from flows.config import ConfigError
    from flows.pipeline import scaling

    with pytest.raises(ConfigError, match="spans 2 compute budget"):
        scaling([*TINY, "scaling.d_sae=[16,32]", "scaling.tokens=[8192]"], experiment="small")
