"""A real scaling-law study on the offline default model (issue 9): `saeflow scaling` with the
default grid (scaling.d_sae × scaling.tokens × scaling.lr = 4 × 3 × 3 relu SAEs on the stdlib
GPT-2's blocks.2.resid_post), timed, its exponents and frontier written to BENCHMARKS.md and
set against the qualitative findings of "Scaling Monosemanticity" (2024).

    python benchmarks/bench_scaling.py [--home DIR] [overrides]

The model and its activation caches are built first (`saeflow cache`, timed apart) in DIR
(default ~/.saeflow-bench-scaling), then the study runs on them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from benchmd import ROOT, cpu, write_section

START, END = "<!-- bench_scaling:start -->", "<!-- bench_scaling:end -->"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def newest_study(home: Path) -> Path:
    studies = sorted(
        (home / "features" / "scaling").glob("study=*"), key=lambda p: p.stat().st_mtime
    )
    return studies[-1]


def findings(fits: dict[str, dict], points: list[dict], splits: list[dict]) -> list[str]:
    """The paper's qualitative claims, each checked against this study's fits."""

    def law(q: str) -> str:
        f = fits[q]
        return f"{f['exponent']:+.3f} [{f['exponent_lo']:+.3f}, {f['exponent_hi']:+.3f}]"

    def sign(q: str) -> int:
        f = fits[q]
        return 1 if f["exponent_lo"] > 0 else -1 if f["exponent_hi"] < 0 else 0

    said = {1: "yes", -1: "no", 0: "not resolved (the interval spans 0)"}
    out = [
        f"- *Loss falls as a power law in compute*: exponent {law('loss')} — "
        + {-1: "yes", 1: "no", 0: "not resolved (the interval spans 0)"}[sign("loss")]
        + f"; held-out FVU {law('fvu')}.",
        f"- *The compute-optimal number of features grows as a power law*: {law('d_sae')} — "
        + said[sign("d_sae")]
        + ".",
        f"- *…and so does the compute-optimal number of training tokens*: {law('tokens')} — "
        + said[sign("tokens")]
        + f" (for C ∝ N·D the two exponents sum to 1: here "
        f"{fits['d_sae']['exponent'] + fits['tokens']['exponent']:.3f}).",
        f"- *The best learning rate decreases with compute*: {law('lr')} — "
        + {-1: "yes", 1: "no", 0: "not resolved (the interval spans 0)"}[sign("lr")]
        + f"; the best lr is at the grid's edge in {fits['lr']['at_grid_edge']:.0%} of the cells"
        + " (there the fit only bounds the optimum).",
    ]
    if splits:
        pairs = sorted({(r["small_d_sae"], r["large_d_sae"]) for r in splits})
        parts = []
        for small, large in pairs:
            rows = [r for r in splits if (r["small_d_sae"], r["large_d_sae"]) == (small, large)]
            parents = {r["parent"]: r["n_children"] for r in rows}
            split = sum(1 for n in parents.values() if n >= 2)
            parts.append(
                f"{small}→{large}: {split} of {small} features split "
                f"(≥ 2 children at cosine ≥ 0.5), {len(rows)} of {large} children matched"
            )
        out.append("- *Features split as the dictionary grows*: " + "; ".join(parts) + ".")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=str(Path.home() / ".saeflow-bench-scaling"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    env = os.environ | {"SAEFLOW_HOME": args.home, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "flows.cli"]
    cache_s = timed([*cli, "cache", *args.overrides], env)
    study_s = timed([*cli, "scaling", *args.overrides], env)
    out = newest_study(Path(args.home))
    fits = {r["quantity"]: r for r in pq.read_table(out / "fits.parquet").to_pylist()}
    points = pq.read_table(out / "points.parquet").to_pylist()
    splits = (
        pq.read_table(out / "splits.parquet").to_pylist()
        if (out / "splits.parquet").is_file()
        else []
    )
    budget = fits["loss"]["budget"]
    frontier = sorted((p for p in points if p["frontier"]), key=lambda p: p["compute"])
    rows = "\n".join(
        f"| {p['compute']:.3g} | {p['d_sae']} | {p['tokens']:,} | {p['lr']:g} | {p['loss']:.4f} | "
        f"{p['fvu']:.4f} | {p['l0']:.1f} |"
        for p in frontier
    )
    laws = "\n".join(
        f"| {q} | {f['exponent']:+.3f} | [{f['exponent_lo']:+.3f}, {f['exponent_hi']:+.3f}] | "
        f"{f['n_points']} | {f['at_budget']:.4g} |"
        for q, f in fits.items()
    )
    section = f"""{START}
## Scaling study (`python benchmarks/bench_scaling.py`)

{datetime.date.today()}, {cpu()}, no GPU. `saeflow scaling` with the default grid on the offline
default model (stdlib GPT-2, 4 × 128, `blocks.2.resid_post`, d_in 128): {len(points)} relu SAEs,
d_sae {sorted({p["d_sae"] for p in points})} × tokens {sorted({p["tokens"] for p in points})}
× lr {sorted({p["lr"] for p in points})}, from one 1M-token cache. Wall time: model + caches
{cache_s / 60:.1f} min (`saeflow cache`), then the study {study_s / 60:.1f} min (training,
evaluation and feature stats of every SAE, the fits, the splits, the report).

Compute-efficient SAEs (least final training loss per ×2 compute bin):

| compute (FLOPs) | d_sae | tokens | lr | final loss | held-out FVU | L0 |
|---|---|---|---|---|---|---|
{rows}

Fitted power laws y ≈ a·C^b (90% bootstrap interval on b), and their value at {budget:.3g}
FLOPs (10× the largest budget):

| y | b | interval | points | at {budget:.3g} |
|---|---|---|---|---|
{laws}

Against the paper's qualitative findings:

{chr(10).join(findings(fits, points, splits))}
{END}"""
    write_section(section, START, END)
    print(section)


if __name__ == "__main__":
    main()
