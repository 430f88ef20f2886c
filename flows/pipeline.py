"""The study as Prefect flows: each stage alone, and the whole pipeline (DESIGN §3).

Flow parameters are Hydra override strings, so the Prefect UI shows the same knobs as the shell;
the config is composed and validated inside the flow before any work starts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from flows.config import load
from tasks.cache import cache_shard, finish_cache, plan_cache
from tasks.evaluate import evaluate, features
from tasks.model import prepare_model
from tasks.study import close_study, find_sae, open_study
from tasks.train import train_sae


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


@flow(name="pipeline")
def pipeline(overrides: list[str] | None = None) -> dict[str, Any]:
    """cache -> train -> evaluate -> feature stats, under one MLflow parent run."""
    _, cfg = load(overrides or [])
    model = prepare_model(cfg)
    train_cache = cache_activations(cfg, model, "train")
    eval_cache = cache_activations(cfg, model, "eval")
    study = open_study(cfg, "pipeline")
    try:
        trained = train_sae(cfg, train_cache, study["experiment_id"], study["parent_run_id"])
        metrics = evaluate(cfg, model, eval_cache, trained)
        feats = features(cfg, model, eval_cache, trained)
    except BaseException:
        close_study(cfg, study["parent_run_id"], "FAILED")
        raise
    close_study(cfg, study["parent_run_id"], tags={"sae_run_id": trained["run_id"]})
    return {
        "model": model,
        "train_cache": train_cache,
        "eval_cache": eval_cache,
        "study": study,
        "trained": trained,
        "metrics": metrics,
        "features": feats,
    }
