"""Train one SAE on a cache and track it as an MLflow run (params, train/* by step, checkpoint)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config, from_dict
from sae.cache import Manifest
from sae.loader import batches
from sae.models import build_sae
from sae.train import FitConfig, fit
from tasks import tracking
from tasks.common import logger
from tasks.home import home

# Which SAEConfig fields each architecture takes (the rest belong to other architectures).
HPARAMS = {
    "relu": ("l1_coeff",),
    "topk": ("k", "aux_coeff"),
    "batchtopk": ("k", "aux_coeff"),
    "jumprelu": ("l1_coeff",),
}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sae': {'k': 16}} -> {'sae.k': 16}: MLflow params with dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def fit_config(c: Config) -> FitConfig:
    t = c.train
    return FitConfig(
        tokens=t.tokens,
        batch_size=t.batch_size,
        lr=t.lr,
        l1_warmup_frac=t.l1_warmup_frac,
        lr_decay_frac=t.lr_decay_frac,
        grad_clip=t.grad_clip,
        dtype=t.dtype,
        device=t.device,
        seed=t.seed,
        log_every=t.log_every,
        threads=t.threads,
        target_l0=c.sae.target_l0,
    )


class _Logger:
    """on_step callback: buffers train/* metrics and sends them to MLflow in batches."""

    def __init__(self, run_id: str, uri: str | None, tokens: int):
        self.run_id, self.uri, self.tokens = run_id, uri, tokens
        self.buf: list[tuple[int, dict[str, float]]] = []
        self.last_print = 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.buf.append((step, {f"train/{k}": v for k, v in metrics.items()}))
        if len(self.buf) >= 20:
            self.flush()
        if time.monotonic() - self.last_print > 10:
            self.last_print = time.monotonic()
            seen, rate = metrics.get("tokens", 0), metrics.get("tokens_per_s", 0) or 1
            logger().info(
                f"step {step}: loss {metrics['loss']:.4f} l0 {metrics['l0']:.1f} "
                f"{seen:,.0f}/{self.tokens:,} tokens, {rate:,.0f} tok/s, "
                f"ETA {(self.tokens - seen) / rate:.0f}s"
            )

    def flush(self) -> None:
        if self.buf:
            tracking.log_history(self.run_id, self.buf, self.uri)
            self.buf = []


@task(name="train_sae", cache_policy=NO_CACHE)
def train_sae(
    cfg: dict[str, Any], cache: dict[str, Any], experiment_id: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Train `cfg.sae` on the cache; returns {run_id, checkpoint}. The run ends FINISHED, or
    FAILED with the error, and the checkpoint lands in $SAEFLOW_HOME/saes/<run_id>."""
    c, uri = from_dict(cfg), from_dict(cfg).tracking.uri
    m = Manifest.load(Path(cache["dir"]))
    d_in = m.d_in(c.hook)
    hparams = {k: getattr(c.sae, k) for k in HPARAMS[c.sae.arch]}
    sae = build_sae(c.sae.arch, d_in, c.sae.d_sae, seed=c.train.seed, **hparams)
    run_id = tracking.start_run(
        experiment_id,
        c.run_name or f"{c.sae.arch}-{c.sae.d_sae}",
        uri=uri,
        parent_run_id=parent_run_id,
        tags={"cache_key": cache["key"], "saeflow.stage": "train"},
    )
    tracking.log_params(run_id, flatten(cfg) | {"sae.d_in": d_in, "cache.key": cache["key"]}, uri)
    on_step = _Logger(run_id, uri, c.train.tokens)
    try:
        stream = batches(
            Path(cache["dir"]),
            c.hook,
            c.train.batch_size,
            buffer_rows=c.train.shuffle_rows,
            seed=c.train.seed,
            exclude_special=c.cache.exclude_special,
        )
        sae = fit(sae, stream, fit_config(c), on_step)
        on_step.flush()
        out = home() / "saes" / run_id
        sae.save(
            out,
            meta={
                "hook": c.hook,
                "cache_key": cache["key"],
                "run_id": run_id,
                "model": c.model.name,
            },
        )
        tracking.log_artifact(run_id, out, "checkpoint", uri)
    except BaseException as e:
        on_step.flush()
        tracking.set_tags(run_id, {"error": f"{type(e).__name__}: {e}"[:5000]}, uri)
        tracking.end_run(run_id, "FAILED" if isinstance(e, Exception) else "KILLED", uri)
        raise
    tracking.end_run(run_id, "FINISHED", uri)
    logger().info(f"trained {c.sae.arch} SAE: run {run_id}, checkpoint {out}")
    return {"run_id": run_id, "checkpoint": str(out)}
