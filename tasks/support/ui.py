"""What the Prefect UI shows of a flow run beyond states and logs: a name saying what runs, and
at the end a table of each SAE's evaluation (with its MLflow link) and a markdown summary."""

from __future__ import annotations

import contextlib
from typing import Any

from conf.schema import Config
from tasks.support import tracking


def flow_run_name(kind: str, c: Config, overrides: list[str]) -> str:
    """`pipeline · stdlib-gpt2 blocks.2.resid_post relu-1024 · sae.l1_coeff=3`."""
    what = f"{c.model.name} {c.hook} {c.sae.arch}-{c.sae.d_sae}"
    shown = " ".join(o for o in overrides if not o.startswith("tracking.experiment="))
    return f"{kind} · {what}" + (f" · {shown}" if shown else "")[:200]


def name_flow_run(kind: str, c: Config, overrides: list[str]) -> None:
    """Rename the current Prefect flow run (if any) after what it runs; never fails the run."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, name=flow_run_name(kind, c, overrides))


COLUMNS = ("explained_variance", "l0", "loss_recovered", "dead_frac", "kl")
"""Evaluation metrics in the flow run's table artifact."""


def publish_results(
    c: Config, kind: str, study: dict[str, str], jobs: list[dict[str, Any]]
) -> None:
    """At the end of a flow run: a table artifact (`sae-metrics`, one row per SAE with its
    metrics and MLflow link) and a markdown artifact (`summary`), in the Prefect UI's
    Artifacts; never fails the run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = []
    for j in jobs:
        run_id = j["trained"]["run_id"]
        link = tracking.mlflow_ui_url(
            c.tracking.uri, c.tracking.ui_url, study["experiment_id"], run_id
        )
        metrics = {k: round(float(j["metrics"][k]), 4) for k in COLUMNS if k in j["metrics"]}
        rows.append({"run_id": run_id, "overrides": " ".join(j["overrides"])} | metrics
                    | {"mlflow": link})  # fmt: skip
    parent = tracking.mlflow_ui_url(
        c.tracking.uri, c.tracking.ui_url, study["experiment_id"], study["parent_run_id"]
    )
    lines = [
        f"# {kind}: {len(rows)} SAE(s) at `{c.hook}` of `{c.model.name}`",
        "",
        f"MLflow parent run: [{study['parent_run_id']}]({parent})",
        "",
        "| run | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
        *(
            f"| [{r['run_id'][:8]}]({r['mlflow']}) | "
            + " | ".join(str(r.get(k, "")) for k in COLUMNS)
            + " |"
            for r in rows
        ),
        "",
        'Query them: `saeflow sql "select run_name, eval_l0, eval_explained_variance from runs"`',
    ]
    with contextlib.suppress(Exception):
        create_table_artifact(rows, key="sae-metrics", description=f"{kind}: each SAE's eval")
        create_markdown_artifact("\n".join(lines), key="summary", description=kind)
