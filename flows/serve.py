"""`saeflow serve`: the flows as Prefect deployments, triggerable from the Prefect UI."""

from __future__ import annotations

from prefect import serve as prefect_serve

from flows.pipeline import cache_flow, evaluate_flow, pipeline, train_flow


def serve() -> int:
    """Serve until interrupted; each deployment's form takes a list of Hydra overrides."""
    prefect_serve(
        *(
            f.to_deployment(name="saeflow")
            for f in (pipeline, cache_flow, train_flow, evaluate_flow)
        )
    )
    return 0
