"""Cache activations of the model at the hook for one data split (DESIGN §4)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config, from_dict
from sae.cache import FORMAT_VERSION, CacheError, Manifest, cache_key, verify
from sae.extract import build_cache
from sae.hooks import load_lm, parse_hook
from sae.text import documents, token_contexts
from tasks.common import logger
from tasks.home import home


def _file_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def key_inputs(c: Config, model: dict[str, Any], split: str) -> dict[str, Any]:
    """Everything that determines the activations, in clear (stored in the manifest)."""
    n_tokens = c.cache.tokens if split == "train" else c.eval.tokens
    return {
        "format_version": FORMAT_VERSION,
        "model": {
            "path": model["path"] if model["revision"] else c.model.name,
            "identity": model["identity"],
            "dtype": c.model.dtype,
        },
        "tokenizer": _file_hash(Path(model["path"]) / "tokenizer.json") or model["identity"],
        "hooks": [c.hook],
        "dtype": c.cache.dtype,
        "context_length": c.data.context_length,
        "data": {
            "source": c.data.source,
            "paths": sorted(c.data.paths),
            "holdout": c.data.holdout,
            "max_bytes": c.data.max_bytes,
            "split": split,
        },
        "n_contexts": math.ceil(n_tokens / c.data.context_length),
        "prepend_bos": c.data.prepend_bos,
        "special_policy": "flag bos/eos/pad; exclude from training",
    }


def _external(c: Config) -> dict[str, Any]:
    """`cache.dir=PATH`: any cache in the §4 layout, checked, never written."""
    path = Path(c.cache.dir).expanduser().resolve()
    m = Manifest.load(path)
    m.d_in(c.hook)
    if not m.complete:
        raise CacheError(f"cache {path} is incomplete; finish it before training on it")
    return {"dir": str(path), "key": m.key, "n_tokens": m.n_tokens, "reused": True}


@task(name="cache_activations", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def cache_activations(cfg: dict[str, Any], model: dict[str, Any], split: str) -> dict[str, Any]:
    """Cache the `split` ("train" or "eval") activations; a finished cache is reused untouched."""
    c, log = from_dict(cfg), logger()
    if split == "train" and c.cache.dir:
        return _external(c)
    inputs = key_inputs(c, model, split)
    key = cache_key(inputs)
    out = home() / "activations" / key
    if (out / "manifest.json").is_file() and (m := Manifest.load(out)).complete:
        if bad := verify(out, m):
            raise CacheError(
                f"cache {out}: shards {bad} fail their checksum; delete them "
                "(and their manifest entries) to recompute"
            )
        log.info(f"{split} cache {key} already complete ({m.n_tokens:,} tokens): no work")
        return {"dir": str(out), "key": key, "n_tokens": m.n_tokens, "reused": True}
    lm, tokenizer = load_lm(model["path"], model["revision"], c.model.dtype)
    hp = parse_hook(lm, c.hook)
    docs = documents(
        c.data.source, split, paths=c.data.paths, holdout=c.data.holdout, max_bytes=c.data.max_bytes
    )
    contexts = token_contexts(
        tokenizer, docs, c.data.context_length, prepend_bos=c.data.prepend_bos
    )
    special = sorted(
        {
            t
            for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            if t is not None
        }
    )
    n = inputs["n_contexts"]
    d_model = lm.config.hidden_size
    log.info(
        f"caching {split}: {n * c.data.context_length:,} tokens at {c.hook} -> {out} "
        f"(~{n * c.data.context_length * d_model * 2 / 1e6:,.0f} MB)"
    )
    m = build_cache(
        out,
        lm,
        [hp],
        contexts,
        n_contexts=n,
        key=key,
        key_inputs=inputs,
        context_length=c.data.context_length,
        special_token_ids=special,
        dtype=c.cache.dtype,
        shard_tokens=c.cache.shard_tokens,
        batch_size=c.cache.batch_size,
        log=log.info,
    )
    if m.n_sequences < n:
        log.warning(f"{split} data ran out: cached {m.n_sequences} of {n} contexts")
    return {"dir": str(out), "key": key, "n_tokens": m.n_tokens, "reused": False}
