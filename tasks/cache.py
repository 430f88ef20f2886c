"""Cache activations at the hook(s) for one data split (DESIGN §4), as Prefect tasks.

`plan_cache` decides the content key, reuses a finished cache (local, else fetched from
`cache.store`), else writes the plan and the tokens and lists the shards still to do;
`cache_shard` (mapped, one per shard) computes and records one shard; `finish_cache` seals it
and publishes it to `cache.store` (tasks/support/store.py). A task runner can spread the shards over
workers; a store spreads the finished caches over machines.
"""

from __future__ import annotations

import errno
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoConfig, AutoTokenizer

from conf.schema import Config
from sae.activations.cache import FORMAT_VERSION, CacheError, Manifest, cache_key, verify
from sae.activations.extract import (
    EmptyData,
    claimed,
    compute_shard,
    disk_needed,
    finish,
    open_cache,
    progress,
    read_tokens,
    record_shard,
    shrink_plan,
    shuffle_seed,
    todo,
    write_tokens,
)
from sae.files import file_sha256
from sae.lm.hooks import load_lm, parse_hook
from sae.lm.text import documents, token_contexts
from tasks.model import lm_device
from tasks.support import stop
from tasks.support.home import home
from tasks.support.log import logger
from tasks.support.store import fetch, publish, shown

