from __future__ import annotations

import pytest
import torch

from sae.models import rowtopk
from sae.models.config import SAEConfig
from sae.models.rowtopk import MIN_NUMEL, topk_rows
from sae.models.topk import TopKSAE

N, M, K = 512, 1024, 16  # N·M >= MIN_NUMEL: the kernel's size


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the kernel's runs (numba is a dependency: it must load)."""
    kernel = rowtopk._kernel()
    assert kernel is not None
    seen: list[int] = []

    def counted(*args: object) -> bool:
        seen.append(1)
        return kernel(*args)

    monkeypatch.setitem(rowtopk._KERNEL, "fn", counted)
    return seen


def _same_set(z: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """vals, idx are each row's k largest of z: distinct positions, z's values there, and the
    same values as torch.topk's (ties may pick other equal entries)."""
    ref = z.topk(k, dim=-1, sorted=False).values
    assert idx.shape == vals.shape == (z.shape[0], k)
    assert all(len(set(r.tolist())) == k for r in idx)
    assert torch.equal(z.gather(1, idx), vals)
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)


def test_the_kernel_gives_torch_topk_s_entries(calls: list[int]) -> None:
    assert N * M >= MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    ramp = torch.arange(M, dtype=torch.float32).expand(N, M)
    inf = torch.randn(N, M, generator=g)
    inf[3, 5], inf[4, 6], inf[5] = float("inf"), float("-inf"), float("-inf")
    cases = [
        (torch.randn(N, M, generator=g), K),  # pre-activations
        (torch.randn(N, M, generator=g).relu(), K),  # half of each row tied at 0
        (-torch.rand(N, M, generator=g), K),  # all negative
        (torch.zeros(N, M), K),  # every entry tied
        (torch.randn(N, M + 7, generator=g), K),  # a tail past the k groups
        (torch.randn(N, M, generator=g, dtype=torch.float64), K),
        (ramp, K),  # a trend along the latents
        (ramp.flip(1), K),
        (inf, K),  # ±inf; row 5 all -inf
        (torch.randn(N, M, generator=g), M // 2),  # the widest k it takes
        (torch.randn(N, M, generator=g), 1),
    ]
    for i, (z, k) in enumerate(cases):
        _same_set(z, *topk_rows(z, k), k)
        assert len(calls) == i + 1  # the kernel ran, not the fallback
    assert 5 in topk_rows(inf, K)[1][3].tolist()


def test_a_nan_falls_back_to_torch_topk(calls: list[int]) -> None:
    """torch.topk ranks NaN largest (a NaN pre-activation then reaches the loss, which fit
    reports); the kernel sees it and hands the matrix to torch.topk."""
    z = torch.randn(N, M, generator=torch.Generator().manual_seed(1))
    z[7, 100] = float("nan")
    v, i = topk_rows(z, K)
    assert calls == [1]
    assert 100 in i[7].tolist() and v[7].isnan().any()
    _same_set(z[:7], v[:7], i[:7], K)


@pytest.mark.parametrize("case", ["small", "bf16", "grad", "wide k"])
def test_elsewhere_it_is_torch_topk(case: str, calls: list[int]) -> None:
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
    assert not calls


def test_a_failing_kernel_warns_and_gives_torch_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> bool:
        raise RuntimeError("cannot run")

    monkeypatch.setitem(rowtopk._KERNEL, "fn", broken)
    monkeypatch.setitem(rowtopk._KERNEL, "pid", rowtopk.os.getpid())
    z = torch.randn(N, M, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="falls back to torch.topk.*cannot run"):
        _, idx = topk_rows(z, K)
    assert torch.equal(idx, z.topk(K, dim=-1, sorted=False).indices)
    assert rowtopk._KERNEL["fn"] is None  # not tried again


def test_a_topk_step_is_the_same_with_torch_topk(
    calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TopK SAE's training forward at the kernel's size: the same latents, loss and
    gradients as with torch.topk (the sums' order differs: float tolerance)."""
    sae = TopKSAE(64, SAEConfig(arch="topk", d_sae=4096, k=8))
    x = torch.randn(N, 64, generator=torch.Generator().manual_seed(4))
    out = sae(x)
    grads = torch.autograd.grad(out.loss, [sae.W_enc, sae.W_dec])
    assert calls == [1]
    monkeypatch.setitem(rowtopk._KERNEL, "fn", None)
    sae.tokens_trained = 0
    ref = sae(x)
    ref_grads = torch.autograd.grad(ref.loss, [sae.W_enc, sae.W_dec])
    assert torch.equal(out.f.to_dense() != 0, ref.f.to_dense() != 0)
    torch.testing.assert_close(out.loss, ref.loss)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
