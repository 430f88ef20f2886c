"""Feature statistics on a planted case: known activations, known top examples, known twins."""

from __future__ import annotations

import pytest
import torch

from sae.analysis.features import feature_stats
from sae.models.registry import build_sae


def test_planted_features() -> None:
    d_in, d_sae, t = 4, 3, 5
    sae = build_sae("relu", d_in, d_sae)
    with torch.no_grad():  # latent i reads coordinate i; latent 2 is dead; 0 and 1 nearly twins
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = 1.0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 0, 2.0]]))
    ids = torch.arange(10).view(2, t)  # tokens 0..9
    special = torch.zeros(2, t, dtype=torch.bool)
    special[:, 0] = True
    acts = torch.zeros(2, t, d_in)
    acts[0, 2, 0] = 3.0  # latent 0 fires on token 2 (3.0) and token 8 (1.0)
    acts[1, 3, 0] = 1.0
    acts[1, 4, 1] = 2.0  # latent 1 fires once, on token 9
    acts[0, 0, 0] = 99.0  # a special position: ignored
    unembed = torch.eye(10, d_in)  # token j's unembedding = e_j (j < 4)
    table = feature_stats(
        sae,
        [(ids, special, acts)],
        decode=lambda x: "".join(map(str, x)),
        unembed=unembed,
        vocab=str,
        n_top=2,
        before=2,
        after=1,
        n_logits=1,
    ).to_pylist()
    f0, f1, f2 = table
    assert f0["freq"] == pytest.approx(2 / 8) and f0["mean_act"] == pytest.approx(2.0)
    assert f0["max_act"] == pytest.approx(3.0)
    assert [e["text"] for e in f0["top_examples"]] == ["01«2»3", "67«8»9"]
    assert (f0["top_examples"][0]["seq_id"], f0["top_examples"][0]["pos"]) == (0, 2)
    assert f1["top_examples"][0]["text"] == "78«9»" and f1["max_act"] == pytest.approx(2.0)
    assert f2["freq"] == 0 and f2["top_examples"] == [] and f2["decoder_norm"] == pytest.approx(2)
    assert f0["top_logits"] == ["0"] and f2["top_logits"] == ["3"]
    assert (f0["nearest_feature"], f1["nearest_feature"]) == (1, 0)
    assert f0["nearest_cos"] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5)
    assert (f0["act_p50"], f0["act_p99"], f1["act_p50"]) == (pytest.approx(1.0), 3.0, 2.0)
    assert f2["act_p50"] == 0  # never active
    assert f0["cluster_id"] == f1["cluster_id"] != f2["cluster_id"]  # twins together


def test_quantiles_are_exact_nearest_rank() -> None:
    from sae.analysis.features import _quantiles

    vals = torch.arange(1, 101, dtype=torch.float32)  # latent 1: 1..100, in a shuffled order
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    active = [(torch.ones(60, dtype=torch.long), vals[order][:60]),
              (torch.ones(40, dtype=torch.long), vals[order][60:])]  # fmt: skip
    q = _quantiles(active, 3, (0.5, 0.9, 0.99))
    assert q[:, 1].tolist() == [51.0, 90.0, 99.0] and (q[:, [0, 2]] == 0).all()


def test_clusters_group_directions_that_point_alike() -> None:
    from sae.analysis.features import clusters

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 32)  # four well-separated concepts, 16 noisy features each
    W = centres.repeat_interleave(16, 0) + 0.05 * torch.randn(64, 32, generator=g)
    label = clusters(W, k=4, iters=20)
    groups = [set(label[i * 16 : (i + 1) * 16].tolist()) for i in range(4)]
    assert all(len(grp) == 1 for grp in groups) and len(set().union(*groups)) == 4