_MODELS: dict[tuple, tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def _file_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    return file_sha256(path)[:16]


def hooks_of(c: Config) -> list[str]:
    """`hook` and `cache.hooks`, deduplicated, in a stable order (part of the key)."""
    return list(dict.fromkeys([c.hook, *c.cache.hooks]))


def kernels(device: torch.device | None = None) -> dict[str, str]:
    """What fixes the last bits of the caching forward pass on `device` (None: the CPU) besides
    the config: the torch and transformers versions and the CPU kernels torch dispatches to
    (AVX2 and AVX-512 matmuls sum in different orders; the outlier norms run on the CPU on any
    device). On cuda also the GPU, its compute capability and the CUDA runtime, which pick the
    GPU's kernels; a CPU forward adds nothing, so CPU caches keep the keys they had before
    `model.device`. In the key, so that two machines sharing a `cache.store` never write one
    shard differently. Measured: 1 or 2 threads, same bytes."""
    out = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    if device is not None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out |= {
            "device": "cuda",
            "gpu": torch.cuda.get_device_name(device),
            "sm": f"{major}.{minor}",
            "cuda": str(torch.version.cuda),
        }
    return out


def key_inputs(
    c: Config, model: dict[str, Any], split: str, device: torch.device | None = None
) -> dict[str, Any]:
    """Everything that determines the activations, in clear (stored in the manifest); the
    forward runs on `device` (None: where `model.device` puts it on this machine)."""
    n_tokens = c.cache.tokens if split == "train" else c.eval.tokens
    device = lm_device(c.model) if device is None else device
    return {
        "format_version": FORMAT_VERSION,
        "model": {
            "path": model["path"] if model["revision"] else c.model.name,
            "identity": model["identity"],
            "dtype": c.model.dtype,
        },
        "tokenizer": _file_hash(Path(model["path"]) / "tokenizer.json") or model["identity"],
        "hooks": hooks_of(c),
        "dtype": c.cache.dtype,
        "context_length": c.data.context_length,
        "data": {
            "source": c.data.source,
            "paths": sorted(c.data.paths),
            "hf_name": c.data.hf_name,
            "hf_config": c.data.hf_config,
            "hf_split": c.data.hf_split,
            "text_column": c.data.text_column,
            "holdout": c.data.holdout,
            "max_bytes": c.data.max_bytes,
            # how file/hf text is split and decoded (the stdlib source reads neither setting)
            **(
                {}
                if c.data.source == "stdlib"
                else {
                    "chunk_chars": c.data.chunk_chars,
                    "held_chunks": "first-n",  # since 2026-12-07: never the short last piece
                    "encoding": c.data.encoding,
                    "errors": c.data.errors,
                }
            ),
            "split": split,
        },
        "n_contexts": math.ceil(n_tokens / c.data.context_length),
        "prepend_bos": c.data.prepend_bos,
        "context_order": "shuffled",
        "special_policy": "flag bos/eos/pad; exclude from training",
        "outlier_factor": c.cache.outlier_factor,
        "shard_tokens": c.cache.shard_tokens,
        "batch_size": c.cache.batch_size,  # batching can change the last bits of a forward pass
        "kernels": kernels(device),
    }


def _external(c: Config) -> dict[str, Any]:
    """`cache.dir=PATH`: any cache in the §4 layout, checked, never written."""
    path = Path(c.cache.dir).expanduser().resolve()
    m = Manifest.load(path)
    for h in hooks_of(c):
        m.d_in(h)
    if not m.complete:
        raise CacheError(f"cache {path} is incomplete; finish it before training on it")
    if c.cache.verify and (bad := verify(path, m)):  # before the study's MLflow run opens
        raise CacheError(
            f"cache {path}: shard(s) {', '.join(bad)} are missing or fail their checksum; an "
            "external cache (cache.dir) is never rewritten: rebuild it, or set "
            "cache.verify=false to train on it as it is"
        )
    return {"dir": str(path), "key": m.key, "n_tokens": m.n_tokens, "reused": True, "todo": []}


def _plan(c: Config, model: dict[str, Any], split: str, key: str, tok: Any) -> Manifest:
    inputs = key_inputs(c, model, split)
    hf = AutoConfig.from_pretrained(model["path"], revision=model["revision"])
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
    return Manifest(
        key=key,
        key_inputs=inputs,
        hooks={h: hf.hidden_size for h in hooks_of(c)},
        dtype=c.cache.dtype,
        context_length=c.data.context_length,
        special_token_ids=sorted(special),
        n_planned=inputs["n_contexts"],
        shard_seqs=max(1, c.cache.shard_tokens // c.data.context_length),
        outlier_factor=c.cache.outlier_factor,
    )


def _transient(task: Any, run: Any, state: Any) -> bool:
    """Retry I/O hiccups, not errors a retry cannot fix: a bad cache or data path, a corrupt
    shard, a full disk (each would only wait before failing the same way)."""
    try:
        state.result()
    except (CacheError, ValueError, FileNotFoundError, stop.Stopped):
        return False
    except OSError as e:
        return e.errno not in (errno.ENOSPC, errno.EFBIG)
    except Exception:
        return True
    return True


def _reuse(c: Config, split: str, key: str, out: Path, force: bool) -> dict[str, Any] | None:
    """The finished cache `key`: local (checksums checked with cache.verify), else fetched from
    cache.store; None when it is to be computed (or repaired, with cache.repair)."""
    log = logger()
    m = Manifest.load(out) if (out / "manifest.json").is_file() else None
    m = m if m is not None and m.complete else None
    bad = verify(out, m) if m is not None and c.cache.verify else []
    reused = {"dir": str(out), "key": key, "reused": True, "todo": [], "store": c.cache.store}
    # Not after `force`: a forced cache is computed here, and publishing it checks it against
    # the store's copy byte for byte.
    if (
        c.cache.store
        and not force
        and (m is None or bad)
        and (got := fetch(c.cache.store, key, out))
    ):
        log.info(
            f"{split} cache {key} fetched from {shown(c.cache.store)}: {got['fetched']} shards, "
            f"{got['bytes'] / 1e6:,.1f} MB in {got['seconds']:.1f}s; no work"
        )
        return reused | {"n_tokens": Manifest.load(out).n_tokens, "fetched": got}
    if m is not None:
        if bad and not c.cache.repair:
            raise CacheError(
                f"cache {out}: shard(s) {', '.join(bad)} fail their checksum; "
                "re-run with cache.repair=true to recompute just those"
            )
        if not bad:
            log.info(f"{split} cache {key} already complete ({m.n_tokens:,} tokens): no work")
            return reused | {"n_tokens": m.n_tokens}
    return None


@task(
    name="plan_cache",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
)
def plan_cache(
    cfg: Config, model: dict[str, Any], split: str, force: bool = False
) -> dict[str, Any]:
    """Key, reuse check, plan, tokens, disk check; returns {dir, key, reused, todo, ...}.

    Not cached by Prefect: the reuse check reads the manifest (and verifies the shards with
    cache.verify), which a stored result could not. `force` recomputes the cache from scratch.
    With `cache.store`, a cache missing here (or failing its checksums) is fetched from the
    store when the store has it complete (`fetched` in the result); a store shard failing its
    checksum stops the run (CacheError naming it): the store is shared, so its corruption is
    reported rather than computed around.
    """
    c, log = cfg, logger()
    if split == "train" and c.cache.dir:
        return _external(c)
    key = cache_key(key_inputs(c, model, split))
    out = home() / "activations" / key
    if force and out.exists():
        log.warning(f"force: removing {split} cache {out} to compute it again")
        shutil.rmtree(out)
    if (done := _reuse(c, split, key, out, force)) is not None:
        return done
    tok = AutoTokenizer.from_pretrained(model["path"], revision=model["revision"])
    plan = _plan(c, model, split, key, tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = disk_needed(plan, plan.n_shards), shutil.disk_usage(out.parent).free
    if need > free:  # before any work: tokenising a corpus that cannot be stored wastes hours
        raise OSError(
            f"not enough disk for cache {key}: needs ~{need / 1e9:,.2f} GB at {out}, "
            f"{free / 1e9:,.2f} GB free; free space, lower cache.tokens, or move SAEFLOW_HOME"
        )
    m = open_cache(out, plan)
    d = c.data
    docs = documents(
        d.source,
        split,
        paths=d.paths,
        holdout=d.holdout,
        max_bytes=d.max_bytes,
        hf_name=d.hf_name,
        hf_config=d.hf_config,
        hf_split=d.hf_split,
        text_column=d.text_column,
        chunk_chars=d.chunk_chars,
        encoding=d.encoding,
        errors=d.errors,
    )
    contexts = token_contexts(tok, docs, m.context_length, prepend_bos=c.data.prepend_bos)
    try:
        tokens = write_tokens(out, contexts, m.n_planned, m.context_length, shuffle_seed(m))
    except EmptyData as e:
        raise EmptyData(f"{e}: {docs.why_empty(d.holdout, d.chunk_chars)}") from None
    if docs.skipped:
        log.warning(
            f"data.errors=skip left out {len(docs.skipped)} file(s): "
            + "; ".join(docs.skipped[:5])
            + (" …" if len(docs.skipped) > 5 else "")
        )
    m = shrink_plan(out, len(tokens))
    left = todo(out, m, c.cache.repair)
    log.info(
        f"caching {split}: {m.n_planned * m.context_length:,} tokens at {', '.join(m.hooks)} "
        f"-> {out}; {len(left)} of {m.n_shards} shards to do, ~{need / 1e6:,.0f} MB "
        f"({free / 1e9:,.1f} GB free)"
    )
    return {
        "dir": str(out),
        "key": key,
        "reused": False,
        "todo": left,
        "started": time.time(),
        "n_todo": len(left),
        "store": c.cache.store,
    }


def _model(model: dict[str, Any], dtype: str, device: torch.device) -> tuple[Any, threading.Lock]:
    """One loaded model per process, shared by shard tasks in threads (with a forward lock)."""
    key = (model["path"], model["revision"], dtype, str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            lm, _ = load_lm(model["path"], model["revision"], dtype, device)
            _MODELS[key] = (lm, threading.Lock())
        return _MODELS[key]


def check_kernels(m: Manifest, here: dict[str, str]) -> None:
    """A shard is computed where its cache was planned to be: a worker whose device or kernels
    differ from the key's (a GPU planner, a CPU-only worker) would write other bytes under it."""
    planned = m.key_inputs.get("kernels")
    if planned is not None and planned != here:
        raise ValueError(
            f"cache {m.key} was planned for a forward pass on {planned}, but this worker would "
            f"run it on {here}; run its shards on machines like the planner's, or set "
            "model.device so that they match (e.g. model.device=cpu everywhere)"
        )


@task(
    name="cache_shard",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
)
def cache_shard(
    cfg: Config, model: dict[str, Any], plan: dict[str, Any], index: int
) -> dict[str, Any]:
    """Compute and record shard `index` of the planned cache, unless another run (holding
    its claim) has: {file, rows, computed}."""
    c = cfg
    stop.check(f"shard {index}")  # queued shards do not start after a Ctrl-C / SIGTERM
    out = Path(plan["dir"])
    with claimed(out, index) as mine:
        m = Manifest.load(out)
        if not mine:
            logger().info(f"cache {m.key}: shard {index} was computed by another run")
            shard = next(s for s in m.shards if s.first_seq == index * m.shard_seqs)
            return {"file": shard.file, "rows": shard.rows, "computed": False}
        device = lm_device(c.model)
        check_kernels(m, kernels(device))
        lm, lock = _model(model, c.model.dtype, device)
        hooks = [parse_hook(lm, h) for h in m.hooks]
        tokens = read_tokens(out)
        shard = compute_shard(out, lm, hooks, tokens, index, m, c.cache.batch_size, lock)
        m = record_shard(out, shard)
    done = len(m.shards) - (m.n_shards - plan["n_todo"])  # by this run, any worker
    logger().info(progress(m, max(done, 1), plan["n_todo"], time.time() - plan["started"]))
    return {"file": shard.file, "rows": shard.rows, "computed": True}


@task(
    name="finish_cache",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
)
def finish_cache(plan: dict[str, Any]) -> dict[str, Any]:
    """Seal the cache once every shard is in, publish it to `cache.store` (unless it came from
    there); returns {dir, key, n_tokens, reused}."""
    out = {k: plan[k] for k in ("dir", "key", "n_tokens", "reused") if k in plan}
    if not plan["reused"]:
        m = finish(Path(plan["dir"]))
        out["n_tokens"] = m.n_tokens
        if m.n_planned < m.key_inputs["n_contexts"]:
            logger().warning(
                f"data ran out: cached {m.n_planned} of {m.key_inputs['n_contexts']} contexts"
            )
    if plan.get("store") and not plan.get("fetched"):  # also a cache made before the store was set
        sent = publish(Path(plan["dir"]), plan["store"])
        logger().info(
            f"cache {plan['key']} published to {shown(plan['store'])}: {sent['uploaded']} "
            f"objects uploaded ({sent['bytes'] / 1e6:,.1f} MB in {sent['seconds']:.1f}s), "
            f"{sent['same']} already there"
        )
    return out
