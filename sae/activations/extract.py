"""Fill an activation cache: plan, tokens, shards, manifest — each step safe to kill and re-run.

    open_cache    the manifest with the plan (n_planned sequences, shard_seqs); reused if there
    write_tokens  the packed contexts as `tokens.npy` (n, T) int32, atomically; reused if there
    todo          shards still to compute: those not in the manifest (+ corrupt ones on repair)
    compute_shard forward pass over shard i's contexts, written to a temp name and renamed
    record_shard  add it to the manifest (read-modify-write under a file lock, atomic rename)
    finish        mark the cache complete once every planned shard is listed

Shard i always holds contexts [i·shard_seqs, (i+1)·shard_seqs) computed in the same batches, so
shards can be computed in any order, by any number of workers, and a resumed cache is
byte-identical to an uninterrupted one. `build_cache` runs the steps in one process.
"""

from __future__ import annotations

import fcntl
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae.activations.cache import MANIFEST, CacheError, Manifest, Shard, verify, write_shard
from sae.failpoint import failpoint
from sae.files import atomic_write
from sae.lm.hooks import HookPoint, activations_at

TOKENS = "tokens.npy"
META_BYTES_PER_ROW = 8 + 4 + 4 + 1 + 1  # seq_id, pos, token_id, special, outlier


