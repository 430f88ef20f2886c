"""`saeflow serve`: the flows as Prefect deployments, triggerable from the Prefect UI."""

from __future__ import annotations

from prefect import serve as prefect_serve

from flows.pipeline import (
    cache_flow,
    evaluate_flow,
    export_flow,
    pipeline,
    scaling,
    steer_flow,
    sweep,
    train_flow,
)

FLOWS = (pipeline, sweep, scaling, cache_flow, train_flow, evaluate_flow, steer_flow, export_flow)
DEPLOYMENT = "saeflow"
"""Each flow's deployment is `<flow name>/saeflow`, e.g. `pipeline/saeflow`."""


def serve(defaults: list[str] | None = None) -> int:
    """Serve until interrupted. Each deployment's run form takes `overrides` (a list of Hydra
    override strings, pre-filled with `defaults`), `experiment` (MLflow experiment) and, where
    a stage can be reused, `force` (stages to redo); a bad override fails the flow run before
    any work, naming it and the valid choices."""
    from flows.config import load
    from flows.runner import task_runner

    params = {"overrides": list(defaults)} if defaults else {}
    runner = task_runner(load(defaults or [])[0].runner)  # `saeflow serve runner=dask`
    prefect_serve(
        *(
            f.with_options(task_runner=runner).to_deployment(name=DEPLOYMENT, parameters=params)
            for f in FLOWS
        )
    )
    return 0
