from __future__ import annotations

import pytest
import torch

from sae.models import rowtopk
from sae.models.rowtopk import MIN_NUMEL, topk_rows

N, M, K = 512, 1024, 16  # N·M >= MIN_NUMEL: the kernel's size


def _same_set(z: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """vals, idx are each row's k largest of z: distinct positions, z's values there, and the
    same values as torch.topk's (ties may pick other equal entries)."""
    ref = z.topk(k, dim=-1, sorted=False).values
    assert idx.shape == vals.shape == (z.shape[0], k)
    assert all(len(set(r.tolist())) == k for r in idx)
    assert torch.equal(z.gather(1, idx), vals)
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)


def test_the_kernel_gives_torch_topk_s_entries() -> None:
    pytest.importorskip("numba")
    assert N * M >= MIN_NUMEL
    kernel = rowtopk._kernel()
    g = torch.Generator().manual_seed(0)
    for z in (
        torch.randn(N, M, generator=g),  # pre-activations
        torch.randn(N, M, generator=g).relu(),  # half the row tied at 0
        -torch.rand(N, M, generator=g),  # all negative
        torch.zeros(N, M),  # every entry tied
        torch.randn(N, M + 7, generator=g),  # a tail past the k groups
        torch.randn(N, M, generator=g, dtype=torch.float64),
    ):
        vals, idx = z.new_empty(N, K), torch.empty(N, K, dtype=torch.int64)
        assert not kernel(z.contiguous().numpy(), K, vals.numpy(), idx.numpy())  # no fallback
        _same_set(z, vals, idx, K)
        _same_set(z, *topk_rows(z, K), K)
    z = torch.randn(N, M, generator=g)
    z[3, 5], z[4, 6] = float("inf"), float("-inf")
    _same_set(z, *topk_rows(z, K), K)
    assert 5 in topk_rows(z, K)[1][3].tolist()


def test_a_nan_falls_back_to_torch_topk() -> None:
    """torch.topk ranks NaN largest (a NaN pre-activation then reaches the loss, which fit
    reports); the kernel sees it and hands the matrix to torch.topk."""
    pytest.importorskip("numba")
    z = torch.randn(N, M, generator=torch.Generator().manual_seed(1))
    z[7, 100] = float("nan")
    vals = rowtopk._kernel()(
        z.numpy(), K, z.new_empty(N, K).numpy(), torch.empty(N, K, dtype=torch.int64).numpy()
    )
    assert vals  # the kernel reports it
    v, i = topk_rows(z, K)
    assert 100 in i[7].tolist() and v[7].isnan().any()
    _same_set(z[:7], v[:7], i[:7], K)


@pytest.mark.parametrize("case", ["small", "bf16", "grad", "wide k"])
def test_elsewhere_it_is_torch_topk(case: str) -> None:
    z = torch.randn(N, M, generator=torch.Generator().manual_seed(2))
    k = K
    if case == "small":
        z = z[:8]
    elif case == "bf16":
        z = z.bfloat16()
    elif case == "grad":
        z.requires_grad_(True)
    else:
        k = M // 2 + 1
    vals, idx = topk_rows(z, k)
    ref = z.topk(k, dim=-1, sorted=False)
    assert torch.equal(idx, ref.indices) and torch.equal(vals, ref.values)