@contextmanager
def locked(dir: Path, name: str = ".lock") -> Iterator[None]:
    """An exclusive lock on the cache directory, across processes (flock on `name`; the
    kernel releases it if the holder dies)."""
    with open(dir / name, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_cache(dir: Path, plan: Manifest) -> Manifest:
    """The manifest in `dir`, created from `plan` (no shards yet) if there is none."""
    dir.mkdir(parents=True, exist_ok=True)
    with locked(dir):
        if (dir / MANIFEST).is_file():
            m = Manifest.load(dir)
            if m.key != plan.key:
                raise CacheError(f"{dir} holds cache {m.key}, not {plan.key}; refusing to mix")
            return m
        plan.save(dir)
        return plan


class EmptyData(ValueError):
    """The text gave not one full context."""


def write_tokens(
    dir: Path, contexts: Iterator[list[int]], n: int, t: int, shuffle_seed: int | None = None
) -> np.ndarray:
    """The first `n` contexts of length `t` as (n', t) int32, n' ≤ n if the data runs out,
    in a seeded random order when `shuffle_seed` is given.

    Why shuffle: corpora arrive in document order (the stdlib sorted by path: its last shards
    are Unicode tables), so sequence-contiguous shards would each hold one topic and a shuffle
    window of a few shards would feed the SAE non-i.i.d. batches.
    """
    path = dir / TOKENS
    if not path.is_file():
        flat = np.fromiter(itertools.chain.from_iterable(itertools.islice(contexts, n)), np.int32)
        if flat.size < t:
            raise EmptyData(
                f"the data source produced no full context of {t} tokens; "
                "give more text or a smaller data.context_length"
            )
        rows = flat.reshape(-1, t)
        if shuffle_seed is not None:
            rows = rows[np.random.default_rng(shuffle_seed).permutation(len(rows))]

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a name
                np.save(f, rows)

        atomic_write(path, save, point="cache.tokens")  # the point: written, not yet renamed
    return read_tokens(dir)


def read_tokens(dir: Path) -> np.ndarray:
    """The planned contexts (n, T) int32, memory-mapped; written by `write_tokens`."""
    path = dir / TOKENS
    if not path.is_file():
        raise CacheError(f"{path} is missing: plan the cache before computing its shards")
    return np.load(path, mmap_mode="r")


def shuffle_seed(m: Manifest) -> int | None:
    """The context order is part of the cache's content: seeded by its key."""
    return int(m.key[:8], 16) if m.key_inputs.get("context_order") == "shuffled" else None


def todo(dir: Path, m: Manifest, repair: bool = False) -> list[int]:
    """Indices of shards to compute. A listed shard failing its checksum raises, naming it,
    unless `repair`, which drops it from the manifest so it is recomputed."""
    if bad := verify(dir, m):
        if not repair:
            raise CacheError(
                f"cache {dir}: shard(s) {', '.join(bad)} fail their checksum; "
                "re-run with cache.repair=true to recompute just those"
            )
        with locked(dir):
            m = Manifest.load(dir)
            m.shards = [s for s in m.shards if s.file not in bad]
            m.complete = False
            m.save(dir)
    done = {s.first_seq // m.shard_seqs for s in m.shards}
    return [i for i in range(m.n_shards) if i not in done]


def disk_needed(m: Manifest, shards: int) -> int:
    """Bytes that `shards` more shards of this plan will take (an upper bound)."""
    row = META_BYTES_PER_ROW + sum(d * 2 for d in m.hooks.values())
    return shards * m.shard_seqs * m.context_length * row


def compute_shard(
    dir: Path,
    model: nn.Module,
    hooks: list[HookPoint],
    tokens: np.ndarray,
    index: int,
    m: Manifest,
    batch_size: int,
    forward_lock: AbstractContextManager | None = None,
) -> Shard:
    """Run the model over shard `index`'s contexts and write the shard (not yet recorded)."""
    with forward_lock or nullcontext():  # hooks on a shared model must not interleave
        computed = _compute(model, hooks, tokens, index, m, batch_size)
    return write_shard(dir, index, *computed[:4], m.dtype, computed[4])


def _compute(
    model: nn.Module,
    hooks: list[HookPoint],
    tokens: np.ndarray,
    index: int,
    m: Manifest,
    batch_size: int,
) -> tuple:
    """(first_seq, ids, special, acts, outlier) of shard `index`: the forward-pass half."""
    first = index * m.shard_seqs
    ids = torch.from_numpy(np.array(tokens[first : first + m.shard_seqs], dtype=np.int64))
    acts = _forward(model, hooks, ids, batch_size)  # {hook: (S, T, d)}
    special = torch.isin(ids, torch.tensor(m.special_token_ids, dtype=torch.long))
    return first, ids, special, acts, _outliers(acts, special, m.outlier_factor)


@contextmanager
def claimed(dir: Path, index: int) -> Iterator[bool]:
    """Hold shard `index` for computing; yields False when it is already in the manifest.

    Two runs building one cache (two pipelines started at once, or Dask workers) each compute
    a shard only if no one else has: the second waits on the first's claim, then finds the
    shard recorded. So the cache is built once, with no half-caches and no repeated work.
    """
    with locked(dir, f".shard-{index:05d}.lock"):
        name = f"shard-{index:05d}.parquet"
        yield not any(s.file == name for s in Manifest.load(dir).shards)


def record_shard(dir: Path, shard: Shard) -> Manifest:
    """Add `shard` to the manifest (replacing an entry for the same file)."""
    with locked(dir):
        m = Manifest.load(dir)
        m.shards = sorted(
            [s for s in m.shards if s.file != shard.file] + [shard], key=lambda s: s.first_seq
        )
        m.save(dir)
    failpoint("cache.shard_recorded")  # between shards
    return m


def finish(dir: Path) -> Manifest:
    """Mark the cache complete; raises if a planned shard is missing."""
    with locked(dir):
        m = Manifest.load(dir)
        if len(m.shards) != m.n_shards:
            raise CacheError(f"cache {dir}: {len(m.shards)} of {m.n_shards} shards written")
        m.complete = True
        m.save(dir)
        return m


def build_cache(
    dir: Path,
    model: nn.Module,
    hooks: list[HookPoint],
    contexts: Iterator[list[int]],
    plan: Manifest,
    *,
    batch_size: int = 32,
    repair: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Every step in this process; `plan.n_planned` contexts drawn from `contexts`."""
    m = open_cache(dir, plan)
    tokens = write_tokens(dir, contexts, m.n_planned, m.context_length, shuffle_seed(m))
    m = shrink_plan(dir, len(tokens))
    left = todo(dir, m, repair)
    if len(left) < m.n_shards:
        log(f"resuming cache {m.key}: {m.n_shards - len(left)} of {m.n_shards} shards done")
    t0 = time.perf_counter()

    def write(i: int, computed: tuple) -> None:
        record_shard(dir, write_shard(dir, i, *computed[:4], m.dtype, computed[4]))

    # Shard i is written (Parquet, sha256, manifest) while shard i+1's forward pass runs.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        for n, i in enumerate(left, 1):
            computed = _compute(model, hooks, tokens, i, m, batch_size)
            if pending is not None:
                pending.result()  # at most one shard in flight; errors surface here
            pending = writer.submit(write, i, computed)
            log(progress(m, n, len(left), time.perf_counter() - t0))
        if pending is not None:
            pending.result()
    return finish(dir)


def shrink_plan(dir: Path, n_available: int) -> Manifest:
    """When the data ran out, the plan is the contexts there are."""
    with locked(dir):
        m = Manifest.load(dir)
        if n_available < m.n_planned:
            m.n_planned = n_available
            m.save(dir)
        return m


def progress(m: Manifest, done: int, total: int, seconds: float) -> str:
    """`cache KEY: shard 3/8, 393,216 tokens, 41,000 tok/s, ETA 12s`."""
    tokens = done * m.shard_seqs * m.context_length
    rate = tokens / max(seconds, 1e-9)
    eta = (total - done) * seconds / max(done, 1)
    return (
        f"cache {m.key}: shard {done}/{total}, {tokens:,} tokens, {rate:,.0f} tok/s, ETA {eta:.0f}s"
    )


def _outliers(acts: dict[str, torch.Tensor], special: torch.Tensor, factor: float) -> torch.Tensor:
    """(S, T) rows whose norm at any hook exceeds `factor` × the median over ordinary rows."""
    out = torch.zeros_like(special)
    if factor <= 0:
        return out
    for a in acts.values():
        norms = a.float().norm(dim=-1)  # (S, T)
        ordinary = norms[~special]
        if ordinary.numel():
            out |= norms > factor * ordinary.median()
    return out & ~special


@torch.no_grad()
def _forward(
    model: nn.Module, hooks: list[HookPoint], ids: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """{hook: (S, T, d)} for a shard's contexts, batch by batch, in fp32 until written."""
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {h.name: [] for h in hooks}
    for i in range(0, ids.shape[0], batch_size):
        out = activations_at(model, hooks, ids[i : i + batch_size].to(device))
        for name, a in out.items():
            parts[name].append(a.float().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}
