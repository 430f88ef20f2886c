"""Scaling-law fitting (sae/scaling.py): known exponents recovered from noisy power-law points,
the frontier, and the FLOP counts."""

from __future__ import annotations

import numpy as np
import pytest

from sae.scaling import fit_power_law, frontier, training_flops


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
