"""What the Prefect UI shows of a pipeline's flow run: a name saying what ran, a table of each
SAE's evaluation with its MLflow link, a markdown summary, and progress artifacts for the long
stages (tasks/support/ui.py, log.py)."""

from __future__ import annotations


def test_a_pipeline_flow_run_is_named_and_has_its_artifacts(study) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    from tasks.support import tracking

    parent = tracking.client().get_run(study["study"]["parent_run_id"])
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(flow_run_id).name
        own = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        task_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    assert name.startswith("pipeline · tiny-gpt2 blocks.0.resid_post relu-64 · model=tiny")
    by_type: dict[str, list] = {}
    for a in own:
        by_type.setdefault(a.type, []).append(a)
    (table,) = [a for a in by_type["table"] if a.key == "sae-metrics"]
    rows = table.data if isinstance(table.data, list) else __import__("json").loads(table.data)
    (row,) = rows
    assert row["run_id"] == study["trained"]["run_id"]
    assert row["explained_variance"] == round(study["metrics"]["explained_variance"], 4)
    assert row["mlflow"].endswith(f"/runs/{study['trained']['run_id']}")
    (summary,) = [a for a in by_type["markdown"] if a.key == "summary"]
    assert study["study"]["parent_run_id"] in summary.data
    # progress artifacts of the long stages, each finished at 100%
    progress = by_type.get("progress", [])
    assert progress and all(float(a.data) == 100.0 for a in progress), progress
    assert {a.description for a in progress} == {
        "cache train", "cache eval", "train ×1", "evaluating 1 SAE(s)", "feature stats"
    }  # fmt: skip
    names = {t.name.rsplit("-", 1)[0] for t in task_runs}
    assert "train_saes" in names and not names & {"pipeline", "train", "evaluate", "export"}
