"""Train SAEs on a cache, each tracked as an MLflow run (params, train/* by step, checkpoint).

Several SAEs that share a stream of batches train from one read of the cache (`fit_many`). A run
is identified by `run_key` (tag `saeflow.run_key`): asked again, a finished run is reused and an
unfinished one (killed, failed) resumes from its newest trainer state in
$SAEFLOW_HOME/saes/<run_id>/state, continuing the same loss trajectory in the same MLflow run.
With train.processes > 1 the group trains data-parallel under torchrun (tasks/support/ddp.py); the
runs, their locks and the final save stay here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from prefect import task

from conf.schema import Config
from sae.activations.cache import Manifest
from sae.hardware import resolve_device
from sae.models import registry
from sae.models.base import CONFIG, SAE, WEIGHTS
from sae.models.config import K_ARCHS, SAEConfig
from sae.training.checkpoint import steps as steps_in
from sae.training.config import FitConfig
from sae.training.fit import FREE_ON_RESUME, SHARED_FIELDS, STIFFNESS, stiffness_acts
from tasks.support import ddp, tracking
from tasks.support.fitting import fit_group, load_states, state_dir, step_loggers
from tasks.support.home import inside, sae_dir
from tasks.support.log import logger
from tasks.support.stage import CACHED, Stage


def run_key(c: Config, cache_key: str) -> str:
    """What fixes a trained SAE: the cache, hook, SAE and training settings (not how it logs)."""
    train = {k: v for k, v in asdict(c.train).items() if k not in UNKEYED}
    if train.get("processes") == 1:  # the keys of runs from before the field stay theirs
        del train["processes"]
    if c.sae.target_l0 is None:  # the controller's gains change nothing without a target
        train = {k: v for k, v in train.items() if not k.startswith("l0_")}
    elif not stiffness_acts(registry.ARCHS[c.sae.arch], c.sae.target_l0, c.train.l0_stiffness):
        train = {k: v for k, v in train.items() if k not in STIFFNESS}  # nor κ where it does not
    spec = {
        "cache": cache_key,
        "hook": c.hook,
        "sae": _unless_default(_since_saved(asdict(c.sae), c.sae.arch), SAEConfig, ADDED["sae"]),
        "train": _unless_default(train, FitConfig, ADDED["train"]),
        "exclude_special": c.cache.exclude_special,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


ADDED = {
    "sae": (
        "init_norm",
        "aux_k",
        "dead_tokens",
        "threshold_beta",
        "bandwidth",
        "init_threshold",
        "centre",
        "matryoshka_fractions",
    ),
    "train": (
        "lr_warmup_frac",
        "geometric_median_samples",
        "dead_window",
        "scale",
        "l0_smooth",
        "l0_slow",
        "l0_gain",
        "l0_max_step",
        "l0_stiffness",
        "l0_stiffness_from",
    ),
}
"""Fields no config could set before (they were fixed in the code): at the value they had then
(`FORMER`, else their default) they are left out of the key, so earlier runs, which trained
with those values, keep their keys."""
FORMER = {
    "centre": False,
    "scale": "norm",
    "l0_max_step": 0.05,
    "l0_stiffness": 0.0,
    "l0_stiffness_from": 0.6,
}
"""Fields of `ADDED` whose value before them is not their default: the value they were added
with, or (l0_stiffness) the one the code had before the field, or (l0_stiffness_from) their
default before it moved (runs at 0.6, the default from stop 29 to stop 33, keep their keys)."""


def _since_saved(values: dict[str, Any], arch: str) -> dict[str, Any]:
    """sae.* without the hyper-parameters added since some SAEs were saved (`SAE.saved_before`,
    e.g. matryoshka_topk) where they change nothing: for an architecture that does not read
    them, or at the value the SAEs had before them. Runs from before keep their keys."""
    before = registry.ARCHS[arch].saved_before
    added = {name for cls in registry.ARCHS.values() for name in cls.saved_before}
    return {k: v for k, v in values.items() if k not in added or before.get(k, v) != v}


def _unless_default(values: dict[str, Any], cls: type, names: tuple[str, ...]) -> dict[str, Any]:
    fields = cls.__dataclass_fields__

    def default(k: str) -> Any:
        f = fields[k]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    return {k: v for k, v in values.items() if k not in names or v != FORMER.get(k, default(k))}


UNKEYED = (*FREE_ON_RESUME, "resume")
"""train.* settings that do not change the trained SAE (threads: to the last bit on CPU, yes)."""
STREAM = (*SHARED_FIELDS, "shuffle_rows", "processes")
"""train.* settings SAEs must share to be trained from one read of the cache: fit_many's, the
loader's shuffle buffer, and the data-parallel ranks that train them."""


