"""saeflow against its peers, SAELens and EleutherAI sparsify, on the same known-answer data.

Each library trains from its own defaults (sizes aside) for ONE pass over the same in-memory
batches of `sae.activations.synthetic` data (1024 true features in d_in 256, ~16 on per sample), in
one run:

    saelens       SAELens StandardTrainingSAE (ReLU + L1), its SAETrainer (Adam, lr 3e-4)
    sparsify      sparsify SparseCoder (TopK, its default k = 32), its Trainer (SignSGD +
                  schedule-free, lr 5e-3·√(2^14 / d_sae)), batches fed through a stand-in model
    sparsify-k16  the same with k = 16, the data's true L0 and saeflow-topk's k
    saeflow-relu  build_sae("relu", 256, 2048) + fit(), FitConfig defaults, fp32
    saeflow-topk  build_sae("topk", 256, 2048, k=16) + fit(), FitConfig defaults, fp32

d_sae 2048, batches of 4096, --samples rows (the last partial batch dropped), all generated
before any clock starts. Reported: samples/s over the library's training call (set-up outside
it excluded; everything per step, and one-off work inside the call, included), and on a
held-out batch of 16,384: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², L0, and MMCS of the decoder rows
against the true features, all from each library's own encode/decode in fp32.

The peers are benchmark-only and never saeflow dependencies; install them in their own venv
(commands that worked on the 2-core CPU box, 2026-11; pip there resolves `torch==2.13.0` to the
+cpu wheel through a local wheel dir; elsewhere add `--index-url
https://download.pytorch.org/whl/cpu` to the torch line, or a plain pip pulls the CUDA build):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install --upgrade pip
    /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install torch==2.13.0 sae-lens==6.54.12 eai-sparsify==1.3.3

Neither peer pins torch, so torch stays 2.13.0. saeflow itself is not installed there: this
script puts the repository root on sys.path.

    /work/peers-venv/bin/python benchmarks/bench_peers.py --write     # full run, ~15 min
    /work/peers-venv/bin/python benchmarks/bench_peers.py --samples 100000 --only saeflow-topk
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from benchmd import cpu, write_section
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the peers venv does not install saeflow

from sae.activations.synthetic import mean_max_cos, sparse_batches, unit_rows  # noqa: E402
from sae.analysis import metrics  # noqa: E402
from sae.models.registry import build_sae  # noqa: E402
from sae.training.fit import FitConfig, fit  # noqa: E402

D_IN, D_SAE, BATCH, ACTIVE, N_FEATURES, EVAL_ROWS = 256, 2048, 4096, 16, 1024, 16384
START, END = "<!-- bench_peers:start -->", "<!-- bench_peers:end -->"

EncodeDecode = Callable[[Tensor], tuple[Tensor, Tensor]]  # x (N, d_in) -> f (N, d_sae), x̂


@dataclass
class Trained:
    seconds: float
    """Wall time of the library's training call (minus any checkpoint writes inside it)."""
    encode_decode: EncodeDecode
    W_dec: Tensor
    """(d_sae, d_in): row i is latent i's decoder direction."""
    steering: tuple[float, int, list[tuple[int, float]]] | None = None
    """A run steered to an L0: (target_l0, steps, [(step, L0) every `log_every` steps])."""


