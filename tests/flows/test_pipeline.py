"""The whole study on the tiny model through a real Prefect API, MLflow store and DuckDB."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dashboards.sql import connect, query
from flows.cli import main
from tests.conftest import TINY


def test_pipeline_tracks_run_metrics_checkpoint_and_features(study, saeflow_home: Path) -> None:
    from tasks.support import tracking

    c = tracking.client()
    run = c.get_run(study["trained"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == study["study"]["parent_run_id"]
    assert run.data.tags["cache_key"] == study["train_cache"]["key"]
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.params["sae.d_sae"] == "64" and run.data.params["hook"] == "blocks.0.resid_post"
    m = run.data.metrics
    for key in [
        "mse",
        "fvu",
        "explained_variance",
        "l0",
        "dead_frac",
        "ce_clean",
        "ce_sae",
        "ce_zero",
        "loss_recovered",
    ]:
        assert f"eval/{key}" in m, key
    assert m["eval/explained_variance"] == pytest.approx(1 - m["eval/fvu"])
    assert m["eval/ce_clean"] < m["eval/ce_zero"]
    assert m["eval/loss_recovered"] == pytest.approx(
        (m["eval/ce_zero"] - m["eval/ce_sae"]) / (m["eval/ce_zero"] - m["eval/ce_clean"])
    )
    assert 0 < m["eval/l0"] <= 64
    history = c.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 5 and history[-1].value < history[0].value
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")}
    assert artifacts == {"checkpoint/sae.safetensors", "checkpoint/cfg.json"}
    table = pq.read_table(study["features"]["path"])
    assert table.num_rows == 64
    assert c.get_run(study["study"]["parent_run_id"]).info.status == "FINISHED"


def test_sql_joins_features_to_runs(study, saeflow_home: Path) -> None:
    from tasks.support import tracking

    con = connect(saeflow_home / "features", tracking.runs_table())
    rows = query(
        con,
        "select r.sae_d_sae, r.eval_l0, count(*) as n from features f "
        "join runs r using (run_id) where r.run_id = ? group by all",
        [study["trained"]["run_id"]],
    ).to_pylist()
    assert rows[0]["n"] == 64 and rows[0]["sae_d_sae"] == 64
    ex = query(
        con,
        "select top_examples[1].text as t, top_examples[1].activation as a "
        "from features where max_act > 0 order by max_act desc limit 1",
    ).to_pylist()
    assert "«" in ex[0]["t"] and "»" in ex[0]["t"] and ex[0]["a"] > 0


def test_second_run_reuses_the_cache(study, capsys) -> None:
    from flows.pipeline import cache_flow

    again = cache_flow(TINY)
    assert again["train"]["reused"] and again["train"]["key"] == study["train_cache"]["key"]
    assert again["eval"]["reused"]


def test_cli_rejects_bad_override_before_work(saeflow_home: Path, capsys) -> None:
    before = sorted(p.name for p in saeflow_home.iterdir())
    assert main(["run", "sae.d_sae=-3"]) == 2
    assert "sae.d_sae must be > 0, got -3" in capsys.readouterr().err
    assert main(["run", "model=nope"]) == 2
    assert "Could not find 'model/nope'" in capsys.readouterr().err
    assert sorted(p.name for p in saeflow_home.iterdir()) == before


def test_cli_sql_counts_features(study, capsys) -> None:
    assert (
        main(
            [
                "sql",
                f"select count(*) as n from features where run_id = '{study['trained']['run_id']}'",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["n", "64"]


def test_train_on_an_external_cache_then_evaluate_it(study) -> None:
    from flows.pipeline import evaluate_flow, train_flow
    from tasks.support import tracking

    cache_dir = study["train_cache"]["dir"]
    trained = train_flow([*TINY, "sae=topk", "sae.k=4", f"cache.dir={cache_dir}"])
    assert trained["cache"] == {
        "dir": cache_dir,
        "key": study["train_cache"]["key"],
        "n_tokens": 16384,
        "reused": True,
    }
    run = tracking.client().get_run(trained["run_id"])
    assert run.data.params["sae.arch"] == "topk" and run.info.status == "FINISHED"
    evaluated = evaluate_flow(TINY)  # the latest trained SAE of the study: this one
    assert evaluated["trained"]["run_id"] == trained["run_id"]
    assert evaluated["metrics"]["l0"] == pytest.approx(4.0, abs=0.5)
    logged = tracking.client().get_run(trained["run_id"]).data.metrics
    assert logged["eval/l0"] == pytest.approx(evaluated["metrics"]["l0"])


def test_missing_cache_dir_is_named(prefect_server, tmp_path: Path) -> None:
    from flows.pipeline import train_flow
    from sae.activations.cache import CacheError

    with pytest.raises(CacheError, match=r"manifest\.json is missing"):
        train_flow([*TINY, f"cache.dir={tmp_path}"])


def test_many_hooks_one_pass_corruption_named_and_repaired(prefect_server, tiny_model) -> None:
    from flows.pipeline import cache_flow
    from sae.activations.cache import CacheError, Manifest, verify

    overrides = [*TINY, "cache.hooks=[blocks.1.mlp_out,blocks.0.resid_pre]"]
    out = cache_flow(overrides)["train"]
    m = Manifest.load(Path(out["dir"]))
    assert m.complete and list(m.hooks) == [
        "blocks.0.resid_post",
        "blocks.1.mlp_out",
        "blocks.0.resid_pre",
    ]
    shard = Path(out["dir"]) / m.shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=m.shards[1].file):
        cache_flow(overrides)
    assert cache_flow([*overrides, "cache.repair=true"])["train"]["reused"] is False
    assert verify(Path(out["dir"])) == []
    assert Manifest.load(Path(out["dir"])).shards[1].sha256 == m.shards[1].sha256


def test_cache_refuses_when_the_disk_cannot_hold_it(
    prefect_server, tiny_model, saeflow_home: Path
) -> None:
    from flows.pipeline import cache_flow

    before = sorted(p.name for p in (saeflow_home / "activations").iterdir())
    with pytest.raises(OSError, match="not enough disk for cache"):
        cache_flow([*TINY, "cache.tokens=100000000000000"])
    assert sorted(p.name for p in (saeflow_home / "activations").iterdir()) == before


def test_steer_generates_side_by_side_and_logs_to_the_run(study, capsys) -> None:
    from tasks.support import tracking

    run = study["trained"]["run_id"]
    out = main(["steer", *TINY, f"eval.run_id={run}", "steer.feature=5", "steer.value=40",
                "steer.prompts=[ab]", "steer.max_new_tokens=6"])  # fmt: skip
    assert out == 0
    text = capsys.readouterr().out
    assert f"feature 5 of run {run}" in text and "unsteered" in text and "steered" in text
    arts = {a.path for a in tracking.client().list_artifacts(run, "steering")}
    assert arts == {"steering/feature-5-add-40.json"}
    assert main(["steer", *TINY, "steer.mode=push"]) == 2
    assert "steer.mode='push' is not one of add, clamp" in capsys.readouterr().err


def test_steer_feature_past_d_sae_fails_before_the_model_is_loaded(study) -> None:
    from flows.pipeline import steer_flow
    from tests.flows.test_stages import task_states

    run = study["trained"]["run_id"]
    state = steer_flow([*TINY, f"eval.run_id={run}", "steer.feature=64"], return_state=True)
    assert state.is_failed()
    assert f"steer.feature=64 is not a latent of the SAE of run {run}: valid 0..63" in state.message
    states = task_states(state.state_details.flow_run_id, {"find_sae"})
    assert "prepare_model" not in states and "generate_steered" not in states