def stream_key(c: Config, cache_key: str) -> str:
    """Jobs with equal stream keys train together in one `train_saes` task."""
    spec = [cache_key, c.hook, c.cache.exclude_special]
    return json.dumps(spec + [getattr(c.train, k) for k in STREAM])


def _previous(c: Config, key: str, experiment_id: str) -> list[tuple[str, str]]:
    """(run_id, status) of this experiment's runs with run key `key`, newest first."""
    runs = tracking.client(c.tracking.uri).search_runs(
        [experiment_id],
        f"tags.`saeflow.run_key` = '{key}'",
        order_by=["attributes.start_time DESC"],
    )
    return [(r.info.run_id, r.info.status) for r in runs]


def _trained_by(inputs: dict[str, Any]) -> Any:
    """train_saes's cache key content: the run keys and the tracking store (not the parent);
    None (never cached) with train.resume=false, which asks for a fresh run every time."""
    cfgs, key = inputs.get("cfgs") or [inputs["cfg"]], inputs["cache"]["key"]
    if not all(c.train.resume for c in cfgs):
        return None
    return [[run_key(c, key), c.tracking.uri, c.tracking.experiment] for c in cfgs]


@task(name="train_saes", cache_policy=Stage(content=_trained_by), **CACHED)
def train_saes(
    cfgs: list[Config],
    cache: dict[str, Any],
    experiment_id: str,
    parent_run_id: str | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Train one SAE per config on one read of the cache; each is its own MLflow run.

    Returns [{run_id, checkpoint, status}] in the order of `cfgs`, status one of trained,
    resumed, reused. With train.resume (default), a config trained before (same `run_key`) is
    reused, and unfinished runs of every config are resumed from their newest common trainer
    state; the rest start afresh. The configs must share `stream_key`. `force` trains afresh.
    """
    keys = [run_key(c, cache["key"]) for c in cfgs]
    if len({stream_key(c, cache["key"]) for c in cfgs}) != 1:
        raise ValueError(f"train_saes: the configs differ in train.{STREAM} or the cache")
    with _training(keys):  # one process at a time per run key: a second waits, then reuses
        return _train_or_reuse(cfgs, keys, cache, experiment_id, parent_run_id, force)


@contextlib.contextmanager
def _training(keys: list[str]) -> Iterator[None]:
    """Hold an exclusive lock per run key (sorted: two groups sharing keys cannot deadlock) for
    the whole training, so the same SAE asked twice at once is trained once: the second
    process waits here, then finds the first's finished run and reuses it. A killed holder's
    locks go with its process."""
    files = []
    try:
        for key in sorted(set(keys)):
            path = inside("locks", f"train-{key}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")  # noqa: SIM115 (held until the training ends)
            files.append(f)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger().info(f"another process is training SAE {key}; waiting for it")
                fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        for f in files:
            f.close()


def _train_or_reuse(
    cfgs: list[Config],
    keys: list[str],
    cache: dict[str, Any],
    experiment_id: str,
    parent_run_id: str | None,
    force: bool,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any] | None] = [None] * len(cfgs)
    todo, states = [], []
    for i, (c, key) in enumerate(zip(cfgs, keys, strict=True)):
        found = _previous(c, key, experiment_id) if c.train.resume and not force else []
        done = [r for r, status in found if status == "FINISHED" and _checkpoint(r).is_file()]
        if done:
            out[i] = {
                "run_id": done[0],
                "checkpoint": str(_checkpoint(done[0]).parent),
                "status": "reused",
            }
            logger().info(f"{c.sae.arch} SAE {key} was trained before: run {done[0]}, reused")
            continue
        todo.append(i)
        states.append([r for r, status in found if status != "FINISHED"])
    if todo:
        trained = _train_group(
            [cfgs[i] for i in todo],
            [keys[i] for i in todo],
            states,
            cache,
            experiment_id,
            parent_run_id,
        )
        for i, t in zip(todo, trained, strict=True):
            out[i] = t
    return [t for t in out if t is not None]


def _checkpoint(run_id: str) -> Path:
    return sae_dir(run_id) / WEIGHTS


def _resumable(candidates: list[list[str]]) -> tuple[list[str], int] | None:
    """(one run id per config, the step) if every config has an unfinished run with a trainer
    state at a step common to all, not held by a live process; else None."""
    choice, common = [], None
    for runs in candidates:
        run = next((r for r in runs if steps_in(state_dir(r)) and not _locked(r)), None)
        if run is None:
            return None
        choice.append(run)
        have = set(steps_in(state_dir(run)))
        common = have if common is None else common & have
    return (choice, max(common)) if common else None


def _locked(run_id: str) -> bool:
    """Whether another live process trains this run (holds its lock)."""
    with open(_lock_path(run_id), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _lock_path(run_id: str) -> Path:
    path = sae_dir(run_id) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_cache(c: Config, dir: Path, manifest: Manifest) -> None:
    """Before any MLflow run starts (checksums: plan_cache). A cache smaller than one batch
    would put each of its rows in every batch many times."""
    if manifest.n_tokens < c.train.batch_size:
        raise ValueError(
            f"cache {dir} holds {manifest.n_tokens:,} tokens, fewer than one batch "
            f"(train.batch_size={c.train.batch_size:,}); cache more text (cache.tokens, "
            "data.paths) or lower train.batch_size"
        )


DENSE_BATCH_COPIES = 3
"""(batch, d_sae) fp32 tensors a training step of a dense SAE (relu, jumprelu) holds at once:
pre-activations, latents and their gradient (the top-k family holds its pre-activations)."""


def memory_needed(cfgs: list[Config], d_in: int) -> dict[str, int]:
    """Bytes a training group needs, estimated, by part: the SAEs' fp32 weights, their
    gradients and Adam's two moments (as much again each), the step's (batch, d_sae) tensors
    (`DENSE_BATCH_COPIES` of them for the dense architectures, one for the sparse), and the
    loader's shuffle buffer (fp32 rows)."""
    params = sum(2 * d_in * t.sae.d_sae + t.sae.d_sae + d_in for t in cfgs)
    batch = sum(
        4 * t.train.batch_size * t.sae.d_sae
        * (1 if t.sae.arch in K_ARCHS else DENSE_BATCH_COPIES)
        for t in cfgs
    )  # fmt: skip
    return {
        "weights": 4 * params,
        "gradients": 4 * params,
        "Adam's moments": 8 * params,
        "batch activations": batch,
        "shuffle buffer": cfgs[0].train.shuffle_rows * d_in * 4,
    }


def _check_memory(cfgs: list[Config], d_in: int) -> None:
    """Before any MLflow run starts: log what training needs against what the device has, and
    refuse, with the numbers, a group that cannot fit (the allocator would grow until it fails
    or the kernel kills it)."""
    c = cfgs[0]
    device = resolve_device(c.train.device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    parts = memory_needed(cfgs, d_in)
    need = sum(parts.values())
    sizes = ", ".join(f"{t.sae.arch}-{t.sae.d_sae}" for t in cfgs)
    itemised = ", ".join(f"{name} {b / 1e9:,.2f}" for name, b in parts.items())
    logger().info(
        f"memory for {sizes} at d_in={d_in}, batch {c.train.batch_size:,}: {itemised} "
        f"= {need / 1e9:,.2f} GB; {free / 1e9:,.1f} GB free on {device}"
    )
    if need > free:
        raise MemoryError(
            f"training {sizes} at d_in={d_in} needs ~{need / 1e9:,.1f} GB (weights, gradients, "
            f"Adam's moments, a batch of {c.train.batch_size:,}, the shuffle buffer); "
            f"{free / 1e9:,.1f} GB is free on {device}: lower sae.d_sae or train.batch_size, "
            "or train on a larger machine"
        )


def _train_group(
    cfgs: list[Config],
    keys: list[str],
    candidates: list[list[str]],
    cache: dict[str, Any],
    experiment_id: str,
    parent_run_id: str | None,
) -> list[dict[str, Any]]:
    c, uri, ranks = cfgs[0], cfgs[0].tracking.uri, cfgs[0].train.processes
    manifest = Manifest.load(Path(cache["dir"]))
    d_in = manifest.d_in(c.hook)
    _check_cache(c, Path(cache["dir"]), manifest)
    if ranks == 1:
        _check_memory(cfgs, d_in)
    found = _resumable(candidates)
    # Read before the runs reopen: a bad state fails with the runs as they were. torchrun's
    # ranks read their own.
    resume = load_states(*found) if found and ranks == 1 else None
    if found:
        run_ids, step = found
        _reopen_runs(run_ids, step, uri, parent_run_id)
    else:
        run_ids = _start_runs(cfgs, keys, cache, d_in, experiment_id, parent_run_id)
        step = None
    group = tracking.task_run_id() or uuid.uuid4().hex  # one read of the cache for these runs
    for r in run_ids:
        tracking.set_tags(r, {"saeflow.group": group}, uri)
    locks = [open(_lock_path(r), "a") for r in run_ids]  # noqa: SIM115 (held to the end)
    for f in locks:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the files close, or the process dies
    on_steps = step_loggers(cfgs, run_ids) if ranks == 1 else []  # torchrun: rank 0 logs
    try:
        if ranks == 1:
            with tracking.system_metrics(run_ids[0], uri):  # the group shares the machine
                saes = fit_group(cfgs, run_ids, Path(cache["dir"]), d_in, resume, on_steps)
            for log in on_steps:
                log.close()
        else:
            saes = ddp.fit(cfgs, run_ids, cache, d_in, step)
        status = "resumed" if found else "trained"
        return [
            _finish(r, sae, t, cache, status) for r, sae, t in zip(run_ids, saes, cfgs, strict=True)
        ]
    except BaseException as e:
        for log in on_steps:
            log.flush()
        for r in run_ids:
            tracking.set_tags(r, {"error": f"{type(e).__name__}: {e}"[:5000]}, uri)
            tracking.end_run(r, "FAILED" if isinstance(e, Exception) else "KILLED", uri)
        raise
    finally:
        for f in locks:
            f.close()


def _reopen_runs(run_ids: list[str], step: int, uri: str | None, parent: str | None) -> None:
    for r in run_ids:
        tracking.reopen_run(r, uri)
        tracking.set_tags(
            r, {"saeflow.resumed_from_step": str(step), "saeflow.resumed_by": str(parent)}, uri
        )
    logger().info(f"resuming {len(run_ids)} run(s) {run_ids} from step {step}")


def _start_runs(
    cfgs: list[Config],
    keys: list[str],
    cache: dict[str, Any],
    d_in: int,
    experiment_id: str,
    parent_run_id: str | None,
) -> list[str]:
    """A new MLflow run per config, its params the flattened config."""
    run_ids = []
    for t, key in zip(cfgs, keys, strict=True):
        uri = t.tracking.uri
        r = tracking.start_run(
            experiment_id,
            t.run_name or f"{t.sae.arch}-{t.sae.d_sae}",
            uri=uri,
            parent_run_id=parent_run_id,
            tags={"cache_key": cache["key"], "saeflow.stage": "train", "saeflow.run_key": key},
        )
        params = tracking.flatten(asdict(t)) | {"sae.d_in": d_in, "cache.key": cache["key"]}
        tracking.log_params(r, params, uri)
        tracking.log_config(r, asdict(t), uri)
        manifest = str(Path(cache["dir"]) / "manifest.json")
        name = f"activations {t.hook}"
        tracking.log_dataset(r, name, cache["key"], manifest, "training", uri)
        run_ids.append(r)
    return run_ids


def _finish(run_id: str, sae: SAE, t: Config, cache: dict[str, Any], status: str) -> dict:
    """Save the trained SAE, log it, end its run FINISHED; {run_id, checkpoint, status}."""
    dir, uri = sae_dir(run_id), t.tracking.uri
    meta = {"hook": t.hook, "cache_key": cache["key"], "run_id": run_id, "model": t.model.name}
    sae.save(dir, meta=meta)
    tracking.log_artifact(run_id, dir / WEIGHTS, "checkpoint", uri)
    tracking.log_artifact(run_id, dir / CONFIG, "checkpoint", uri)
    tracking.end_run(run_id, "FINISHED", uri)
    shutil.rmtree(state_dir(run_id), ignore_errors=True)  # the final weights supersede it
    logger().info(f"trained {t.sae.arch} SAE: run {run_id}, checkpoint {dir}")
    return {"run_id": run_id, "checkpoint": str(dir), "status": status}
