"""The study as Prefect flows: each stage alone, and the whole pipeline (DESIGN §3).

Flow parameters are Hydra override strings (plus an MLflow experiment name and the stages to
redo), so the Prefect UI shows the same knobs as the shell; a flow's first step composes them,
once per job, into typed `Config`s (flows/config.py), validated before any work starts, and the
tasks take those. Stages are cached across runs by the content of their
config (tasks/support/stage.py): a re-run reuses the activation caches and trained SAEs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prefect import Task, flow, unmapped
from prefect.futures import as_completed

from conf.schema import Config
from flows.config import jobs as compose_jobs
from flows.config import load, place, scaling_jobs
from flows.runner import runs_on, task_runner
from tasks.cache import cache_shard, finish_cache, plan_cache
from tasks.evaluate import evaluate_many, features
from tasks.export import export_sae, export_targets
from tasks.model import prepare_model
from tasks.report import compare_sweep, report
from tasks.scaling import feature_splits, fit_study, scaling_report
from tasks.steer import check_feature, steer
from tasks.study import close_study, find_sae, link_runs, open_study, study_name
from tasks.support.log import with_progress
from tasks.support.stage import forced
from tasks.support.ui import name_flow_run, publish_results
from tasks.train import stream_key, train_saes


def with_experiment(overrides: list[str] | None, experiment: str | None) -> list[str]:
    """The overrides, plus `tracking.experiment` when the flow's `experiment` is given."""
    out = list(overrides or [])
    if experiment:
        quoted = experiment.replace("\\", "\\\\").replace("'", "\\'")
        out.append(f"tracking.experiment='{quoted}'")
    return out


def _run(t: Task, *args: Any, force: bool = False) -> tuple[Any, bool]:
    """Call task `t`; (its result, whether Prefect served it from the stage cache)."""
    state = t.with_options(refresh_cache=force or None)(*args, return_state=True)
    return state.result(), state.name == "Cached"


def cache_activations(
    cfg: Config, model: dict[str, Any], split: str, force: bool = False
) -> dict[str, Any]:
    """plan -> one mapped task per missing shard (a task runner may spread them) -> finish."""
    plan = plan_cache(cfg, model, split, force)
    if plan["todo"]:
        shards = cache_shard.map(unmapped(cfg), unmapped(model), unmapped(plan), plan["todo"])
        for shard in with_progress(as_completed(shards), len(shards), f"cache {split}", "shard"):
            shard.result()  # raises the first failed shard's error, after its retries
    return finish_cache(plan)


def _elsewhere(flow_: Any, c: Config, **params: Any) -> dict[str, Any] | None:
    """None where this flow run already maps tasks on `runner.*`'s runner; else the flow run
    again, as a subflow on that runner (a deployment's form, or `saeflow deploy`'s workers,
    asking for runner=dask while the server runs threads), and its result."""
    if runs_on(c.runner):
        return None
    return flow_.with_options(task_runner=task_runner(c.runner))(**params)


