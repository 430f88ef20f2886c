"""Known-answer benchmark: every saeflow architecture, and the peers, on data whose features are
known (`sae.activations.ground_truth`), in one run, on the same batches.

Data sets (d_in 256, 1024 true features, a_j ~ U(0, 1); features on per sample, measured on
65,536 samples: flat / offset 16.0, hard 13.6, tree 22.4):

    flat       Sharkey et al.: every feature equally likely, independent
    offset     flat + a constant vector of norm 10 (≈4× the signal's norm), as residual streams
    hard       Zipf frequencies (exponent 1), 64 parents with 4 children each (a child fires
               only with its parent), correlated firing (30% shared factors), offset 10, noise
    tree       hard, but each child's rate is 40% of its parent's (`child_rate`; on hard 5–20%,
               from the children's Zipf ranks; measured shares of the parents' firings, spread
               by the correlation: tree 0.20–0.59, hard 0.04–0.35): the nesting that makes an
               SAE absorb a parent into its children (Chanin et al. 2024)

Contenders train ONE pass over the same pre-generated batches of 4096 (d_sae 2048, fp32; the
`-auto` rows in saeflow's default dtype: bf16 autocast where the CPU has native bf16 matmuls;
the peers' CPU defaults are fp32) from their own defaults (saeflow's: `SAEConfig` and
`conf/sae/<arch>.yaml`, as `sae=<arch>` trains); k = 16 (flat data's L0) for the top-k
family, and relu at its default λ and relu and jumprelu steered to L0 16 (`target_l0`), and
relu with its recipe before 2026-12-05 (no encoder centre, `train.scale=norm`, lr 1e-3), and
topk and matryoshka trained on each token's top 24 with a learnt threshold that keeps 16 on
average at inference (`-x1.5`: `sae.k_train_factor=1.5`).
Peers (`saelens`, `sparsify-k16`) come from bench_peers.py and run only where that venv has
them (see its docstring). Scores on 16,384 held-out samples: FVU, L0, MMCS, dead latents (never
active there; `dead 262k`: on 262,144 held-out samples, which sees latents that fire once in
~100k), and for each true feature matched to a distinct latent the firing precision/recall/F1
and the MCC, and on hard and tree data the F1 of the 64 parents alone
(absorption into children shows there; `ground_truth.score`); samples/s over the training call;
for the rows steered to L0 16, how their L0 got there (`settling`: the issue-16 target is the
end within 5%, no swing past ±30% after the first 20% of the steps).

    .venv/bin/python benchmarks/bench_ground_truth.py --samples 1000000 --data flat offset
    .venv/bin/python benchmarks/bench_ground_truth.py --write   # all, ~65 min (peers: dev extras)
    .venv/bin/python benchmarks/bench_ground_truth.py --speed 3 --samples 1000000 --write
    .venv/bin/python benchmarks/bench_ground_truth.py --only saeflow-relu --data offset \
        --dead-samples 4194304   # which latents stay silent on 4M held-out samples
    .venv/bin/python benchmarks/bench_ground_truth.py --only saeflow-matryoshka --data hard \
        --set sae.matryoshka_fractions=[0.25,1.0] --set train.lr=0.006   # an ablation
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from benchmd import cpu, write_section
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the peers venv does not install saeflow

from bench_peers import BATCH, D_IN, D_SAE, Trained, train_saelens, train_sparsify  # noqa: E402

from sae.activations.ground_truth import (  # noqa: E402
    DEAD_SAMPLES,
    SCORE_SAMPLES,
    GroundTruth,
    score,
)
from sae.hardware import resolve_dtype  # noqa: E402
from sae.models.config import SAEConfig  # noqa: E402
from sae.models.registry import build_sae, hparam_names  # noqa: E402
from sae.training.fit import FitConfig, fit  # noqa: E402

START, END = "<!-- bench_ground_truth:start -->", "<!-- bench_ground_truth:end -->"


def dead_column(n: int) -> str:
    """The dead_long column's name for a count on n held-out samples ("dead 262k")."""
    return f"dead {n // 1000}k"


SPEED_START = "<!-- bench_ground_truth_speed:start -->"
SPEED_END = "<!-- bench_ground_truth_speed:end -->"
SPEED = {  # --speed: saeflow contender -> the peer it is timed against
    "saeflow-topk": "sparsify-k16",
    "saeflow-topk-auto": "sparsify-k16",
    "saeflow-relu": "saelens",
    "saeflow-relu-auto": "saelens",
}
DATA = {
    "flat": GroundTruth(d_in=D_IN, n_features=1024, active=16),
    "offset": GroundTruth(d_in=D_IN, n_features=1024, active=16, offset=10.0),
    "hard": GroundTruth(
        d_in=D_IN,
        n_features=1024,
        active=16,
        zipf=1.0,
        parents=64,
        children=4,
        correlation=0.3,
        offset=10.0,
        noise=0.5,
    ),
}
DATA["tree"] = dataclasses.replace(DATA["hard"], child_rate=0.4)


