"""Training throughput per architecture and FLOP utilisation (issue 4; DESIGN §9).

Tokens/s of one optimiser step (`sae.training.fit.train_step`: forward, backward, clip, Adam,
decoder hooks) at d_in 768, d_sae ∈ {8192, 24576}, batch 4096, against the machine's own
matrix-product rate measured in the same run on the encoder's shape, (4096, 768) @ (768, d_sae):

    dense SAE (relu, jumprelu)       ≈ 10·d_in·d_sae FLOPs per token: 2 products of 2·d·m forward
                                       (encoder, decoder), 3 backward (∂f, ∂W_dec, ∂W_enc)
    topk, batchtopk (sparse)         ≈ 2·d_in·d_sae + 8·d_in·k: a dense encoder product, the rest
                                       on the k picked latents only (SparseGather, embedding bag)
    topk-dense (the baseline)        a TopK SAE as most code writes it: dense f @ W_dec and the
                                       dense encoder backward, 10·d_in·d_sae

Utilisation = counted FLOPs per token × tokens/s ÷ matmul rate. Targets: dense ≥ 50% of the
matmul rate, topk sparse ≥ 3× topk-dense. bf16 is measured only where the CPU has native bf16
(`sae.hardware.cpu_has_fast_bf16`); elsewhere autocast emulates it far slower than fp32, which
is why dtype=auto picks fp32 there, and the table says so.

    python benchmarks/bench_train.py             # writes the Training section of BENCHMARKS.md
    python benchmarks/bench_train.py --quick     # d_sae 8192 only, prints only
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from benchmd import cpu, write_section
from torch import Tensor

from sae.hardware import cpu_has_fast_bf16
from sae.models.base import SAEOutput, reusing_buffers, sq_err
from sae.models.config import SAEConfig
from sae.models.registry import build_sae
from sae.models.topk import TopKSAE
from sae.training.fit import train_step

START, END = "<!-- bench_train:start -->", "<!-- bench_train:end -->"
D_IN, BATCH, K = 768, 4096, 32


class DenseTopK(TopKSAE):
    """The baseline: TopK through a dense (N, d_sae) code, autograd's dense backward."""

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> SAEOutput:
        z = self.pre_acts(x)
        vals, idx = z.topk(self.k, dim=-1, sorted=False)
        f = torch.zeros_like(z).scatter(-1, idx, vals.relu())
        x_hat = f @ self.W_dec + self.b_dec
        err = sq_err(x, x_hat)
        fvu = err.sum() / sq_err(x, x.mean(0)).sum()
        return SAEOutput(x_hat, f, fvu, err.mean() / self.d_in, fvu.new_zeros(()))


def flops_per_token(arch: str, d_sae: int) -> float:
    if arch in ("topk", "batchtopk"):
        return 2 * D_IN * d_sae + 8 * D_IN * K
    return 10 * D_IN * d_sae


def make(arch: str, d_sae: int) -> torch.nn.Module:
    if arch == "topk-dense":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return DenseTopK(D_IN, SAEConfig(arch="topk", d_sae=d_sae, k=K))
    hp = {"k": K} if arch in ("topk", "batchtopk") else {}
    return build_sae(arch, D_IN, d_sae, seed=0, **hp)


def step_time(arch: str, d_sae: int, bf16: bool, steps: int) -> float:
    """Median seconds per train_step after one warm-up step (buffers reused as in fit's loop)."""
    sae = make(arch, d_sae).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1)) * 0.7
    times = []
    with reusing_buffers():
        for i in range(steps + 1):
            t = time.perf_counter()
            train_step(sae, opt, x, 1.0, 1.0, bf16)
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(d_sae: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of (BATCH, D_IN) @ (D_IN, d_sae) in `dtype`, median of `repeats`."""
    a = torch.randn(BATCH, D_IN).to(dtype)
    b = torch.randn(D_IN, d_sae).to(dtype)
    out = a @ b  # into one output throughout: a fresh one is page-faulted in, as steps' are not
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2 * BATCH * D_IN * d_sae / statistics.median(times)


def machine() -> str:
    return f"{cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def run(sizes: list[int], steps: int) -> str:
    dtypes = ["fp32"] + (["bf16"] if cpu_has_fast_bf16() else [])
    rows = []
    for d_sae in sizes:
        for dtype in dtypes:
            rate = matmul_rate(d_sae, torch.float32 if dtype == "fp32" else torch.bfloat16)
            per = {}
            for arch in ("relu", "jumprelu", "topk", "batchtopk", "topk-dense"):
                per[arch] = BATCH / step_time(arch, d_sae, dtype == "bf16", steps)
                fl = flops_per_token("relu" if arch == "topk-dense" else arch, d_sae)
                rows.append((d_sae, dtype, arch, per[arch], fl * per[arch] / rate, rate))
                print(rows[-1], flush=True)
            rows.append((d_sae, dtype, "topk ÷ topk-dense", per["topk"] / per["topk-dense"], 0, 0))
    lines = [
        START,
        "## Training (`python benchmarks/bench_train.py`)",
        "",
        f"{datetime.date.today()} · {machine()}.",
        f"One optimiser step (`train_step`) at d_in {D_IN}, batch {BATCH}, k {K}; median of "
        f"{steps} steps after a warm-up. Utilisation = counted FLOPs/token × tokens/s ÷ the "
        "matmul rate of (4096, 768) @ (768, d_sae) measured in the same run.",
        "",
        "| d_sae | dtype | arch | tokens/s | FLOP utilisation | matmul GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for d_sae, dtype, arch, tps, util, rate in rows:
        if rate:
            lines.append(
                f"| {d_sae} | {dtype} | {arch} | {tps:,.0f} | {util:.0%} | {rate / 1e9:.1f} |"
            )
        else:
            lines.append(f"| {d_sae} | {dtype} | **{arch}** | **{tps:.2f}×** | | |")
    if "bf16" not in dtypes:
        emu = matmul_rate(1024, torch.bfloat16, 1) / 1e9  # small: emulated bf16 is that slow
        lines += [
            "",
            f"bf16 not run: this CPU has no native bf16 matmuls (bf16 matmul {emu:.1f} GFLOP/s "
            "here vs fp32 in the table), so `train.dtype=auto` trains in fp32.",
        ]
    return "\n".join([*lines, END, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    section = run([8192] if args.quick else [8192, 24576], args.steps)
    print(section)
    if not args.quick:
        write_section(section, START, END)


if __name__ == "__main__":
    main()
