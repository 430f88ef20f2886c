"""`saeflow serve` against a real Prefect server: deployments with an overrides form, a run
triggered through the API with overrides, tracked in MLflow with lineage both ways, and a bad
override failing the flow run at once."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY


def test_deployments_take_overrides_experiment_and_force(served: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: served}), get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        flows = {client.read_flow(d.flow_id).name for d in deployments}
    assert flows == {
        "pipeline", "sweep", "scaling", "cache", "train", "evaluate", "steer", "export",
    }  # fmt: skip
    pipeline = next(d for d in deployments if d.parameter_openapi_schema["title"] == "Parameters"
                    and "force" in d.parameter_openapi_schema["properties"]
                    and "jobs" not in d.parameter_openapi_schema["properties"])  # fmt: skip
    props = pipeline.parameter_openapi_schema["properties"]
    assert props["overrides"]["anyOf"][0] == {"items": {"type": "string"}, "type": "array"}
    assert "Hydra overrides" in pipeline.description or props["overrides"]


def test_pipeline_deployment_runs_with_overrides_and_links_back(
    served: str, saeflow_home: Path
) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.support import tracking

    params = {"overrides": [*TINY, "sae.d_sae=32"], "experiment": "served"}
    with temporary_settings({PREFECT_API_URL: served}):
        flow_run = run_deployment("pipeline/saeflow", parameters=params, timeout=600)
        assert flow_run.state.is_completed(), flow_run.state.message
        bad = run_deployment(
            "pipeline/saeflow", parameters={"overrides": ["sae.dsae=3"]}, timeout=300
        )
    assert bad.state.is_failed()
    assert "unknown key 'sae.dsae' (did you mean 'sae.d_sae'?)" in bad.state.message

    c = tracking.client()
    exp = c.get_experiment_by_name("served")
    runs = c.search_runs([exp.experiment_id], "tags.`saeflow.stage` = 'train'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["sae.d_sae"] == "32" and "eval/explained_variance" in run.data.metrics
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    ui = served.removesuffix("/api")
    assert run.data.tags["prefect.flow_run_url"] == f"{ui}/runs/flow-run/{flow_run.id}"
    assert run.data.tags["git_commit"] and run.data.tags["cache_key"]
    assert f"mlflow:{run.info.run_id}" in flow_run.tags or _tags(served, flow_run.id)


def _tags(api: str, flow_run_id) -> bool:
    """The flow run's tags as the server has them now (tags are added while it runs)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return any(t.startswith("mlflow:") for t in client.read_flow_run(flow_run_id).tags)


def test_a_runner_override_in_a_deployments_form_is_honoured(study) -> None:
    """A served flow runs on its server's runner (threads); `runner=dask` among its overrides
    re-runs it as a subflow on a Dask cluster, which maps its tasks (it used to be ignored)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline import cache_flow

    state = cache_flow([*TINY, "runner=dask", "runner.workers=1"], return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["train"]["key"] == study["train_cache"]["key"]
    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
            )
        )
    assert [c.state.name for c in children] == ["Completed"]
    assert children[0].name.startswith("cache · tiny-gpt2")  # the subflow did the work
    local = cache_flow([*TINY], return_state=True)  # threads, as served: no subflow
    with get_client(sync_client=True) as client:
        none = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[local.state_details.flow_run_id]
                )
            )
        )
    assert none == []
