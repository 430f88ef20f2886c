from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sae.models import kernels
from sae.models.config import SAEConfig
from sae.models.kernels import MIN_NUMEL, topk_rows
from sae.models.registry import build_sae
from sae.models.topk import TopKSAE

N, M, K = 512, 1024, 16  # N·M >= MIN_NUMEL: the kernel's size


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernels run, by name (numba is a dependency: they must load)."""
    module = kernels._module()
    assert module is not None
    seen: list[str] = []

    def counted(name: str) -> object:
        def run(*args: object) -> object:
            seen.append(name)
            return getattr(module, name)(*args)

        return run

    names = ("rows_topk", "pair_grads")
    monkeypatch.setitem(kernels._STATE, "module", SimpleNamespace(**{n: counted(n) for n in names}))
    return seen


def _same_set(z: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """vals, idx are each row's k largest of z: distinct positions, z's values there, and the
    same values as torch.topk's (ties may pick other equal entries)."""
    ref = z.topk(k, dim=-1, sorted=False).values
    assert idx.shape == vals.shape == (z.shape[0], k)
    assert all(len(set(r.tolist())) == k for r in idx)
    assert torch.equal(z.gather(1, idx), vals)
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)


def test_the_kernel_gives_torch_topk_s_entries(calls: list[str]) -> None:
    assert N * M >= MIN_NUMEL
    g = torch.Generator().manual_seed(0)
    ramp = torch.arange(M, dtype=torch.float32).expand(N, M)
    inf = torch.randn(N, M, generator=g)
    inf[3, 5], inf[4, 6], inf[5] = float("inf"), float("-inf"), float("-inf")
    signed_zeros = torch.randn(N, M, generator=g).bfloat16()
    signed_zeros[:, ::3], signed_zeros[:, 1::3] = 0.0, -0.0
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
        (torch.randn(N + 5, M, generator=g), K),  # a last block of 5 rows
        (torch.randn(N, M, generator=g).bfloat16(), K),  # autocast's z: many ties
        (-torch.rand(N, M, generator=g).bfloat16(), K),
        (signed_zeros, K),  # -0 and +0 tie
        (inf.bfloat16(), K),
    ]
    for i, (z, k) in enumerate(cases):
        _same_set(z, *topk_rows(z, k), k)
        assert calls == ["rows_topk"] * (i + 1)  # the kernel ran, not the fallback
    assert 5 in topk_rows(inf, K)[1][3].tolist()
    assert 5 in topk_rows(inf.bfloat16(), K)[1][3].tolist()


def test_a_nan_falls_back_to_torch_topk(calls: list[str]) -> None:
    """torch.topk ranks NaN largest (a NaN pre-activation then reaches the loss, which fit
    reports); the kernel sees it and hands the matrix to torch.topk."""
    for dtype, nan in (
        (torch.float32, 0x7FC0_0000),
        (torch.bfloat16, 0x7FC0),
        (torch.bfloat16, -64),
    ):
        z = torch.randn(N, M, generator=torch.Generator().manual_seed(1), dtype=dtype)
        bits = z.view(torch.int32 if dtype == torch.float32 else torch.int16)
        bits[7, 100] = nan  # -64: 0xFFC0, a NaN with the sign set (x86's default NaN)
        assert z[7, 100].isnan()
        v, i = topk_rows(z, K)
        assert 100 in i[7].tolist() and v[7].isnan().any()
        _same_set(z[:7], v[:7], i[:7], K)
    assert calls == ["rows_topk"] * 3


@pytest.mark.parametrize("case", ["small", "fp16", "grad", "wide k"])
def test_elsewhere_it_is_torch_topk(case: str, calls: list[str]) -> None:
    z = torch.randn(N, M, generator=torch.Generator().manual_seed(2))
    k = K
    if case == "small":
        z = z[:8]
    elif case == "fp16":
        z = z.half()
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

    monkeypatch.setitem(kernels._STATE, "module", SimpleNamespace(rows_topk=broken))
    monkeypatch.setitem(kernels._STATE, "pid", kernels.os.getpid())
    z = torch.randn(N, M, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="fall back to torch.*cannot run"):
        _, idx = topk_rows(z, K)
    assert torch.equal(idx, z.topk(K, dim=-1, sorted=False).indices)
    assert kernels._STATE["module"] is None  # not tried again


