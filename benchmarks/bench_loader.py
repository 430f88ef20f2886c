"""Loader benchmarks (DESIGN §9), as ratios measured in one run on this machine.

    (a) cache read: loader rate ÷ raw file read rate of the same shard files, both warm (files
        in the page cache: dropping them needs root), d_in 768 and 128; target ≥ 0.4
    (b) loader tokens/s ÷ training tokens/s of the default SAE (relu, d_in 128, d_sae 1024,
        batch 4096, fp32 via `sae.training.fit.fit`); target ≥ 5
    (c) training tokens/s fed by the loader ÷ fed from batches already in memory; ≈ 1 means
        training never waits on the loader

Rates are shard-file bytes (or rows) per second, medians of REPEATS runs. The raw reads are
interleaved so that noise from other jobs hits them alike; the loader is timed one epoch at a
time from one long-lived loader, as training uses it (a fresh loader per run would time its
start-up, and pausing one between runs would let it read ahead off the clock).

    python benchmarks/bench_loader.py            # writes the Loader section of BENCHMARKS.md
    python benchmarks/bench_loader.py --quick    # smaller caches, prints only
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import mmap
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from benchmd import cpu, write_section

from sae.activations.cache import Manifest, write_shard
from sae.activations.loader import ActivationLoader
from sae.models.registry import build_sae
from sae.training.fit import FitConfig, fit

ROOT = Path(__file__).resolve().parents[1]
HOOK, T, BATCH, REPEATS = "blocks.0.resid_post", 128, 4096, 5
START, END = "<!-- bench_loader:start -->", "<!-- bench_loader:end -->"


def build_cache(dir: Path, d_in: int, n_shards: int, shard_rows: int) -> list[Path]:
    """Random bf16 activations, BOS at position 0 of every sequence; returns the shard paths."""
    dir.mkdir(parents=True)
    m = Manifest("bench", {"bench": d_in}, {HOOK: d_in}, "bf16", T, [0])
    g = torch.Generator().manual_seed(d_in)
    seqs = shard_rows // T
    for i in range(n_shards):
        ids = torch.randint(1, 1000, (seqs, T), generator=g)
        ids[:, 0] = 0
        acts = torch.randn(seqs, T, d_in, generator=g).to(torch.bfloat16)
        m.shards.append(write_shard(dir, i, i * seqs, ids, ids == 0, {HOOK: acts}, "bf16"))
    m.complete = True
    m.save(dir)
    return [dir / s.file for s in m.shards]


def read_plain(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            f.read()


def read_mmap(paths: list[Path], buf: np.ndarray) -> None:
    """Copy each file out of a memory map into `buf`, reused (no kernel copy, no fresh pages)."""
    for p in paths:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            src = np.frombuffer(m, dtype=np.uint8)
            buf[: len(src)] = src
            del src  # the map cannot close while a view of it exists


def seconds(runs: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median seconds of each run, the runs interleaved, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round in range(REPEATS + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            if round:  # round 0 warms the page cache and the allocators
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def loader_seconds(dir: Path, prefetch: int, rows: int) -> float:
    """Median seconds per epoch of one endless loader, epochs back to back after a warm-up one:
    as in training (one loader for the run), and no read-ahead done while the clock is off."""
    times = []
    with ActivationLoader(dir, HOOK, BATCH, prefetch=prefetch) as loader:
        for round in range(REPEATS + 1):
            t0 = time.perf_counter()
            for _ in itertools.islice(loader, math.ceil(rows / BATCH)):
                pass
            if round:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_rates(dir: Path, paths: list[Path]) -> dict[str, float]:
    """GB/s of shard files: raw read(), raw via mmap, loader with and without prefetch; and
    the loader's tokens/s (rows yielded: all but the BOS rows)."""
    gb = sum(p.stat().st_size for p in paths) / 1e9
    m = Manifest.load(dir)
    tokens = m.n_tokens - m.n_sequences
    buf = np.ones(max(p.stat().st_size for p in paths), dtype=np.uint8)  # pages touched once
    secs = seconds(
        {"raw read()": lambda: read_plain(paths), "raw mmap copy": lambda: read_mmap(paths, buf)}
    )
    secs["loader"] = loader_seconds(dir, 4, tokens)
    secs["loader, prefetch=0"] = loader_seconds(dir, 0, tokens)
    rates = {name: gb / s for name, s in secs.items()}
    return rates | {"tokens/s": tokens / secs["loader"], "file MiB": gb * 1e9 / len(paths) / 2**20}


def train_rate(batches: Iterator[torch.Tensor], steps: int) -> float:
    """Steady-state tokens/s of fit() on the default SAE (the first 10 steps not counted)."""
    sae = build_sae("relu", 128, 1024, seed=0, l1_coeff=5.0)
    cfg = FitConfig(tokens=steps * BATCH, batch_size=BATCH, dtype="fp32", device="cpu")
    seen: list[tuple[int, float]] = []
    fit(sae, batches, cfg, on_step=lambda step, m: seen.append((step, time.perf_counter())))
    (s0, t0), (s1, t1) = seen[0], seen[-1]
    return (s1 - s0) * BATCH / (t1 - t0)


