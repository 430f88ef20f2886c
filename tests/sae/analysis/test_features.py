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


def _planted(n: int, d: int = 32, group: int = 16, seed: int = 0) -> torch.Tensor:
    """n decoder rows in groups of `group` noisy copies of a random direction."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // group, d, generator=g)
    return centres.repeat_interleave(group, 0) + 0.3 * torch.randn(n, d, generator=g)


def test_table_is_the_same_computed_a_few_rows_at_a_time(monkeypatch) -> None:
    """Latents computed in blocks of 2 rows (instead of whole batches) change no number."""
    import sae.models.base as base

    g = torch.Generator().manual_seed(0)
    sae = build_sae("relu", 8, 48)
    ids = torch.randint(0, 50, (6, 10), generator=g)
    special = torch.zeros(6, 10, dtype=torch.bool)
    special[:, 0] = True
    batches = [(ids[i : i + 3], special[i : i + 3], torch.randn(3, 10, 8, generator=g))
               for i in (0, 3)]  # fmt: skip
    kw = {"decode": lambda x: " ".join(map(str, x)), "unembed": torch.randn(50, 8),
          "vocab": str}  # fmt: skip
    whole = feature_stats(sae, batches, **kw)
    monkeypatch.setattr(base, "BLOCK_ELEMENTS", 2 * 48)
    assert len(base.row_blocks(27, 48)) == 14
    blocked = feature_stats(sae, batches, **kw)
    a, b = whole.to_pylist(), blocked.to_pylist()  # a matmul of fewer rows may round otherwise
    for row_a, row_b in zip(a, b, strict=True):
        for name, v in row_a.items():
            if name == "top_examples":
                assert [(e["seq_id"], e["pos"], e["text"]) for e in v] == [
                    (e["seq_id"], e["pos"], e["text"]) for e in row_b[name]
                ]
            elif isinstance(v, float):
                assert row_b[name] == pytest.approx(v, rel=1e-5, abs=1e-7), name
            else:
                assert row_b[name] == v, name


def test_neighbours_beyond_the_exact_size_match_the_exact_ones(monkeypatch) -> None:
    """The inverted-file search (clusters, PROBE nearest centres each) against all pairs, on
    4,096 planted directions in groups of 16: the same neighbour for ≥ 99% of rows, and a found
    cosine never above the true one."""
    import sae.analysis.features as F

    W = _planted(4096)
    _, probes = F._kmeans(W, probe=F.PROBE)
    exact_i, exact_c = F._nearest(W, probes)  # 4,096 ≤ EXACT_NEIGHBOURS: all pairs
    monkeypatch.setattr(F, "EXACT_NEIGHBOURS", 0)
    ivf_i, ivf_c = F._nearest(W, probes)
    assert (ivf_i == exact_i).float().mean() >= 0.99
    assert (ivf_c <= exact_c + 1e-6).all() and (ivf_i != torch.arange(4096)).all()


def test_clusters_fitted_on_a_sample_still_group_alike_directions(monkeypatch) -> None:
    """Centres fitted on 8 rows per centre (not all 1,024 rows) recover the 64 planted groups."""
    import sae.analysis.features as F

    monkeypatch.setattr(F, "SAMPLE_PER_CENTRE", 8)
    W = _planted(1024, d=64, seed=1) * 0.2 + torch.eye(64).repeat_interleave(16, 0)
    label = F.clusters(W, k=64, iters=20)
    groups = [set(label[i * 16 : (i + 1) * 16].tolist()) for i in range(64)]
    assert sum(len(grp) == 1 for grp in groups) >= 60 and len(set(label.tolist())) >= 60
