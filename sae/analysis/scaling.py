"""Scaling laws for SAE studies ("Scaling Monosemanticity"): compute, power-law fits with
bootstrap intervals, and the compute-efficient frontier.

    loss(C) ≈ a · C^b            fitted as log y = log a + b · log x (least squares)
    N_opt(C) ≈ a_N · C^b_N       the best dictionary size per compute budget, likewise
    D_opt(C) ≈ a_D · C^b_D       the best number of training tokens (b_N + b_D ≈ 1 when C ∝ N·D)
    lr_opt(C) ≈ a_η · C^b_η      the best learning rate of each (N, D) cell of the grid

A grid of SAEs (sizes × tokens × learning rates) gives one point per SAE. Budgets are binned by
compute (a bin spans a factor `bin_factor`); the point of least loss in each bin is that budget's
compute-efficient SAE, and loss, N_opt and D_opt are fitted through those points. The learning
rate is fitted through every (N, D) cell's best learning rate, at the cell's compute.

Compute C of training an SAE on T tokens (forward + backward, 2 FLOPs per multiply-add):
dense (relu, jumprelu) ≈ 10 · d_in · d_sae · T (DESIGN §9); topk/batchtopk with sparse
backward ≈ (2 · d_in · d_sae + 8 · d_in · k) · T (the encoder stays dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae.checks import positive
from sae.models.config import K_ARCHS


def training_flops(arch: str, d_in: int, d_sae: int, tokens: int, k: int = 0) -> float:
    """FLOPs to train one SAE on `tokens` tokens (see the module doc)."""
    if arch in K_ARCHS:  # topk, batchtopk, matryoshka: the sparse backward
        return float(2 * d_in * d_sae + 8 * d_in * k) * tokens
    return 10.0 * d_in * d_sae * tokens


@dataclass(frozen=True)
class PowerLaw:
    """y = coef · x^exponent, with a bootstrap interval on the exponent."""

    coef: float
    exponent: float
    exponent_lo: float
    exponent_hi: float
    n: int

    def __call__(self, x: float) -> float:
        return self.coef * x**self.exponent


def _loglog(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(log coef, exponent) of the least-squares line through (log x, log y)."""
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(log_a), float(b)


def fit_power_law(
    x: list[float], y: list[float], n_boot: int = 1000, level: float = 0.9, seed: int = 0
) -> PowerLaw:
    """Least squares in log-log space; the exponent's `level` interval from `n_boot` bootstrap
    resamples of the points (percentile method). Needs ≥ 3 points with x, y > 0."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) != len(ys) or len(xs) < 3:
        raise ValueError(f"a power-law fit needs ≥ 3 (x, y) pairs, got {len(xs)} and {len(ys)}")
    if (xs <= 0).any() or (ys <= 0).any():
        raise ValueError("a power-law fit needs x > 0 and y > 0 (it is a line in log-log)")
    log_a, b = _loglog(xs, ys)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(xs), len(xs))
        if len(np.unique(xs[i])) >= 2:  # a resample on one x has no slope
            boots.append(_loglog(xs[i], ys[i])[1])
    tail = (1 - level) / 2
    lo, hi = np.quantile(boots, [tail, 1 - tail]) if boots else (math.nan, math.nan)
    return PowerLaw(math.exp(log_a), b, float(lo), float(hi), len(xs))


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The compute-efficient frontier of (compute, loss) points: those that no point with less
    (or equal) compute beats on loss, sorted by compute."""
    out: list[tuple[float, float]] = []
    for c, loss in sorted(points):
        if not out or loss < out[-1][1]:
            out.append((c, loss))
    return out


@dataclass(frozen=True)
class Point:
    """One trained SAE of a scaling grid."""

    run_id: str
    d_sae: int
    tokens: int
    lr: float
    compute: float
    loss: float
    """The training objective at the end of training (what the paper's laws are about)."""
    fvu: float
    """Held-out fraction of variance unexplained."""
    l0: float


def best_per_budget(points: list[Point], bin_factor: float = 2.0, by: str = "loss") -> list[Point]:
    """The point of least `by` in each compute bin (bins of a factor `bin_factor`, from the
    least compute up), sorted by compute."""
    if not points:
        return []
    least = min(p.compute for p in points)
    bins: dict[int, Point] = {}
    for p in points:
        # + 1e-9: budgets on exact powers of the factor must not fall a bin short by rounding
        b = math.floor(math.log(p.compute / least, bin_factor) + 1e-9)
        if b not in bins or getattr(p, by) < getattr(bins[b], by):
            bins[b] = p
    return [bins[b] for b in sorted(bins)]


