"""The study as Prefect flows: each stage alone, and the whole pipeline (DESIGN §3).

Flow parameters are Hydra override strings, so the Prefect UI shows the same knobs as the shell;
the config is composed and validated inside the flow before any work starts.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, unmapped

from flows.config import load
from tasks.cache import cache_shard, finish_cache, plan_cache
from tasks.evaluate import evaluate, evaluate_many, features
from tasks.model import prepare_model
from tasks.report import report
from tasks.steer import steer
from tasks.study import close_study, find_sae, open_study
from tasks.train import stream_key, train_sae, train_saes


def cache_activations(cfg: dict[str, Any], model: dict[str, Any], split: str) -> dict[str, Any]:
    """plan -> one mapped task per missing shard (a task runner may spread them) -> finish."""
    plan = plan_cache(cfg, model, split)
    if plan["todo"]:
        shards = cache_shard.map(unmapped(cfg), unmapped(model), unmapped(plan), plan["todo"])
        shards.result()  # waits; raises the first shard's error after its retries
    return finish_cache(plan)


@flow(name="cache_activations")
def cache_flow(overrides: list[str] | None = None) -> dict[str, Any]:
    """Cache the train and eval activations for the configured model, data and hook."""
    _, cfg = load(overrides or [])
    model = prepare_model(cfg)
    return {
        "train": cache_activations(cfg, model, "train"),
        "eval": cache_activations(cfg, model, "eval"),
    }


@flow(name="train_sae")
def train_flow(overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one SAE (caching first if needed); `cache.dir=PATH` trains on any §4 cache."""
    typed, cfg = load(overrides or [])
    cache = (
        cache_activations(cfg, {}, "train")
        if typed.cache.dir
        else cache_activations(cfg, prepare_model(cfg), "train")
    )
    study = open_study(cfg, "train")
    try:
        trained = train_sae(cfg, cache, study["experiment_id"], study["parent_run_id"])
    except BaseException:
        close_study(cfg, study["parent_run_id"], "FAILED")
        raise
    close_study(cfg, study["parent_run_id"])
    return trained | {"cache": cache}


@flow(name="evaluate_sae")
def evaluate_flow(overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a trained SAE (`eval.run_id`, default the latest) and write its feature table."""
    _, cfg = load(overrides or [])
    model = prepare_model(cfg)
    eval_cache = cache_activations(cfg, model, "eval")
    trained = find_sae(cfg)
    return {
        "trained": trained,
        "metrics": evaluate(cfg, model, eval_cache, trained),
        "features": features(cfg, model, eval_cache, trained),
    }


@flow(name="steer")
def steer_flow(overrides: list[str] | None = None) -> dict[str, Any]:
    """Generate with and without one feature of a trained SAE (`steer.*`, `eval.run_id`)."""
    _, cfg = load(overrides or [])
    model = prepare_model(cfg)
    trained = find_sae(cfg)
    return steer(cfg, model, trained) | {"run_id": trained["run_id"]}


@flow(name="pipeline")
def pipeline(overrides: list[str] | None = None) -> dict[str, Any]:
    """cache -> train -> evaluate -> feature stats -> report, under one MLflow parent run."""
    result = study([overrides or []], "pipeline")
    return {k: v for k, v in result.items() if k != "jobs"} | result["jobs"][0]


@flow(name="sweep")
def sweep(jobs: list[list[str]]) -> dict[str, Any]:
    """The pipeline for many configs (one override list each) under one MLflow parent run.

    Each distinct cache is built once; SAEs that share a stream of batches (same cache, hook and
    train.{tokens, batch_size, seed, ...}) train together from one read of it (`train_saes`).
    """
    return study(jobs, "sweep")


def study(jobs: list[list[str]], kind: str) -> dict[str, Any]:
    """The DAG of DESIGN §3 for `jobs`: caches, grouped training, evaluation, feature stats."""
    if not jobs:
        raise ValueError("a sweep needs at least one job")
    cfgs = [load(job)[1] for job in jobs]  # all validated before any work
    models: dict[str, dict[str, Any]] = {}
    caches: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for cfg in cfgs:
        key = _cache_spec(cfg)
        if key not in caches:
            if json.dumps(cfg["model"]) not in models:
                models[json.dumps(cfg["model"])] = prepare_model(cfg)
            model = models[json.dumps(cfg["model"])]
            caches[key] = (
                cache_activations(cfg, model, "train"),
                cache_activations(cfg, model, "eval"),
            )
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(stream_key(cfg, caches[_cache_spec(cfg)][0]["key"]), []).append(i)
    opened = open_study(cfgs[0], kind)
    trained: list[dict[str, Any]] = [{}] * len(cfgs)
    out = []
    try:
        for members in groups.values():
            train_cache = caches[_cache_spec(cfgs[members[0]])][0]
            group = train_saes(
                [cfgs[i] for i in members],
                train_cache,
                opened["experiment_id"],
                opened["parent_run_id"],
            )
            for i, t in zip(members, group, strict=True):
                trained[i] = t
        metrics: list[dict[str, float]] = [{}] * len(cfgs)
        for spec in caches:  # SAEs on the same eval set and hook: evaluated in one pass
            members = [i for i, cfg in enumerate(cfgs) if _cache_spec(cfg) == spec]
            model = models[json.dumps(cfgs[members[0]]["model"])]
            results = evaluate_many(
                cfgs[members[0]], model, caches[spec][1], [trained[i] for i in members]
            )
            for i, m in zip(members, results, strict=True):
                metrics[i] = m
        for job, cfg, t, m in zip(jobs, cfgs, trained, metrics, strict=True):
            model = models[json.dumps(cfg["model"])]
            eval_cache = caches[_cache_spec(cfg)][1]
            out.append(
                {
                    "overrides": job,
                    "model": model,
                    "train_cache": caches[_cache_spec(cfg)][0],
                    "eval_cache": eval_cache,
                    "trained": t,
                    "metrics": m,
                    "features": features(cfg, model, eval_cache, t),
                }
            )
            out[-1]["report"] = report(cfg, t, out[-1]["features"], opened["parent_run_id"])
    except BaseException:
        close_study(cfgs[0], opened["parent_run_id"], "FAILED")
        raise
    runs = ",".join(t["run_id"] for t in trained)
    close_study(cfgs[0], opened["parent_run_id"], tags={"sae_run_id": runs[:5000]})
    return {"study": opened, "jobs": out}


def _cache_spec(cfg: dict[str, Any]) -> str:
    """The config sections that fix the activation caches (their content key is computed
    from these when planning) and how SAEs are evaluated on them."""
    return json.dumps([cfg[k] for k in ("model", "data", "cache", "hook", "eval")], sort_keys=True)
