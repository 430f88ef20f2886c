"""Flows as a researcher drives them: re-runs reuse stages (seen in Prefect's task states),
`force` redoes one, bad overrides fail the flow run at once, sweeps compare on their parent,
and MLflow and Prefect runs link to each other."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.conftest import TINY


def task_states(flow_run_id: Any, expect: set[str], timeout: float = 30) -> dict[str, list[str]]:
    """{task name: [state names]} of a flow run. Task states reach the API as events, a moment
    after the flow returns: poll until every name in `expect` has a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        out: dict[str, list[str]] = {}
        for r in runs:
            final = r.state is not None and r.state.is_final()
            name = r.name.rsplit("-", 1)[0]  # Prefect names task runs `<task>-<suffix>`
            out.setdefault(name, []).append(r.state.name if final else "pending")
        if (expect <= out.keys() and all("pending" not in s for s in out.values())) or (
            time.monotonic() > deadline
        ):
            return out
        time.sleep(0.5)


def test_rerun_does_no_caching_or_training_work(study) -> None:
    from flows.pipeline import pipeline

    state = pipeline(TINY, return_state=True)
    result = state.result()
    states = task_states(state.state_details.flow_run_id, {"train_saes", "feature_stats"})
    assert "cache_shard" not in states  # no shard computed: the caches are complete
    assert [s for name, s in states.items() if name == "plan_cache"] == [["Completed"] * 2]
    for name in ("train_saes", "evaluate_saes", "feature_stats"):
        assert states[name] == ["Cached"], (name, states)
    assert result["trained"]["run_id"] == study["trained"]["run_id"]
    assert result["trained"]["status"] == "cached"
    assert result["metrics"] == study["metrics"]


def test_force_redoes_a_stage_and_a_deleted_checkpoint_retrains(study, saeflow_home: Path) -> None:
    from flows.pipeline import train_flow

    first = train_flow(TINY, experiment="forced")
    again = train_flow(TINY, experiment="forced")
    assert again["status"] == "cached" and again["run_id"] == first["run_id"]
    forced = train_flow(TINY, experiment="forced", force=["train"])
    assert forced["status"] == "trained" and forced["run_id"] != first["run_id"]
    shutil.rmtree(saeflow_home / "saes" / forced["run_id"])  # the cached result is stale now
    redone = train_flow(TINY, experiment="forced")
    assert redone["status"] == "reused" and redone["run_id"] == first["run_id"]


def test_bad_override_or_stage_fails_the_flow_run_naming_it(study, saeflow_home: Path) -> None:
    from flows.pipeline import pipeline, sweep

    before = sorted(p.name for p in (saeflow_home / "saes").iterdir())
    cases = [
        (
            pipeline,
            {"overrides": ["sae.dsae=3"]},
            "unknown key 'sae.dsae' (did you mean 'sae.d_sae'",
        ),
        (pipeline, {"overrides": ["sae=topkk"]}, "Available options in 'sae'"),
        (pipeline, {"overrides": TINY, "force": ["trian"]}, "choose from ['cache', 'train'"),
        (sweep, {"overrides": [*TINY, "sae.k=4,x"], "jobs": []}, "sae.k"),
    ]
    for flow, params, message in cases:
        state = flow(**params, return_state=True)
        assert state.is_failed() and message in state.message, (params, state.message)
    assert sorted(p.name for p in (saeflow_home / "saes").iterdir()) == before


def test_sweep_of_three_one_cache_three_children_compared_on_the_parent(study) -> None:
    from flows.pipeline import sweep
    from tasks.support import tracking

    state = sweep([*TINY, "sae=topk", "sae.k=2,4,8"], experiment="sweep3", return_state=True)
    out = state.result()
    assert len(out["jobs"]) == 3
    assert {j["train_cache"]["key"] for j in out["jobs"]} == {study["train_cache"]["key"]}
    states = task_states(state.state_details.flow_run_id, {"train_saes", "compare_sweep"})
    assert "cache_shard" not in states and states["train_saes"] == ["Completed"]  # one group
    c, parent = tracking.client(), out["study"]["parent_run_id"]
    children = [c.get_run(j["trained"]["run_id"]) for j in out["jobs"]]
    assert [r.data.params["sae.k"] for r in children] == ["2", "4", "8"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    assert c.get_run(parent).data.tags["cache_key"] == study["train_cache"]["key"]
    table = json.loads(Path(c.download_artifacts(parent, "comparison/table.json")).read_text())
    rows = {r[table["columns"].index("run_id")]: r for r in table["data"]}
    assert set(rows) == {r.info.run_id for r in children}
    l0 = [rows[r.info.run_id][table["columns"].index("eval_l0")] for r in children]
    assert l0 == sorted(l0) and abs(l0[0] - 2) < 0.5  # k=2,4,8 in order
    html = Path(c.download_artifacts(parent, f"comparison/sweep-{parent}.html")).read_text()
    assert html.count("<circle") >= 6  # 3 points in each of the two plots


def test_lineage_links_mlflow_and_prefect_runs_both_ways(study) -> None:
    from prefect.client.orchestration import get_client

    from tasks.support import tracking

    run = tracking.client().get_run(study["trained"]["run_id"])
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")
    assert run.data.tags["git_commit"] and run.data.tags["cache_key"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        links = client.read_artifacts()
    assert f"mlflow:{run.info.run_id}" in flow_run.tags
    mine = [a for a in links if a.flow_run_id == flow_run.id and a.type == "markdown"]
    assert any(run.info.run_id in a.data and "#/experiments/" in a.data for a in mine), mine
