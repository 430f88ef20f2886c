"""Scaling laws for SAE studies ("Scaling Monosemanticity"): compute, power-law fits with
bootstrap intervals, and the compute-efficient frontier.

    loss(C) ≈ a · C^b            fitted as log y = log a + b · log x (least squares)
    N_opt(C) ≈ a_N · C^b_N       the best dictionary size per compute budget, likewise

Compute C of training an SAE on T tokens (forward + backward, 2 FLOPs per multiply-add):
dense (relu, jumprelu) ≈ 10 · d_in · d_sae · T (DESIGN §9); topk/batchtopk with sparse
backward ≈ (2 · d_in · d_sae + 8 · d_in · k) · T (the encoder stays dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def training_flops(arch: str, d_in: int, d_sae: int, tokens: int, k: int = 0) -> float:
    """FLOPs to train one SAE on `tokens` tokens (see the module doc)."""
    if arch in ("topk", "batchtopk"):
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