@flow(name="cache")
def cache_flow(
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """Cache the train and eval activations for the configured model, data and hook."""
    cfg, _ = load(with_experiment(overrides, experiment))
    params = {"overrides": overrides, "experiment": experiment, "force": force}
    if (done := _elsewhere(cache_flow, cfg, **params)) is not None:
        return done
    name_flow_run("cache", cfg, overrides or [])
    redo = "cache" in forced(force)
    model = prepare_model(cfg)
    return {
        "train": cache_activations(cfg, model, "train", redo),
        "eval": cache_activations(cfg, model, "eval", redo),
    }


@flow(name="train")
def train_flow(
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """Train one SAE (caching first if needed); `cache.dir=PATH` trains on any §4 cache."""
    cfg, _ = load(with_experiment(overrides, experiment))
    params = {"overrides": overrides, "experiment": experiment, "force": force}
    if (done := _elsewhere(train_flow, cfg, **params)) is not None:
        return done
    name_flow_run("train", cfg, overrides or [])
    redo = forced(force)
    model = {} if cfg.cache.dir else prepare_model(cfg)
    cache = cache_activations(cfg, model, "train", "cache" in redo)
    study = open_study(cfg, "train", study_name("train", [cfg], []))
    try:
        args = ([cfg], cache, study["experiment_id"], study["parent_run_id"], "train" in redo)
        (trained,), cached = _run(train_saes, *args, force="train" in redo)
        link_runs(cfg, study["experiment_id"], {"sae": trained["run_id"]})
    except BaseException:
        close_study(cfg, study["parent_run_id"], "FAILED")
        raise
    close_study(cfg, study["parent_run_id"])
    return trained | {"cache": cache} | ({"status": "cached"} if cached else {})


@flow(name="evaluate")
def evaluate_flow(
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a trained SAE (`eval.run_id`, default the latest) and write its feature table."""
    cfg, _ = load(with_experiment(overrides, experiment))
    params = {"overrides": overrides, "experiment": experiment, "force": force}
    if (done := _elsewhere(evaluate_flow, cfg, **params)) is not None:
        return done
    name_flow_run("evaluate", cfg, overrides or [])
    redo = forced(force)
    trained = find_sae(cfg)  # a bad eval.run_id or hook fails before any caching
    model = prepare_model(cfg)
    eval_cache = cache_activations(cfg, model, "eval", "cache" in redo)
    args = (cfg, model, eval_cache)
    return {
        "trained": trained,
        "metrics": _run(evaluate_many, *args, [trained], force="evaluate" in redo)[0][0],
        "features": _run(features, *args, trained, force="features" in redo)[0],
    }


@flow(name="steer")
def steer_flow(overrides: list[str] | None = None, experiment: str | None = None) -> dict[str, Any]:
    """Generate with and without one feature of a trained SAE (`steer.*`, `eval.run_id`)."""
    cfg, _ = load(with_experiment(overrides, experiment))
    name_flow_run("steer", cfg, overrides or [])
    trained = find_sae(cfg)
    check_feature(cfg, trained)  # before the model is built or loaded
    model = prepare_model(cfg)
    return steer(cfg, model, trained) | {"run_id": trained["run_id"]}


@flow(name="export")
def export_flow(
    overrides: list[str] | None = None, experiment: str | None = None
) -> dict[str, Any]:
    """Write an SAE in another tool's format (`export.format`, `export.dir`): `eval.run_id`'s
    (a sweep's or scaling study's parent: each of its SAEs), `eval.sae`'s, or the latest."""
    cfg, _ = load(with_experiment(overrides, experiment))
    name_flow_run("export", cfg, overrides or [])
    targets = export_targets(cfg) or [(find_sae(cfg), None)]
    model = prepare_model(cfg) if cfg.export.format == "neuronpedia" else {}
    return {"exports": [export_sae(cfg, trained, model, dir) for trained, dir in targets]}


@flow(name="pipeline")
def pipeline(
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """cache -> train -> evaluate -> feature stats -> report, under one MLflow parent run.

    `overrides`: Hydra overrides (`sae=topk`, `sae.k=32`); `experiment`: the MLflow experiment
    (default `<model>/<hook>`); `force`: stages to redo rather than reuse (cache, train,
    evaluate, features, or all).
    """
    jobs = compose_jobs(with_experiment(overrides, experiment))
    params = {"overrides": overrides, "experiment": experiment, "force": force}
    if (done := _elsewhere(pipeline, jobs[0][1], **params)) is not None:
        return done
    result = study(jobs, "pipeline", force)
    return {k: v for k, v in result.items() if k != "jobs"} | result["jobs"][0]


@flow(name="sweep")
def sweep(
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: list[str] | None = None,
    jobs: list[list[str]] | None = None,
) -> dict[str, Any]:
    """The pipeline for many configs under one MLflow parent run, compared on it.

    `overrides` in Hydra's multirun syntax (`sae.k=16,32,64`, `sae.d_sae=4096,8192`: every
    combination), and/or `jobs`: explicit override lists, one per SAE. Each distinct cache is
    built once; SAEs that share a stream of batches (same cache, hook and train.{tokens,
    batch_size, seed, ...}) train together from one read of it (`train_saes`).
    """
    todo = compose_jobs(with_experiment(overrides, experiment), multirun=True) if overrides else []
    todo += [one for job in jobs or [] for one in compose_jobs(with_experiment(job, experiment))]
    todo = todo or compose_jobs(with_experiment([], experiment))
    params = {"overrides": overrides, "experiment": experiment, "force": force, "jobs": jobs}
    if (done := _elsewhere(sweep, todo[0][1], **params)) is not None:
        return done
    return study(todo, "sweep", force)


@flow(name="scaling")
def scaling(
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """A scaling-law study ("Scaling Monosemanticity"): one SAE per scaling.d_sae ×
    scaling.tokens × scaling.lr, all on one activation cache (SAEs with equal tokens train from
    one read of it), each a nested MLflow run under one parent. On the parent: power laws of the
    final loss and held-out FVU per compute budget, of the compute-optimal d_sae and tokens and
    of the best lr against compute (bootstrap intervals), the recommendation for
    scaling.extrapolate × the largest budget, feature splitting between consecutive sizes, and
    the report; points, fits and splits as Parquet for `saeflow sql`.
    """
    base = with_experiment(overrides, experiment)
    jobs = scaling_jobs(base, load(base)[0])  # the grid from one compose, all validated first
    params = {"overrides": overrides, "experiment": experiment, "force": force}
    if (done := _elsewhere(scaling, jobs[0][1], **params)) is not None:
        return done
    return study(jobs, "scaling", force, analyse=_scaling)


def _scaling(
    cfgs: list[Config], out: list[dict[str, Any]], opened: dict[str, str]
) -> dict[str, Any]:
    """fits -> feature splits -> report, on the scaling study's parent run."""
    parent = opened["parent_run_id"]
    fitted = fit_study(
        cfgs, [{"trained": j["trained"], "metrics": j["metrics"]} for j in out], parent
    )
    checkpoints = {j["trained"]["run_id"]: j["trained"]["checkpoint"] for j in out}
    splits = feature_splits(cfgs[0], fitted, checkpoints, parent)
    shown = scaling_report(cfgs[0], fitted, splits, parent)
    return {"scaling": {"fits": fitted["fits"], "dir": fitted["dir"]} | splits | shown}


Analyse = Callable[[list[Config], list[dict[str, Any]], dict[str, str]], dict[str, Any]]


def study(
    jobs: list[tuple[list[str], Config]],
    kind: str,
    force: list[str] | None = None,
    analyse: Analyse | None = None,
) -> dict[str, Any]:
    """The DAG of DESIGN §3 for `jobs` ((overrides, config) each; the overrides only label the
    job): caches, grouped training, evaluation, feature stats, reports, for a sweep or scaling
    study the comparison on its parent run, then `analyse` (configs, per-job results, the opened
    study) before the parent run is closed."""
    if not jobs:
        raise ValueError("a sweep needs at least one job")
    labels_of = [overrides for overrides, _ in jobs]
    cfgs = place([c for _, c in jobs])  # all validated before any work
    name = study_name(kind, cfgs, labels_of)  # the parent run's, and the flow run's
    name_flow_run(kind, cfgs[0], labels_of[0] if len(jobs) == 1 else [name.split(" ", 1)[1]])
    redo = forced(force)
    models, caches = _caches(cfgs, "cache" in redo)
    opened = open_study(cfgs[0], kind, name)
    try:
        trained = _train(cfgs, caches, opened, "train" in redo)
        metrics = _evaluate(cfgs, models, caches, trained, "evaluate" in redo)
        out = []
        for job, cfg, t, m in zip(labels_of, cfgs, trained, metrics, strict=True):
            model, (train_cache, eval_cache) = models[_model_spec(cfg)], caches[_cache_spec(cfg)]
            args = (cfg, model, eval_cache, t)
            feats = _run(features, *args, force="features" in redo)[0]
            out.append(
                {"overrides": job, "model": model, "train_cache": train_cache}
                | {"eval_cache": eval_cache, "trained": t, "metrics": m, "features": feats}
                | {"report": report(cfg, t, feats, opened["parent_run_id"])}
            )
        if kind in ("sweep", "scaling"):
            runs = [{"run_id": j["trained"]["run_id"], "overrides": j["overrides"]} for j in out]
            compare_sweep(cfgs[0], opened["parent_run_id"], runs)
        extra = analyse(cfgs, out, opened) if analyse else {}
        publish_results(cfgs[0], kind, opened, out)
        labels = {"study": opened["parent_run_id"]}
        labels |= {f"sae-{i}": t["run_id"] for i, t in enumerate(trained)}
        link_runs(cfgs[0], opened["experiment_id"], labels)
    except BaseException:
        close_study(cfgs[0], opened["parent_run_id"], "FAILED")
        raise
    runs = ",".join(t["run_id"] for t in trained)
    keys = ",".join(dict.fromkeys(train["key"] for train, _ in caches.values()))
    tags = {"sae_run_id": runs[:5000], "cache_key": keys[:5000]}
    close_study(cfgs[0], opened["parent_run_id"], tags=tags)
    return {"study": opened, "jobs": out} | extra


Caches = dict[str, tuple[dict[str, Any], dict[str, Any]]]


def _caches(cfgs: list[Config], redo: bool) -> tuple[dict[str, Any], Caches]:
    """Each distinct model prepared once, each distinct (train, eval) cache pair built once."""
    models: dict[str, dict[str, Any]] = {}
    caches: Caches = {}
    for cfg in cfgs:
        if _cache_spec(cfg) in caches:
            continue
        if _model_spec(cfg) not in models:
            models[_model_spec(cfg)] = prepare_model(cfg)
        model = models[_model_spec(cfg)]
        caches[_cache_spec(cfg)] = (
            cache_activations(cfg, model, "train", redo),
            cache_activations(cfg, model, "eval", redo),
        )
    return models, caches


def _train(
    cfgs: list[Config], caches: Caches, opened: dict[str, str], redo: bool
) -> list[dict[str, Any]]:
    """One `train_saes` task per group of configs sharing a stream of batches."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(stream_key(cfg, caches[_cache_spec(cfg)][0]["key"]), []).append(i)
    trained: list[dict[str, Any]] = [{}] * len(cfgs)
    t = train_saes.with_options(refresh_cache=redo or None)
    spread = cfgs[0].runner.kind != "local"  # groups run at once on the runner's workers
    runs = {}
    for key, members in groups.items():
        train_cache = caches[_cache_spec(cfgs[members[0]])][0]
        args = ([cfgs[i] for i in members], train_cache, opened["experiment_id"])
        args += (opened["parent_run_id"], redo)
        runs[key] = t.submit(*args) if spread else t(*args, return_state=True)
    for key, members in groups.items():
        if spread:
            runs[key].wait()
        state = runs[key].state if spread else runs[key]
        for i, one in zip(members, state.result(), strict=True):
            trained[i] = one | ({"status": "cached"} if state.name == "Cached" else {})
    return trained


def _evaluate(
    cfgs: list[Config],
    models: dict[str, Any],
    caches: Caches,
    trained: list[dict[str, Any]],
    redo: bool,
) -> list[dict[str, float]]:
    """SAEs on the same eval set and hook are evaluated in one pass."""
    metrics: list[dict[str, float]] = [{}] * len(cfgs)
    for spec in caches:
        members = [i for i, cfg in enumerate(cfgs) if _cache_spec(cfg) == spec]
        first = cfgs[members[0]]
        args = (first, models[_model_spec(first)], caches[spec][1], [trained[i] for i in members])
        results, _ = _run(evaluate_many, *args, force=redo)
        for i, m in zip(members, results, strict=True):
            metrics[i] = m
    return metrics


def _model_spec(cfg: Config) -> str:
    return json.dumps(asdict(cfg.model), sort_keys=True)


def _cache_spec(cfg: Config) -> str:
    """The config sections that fix the activation caches (their content key is computed
    from these when planning) and how SAEs are evaluated on them."""
    sections = [asdict(cfg.model), asdict(cfg.data), asdict(cfg.cache), cfg.hook, asdict(cfg.eval)]
    return json.dumps(sections, sort_keys=True)
