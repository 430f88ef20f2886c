"""Feature splitting on planted dictionaries: known families, known cosines, known strangers."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from sae.analysis.splitting import SCHEMA, decoder_directions, families, match_features
from sae.models.registry import build_sae

D_IN = 64
SPLITS = {0: 2, 1: 3, 2: 2, 3: 3, 4: 2, 5: 3}  # parent -> number of children
SINGLES = (6, 7)  # kept as one slightly perturbed child; parents 8, 9 vanish
N_UNRELATED = 5
SPLIT_COS = 1 / math.sqrt(1 + 0.7**2)  # ‖p + 0.7u‖ = √1.49 for unit p ⟂ u
SINGLE_COS = 1 / math.sqrt(1 + 0.1**2)


def planted() -> tuple[torch.Tensor, torch.Tensor, dict[int, dict[int, float]]]:
    """small (10, 64), large (22, 64) shuffled, and parent -> {child row in large: cos}."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))[0].T  # orthonormal rows
    small, fresh = basis[:10], iter(basis[10:])  # fresh: ⟂ every parent and each other
    rows, truth = [], []  # truth: (parent or None, cos) of each unshuffled large row
    for p, n in SPLITS.items():
        for _ in range(n):
            rows.append(small[p] + 0.7 * next(fresh))
            truth.append((p, SPLIT_COS))
    for p in SINGLES:
        rows.append(small[p] + 0.1 * next(fresh))
        truth.append((p, SINGLE_COS))
    for _ in range(N_UNRELATED):
        rows.append(next(fresh))  # cos 0 with every parent
        truth.append((None, 0.0))
    large = torch.stack(rows)
    large = large / large.norm(dim=1, keepdim=True)
    perm = torch.randperm(len(rows), generator=g)  # shuffled row r is unshuffled row perm[r]
    expected: dict[int, dict[int, float]] = {}
    for r, o in enumerate(perm.tolist()):
        p, cos = truth[o]
        if p is not None:
            expected.setdefault(p, {})[r] = cos
    return small, large[perm], expected


def check_planted(table: pa.Table, expected: dict[int, dict[int, float]]) -> None:
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert [(r["parent"], r["rank"]) for r in rows] == sorted(
        (r["parent"], r["rank"]) for r in rows
    )
    found: dict[int, dict[int, float]] = {}
    for r in rows:
        found.setdefault(r["parent"], {})[r["child"]] = r["cos"]
    assert {p: set(c) for p, c in found.items()} == {p: set(c) for p, c in expected.items()}
    assert len(rows) == sum(SPLITS.values()) + len(SINGLES)  # no stranger
    for r in rows:
        assert r["cos"] == pytest.approx(expected[r["parent"]][r["child"]], abs=1e-5)
        assert r["n_children"] == len(expected[r["parent"]])
    for p, children in found.items():  # ranks 1..n, cosine non-increasing with rank
        ranked = sorted((r["rank"], r["cos"]) for r in rows if r["parent"] == p)
        assert [k for k, _ in ranked] == list(range(1, len(children) + 1))
        cosines = [c for _, c in ranked]
        assert cosines == sorted(cosines, reverse=True)
    fam = families(table, min_children=2)
    assert set(fam) == set(SPLITS)
    assert {p: {c for c, _ in v} for p, v in fam.items()} == {p: set(expected[p]) for p in SPLITS}
    assert set(families(table, min_children=1)) == set(SPLITS) | set(SINGLES)


def test_planted_families() -> None:
    small, large, expected = planted()
    check_planted(match_features(small, large, threshold=0.5), expected)


def test_through_sae_objects() -> None:
    small, large, expected = planted()
    g = torch.Generator().manual_seed(1)
    saes = []
    for w in (small, large):
        sae = build_sae("relu", D_IN, w.shape[0], seed=0, l1_coeff=1.0)
        with torch.no_grad():  # random positive row norms: decoder_directions must undo them
            sae.W_dec.copy_(w * (0.1 + 10 * torch.rand(w.shape[0], 1, generator=g)))
        saes.append(sae)
    dirs = [decoder_directions(s) for s in saes]
    for d, w in zip(dirs, (small, large), strict=True):
        assert d.dtype == torch.float32 and d.device.type == "cpu" and not d.requires_grad
        torch.testing.assert_close(d, w, atol=1e-6, rtol=0)
    check_planted(match_features(*dirs), expected)


def test_rank_orders_children_by_cosine() -> None:
    small = torch.eye(3, 8)  # parents e0, e1, e2
    large = torch.zeros(4, 8)  # children of e1 at cosines 0.6, 0.9, 0.8; a stranger at 0.4
    for j, (p, c) in enumerate([(1, 0.6), (1, 0.9), (1, 0.8), (0, 0.4)]):
        large[j, p], large[j, 4 + j] = c, math.sqrt(1 - c**2)
    table = match_features(small, 7 * large, threshold=0.5).to_pydict()
    assert table["parent"] == [1, 1, 1]
    assert table["child"] == [1, 2, 0]
    assert table["rank"] == [1, 2, 3]
    assert table["n_children"] == [3, 3, 3]
    assert table["cos"] == pytest.approx([0.9, 0.8, 0.6], abs=1e-6)
    assert families(match_features(small, large)) == {
        1: [(1, pytest.approx(0.9)), (2, pytest.approx(0.8)), (0, pytest.approx(0.6))]
    }


def test_chunking_matches_whole_matrix() -> None:
    g = torch.Generator().manual_seed(2)
    small, large = torch.randn(37, 16, generator=g), torch.randn(200, 16, generator=g)
    whole = match_features(small, large, threshold=0.3, chunk=4096)
    # Reference: the argmax rule on the full cosine matrix, no chunks.
    cos = (
        torch.nn.functional.normalize(large, dim=1) @ torch.nn.functional.normalize(small, dim=1).T
    )
    best, parent = cos.max(dim=1)
    keep = (best >= 0.3).nonzero().squeeze(1).tolist()
    assert 20 < len(keep) < 200  # both kinds of large feature occur
    assert sorted(whole.column("child").to_pylist()) == keep
    got = dict(
        zip(whole.column("child").to_pylist(), whole.column("parent").to_pylist(), strict=True)
    )
    assert got == {j: int(parent[j]) for j in keep}
    for chunk in (1, 3, 7):
        part = match_features(small, large, threshold=0.3, chunk=chunk)
        for col in ("parent", "child", "rank", "n_children"):
            assert part.column(col).equals(whole.column(col)), (chunk, col)
        torch.testing.assert_close(
            torch.tensor(part.column("cos").to_pylist()),
            torch.tensor(whole.column("cos").to_pylist()),
            atol=1e-6,
            rtol=0,
        )


def test_no_children_gives_empty_typed_table() -> None:
    table = match_features(torch.eye(2, 4), torch.eye(4)[2:], threshold=0.5)
    assert table.num_rows == 0 and table.schema == SCHEMA
    assert families(table) == {}


def test_mismatched_d_in_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"small \(3, 8\) and large \(4, 9\)"):
        match_features(torch.randn(3, 8), torch.randn(4, 9))


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, float("nan")])
def test_threshold_outside_unit_interval(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got"):
        match_features(torch.randn(3, 8), torch.randn(4, 8), threshold=threshold)