def group_defaults(arch: str) -> dict[str, Any]:
    """What `sae=<arch>` sets beyond SAEConfig's defaults (`conf/sae/<arch>.yaml`; jumprelu:
    l1_coeff 0.2): the values `saeflow train sae=<arch>` starts from."""
    values = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "sae" / f"{arch}.yaml"))
    assert isinstance(values, dict)
    return {k: v for k, v in values.items() if k != "arch"}


OVERRIDES: dict[str, dict[str, Any]] = {"sae": {}, "train": {}}
"""`--set sae.KEY=VALUE` / `train.KEY=VALUE`: applied to every saeflow contender of the run
whose architecture reads the key, after its own values (an ablation; `--write` refuses them,
the tables show the defaults)."""


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--set` items -> {"sae": {...}, "train": {...}}, each value parsed as YAML (1.5, [0.25,
    1.0], true, auto) and checked by SAEConfig / FitConfig when a contender is built."""
    out: dict[str, dict[str, Any]] = {"sae": {}, "train": {}}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or section not in out or not name:
            raise SystemExit(f"--set {item!r}: expected sae.KEY=VALUE or train.KEY=VALUE")
        known = SAEConfig if section == "sae" else FitConfig
        if name not in {f.name for f in dataclasses.fields(known)}:
            raise SystemExit(f"--set {item!r}: {section}.{name} is not a field of {known.__name__}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out[section][name] = parsed
    return out


def saeflow(
    arch: str, fit_kw: dict | None = None, **hparams: Any
) -> Callable[[list[torch.Tensor]], Trained]:
    """saeflow's fit() from its defaults (the arch's default lr, its config group's values) or
    `fit_kw` and `hparams`, the sizes, fp32 unless `fit_kw` names a dtype."""

    def train(batches: list[torch.Tensor]) -> Trained:
        reads = {*hparam_names(arch), "target_l0"}
        values = group_defaults(arch) | hparams
        values |= {k: v for k, v in OVERRIDES["sae"].items() if k in reads}
        sae = build_sae(arch, D_IN, D_SAE, seed=0, **values)
        n = len(batches) * BATCH
        fit_values = {"dtype": "fp32"} | (fit_kw or {}) | OVERRIDES["train"]
        cfg = FitConfig(tokens=n, batch_size=BATCH, **fit_values)
        trace: list[tuple[int, float]] = []
        steered = values.get("target_l0") is not None  # only these log: the rest time as before
        on_step = (lambda step, m: trace.append((step, m["l0"]))) if steered else None
        t0 = time.perf_counter()
        sae = fit(sae, iter(batches), cfg, on_step)
        seconds = time.perf_counter() - t0
        steering = (float(values["target_l0"]), cfg.steps, trace) if steered else None
        return Trained(
            seconds, lambda x: (sae.encode(x), sae(x).x_hat), sae.W_dec.detach(), steering
        )

    return train


def settling(target: float, steps: int, trace: list[tuple[int, float]]) -> dict[str, float]:
    """How a steered run's L0 reached its target: `end` (the last L0's error, a fraction of the
    target), `inside` (the fraction of the steps after which every logged L0 is within ±30% of
    it), and `swing`: after the first 20% of the steps, the largest move back away from the
    target, as a ratio (|ln(L0_t / T)| above its least value since 20%, as exp(·) − 1), so a
    monotone approach scores 0 and an overshoot or a rebound its size (L0 117 → 135 at a
    target of 16: 15%; 16.0 → 13.9: 15%); a rebound under way at 20% counts from there. In log
    units because the controller steers ln L0 and the band is relative. NaN without a trace."""
    if not trace or not steps:
        return dict.fromkeys(("end", "inside", "swing"), math.nan)
    near = [abs(l0 / target - 1) <= 0.3 for _, l0 in trace]
    inside = next((s for i, (s, _) in enumerate(trace) if all(near[i:])), steps)
    err = [(s, abs(math.log(max(l0, 1e-3) / target))) for s, l0 in trace]
    swing, least = 0.0, math.inf
    for s, e in err:
        if s >= 0.2 * steps:
            least = min(least, e)
            swing = max(swing, e - least)
    return {"end": trace[-1][1] / target - 1, "inside": inside / steps, "swing": math.expm1(swing)}


CONTENDERS: dict[str, Callable[[list[torch.Tensor]], Trained]] = {
    "saeflow-relu": saeflow("relu"),
    "saeflow-relu-auto": saeflow("relu", {"dtype": "auto"}),  # saeflow's default dtype
    "saeflow-relu-l0=16": saeflow("relu", target_l0=16.0),
    # relu's recipe before 2026-12-05: no encoder centre, the scale by the norm, lr 1e-3
    "saeflow-relu-uncentred": saeflow("relu", {"scale": "norm", "lr": 1e-3}, centre=False),
    "saeflow-jumprelu-l0=16": saeflow("jumprelu", target_l0=16.0),
    "saeflow-topk": saeflow("topk", k=16),
    "saeflow-topk-auto": saeflow("topk", {"dtype": "auto"}, k=16),
    "saeflow-batchtopk": saeflow("batchtopk", k=16),
    "saeflow-matryoshka": saeflow("matryoshka", k=16),
    # the paper's Matryoshka BatchTopK (saeflow's default before 2026-12-07)
    "saeflow-matryoshka-batch": saeflow("matryoshka", k=16, matryoshka_topk="batch"),
    # trained on each token's top 24, a learnt threshold keeps 16 on average (sae.k_train_factor)
    "saeflow-topk-x1.5": saeflow("topk", k=16, k_train_factor=1.5),
    "saeflow-matryoshka-x1.5": saeflow("matryoshka", k=16, k_train_factor=1.5),
    "sparsify-k16": lambda b: train_sparsify(b, k=16),
    "saelens": train_saelens,
}
PEERS = {"sparsify-k16": "sparsify", "saelens": "sae_lens"}


def available(name: str) -> bool:
    module = PEERS.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def table_rows(
    by_data: dict[str, dict[str, dict[str, float]]], cells: Callable[[dict[str, float]], str]
) -> list[str]:
    """One markdown row per (data set, contender): `| data | contender | cells(scores) |`."""
    return [f"| {d} | {n} | {cells(r)} |" for d, by in by_data.items() for n, r in by.items()]


def report(
    results: dict[str, dict[str, dict[str, float]]],
    samples: int,
    steered: dict[str, dict[str, dict[str, float]]],
    dead_n: int = DEAD_SAMPLES,
) -> str:
    lines = [
        START,
        "## Known features: every architecture and the peers on ground-truth data",
        "",
        "`benchmarks/bench_ground_truth.py` (data sets and scores in its docstring). "
        f"{datetime.date.today()} · {cpu()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. One pass over {samples:,} samples per data set "
        f"(batches of {BATCH}), d_sae {D_SAE}, fp32 (`-auto`: saeflow's default `dtype=auto`, "
        f"here {resolve_dtype('auto', torch.device('cpu'))}); scores on {SCORE_SAMPLES:,} held-out "
        "samples "
        f"(`{dead_column(dead_n)}`: latents never active on {dead_n:,} held-out samples, those "
        f"{SCORE_SAMPLES:,} first).",
        "",
        f"| data | contender | FVU | L0 | MMCS | dead | {dead_column(dead_n)} | precision "
        "| recall | F1 | F1 parents | MCC | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += table_rows(
        results,
        lambda r: (
            f"{r['fvu']:.3f} | {r['l0']:.1f} | {r['mmcs']:.3f} | {r['dead']:.3f} | "
            f"{r['dead_long']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{'–' if math.isnan(r['f1_parents']) else format(r['f1_parents'], '.3f')} | "
            f"{r['mcc']:.3f} | {r['samples/s']:,.0f}"
        ),
    )
    if any(steered.values()):
        lines += [
            "",
            "L0 steering (`sae.target_l0`, the steered rows above): `end`, the last logged L0's "
            "error; `inside`, the fraction of the steps after which every logged L0 (every "
            f"{FitConfig.log_every} steps) stays within ±30% of the target; `swing`, after the "
            "first 20% of the steps, the largest move back away from the target, as a ratio (0 "
            "for a monotone approach; an overshoot or a rebound counts its size: L0 117 → 135 at "
            "a target of 16 is 15%).",
            "",
            "| data | contender | target | end | inside from | swing after 20% |",
            "|---|---|---|---|---|---|",
        ]
        lines += table_rows(
            steered,
            lambda r: f"{r['target']:g} | {r['end']:+.1%} | {r['inside']:.0%} | {r['swing']:.1%}",
        )
    return "\n".join([*lines, "", END])


def speed(batches: list[torch.Tensor], rounds: int) -> dict[str, list[float]]:
    """samples/s of `SPEED`'s contenders and peers on the same batches, `rounds` times round
    robin: on a shared VM one contender's rate moves by tens of percent from one minute to the
    next (2026-12-06: sparsify 47k samples/s on flat data, 67k on offset data, in one run), so
    single runs compare badly; medians of interleaved rounds compare better."""
    names = [n for n in dict.fromkeys([*SPEED, *SPEED.values()]) if available(n)]
    rates: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names:
            gc.collect()
            t = CONTENDERS[name](batches)
            rates[name].append(len(batches) * BATCH / t.seconds)
            print(f"round {i + 1} {name} {rates[name][-1]:,.0f} samples/s", flush=True)
    return rates


def speed_report(rates: dict[str, list[float]], samples: int, data: str) -> str:
    rounds = len(next(iter(rates.values())))
    lines = [
        SPEED_START,
        f"Speed alone (`--speed {rounds} --samples {samples} --data {data}`), "
        f"{datetime.date.today()} · {cpu()}: each contender trains one pass over the same "
        f"{samples:,} samples of `{data}`, {rounds} rounds round robin; samples/s: median, "
        "min, max.",
        "",
        "| contender | samples/s | min | max | ÷ peer (medians) |",
        "|---|---|---|---|---|",
    ]
    med = {n: statistics.median(r) for n, r in rates.items()}
    for name, r in rates.items():
        peer = SPEED.get(name)
        ratio = f"{med[name] / med[peer]:.2f}× {peer}" if peer in med else ""
        lines.append(f"| {name} | {med[name]:,.0f} | {min(r):,.0f} | {max(r):,.0f} | {ratio} |")
    return "\n".join([*lines, "", SPEED_END])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2_000_000, help="training samples per run")
    ap.add_argument("--data", nargs="*", default=list(DATA), choices=list(DATA))
    ap.add_argument("--only", nargs="*", default=None, help="contenders to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument(
        "--speed", type=int, default=0, metavar="ROUNDS", help="time SPEED's contenders only"
    )
    ap.add_argument(
        "--dead-samples",
        type=int,
        default=DEAD_SAMPLES,
        metavar="N",
        help=f"held-out samples a latent must stay silent on to count in `dead_long` (default "
        f"{DEAD_SAMPLES:,}; Anthropic counts a feature dead after 10^7 tokens)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value of every saeflow contender (sae.* or train.*), e.g. "
        "--set sae.k_train_factor=1.5 --set train.lr_decay_frac=0.4",
    )
    args = ap.parse_args()
    OVERRIDES.update(parse_set(args.set))
    if args.set and args.write:
        raise SystemExit("--write records saeflow's defaults: run --set without --write")
    if args.dead_samples != DEAD_SAMPLES and args.write:
        raise SystemExit(
            f"--write's table counts `{dead_column(DEAD_SAMPLES)}`: run --dead-samples without "
            "--write"
        )
    if args.dead_samples < SCORE_SAMPLES:
        raise SystemExit(
            f"--dead-samples {args.dead_samples}: at least the {SCORE_SAMPLES:,} scored"
        )
    torch.set_num_threads(args.threads)
    if args.set:
        print(f"saeflow contenders with {OVERRIDES}", flush=True)
    if args.speed:
        truth = DATA[args.data[0]]
        batches = list(itertools.islice(truth.batches(BATCH, seed=1), args.samples // BATCH))
        text = speed_report(speed(batches, args.speed), len(batches) * BATCH, args.data[0])
        print(text)
        if args.write:
            write_section(text, SPEED_START, SPEED_END)
        return
    names = [n for n in (args.only or CONTENDERS) if available(n)]
    results: dict[str, dict[str, dict[str, float]]] = {}
    steered: dict[str, dict[str, dict[str, float]]] = {}
    for data in args.data:
        truth = DATA[data]
        batches = list(itertools.islice(truth.batches(BATCH, seed=1), args.samples // BATCH))
        samples = len(batches) * BATCH
        results[data], steered[data] = {}, {}
        for name in names:
            gc.collect()
            t = CONTENDERS[name](batches)
            if t.steering is not None:
                steered[data][name] = {"target": t.steering[0], **settling(*t.steering)}
                print(data, name, "steering", steered[data][name], flush=True)
            r = score(
                truth, lambda x, t=t: t.encode_decode(x), t.W_dec.float(), dead_n=args.dead_samples
            )
            results[data][name] = r | {"samples/s": samples / t.seconds}
            print(data, name, {k: round(v, 4) for k, v in results[data][name].items()}, flush=True)
    text = report(results, samples, steered, args.dead_samples)
    print(text)
    if args.write:
        write_section(text, START, END)


if __name__ == "__main__":
    main()
