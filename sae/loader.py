"""Shuffled training batches from an activation cache, in bounded memory.

Each epoch visits the shards in a seeded random order; rows flow through a shuffle buffer of at
most `buffer_rows + shard rows` rows, so memory depends on the buffer, not on the cache size.
Rows whose token is special (BOS/EOS/pad; outliers with huge norm) are dropped when asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sae.cache import Manifest, read_shard


def batches(
    dir: Path,
    hook: str,
    batch_size: int,
    *,
    buffer_rows: int = 262_144,
    seed: int = 0,
    exclude_special: bool = True,
    epochs: int | None = None,
) -> Iterator[torch.Tensor]:
    """Endless (or `epochs`) stream of (batch_size, d_in) activation batches in the stored dtype.

    Within an epoch every kept row is yielded exactly once; the last, smaller batch of an epoch
    carries over into the next so every batch is full.
    """
    m = Manifest.load(dir)
    if not m.complete:
        raise ValueError(f"cache {dir} is incomplete ({len(m.shards)} shards); finish it first")
    rng = np.random.default_rng(seed)
    buf: torch.Tensor | None = None
    epoch = 0
    while epochs is None or epoch < epochs:
        for i in rng.permutation(len(m.shards)):
            meta, acts = read_shard(dir, m.shards[i], [hook], m)
            rows = acts[hook]
            if exclude_special:
                keep = ~meta["special"].to_numpy(zero_copy_only=False)
                rows = rows[torch.from_numpy(keep)]
            buf = rows if buf is None else torch.cat([buf, rows])
            if len(buf) >= buffer_rows:
                buf = buf[torch.from_numpy(rng.permutation(len(buf)))]
                # Emit all but half a buffer: the rest mixes with the next shard's rows.
                n_out = (len(buf) - buffer_rows // 2) // batch_size * batch_size
                yield from buf[:n_out].split(batch_size)
                buf = buf[n_out:]
        epoch += 1
        if buf is not None and len(buf):
            buf = buf[torch.from_numpy(rng.permutation(len(buf)))]
            n_out = len(buf) // batch_size * batch_size
            yield from buf[:n_out].split(batch_size)
            buf = buf[n_out:]
    if buf is not None and len(buf):
        yield buf
