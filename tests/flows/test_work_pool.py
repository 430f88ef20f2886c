"""The lab set-up: a process work pool on a real Prefect server, `saeflow deploy --pool`, a
`prefect worker` in its own process, and the pipeline run through it to completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.servers import BIN, ROOT, start, stop


@pytest.mark.slow  # ~2 min: a cluster or a worker in its own processes; `./saeflow test -m slow`
def test_pipeline_runs_on_a_process_work_pool(
    prefect_api: str, tiny_model: dict, saeflow_home: Path
) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.support import tracking

    env = os.environ | {"PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    create = [str(BIN / "prefect"), "work-pool", "create", "saeflow-pool", "--type", "process"]
    subprocess.run(create, env=env, check=True, capture_output=True, timeout=120)
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "--pool", "saeflow-pool", *TINY]
    deployed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    assert deployed.stdout.count("on work pool saeflow-pool") == 7
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "saeflow-pool"]
    worker = start(cmd, env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}, saeflow_home / "worker.log")
    try:
        params = {"overrides": [*TINY, "sae.d_sae=40"], "experiment": "work-pool"}
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            flow_run = run_deployment("pipeline/saeflow", parameters=params, timeout=600)
    finally:
        stop(worker)
    assert flow_run.state.is_completed(), (
        flow_run.state.message,
        (saeflow_home / "worker.log").read_text()[-3000:],
    )
    c = tracking.client()
    runs = c.search_runs(
        [c.get_experiment_by_name("work-pool").experiment_id], "tags.`saeflow.stage` = 'train'"
    )
    assert len(runs) == 1 and runs[0].data.params["sae.d_sae"] == "40"
    assert runs[0].data.tags["prefect.flow_run_id"] == str(flow_run.id)
