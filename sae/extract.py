"""Run a language model over token contexts and write its activations as a resumable cache."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from sae.cache import MANIFEST, CacheError, Manifest, write_shard
from sae.hooks import HookPoint, activations_at


def build_cache(
    dir: Path,
    model: nn.Module,
    hooks: list[HookPoint],
    contexts: Iterator[list[int]],
    *,
    n_contexts: int,
    key: str,
    key_inputs: dict,
    context_length: int,
    special_token_ids: list[int],
    dtype: str = "bf16",
    shard_tokens: int = 131_072,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Cache activations of `n_contexts` contexts at `hooks` into `dir` (DESIGN §4 layout).

    Resumes a partial cache: finished shards (listed in the manifest) are skipped, the contexts
    they hold are drawn from `contexts` and dropped, and work restarts at the first missing shard.
    Stops early, with a complete but smaller cache, if `contexts` runs out.
    """
    dir.mkdir(parents=True, exist_ok=True)
    m = Manifest.load(dir) if (dir / MANIFEST).is_file() else None
    if m is not None and m.key != key:
        raise CacheError(f"{dir} holds cache {m.key}, not {key}; refusing to mix them")
    if m is None:
        m = Manifest(
            key=key,
            key_inputs=key_inputs,
            hooks={},
            dtype=dtype,
            context_length=context_length,
            special_token_ids=special_token_ids,
        )
    if m.complete:
        return m
    done = m.n_sequences
    if done:
        log(f"resuming cache {key}: {len(m.shards)} shards ({done} contexts) already written")
    contexts = itertools.islice(contexts, done, n_contexts)
    shard_seqs = max(1, shard_tokens // context_length)
    special = torch.tensor(special_token_ids, dtype=torch.long)
    t0, seen = time.perf_counter(), 0
    while True:
        chunk = list(itertools.islice(contexts, shard_seqs))
        if not chunk:
            break
        ids = torch.tensor(chunk, dtype=torch.long)  # (S, T)
        acts = _forward(model, hooks, ids, batch_size)
        m.hooks = {h: a.shape[-1] for h, a in acts.items()}
        m.shards.append(
            write_shard(
                dir, len(m.shards), m.n_sequences, ids, torch.isin(ids, special), acts, dtype
            )
        )
        m.save(dir)  # after each shard: a kill loses at most the shard in flight
        seen += ids.numel()
        rate = seen / (time.perf_counter() - t0)
        total = n_contexts * context_length
        eta = (total - m.n_tokens) / max(rate, 1e-9)
        log(f"cache {key}: {m.n_tokens:,}/{total:,} tokens, {rate:,.0f} tok/s, ETA {eta:.0f}s")
    if m.n_sequences == 0:
        raise ValueError(
            "the data source produced no full context; "
            "give more text or a smaller data.context_length"
        )
    m.complete = True
    m.save(dir)
    return m


@torch.no_grad()
def _forward(
    model: nn.Module, hooks: list[HookPoint], ids: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """{hook: (S, T, d)} for a shard's contexts, batch by batch, kept in fp32 until written."""
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {h.name: [] for h in hooks}
    for i in range(0, ids.shape[0], batch_size):
        out = activations_at(model, hooks, ids[i : i + batch_size].to(device))
        for name, a in out.items():
            parts[name].append(a.float().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}
