"""`tracking=server`: the pipeline logs to a real `mlflow server` (runs, metrics, lineage, the
checkpoint through the server's artifact proxy), and SQL reads the runs back from it."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY


def test_pipeline_against_an_mlflow_server(study, mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from tasks.support.sql import sql

    out = pipeline([*TINY, "tracking=server", f"tracking.uri={mlflow_server}"])
    c = MlflowClient(mlflow_server)
    run = c.get_run(out["trained"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["tracking.uri"] == mlflow_server
    assert run.data.tags["mlflow.parentRunId"] == out["study"]["parent_run_id"]
    assert run.data.tags["cache_key"] == study["train_cache"]["key"]  # the same local cache
    assert run.data.metrics["eval/explained_variance"] == out["metrics"]["explained_variance"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
    weights = Path(c.download_artifacts(run.info.run_id, "checkpoint/sae.safetensors", tmp_path))
    assert (
        weights.read_bytes()
        == (Path(out["trained"]["checkpoint"]) / "sae.safetensors").read_bytes()
    )
    rows = sql("select run_id, eval_l0 from runs where run_id = $1", [run.info.run_id],
               uri=mlflow_server).to_pylist()  # fmt: skip
    assert rows == [{"run_id": run.info.run_id, "eval_l0": out["metrics"]["l0"]}]