def best_lr_per_cell(points: list[Point]) -> list[Point]:
    """The point of least loss among each (d_sae, tokens) cell's learning rates."""
    cells: dict[tuple[int, int], Point] = {}
    for p in points:
        key = (p.d_sae, p.tokens)
        if key not in cells or p.loss < cells[key].loss:
            cells[key] = p
    return sorted(cells.values(), key=lambda p: p.compute)


FITTED = ("loss", "fvu", "d_sae", "tokens", "lr")
"""What `fit_scaling` fits against compute."""


def fit_scaling(
    points: list[Point], bin_factor: float = 2.0, n_boot: int = 1000, seed: int = 0
) -> dict[str, PowerLaw]:
    """Power laws against compute of: the least loss (and, separately, the least held-out FVU)
    per budget, the d_sae and tokens of the least-loss SAE per budget, and each cell's best lr.
    Raises ValueError, naming what to add, when the grid spans fewer than 3 budgets or cells."""
    best = best_per_budget(points, bin_factor)
    if len(best) < 3:
        raise ValueError(
            f"the grid spans {len(best)} compute budget(s) (bins of ×{bin_factor:g}); the fits "
            "need ≥ 3: add dictionary sizes (scaling.d_sae) or token counts (scaling.tokens)"
        )
    cells = best_lr_per_cell(points)
    if len(cells) < 3:
        raise ValueError("the learning-rate fit needs ≥ 3 (d_sae, tokens) cells")
    by_fvu = best_per_budget(points, bin_factor, "fvu")
    c = [p.compute for p in best]
    kw: dict[str, Any] = {"n_boot": n_boot, "seed": seed}
    return {
        "loss": fit_power_law(c, [p.loss for p in best], **kw),
        "fvu": fit_power_law([p.compute for p in by_fvu], [p.fvu for p in by_fvu], **kw),
        "d_sae": fit_power_law(c, [float(p.d_sae) for p in best], **kw),
        "tokens": fit_power_law(c, [float(p.tokens) for p in best], **kw),
        "lr": fit_power_law([p.compute for p in cells], [p.lr for p in cells], **kw),
    }


def grid_budgets(
    arch: str, d_sae: list[int], tokens: list[int], k: int = 0, bin_factor: float = 2.0
) -> int:
    """How many compute bins a size × tokens grid spans, before anything is trained: compute is
    proportional to d_in for every architecture, so d_in = 1 gives the same bins."""
    points = [
        Point("", n, t, 1.0, training_flops(arch, 1, n, t, k), 0.0, 0.0, 0.0)
        for n in d_sae
        for t in tokens
    ]
    return len(best_per_budget(points, bin_factor))


@dataclass
class ScalingConfig:
    """`saeflow scaling`: a grid of SAEs on one cache, and power laws fitted to it."""

    d_sae: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    """Dictionary sizes of the grid."""
    tokens: list[int] = field(default_factory=lambda: [153_600, 307_200, 614_400])
    """Training tokens of the grid (SAEs with equal tokens train from one read of the cache)."""
    lr: list[float] = field(default_factory=lambda: [3e-3, 1e-2, 3e-2])
    """Learning rates of the grid: the best per budget is fitted against compute."""
    budget_bin: float = 2.0
    """Budgets within this factor of each other count as one (the best SAE of each bin is
    the compute-efficient one)."""
    extrapolate: float = 10.0
    """The recommendation is for this many times the grid's largest budget."""
    split_threshold: float = 0.5
    """Decoder cosine at or above which a feature of the larger SAE is a child of its best
    match in the smaller one (feature splitting)."""
    n_boot: int = 1000
    """Bootstrap resamples for the exponents' 90% intervals."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "tokens", "lr"):
            values = getattr(self, name)
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"scaling.{name} must be a non-empty list of values > 0")
            if len(set(values)) != len(values):
                raise ValueError(f"scaling.{name} has repeated values: {values}")
        if not (math.isfinite(self.budget_bin) and self.budget_bin > 1):
            raise ValueError(f"scaling.budget_bin must be > 1, got {self.budget_bin}")
        positive("scaling", extrapolate=self.extrapolate, n_boot=self.n_boot)
        if not 0 < self.split_threshold <= 1:
            raise ValueError(
                f"scaling.split_threshold must be in (0, 1], got {self.split_threshold}"
            )

    def check_grid(self, arch: str, k: int) -> None:
        """The fits need >= 3 compute budgets and >= 3 (d_sae, tokens) cells: said before hours
        of training, not after."""
        budgets = grid_budgets(arch, self.d_sae, self.tokens, k, self.budget_bin)
        if budgets < 3 or len(self.d_sae) * len(self.tokens) < 3:
            raise ValueError(
                f"scaling.d_sae={self.d_sae} × scaling.tokens={self.tokens} spans {budgets} "
                f"compute budget(s) (bins of ×{self.budget_bin:g}); the fits need ≥ 3: add sizes "
                "or token counts"
            )