def train_rates(dir: Path, steps: int) -> dict[str, float]:
    """Training tokens/s fed from memory and fed by the loader (with and without its
    background threads), interleaved."""
    with ActivationLoader(dir, HOOK, BATCH, prefetch=0) as loader:
        in_memory = [next(loader) for _ in range(16)]
    feeds: dict[str, Callable[[], Iterator[torch.Tensor]]] = {
        "from memory": lambda: itertools.cycle(in_memory),
        "from the loader": lambda: ActivationLoader(dir, HOOK, BATCH, seed=1),
        "from the loader, prefetch=0": lambda: ActivationLoader(
            dir, HOOK, BATCH, seed=1, prefetch=0
        ),
    }
    out: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(REPEATS):
        for name, feed in feeds.items():
            batches = feed()
            out[name].append(train_rate(batches, steps))
            if isinstance(batches, ActivationLoader):
                batches.close()
    return {name: statistics.median(r) for name, r in out.items()}


def machine() -> str:
    return f"{cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(
    read: dict[tuple[int, int], dict[str, float]], train: dict[str, float], sizes: str, steps: int
) -> str:
    lines = [
        START,
        "## Loader (`python benchmarks/bench_loader.py`)",
        "",
        f"{datetime.date.today().isoformat()} · {machine()}.",
        f"Synthetic bf16 caches: {sizes}. Batch 4096, buffer_rows 262,144, BOS rows excluded.",
        "Rates in GB/s of shard-file bytes, files warm in the page cache (dropping them needs",
        f"root); medians of {REPEATS} runs: the raw reads interleaved, the loader one epoch at a",
        "time, back to back, from one loader (as in training), after a warm-up epoch.",
        "",
        "| d_in | rows/shard (file) | raw read() | raw mmap copy | loader | loader, prefetch=0 "
        "| loader ÷ read() | loader ÷ mmap copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (d_in, rows), r in read.items():
        ratio_read, ratio_mmap = r["loader"] / r["raw read()"], r["loader"] / r["raw mmap copy"]
        lines.append(
            f"| {d_in} | {rows:,} ({r['file MiB']:.0f} MiB) | {r['raw read()']:.2f} "
            f"| {r['raw mmap copy']:.2f} | {r['loader']:.2f} | {r['loader, prefetch=0']:.2f} "
            f"| **{ratio_read:.2f}** | **{ratio_mmap:.2f}** |"
        )
    loader_tok = min(r["tokens/s"] for (d_in, _), r in read.items() if d_in == 128)
    mem, fed, fed0 = (
        train[k] for k in ("from memory", "from the loader", "from the loader, prefetch=0")
    )
    lines += [
        "",
        "Target (a): ≥ 0.4 of the raw read rate. `raw read()` is a plain `open().read()` per file;",
        "`raw mmap copy` copies each file out of a memory map into a reused buffer. On this VM",
        "`read()` swings with the file size: into fresh pages for files over 32 MiB (glibc maps",
        "big blocks anew), into reused, partly cache-resident memory below; the mmap copy does",
        "not, and is the steadier, harder bar. The loader decodes each shard once (pyarrow) and",
        "gathers every batch row by row from a window of 262,144 rows (64-384 MiB): two passes",
        "over the bytes, the second at random, where the raw read makes one sequential pass.",
        "",
        "Training: relu SAE, d_in 128, d_sae 1024, batch 4096, fp32, `fit()`; tokens/s over steps",
        f"10–{steps}, median of {REPEATS} runs, from memory and from the loader interleaved.",
        "",
        "| | tokens/s | ratio |",
        "|---|---|---|",
        f"| loader alone, d_in 128 (the slower cache above) | {loader_tok:,.0f} | |",
        f"| training, batches from memory | {mem:,.0f} | |",
        f"| training, batches from the loader | {fed:,.0f} | |",
        f"| training, batches from the loader, prefetch=0 | {fed0:,.0f} | {fed0 / mem:.2f} |",
        f"| **(b) loader ÷ training** (target ≥ 5) | | **{loader_tok / mem:.0f}** |",
        f"| **(c) training from the loader ÷ from memory** (1: never waits) | "
        f"| **{fed / mem:.2f}** |",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small caches; do not write the file")
    args = ap.parse_args()
    # (d_in, rows per shard, shards): 1.2 GB, 270 MB, 270 MB; 3-4 windows of 262,144 rows
    caches = [(768, 65_536, 12), (128, 65_536, 16), (128, 131_072, 8)]
    if args.quick:
        caches = [(d_in, rows, n // 4) for d_in, rows, n in caches]
    sizes = "; ".join(f"d_in {d} × {r:,} rows × {n} shards" for d, r, n in caches)
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        read = {}
        for d_in, rows, n in caches:
            dir = Path(tmp) / f"d{d_in}-{rows}"
            paths = build_cache(dir, d_in, n, rows)
            read[d_in, rows] = read_rates(dir, paths)
            print(
                f"d_in {d_in}, {rows} rows/shard: "
                + ", ".join(f"{k} {v:,.2f}" for k, v in read[d_in, rows].items())
            )
        steps = 20 if args.quick else 30
        train = train_rates(Path(tmp) / "d128-65536", steps)
        print(", ".join(f"training {k}: {v:,.0f} tokens/s" for k, v in train.items()))
    section = report(read, train, sizes, steps)
    if not args.quick:
        write_section(section, START, END)
    print(section)


if __name__ == "__main__":
    main()
