"""Scaling-law fitting (sae/analysis/scaling.py): known exponents recovered from noisy power-law
points, the frontier, and the FLOP counts."""

from __future__ import annotations

import numpy as np
import pytest

from sae.analysis.scaling import fit_power_law, frontier, training_flops


@pytest.mark.parametrize("exponent, coef", [(-0.25, 3.0), (0.5, 1e-4), (-0.08, 40.0)])
def test_recovers_known_exponents_within_five_percent(exponent: float, coef: float) -> None:
    rng = np.random.default_rng(1)
    x = np.logspace(12, 18, 24)  # compute in FLOPs, six decades
    y = coef * x**exponent * np.exp(rng.normal(0, 0.03, x.size))  # 3% multiplicative noise
    law = fit_power_law(list(x), list(y))
    assert law.exponent == pytest.approx(exponent, rel=0.05)
    assert law.exponent_lo < exponent < law.exponent_hi  # the interval holds the truth
    assert law.exponent_hi - law.exponent_lo < 0.1 * abs(exponent)
    assert law(1e15) == pytest.approx(coef * 1e15**exponent, rel=0.05)


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="≥ 3"):
        fit_power_law([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="x > 0 and y > 0"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, -2.0, 3.0])


def test_frontier_keeps_points_no_cheaper_point_beats() -> None:
    points = [(1.0, 5.0), (2.0, 6.0), (2.0, 4.0), (4.0, 4.5), (8.0, 3.0), (16.0, 3.0)]
    assert frontier(points) == [(1.0, 5.0), (2.0, 4.0), (8.0, 3.0)]


def test_flops_dense_and_sparse() -> None:
    assert training_flops("relu", 768, 8192, 1000) == 10 * 768 * 8192 * 1000
    assert training_flops("topk", 768, 8192, 1000, k=32) == (2 * 768 * 8192 + 8 * 768 * 32) * 1000


def _grid(lr_exponent: float = -0.3) -> list:
    """A Chinchilla-like study: L = (N^-½ + D^-½)·(1 + 0.1·log²(lr/lr_opt(C))), so on the frontier
    N_opt, D_opt ∝ C^½ and L ∝ C^-¼, and lr_opt ∝ C^lr_exponent."""
    from sae.analysis.scaling import Point

    points = []
    for i in range(10):
        for j in range(10):
            n, d = 2**i * 64, 2**j * 1000
            c = training_flops("relu", 32, n, d)
            lr_opt = 1e-3 * (c / 1e9) ** lr_exponent
            for k in range(-12, 13):
                lr = lr_opt * 2 ** (k / 4 + 0.01)  # a grid that never hits lr_opt exactly
                base = n**-0.5 + (d / 1000 * 64) ** -0.5
                loss = base * (1 + 0.1 * np.log(lr / lr_opt) ** 2)
                points.append(Point(f"{i}-{j}-{k}", n, d, lr, c, loss, loss * 2, 30.0))
    return points


def test_fit_scaling_recovers_the_optimal_allocation_and_lr() -> None:
    from sae.analysis.scaling import best_per_budget, fit_scaling

    points = _grid()
    best = best_per_budget(points)
    assert len(best) == 19  # N·D on a 10×10 grid of powers of 2: 19 budgets
    assert [p.compute for p in best] == sorted(p.compute for p in best)
    fits = fit_scaling(points, n_boot=200)
    assert fits["d_sae"].exponent == pytest.approx(0.5, rel=0.05)
    assert fits["tokens"].exponent == pytest.approx(0.5, rel=0.05)
    assert fits["loss"].exponent == pytest.approx(-0.25, rel=0.05)
    assert fits["fvu"].exponent == pytest.approx(-0.25, rel=0.05)
    assert fits["lr"].exponent == pytest.approx(-0.3, rel=0.05)
    assert fits["d_sae"].exponent + fits["tokens"].exponent == pytest.approx(1.0, abs=0.02)


def test_fit_scaling_names_what_a_small_grid_lacks() -> None:
    from sae.analysis.scaling import fit_scaling

    two_budgets = [p for p in _grid() if p.d_sae == 64 and p.tokens in (1000, 2000)]
    with pytest.raises(ValueError, match=r"spans 2 compute budget.*scaling\.d_sae"):
        fit_scaling(two_budgets)