# --- the contenders ---------------------------------------------------------------------------
def train_saelens(batches: list[Tensor]) -> Trained:
    """SAELens's SAETrainer on StandardTrainingSAE, both at their defaults except:
    d_in, d_sae, total_training_samples, train_batch_size_samples (the sizes), and lr_end = lr/10
    (SAETrainer asserts it is set; LanguageModelSAERunnerConfig sets it so; a constant schedule
    ignores it). Defaults that matter: l1_coefficient 1.0 without warm-up, no input
    normalisation, b_dec subtracted from the input, decoder rows init at norm 0.1, Adam(0.9,
    0.999) at a constant 3e-4, grad clip 1.0, fp32, W&B off."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)  # SAELens draws its initial weights from the global RNG
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    cfg = SAETrainerConfig(
        total_training_samples=len(batches) * BATCH,
        train_batch_size_samples=BATCH,
        lr_end=3e-4 / 10,
    )
    trainer = SAETrainer(cfg, sae, iter(batches))
    t0 = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - t0

    def encode_decode(x: Tensor) -> tuple[Tensor, Tensor]:
        f = sae.encode(x)
        return f, sae.decode(f)

    return Trained(seconds, encode_decode, sae.W_dec.detach())


class _Replay(nn.Module):
    """Stands in for the language model sparsify's Trainer hooks: input_ids (S, 128) hold the
    global index of each sequence; layer 0 returns those sequences' rows of the pre-generated
    batches (S, 128, d_in), a view, no copy. Sequences of 128 tokens let the Trainer keep its
    default batch_size of 32 sequences = one 4096-row batch per step."""

    T = 128

    def __init__(self, batches: list[Tensor]):
        super().__init__()
        self.batches = batches
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, self.T, dtype=torch.long)}

    base_model = property(lambda self: self)
    device = property(lambda self: torch.device("cpu"))

    def forward(self, input_ids: Tensor) -> Tensor:
        per_batch = BATCH // self.T
        first = int(input_ids[0, 0])
        b, i = divmod(first, per_batch)
        if i + input_ids.shape[0] > per_batch or not torch.equal(
            input_ids[:, 0], torch.arange(first, first + input_ids.shape[0])
        ):
            raise ValueError("the Trainer must ask for consecutive sequences of one batch")
        seqs = self.batches[b].view(per_batch, self.T, -1)[i : i + input_ids.shape[0]]
        return self.layers[0](seqs)


def train_sparsify(batches: list[Tensor], k: int | None = None) -> Trained:
    """sparsify's own Trainer.fit on SparseCoder, both at their defaults except: num_latents
    (d_sae), k when given, log_to_wandb=False, save_dir (a temp dir). Defaults that matter:
    TopK k 32, unit-norm decoder rows, loss FVU without AuxK (auxk_alpha 0), b_dec = mean of the
    first batch, SignSGD in a schedule-free wrapper (momentum 0.95), lr 5e-3·√(2^14/d_sae), no
    lr schedule, batch 32 sequences (here of 128 tokens). The SAE evaluated is the one the
    Trainer saves (schedule-free's averaged weights), read back from disk; its checkpoint writes
    are off the clock."""
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

    class TimedTrainer(Trainer):
        saving = 0.0  # seconds spent writing checkpoints inside fit(), left off the clock

        def save(self) -> None:
            t0 = time.perf_counter()
            super().save()
            self.saving += time.perf_counter() - t0

    per_batch = BATCH // _Replay.T
    data = [{"input_ids": torch.full((_Replay.T,), s)} for s in range(len(batches) * per_batch)]
    sae_cfg = SaeConfig(num_latents=D_SAE) if k is None else SaeConfig(num_latents=D_SAE, k=k)
    precision = torch.get_float32_matmul_precision()  # Trainer.fit sets "high", process-wide
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(sae_cfg, log_to_wandb=False, save_dir=tmp)
        trainer = TimedTrainer(cfg, data, _Replay(batches))
        t0 = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0 - trainer.saving
        sae = SparseCoder.load_from_disk(Path(tmp) / "unnamed" / "layers.0")
    torch.set_float32_matmul_precision(precision)

    def encode_decode(x: Tensor) -> tuple[Tensor, Tensor]:
        top_acts, top_indices, _ = sae.encode(x)
        f = x.new_zeros(x.shape[0], sae.num_latents).scatter_(1, top_indices, top_acts)
        return f, sae.decode(top_acts, top_indices)

    return Trained(seconds, encode_decode, sae.W_dec.detach())


def train_saeflow(
    batches: list[Tensor], arch: str, fit_kw: dict | None = None, **hparams: float
) -> Trained:
    """saeflow's fit() with FitConfig defaults (or `fit_kw`) but the sizes and dtype fp32."""
    sae = build_sae(arch, D_IN, D_SAE, seed=0, **hparams)
    cfg = FitConfig(tokens=len(batches) * BATCH, batch_size=BATCH, dtype="fp32", **(fit_kw or {}))
    t0 = time.perf_counter()
    sae = fit(sae, iter(batches), cfg)
    seconds = time.perf_counter() - t0

    def encode_decode(x: Tensor) -> tuple[Tensor, Tensor]:
        f = sae.encode(x)
        return f, sae.decode(f)

    return Trained(seconds, encode_decode, sae.W_dec.detach())


CONTENDERS: dict[str, Callable[[list[Tensor]], Trained]] = {
    "saelens": train_saelens,
    "sparsify": train_sparsify,
    "sparsify-k16": lambda b: train_sparsify(b, k=16),
    "saeflow-relu": lambda b: train_saeflow(b, "relu"),
    "saeflow-topk": lambda b: train_saeflow(b, "topk", k=16),
    # Not defaults: the relu defaults (lr 1e-3, λ 5) kill every latent on this data. The best of
    # a small grid (lr 1e-3/3e-4/1e-4, λ 5/1, target_l0 16 or not) at 488 steps: lr 3e-4, λ 1.
    "saeflow-relu-tuned": lambda b: train_saeflow(b, "relu", {"lr": 3e-4}, l1_coeff=1.0),
}
RATIOS = [
    ("saeflow-relu", "saelens"),
    ("saeflow-relu-tuned", "saelens"),
    ("saeflow-topk", "sparsify"),
    ("saeflow-topk", "sparsify-k16"),
]


# --- measuring --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(t: Trained, x: Tensor, features: Tensor, samples: int) -> dict[str, float]:
    """samples/s, and FVU, L0 (held-out x (N, d_in)) and MMCS (against features (n, d_in))."""
    f, x_hat = t.encode_decode(x.float())
    return {
        "samples/s": samples / t.seconds,
        "seconds": t.seconds,
        "fvu": metrics.fvu(x, x_hat.float()),
        "l0": metrics.l0(f),
        "mmcs": mean_max_cos(features, t.W_dec.float()),
    }


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name, module in (("sae-lens", "sae_lens"), ("eai-sparsify", "sparsify")):
        try:
            out[name] = __import__(module).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def report(results: dict[str, dict[str, float]], samples: int, threads: int) -> str:
    v = versions()
    lines = [
        START,
        "## Peers (`python benchmarks/bench_peers.py --write`, in the peers venv)",
        "",
        f"{datetime.date.today()} · {cpu()}; torch {v['torch']}, {threads} threads; "
        f"sae-lens {v['sae-lens']}, eai-sparsify {v['eai-sparsify']}, saeflow (this tree).",
        f"`sae.activations.synthetic`: {N_FEATURES} unit features (seed 1000) in d_in {D_IN}, "
        f"~{ACTIVE} on per sample; one pass over {samples:,} samples in batches of {BATCH} "
        f"(seed 1), held in memory before timing; d_sae {D_SAE}; fp32. Each library trains from "
        "its own defaults (see the script's docstrings for every setting passed). samples/s "
        f"over the library's training call; FVU, L0, MMCS on a held-out batch of {EVAL_ROWS:,} "
        "(seed 99).",
        "",
        "| contender | samples/s | s | FVU | L0 | MMCS |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['samples/s']:,.0f} | {r['seconds']:.1f} | {r['fvu']:.4f} "
            f"| {r['l0']:.1f} | {r['mmcs']:.3f} |"
        )
    lines.append("")
    for a, b in RATIOS:
        if a in results and b in results:
            ratio = results[a]["samples/s"] / results[b]["samples/s"]
            lines.append(f"- samples/s {a} ÷ {b}: **{ratio:.2f}**")
    return "\n".join([*lines, END, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2_000_000, help="training samples, one pass")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    if bad := [n for n in names if n not in CONTENDERS]:
        ap.error(f"unknown contender(s) {bad}; valid: {list(CONTENDERS)}")
    if args.samples < BATCH:
        ap.error(f"--samples must be >= {BATCH} (one batch), got {args.samples}")
    torch.set_num_threads(args.threads)

    features = unit_rows(N_FEATURES, D_IN, seed=1000)
    n_batches = args.samples // BATCH
    t0 = time.perf_counter()
    batches = list(itertools.islice(sparse_batches(features, BATCH, ACTIVE, seed=1), n_batches))
    x_eval = next(sparse_batches(features, EVAL_ROWS, ACTIVE, seed=99))
    print(f"generated {n_batches} batches of {BATCH} in {time.perf_counter() - t0:.1f} s")

    results: dict[str, dict[str, float]] = {}
    for name in names:
        gc.collect()  # the previous contender's garbage is not this one's time
        results[name] = evaluate(CONTENDERS[name](batches), x_eval, features, n_batches * BATCH)
        print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    section = report(results, n_batches * BATCH, args.threads)
    print(section)
    if args.write:
        write_section(section, START, END)


if __name__ == "__main__":
    main()
