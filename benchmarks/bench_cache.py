"""Caching wall time ÷ a plain forward pass up to the hooked layer, on the same tokens.

    python benchmarks/bench_cache.py [--model DIR] [--tokens N] [--hook blocks.2.resid_post]

The baseline runs the model over the same contexts, in the same batches, stopping after the
hooked block and keeping nothing; "ours" is `sae.activations.extract.build_cache` end to end
(forward, bf16 conversion, Parquet shards, sha256, manifest updates). Target (DESIGN §9): ratio ≤
1.1. Prints a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae.activations.cache import Manifest
from sae.activations.extract import build_cache
from sae.lm.hooks import activations_at, load_lm, parse_hook


def main() -> None:
    p = argparse.ArgumentParser()
    home = os.environ.get("SAEFLOW_HOME", str(Path.home() / ".saeflow"))
    found = sorted(glob.glob(f"{home}/models/stdlib-gpt2-*"))
    p.add_argument("--model", default=found[-1] if found else None)
    p.add_argument("--tokens", type=int, default=524_288)
    p.add_argument("--hook", default="blocks.2.resid_post")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    if a.model is None:
        raise SystemExit("no model: run `saeflow run` once, or pass --model DIR")
    model, _ = load_lm(a.model)
    hp = parse_hook(model, a.hook)
    n = a.tokens // a.context
    ids = torch.from_numpy(np.random.default_rng(0).integers(1, 4000, (n, a.context)))
    ids[:, 0] = 0

    def baseline() -> float:
        t0 = time.perf_counter()
        for i in range(0, n, a.batch):
            activations_at(model, [hp], ids[i : i + a.batch])
        return time.perf_counter() - t0

    def ours() -> float:
        with tempfile.TemporaryDirectory() as d:
            plan = Manifest(
                key="bench",
                key_inputs={},
                hooks={hp.name: model.config.hidden_size},
                dtype="bf16",
                context_length=a.context,
                special_token_ids=[0],
                n_planned=n,
                shard_seqs=131_072 // a.context,
                outlier_factor=10.0,
            )
            t0 = time.perf_counter()
            build_cache(
                Path(d),
                model,
                [hp],
                iter(ids.tolist()),
                plan,
                batch_size=a.batch,
                log=lambda s: None,
            )
            return time.perf_counter() - t0

    baseline()  # warm-up
    times = [(baseline(), ours()) for _ in range(3)]
    base, mine = min(t[0] for t in times), min(t[1] for t in times)
    print(
        f"| caching ÷ forward to {a.hook} | {a.tokens:,} tokens, d={model.config.hidden_size} "
        f"| forward {a.tokens / base:,.0f} tok/s, caching {a.tokens / mine:,.0f} tok/s "
        f"| **{mine / base:.3f}** (target ≤ 1.1) |"
    )


if __name__ == "__main__":
    main()
