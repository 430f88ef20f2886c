"""A scaling study's analysis (sae/analysis/scaling.py, sae/analysis/splitting.py): power-law fits
and feature splits, logged on the study's parent MLflow run and written as Parquet under
`features/scaling/study=<parent run id>/` for `saeflow sql` (views `scaling_points`,
`scaling_fits`, `feature_splits`)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config
from dashboards.report import scaling_page
from sae.analysis.scaling import (
    FITTED,
    Point,
    best_lr_per_cell,
    best_per_budget,
    fit_scaling,
    training_flops,
)
from sae.analysis.splitting import decoder_directions, families, match_features
from sae.files import atomic_write, write_text
from sae.models.config import K_ARCHS
from sae.models.registry import load_sae
from tasks.support import tracking
from tasks.support.home import inside
from tasks.support.log import logger

RETRY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10]}
FAMILIES_SHOWN = 4
"""Split families the report shows, with their top examples."""


def study_dir(parent_run_id: str) -> Path:
    return inside("features", "scaling", f"study={parent_run_id}")


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def final_loss(run_id: str, uri: str | None) -> float:
    """The training objective at the end of a run: the mean of its last 5% of logged train/loss
    values (one batch's loss is noisy; the lr has decayed to ~0 over them)."""
    history = tracking.client(uri).get_metric_history(run_id, "train/loss")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    if not values:
        raise ValueError(f"run {run_id} logged no train/loss: was it trained by saeflow?")
    tail = values[-max(1, len(values) // 20) :]
    return sum(tail) / len(tail)


def _point(c: Config, job: dict[str, Any]) -> Point:
    trained, m = job["trained"], job["metrics"]
    sae = load_sae(Path(trained["checkpoint"]))
    k = getattr(sae, "k_train", 0)  # the latents trained per token (k' = k_train_factor·k)
    flops = training_flops(c.sae.arch, sae.d_in, sae.d_sae, c.train.tokens, k)
    loss = final_loss(trained["run_id"], c.tracking.uri)
    return Point(
        trained["run_id"], sae.d_sae, c.train.tokens, c.train.lr, flops, loss, m["fvu"], m["l0"]
    )


@task(name="fit_scaling", cache_policy=NO_CACHE, **RETRY)
def fit_study(cfgs: list[Config], jobs: list[dict[str, Any]], parent_run_id: str) -> dict[str, Any]:
    """Points and power-law fits of a scaling grid (`jobs`: the study's {trained, metrics}, in
    the order of `cfgs`); `scaling/*` metrics on the parent run, points.parquet and
    fits.parquet beside the feature tables and as the parent's artifacts."""
    typed = list(cfgs)
    c, uri = typed[0], typed[0].tracking.uri
    points = [_point(t, job) for t, job in zip(typed, jobs, strict=True)]
    s = c.scaling
    fits = fit_scaling(points, s.budget_bin, s.n_boot, seed=c.train.seed)
    budget = max(p.compute for p in points) * s.extrapolate
    frontier = {p.run_id for p in best_per_budget(points, s.budget_bin)}
    fvu_frontier = {p.run_id for p in best_per_budget(points, s.budget_bin, "fvu")}
    best_lr = {p.run_id for p in best_lr_per_cell(points)}
    rows = [
        dataclasses.asdict(p)
        | {"frontier": p.run_id in frontier, "fvu_frontier": p.run_id in fvu_frontier}
        | {"best_lr": p.run_id in best_lr}
        for p in points
    ]
    fixed_l0 = c.sae.arch in K_ARCHS or c.sae.target_l0 is not None
    # A cell whose best lr is the grid's least or greatest only bounds its optimum.
    cells = best_lr_per_cell(points)
    edge = sum(p.lr in (min(s.lr), max(s.lr)) for p in cells) / len(cells) if len(s.lr) > 1 else 1
    fit_rows = [
        {"quantity": q, "coef": f.coef, "exponent": f.exponent, "exponent_lo": f.exponent_lo}
        | {"exponent_hi": f.exponent_hi, "n_points": f.n, "budget": budget, "at_budget": f(budget)}
        | {"arch": c.sae.arch, "fixed_sparsity": fixed_l0}
        | {"at_grid_edge": edge if q == "lr" else None}
        for q, f in fits.items()
    ]
    out = study_dir(parent_run_id)
    _write(pa.Table.from_pylist(rows), out / "points.parquet")
    _write(pa.Table.from_pylist(fit_rows), out / "fits.parquet")
    metrics = {"scaling/budget": budget}
    for q, f in fits.items():
        metrics |= {f"scaling/{q}_exponent": f.exponent, f"scaling/{q}_coef": f.coef}
        metrics |= {f"scaling/{q}_exponent_lo": f.exponent_lo}
        metrics |= {f"scaling/{q}_exponent_hi": f.exponent_hi}
        metrics[f"scaling/recommended_{q}"] = f(budget)
    tracking.log_metrics(parent_run_id, metrics, uri=uri)
    for name in ("points.parquet", "fits.parquet"):
        tracking.log_artifact(parent_run_id, out / name, "scaling", uri)
    log = logger()
    if edge > 0.5:
        log.warning(
            f"the best lr is the least or greatest of scaling.lr={s.lr} in {edge:.0%} of the "
            "(d_sae, tokens) cells: the lr fit only bounds the optimum; widen scaling.lr"
        )
    for q in FITTED:
        f = fits[q]
        log.info(
            f"{q} ∝ C^{f.exponent:.3f} [{f.exponent_lo:.3f}, {f.exponent_hi:.3f}] "
            f"({f.n} points); at C={budget:.3g}: {f(budget):.4g}"
        )
    return {"dir": str(out), "points": rows, "fits": fit_rows, "budget": budget}


def _pairs(points: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Consecutive widths compared for splitting: per width, its SAE trained on the most tokens
    with the best learning rate (their best-trained features)."""
    best: dict[int, dict[str, Any]] = {}
    for p in points:
        n, mine = p["d_sae"], best.get(p["d_sae"])
        if mine is None or (p["tokens"], -p["loss"]) > (mine["tokens"], -mine["loss"]):
            best[n] = p
    widths = sorted(best)
    return [(best[a], best[b]) for a, b in itertools.pairwise(widths)]


@task(name="feature_splits", cache_policy=NO_CACHE, **RETRY)
def feature_splits(
    cfg: Config, fitted: dict[str, Any], checkpoints: dict[str, str], parent_run_id: str
) -> dict[str, Any]:
    """Children of each small-SAE feature in the next larger SAE (decoder cosine ≥
    scaling.split_threshold), as splits.parquet; `checkpoints`: run id -> SAE directory."""
    c = cfg
    tables, shown = [], []
    for small, large in _pairs(fitted["points"]):
        a, b = (
            decoder_directions(load_sae(Path(checkpoints[p["run_id"]]))) for p in (small, large)
        )
        table = match_features(a, b, c.scaling.split_threshold)
        info = {
            "small_run": small["run_id"],
            "large_run": large["run_id"],
            "small_d_sae": small["d_sae"],
            "large_d_sae": large["d_sae"],
        }
        n = table.num_rows
        for name, value in info.items():
            table = table.append_column(name, pa.array([value] * n))
        tables.append(table)
        biggest = sorted(families(table).items(), key=lambda kv: -len(kv[1]))
        for parent, children in biggest[:FAMILIES_SHOWN]:
            shown.append(info | {"parent": parent, "children": children})
        split = len(families(table))
        logger().info(f"d_sae {small['d_sae']} -> {large['d_sae']}: {split} features split")
    path = study_dir(parent_run_id) / "splits.parquet"
    if tables:
        _write(pa.concat_tables(tables), path)
        tracking.log_artifact(parent_run_id, path, "scaling", c.tracking.uri)
    return {"path": str(path) if tables else None, "families": shown}


def _examples(run_id: str, feature: int, n: int = 3) -> list[str]:
    path = inside("features", f"run_id={run_id}", "feature_stats.parquet")
    if not path.is_file():
        return []
    rows = pq.read_table(path, filters=[("feature_id", "=", feature)]).to_pylist()
    return [e["text"] for e in rows[0]["top_examples"][:n]] if rows else []


@task(name="scaling_report", cache_policy=NO_CACHE, **RETRY)
def scaling_report(
    cfg: Config, fitted: dict[str, Any], splits: dict[str, Any], parent_run_id: str
) -> dict[str, str]:
    """reports/scaling-<parent>.html (the fits, frontier, recommendation and split families with
    their top examples), logged on the parent run."""
    c = cfg
    shown = [
        f
        | {"parent_examples": _examples(f["small_run"], f["parent"])}
        | {"child_examples": [_examples(f["large_run"], ch) for ch, _ in f["children"]]}
        for f in splits["families"]
    ]
    page = scaling_page(fitted["points"], fitted["fits"], fitted["budget"], shown, c.sae.arch)
    path = inside("reports", f"scaling-{parent_run_id}.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, page)
    tracking.log_artifact(parent_run_id, path, "report", c.tracking.uri)
    logger().info(f"scaling report -> {path}")
    return {"report": str(path)}
