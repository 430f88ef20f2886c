"""Known-answer data with Zipf frequencies, a hierarchy, correlation, offset and noise; the
scores that compare an SAE with it."""

from __future__ import annotations

import math

import pytest
import torch

from sae.activations.ground_truth import GroundTruth, match, score


def test_frequencies_hierarchy_and_offset() -> None:
    t = GroundTruth(d_in=32, n_features=64, active=6, zipf=1.0, parents=4, children=3,
                    correlation=0.3, offset=10.0)  # fmt: skip
    x, a = t.sample(20_000, torch.Generator().manual_seed(0))
    on = a > 0
    assert on.sum(-1).float().mean().item() == pytest.approx(t.p.sum().item(), rel=0.05)
    freq = on.float().mean(0)
    roots = t.parent < 0
    torch.testing.assert_close(freq[roots], t.p[roots], atol=0.01, rtol=0.1)
    assert freq[0] > 5 * freq[-1]  # Zipf: the first features fire far more often
    kids = (t.parent >= 0).nonzero().flatten()
    assert len(kids) == 12
    assert not (on[:, kids] & ~on[:, t.parent[kids]]).any()  # a child only with its parent
    assert t.mean.norm().item() == pytest.approx(10.0)
    torch.testing.assert_close(x - a @ t.features, t.mean.expand_as(x), atol=1e-4, rtol=0)


def _child_shares(rate: float, correlation: float) -> torch.Tensor:
    """Each child's share of its parent's firings on 40,000 samples of a small hierarchy (4
    parents × 3 children); asserts first that no child fires without its parent."""
    t = GroundTruth(d_in=32, n_features=64, active=6, zipf=1.0, parents=4, children=3,
                    child_rate=rate, correlation=correlation)  # fmt: skip
    _, a = t.sample(40_000, torch.Generator().manual_seed(0))
    on = a > 0
    kids = (t.parent >= 0).nonzero().flatten()
    assert not (on[:, kids] & ~on[:, t.parent[kids]]).any()
    return on[:, kids].sum(0) / on[:, t.parent[kids]].sum(0)


def test_child_rate_sets_each_childs_share_of_its_parents_firings() -> None:
    share = _child_shares(0.4, correlation=0.0)
    torch.testing.assert_close(share, torch.full_like(share, 0.4), atol=0.03, rtol=0)
    assert share.mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.equal(_child_shares(1.0, correlation=0.3), torch.ones(12))  # always with it
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="child_rate must be in"):
            GroundTruth(parents=4, children=3, child_rate=bad)


def test_child_rate_under_correlation_spreads_the_shares_around_it() -> None:
    """With shared factors a child's share of its parent's firings moves with what the two
    share, but stays around child_rate on average (measured, data seeds 1000, 1, 2, 3: means
    0.39–0.42, every share in 0.32–0.49; std 0.032 against 0.004 without correlation)."""
    share = _child_shares(0.4, correlation=0.3)
    assert share.mean().item() == pytest.approx(0.4, abs=0.03)
    assert share.min().item() > 0.25 and share.max().item() < 0.55
    assert share.std().item() > 0.01  # the factors do spread them


def test_a_perfect_dictionary_scores_perfectly() -> None:
    t = GroundTruth(d_in=32, n_features=24, active=4, zipf=0.5, offset=3.0)
    q, _ = torch.linalg.qr(torch.randn(32, 24, generator=torch.Generator().manual_seed(0)))
    t.features = q.T.contiguous()  # orthonormal: the coefficients are read back exactly

    def encode(x: torch.Tensor) -> torch.Tensor:
        a = (x - t.mean) @ t.features.T
        return a * (a > 1e-5)  # exact zeros where off (float error aside)

    s = score(t, lambda x: (encode(x), encode(x) @ t.features + t.mean), t.features, n=4096)
    assert s["fvu"] < 1e-10 and s["mmcs"] == pytest.approx(1.0)
    assert s["f1"] == pytest.approx(1.0) and s["mcc"] == pytest.approx(1.0, abs=1e-4)
    assert s["l0"] == pytest.approx(t.p.sum().item(), rel=0.1)
    shuffled = t.features[torch.randperm(24, generator=torch.Generator().manual_seed(1))]
    assert torch.equal(shuffled[match(t.features, shuffled)], t.features)


def test_the_parents_f1_sees_a_parent_absorbed_into_its_children() -> None:
    """A parent latent that stays off whenever one of its children fires (feature absorption)
    keeps its decoder direction, so MMCS cannot tell; the parents' F1 can."""
    t = GroundTruth(d_in=32, n_features=24, active=4, parents=2, children=3)
    q, _ = torch.linalg.qr(torch.randn(32, 24, generator=torch.Generator().manual_seed(0)))
    t.features = q.T.contiguous()
    kids = torch.stack([t.parent == p for p in range(2)])  # (2, 24): each parent's children

    def encode(x: torch.Tensor, absorbed: bool) -> torch.Tensor:
        a = x @ t.features.T
        a = a * (a > 1e-5)
        if absorbed:
            a[:, :2] *= ((a > 0).float() @ kids.T.float()) == 0  # a child on: the parent off
        return a

    def scored(absorbed: bool) -> dict[str, float]:
        def enc_dec(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return encode(x, absorbed), encode(x, absorbed) @ t.features

        return score(t, enc_dec, t.features, n=4096)

    perfect, absorbed = scored(False), scored(True)
    assert perfect["f1_parents"] == pytest.approx(1.0)
    assert absorbed["f1_parents"] < 0.9 and absorbed["mmcs"] == pytest.approx(1.0)
    flat = GroundTruth(d_in=32, n_features=24, active=4)
    assert math.isnan(score(flat, lambda x: (x @ flat.features.T, x), flat.features)["f1_parents"])


def test_dead_long_counts_only_latents_silent_on_every_held_out_sample() -> None:
    """`dead` reads the n scored samples; `dead_long` also the further ones up to dead_n: a
    latent that fires only on one later sample is dead there and alive here; a latent that never
    fires is dead in both."""
    t = GroundTruth(d_in=32, n_features=24, active=4)
    seen = []

    def enc_dec(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.shape[0])
        f = torch.zeros(x.shape[0], 26)  # latents 0–23: the truth; 24 rare; 25 never
        f[:, :24] = (x - t.mean) @ t.features.T
        f[:, 24] = 0.0
        if len(seen) == 3:  # the second block after the scored samples
            f[7, 24] = 1.0
        return f.clamp_min(0), x

    s = score(t, enc_dec, torch.cat([t.features, torch.eye(2, 32)]), n=1000, dead_n=3500)
    assert seen == [1000, 1000, 1000, 500]  # the scored samples, then blocks up to dead_n
    assert s["dead"] == pytest.approx(2 / 26) and s["dead_long"] == pytest.approx(1 / 26)
