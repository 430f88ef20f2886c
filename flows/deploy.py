"""`saeflow deploy --pool NAME`: the flows as deployments on a Prefect work pool, for workers on
other machines (`prefect worker start --pool NAME`) to run — the lab set-up of DESIGN §1."""

from __future__ import annotations

import inspect
from pathlib import Path

from prefect import Flow

from flows.serve import DEPLOYMENT, FLOWS

ROOT = Path(__file__).resolve().parents[1]


def deploy(pool: str, defaults: list[str] | None = None, source: Path = ROOT) -> list[str]:
    """Register each flow as `<flow>/saeflow` on work pool `pool`, its code pulled from
    `source` (this checkout; a git URL or shared path in production); returns deployment ids.
    The forms are those of `saeflow serve`, pre-filled with `defaults`."""
    params = {"overrides": list(defaults)} if defaults else {}
    ids = []
    for f in FLOWS:
        entry = f"{Path(inspect.getsourcefile(f.fn)).relative_to(ROOT)}:{f.fn.__name__}"
        remote = Flow.from_source(source=str(source), entrypoint=entry)
        ids.append(
            str(
                remote.deploy(
                    name=DEPLOYMENT,
                    work_pool_name=pool,
                    parameters=params,
                    print_next_steps=False,
                )
            )
        )
    return ids