def test_a_topk_step_is_the_same_without_the_kernels(
    calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TopK SAE's training step at the kernels' size: the same latents, loss and gradients
    as torch's top-k, sparse product and embedding bag (the sums' order differs: tolerance)."""
    sae = TopKSAE(64, SAEConfig(arch="topk", d_sae=4096, k=8))
    x = torch.randn(N, 64, generator=torch.Generator().manual_seed(4))
    out = sae(x)
    grads = torch.autograd.grad(out.loss, [sae.W_enc, sae.W_dec])
    assert calls == ["rows_topk", "pair_grads", "pair_grads"]  # the decoder's, the encoder's
    monkeypatch.setitem(kernels._STATE, "module", None)
    sae.tokens_trained = 0
    ref = sae(x)
    ref_grads = torch.autograd.grad(ref.loss, [sae.W_enc, sae.W_dec])
    assert torch.equal(out.f.to_dense() != 0, ref.f.to_dense() != 0)
    torch.testing.assert_close(out.loss, ref.loss)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_pair_kernels_give_torch_s_gradients(
    dtype: torch.dtype, kernel: bool, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder's and the encoder's gradients over (token, latent) pairs sorted by token,
    any latent in any order and repeated (a ReLU step's), equal torch's embedding bag and the
    dense product's, by the kernels and by their fallbacks."""
    if not kernel:
        monkeypatch.setitem(kernels._STATE, "module", None)
    from sae.models.sparse import PairDecode, SparseGather

    g = torch.Generator().manual_seed(5)
    n, d, m, p = 300, 48, 200, 2000
    rows = torch.randint(0, n, (p,), generator=g).sort().values
    cols = torch.randint(0, m, (p,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    W = torch.randn(m, d, generator=g, dtype=dtype, requires_grad=True)
    vals = torch.rand(p, generator=g, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, d, generator=g, dtype=dtype)
    counts = torch.bincount(rows, minlength=n)

    def bag(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding_bag(
            cols, w, counts.cumsum(0) - counts, mode="sum", per_sample_weights=v
        )

    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    out = PairDecode.apply(vals, W, rows, cols, bag)
    torch.testing.assert_close(out, bag(vals, W), rtol=0, atol=0)
    got = torch.autograd.grad(out, [vals, W], grad)
    want = torch.autograd.grad(bag(vals, W), [vals, W], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)

    Wt = W.detach().T.contiguous().requires_grad_(True)  # the encoder's (d_in, d_sae)
    b = torch.zeros(m, dtype=dtype, requires_grad=True)
    z = x @ Wt.detach() + b.detach()
    picked = SparseGather.apply(x, Wt, b, rows, cols, z[rows, cols])
    got = torch.autograd.grad(picked, [Wt, b], vals.detach())
    dense = (x @ Wt + b)[rows, cols]
    want = torch.autograd.grad(dense, [Wt, b], vals.detach())
    for a, b_ in zip(got, want, strict=True):
        torch.testing.assert_close(a, b_, **tol)
    assert calls == (["pair_grads"] * 2 if kernel else [])


def test_more_parts_than_rows() -> None:
    """The pair kernels split the gradient's rows into `parts` ranges; empty ones are fine."""
    module = kernels._module()
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 2])
    w, x = torch.tensor([1.0, 2.0, 3.0]), torch.arange(8.0).view(2, 4)
    out = torch.zeros(3, 4)
    module.pair_grads(rows.numpy(), cols.numpy(), w.numpy(), x.numpy(), out.numpy(), 7)
    want = torch.zeros(3, 4).index_add_(0, cols, w[:, None] * x[rows])
    assert torch.equal(out, want)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk", "matryoshka"])
def test_every_sparse_step_is_the_same_without_the_kernels(
    arch: str, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each architecture's training step at the kernels' size (ReLU and JumpReLU made sparse by
    their encoder bias) gives the same loss and gradients with the kernels as with torch's."""
    sae = build_sae(
        arch, 64, 1024, seed=0, **({"k": 8} if "top" in arch or arch == "matryoshka" else {})
    )
    sae.train()
    if arch in ("relu", "jumprelu"):
        with torch.no_grad():  # few latents fire: the sparse step
            sae.b_enc.fill_(-0.5)
            if arch == "jumprelu":
                sae.threshold.fill_(1.5)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(6))
    params = [p for p in sae.parameters() if p.requires_grad]

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = sae(x)
        return out.loss.detach(), list(torch.autograd.grad(out.loss, params, allow_unused=True))

    loss, grads = step()
    assert calls.count("pair_grads") >= 2  # the decoder's and the encoder's
    monkeypatch.setitem(kernels._STATE, "module", None)
    for name in ("tokens_trained",):
        if hasattr(sae, name):
            setattr(sae, name, 0)
    ref_loss, ref_grads = step()
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
