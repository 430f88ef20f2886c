"""DESIGN §6 metrics against direct numpy computations; streaming == batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.analysis import metrics


def batch(n: int = 200, d_in: int = 12, d_sae: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * 3 + 5  # a large mean: fvu must subtract it
    x_hat = x + 0.5 * torch.randn(n, d_in, generator=g)
    f = torch.relu(torch.randn(n, d_sae, generator=g) - 1.0)
    f[:, :3] = 0  # three dead latents
    f[:, 3] = 1.0  # one dense latent
    return x, x_hat, f


def test_reconstruction_metrics_match_numpy() -> None:
    x, x_hat, _ = batch()
    xn, xhn = x.double().numpy(), x_hat.double().numpy()
    err = ((xn - xhn) ** 2).sum(1)  # per token
    var = ((xn - xn.mean(0)) ** 2).sum()
    assert metrics.mse(x, x_hat) == pytest.approx(err.mean() / x.shape[1], rel=1e-12)
    assert metrics.fvu(x, x_hat) == pytest.approx(err.sum() / var, rel=1e-12)
    assert metrics.explained_variance(x, x_hat) == pytest.approx(1 - err.sum() / var, rel=1e-12)
    assert metrics.fvu(x, x) == 0.0
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)


def test_sparsity_metrics_match_numpy() -> None:
    _, _, f = batch()
    fn = f.numpy()
    assert metrics.l0(f) == pytest.approx((fn != 0).sum(1).mean(), rel=1e-12)
    counts = metrics.fire_counts(f)
    np.testing.assert_array_equal(counts.numpy(), (fn != 0).sum(0))
    assert metrics.dead_frac(counts) == pytest.approx(((fn != 0).sum(0) == 0).mean())
    assert metrics.dead_frac(counts) == pytest.approx(3 / 40)
    dense = ((fn != 0).mean(0) > 0.1).mean()
    assert metrics.dense_frac(counts, len(f)) == pytest.approx(dense)
    assert metrics.dense_frac(counts, len(f), threshold=0.99) == pytest.approx(1 / 40)


def test_loss_recovered() -> None:
    assert metrics.loss_recovered(2.0, 2.0, 6.0) == 1.0  # as good as clean
    assert metrics.loss_recovered(2.0, 6.0, 6.0) == 0.0  # as bad as the ablation
    assert metrics.loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)


def test_streaming_stats_equal_batch_functions() -> None:
    x, x_hat, f = batch(n=1000)
    stats = metrics.ReconstructionStats(f.shape[1])
    for i in range(0, 1000, 137):  # uneven chunks
        stats.update(x[i : i + 137], x_hat[i : i + 137], f[i : i + 137])
    out = stats.compute()
    counts = metrics.fire_counts(f)
    expected = {
        "mse": metrics.mse(x, x_hat),
        "fvu": metrics.fvu(x, x_hat),
        "explained_variance": metrics.explained_variance(x, x_hat),
        "l0": metrics.l0(f),
        "dead_frac": metrics.dead_frac(counts),
        "dense_frac": metrics.dense_frac(counts, 1000),
        "tokens": 1000.0,
    }
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-6), key
    assert torch.equal(stats.fire_counts, counts)


def test_streaming_stats_need_data() -> None:
    with pytest.raises(ValueError, match="before any update"):
        metrics.ReconstructionStats(4).compute()


def test_kl_to_clean_equals_the_definition_and_is_directed() -> None:
    from sae.analysis.metrics import KLToClean, kl_per_token

    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).log_softmax(-1)
    lq = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).log_softmax(-1)
    torch.testing.assert_close(KLToClean(lp)(lq), kl_per_token(lp, lq))
    assert (kl_per_token(lp, lq) > 0).all() and (kl_per_token(lp, lp).abs() < 1e-12).all()
    assert not torch.allclose(kl_per_token(lp, lq), kl_per_token(lq, lp))
