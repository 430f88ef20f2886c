"""The sparse training step (sae.models.sparse): the same numbers as the dense one."""

from __future__ import annotations

import pytest
import torch

from sae.models import sparse
from sae.models.base import SAE, reused, reusing_buffers
from sae.models.jumprelu import JumpReLUSAE
from sae.models.registry import build_sae
from sae.models.relu import ReluSAE

D_IN, D_SAE = 16, 64


def relu_sae(shift: float) -> ReluSAE:
    """A relu SAE in float64 whose latents fire on about Φ(−shift) of (token, latent) pairs of
    data(): b_enc at −shift standard deviations of the pre-activations."""
    sae = build_sae("relu", D_IN, D_SAE, seed=0, l1_coeff=0.3).double().train()
    assert isinstance(sae, ReluSAE)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=torch.float64) + 0.5)  # unequal row norms
        sae.c.normal_(0, 0.5)
        spread = ((data() - sae.c) @ sae.W_enc).std()
        sae.b_enc.normal_(-shift, 0.1).mul_(spread)
    return sae


def data(n: int = 48) -> torch.Tensor:
    return torch.randn(n, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def step(sae: SAE, x: torch.Tensor, below: float, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One training forward and backward with `SPARSE_BELOW` = below: outputs and gradients."""
    monkeypatch.setattr(sparse, "SPARSE_BELOW", below)
    sae.zero_grad()
    sae.tokens_since_fired.fill_(7)
    with reusing_buffers():
        out = sae(x, sparsity_scale=0.5)
        out.loss.backward()
        f = out.f.to_dense() if out.f.is_sparse else out.f.detach().clone()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    values = {"loss": out.loss, "mse": out.mse, "aux": out.aux, "l0": out.l0, "x_hat": out.x_hat}
    return {k: v.detach() for k, v in values.items()} | {
        "f": f,
        "grads": grads,
        "since": sae.tokens_since_fired.clone(),
        "sparse": out.f.is_sparse,
    }


def test_relu_sparse_step_equals_the_dense_step_and_the_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ~7% of latents firing, the sparse step (forced: SPARSE_BELOW 1) and the dense one
    (SPARSE_BELOW 0) give the same loss, mse, aux, L0, x̂, f, firing counters and gradients,
    and both equal autograd through ReLU's textbook formula."""
    sae, x = relu_sae(shift=1.5), data()
    fast = step(sae, x, 1.0, monkeypatch)
    slow = step(sae, x, 0.0, monkeypatch)
    assert fast["sparse"] and not slow["sparse"]
    assert 0.02 < fast["l0"].item() / D_SAE < 0.2
    sae.zero_grad()
    f = ((x - sae.c) @ sae.W_enc + sae.b_enc).relu()
    x_hat = f @ sae.W_dec + sae.b_dec
    recon = ((x - x_hat) ** 2).sum(-1).mean()
    aux = (f @ sae.W_dec.norm(dim=-1)).mean()
    (recon + sae.l1_coeff * 0.5 * aux).backward()
    want = {name: p.grad for name, p in sae.named_parameters()}
    assert torch.equal(fast["f"], slow["f"])  # one encoder product: the same bits
    for got in (fast, slow):
        torch.testing.assert_close(got["x_hat"], x_hat.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["f"], f.detach(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got["aux"], aux.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(got["mse"], recon.detach() / D_IN, rtol=1e-12, atol=0)
        assert got["l0"].item() == pytest.approx((f > 0).sum().item() / x.shape[0], abs=1e-6)
        fired = (f > 0).any(0)
        assert (got["since"][fired] == 0).all() and (got["since"][~fired] == 7 + 48).all()
        for name, g in want.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-9, atol=1e-12)


def test_jumprelu_sparse_step_equals_the_dense_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """JumpReLU's sparse step (the pairs with z > θ − ε/2: those firing and those in the
    kernel's reach below θ) gives the dense step's loss (with the L0 price κ and the
    pre-activation loss on), aux, L0, x̂, f, firing counters and gradients, θ's included; both
    sides of θ hold kernel pairs."""
    hp = {"l1_coeff": 0.3, "bandwidth": 0.05, "target_l0": 3, "pre_act_coeff": 0.05}
    sae = build_sae("jumprelu", D_IN, D_SAE, seed=0, **hp).double()
    assert isinstance(sae, JumpReLUSAE)
    x = data()
    with torch.no_grad():
        sae.c.normal_(0, 0.5)
        z = (x - sae.c) @ sae.W_enc
        sae.b_enc.copy_(-z.std() * 1.2)
        z = z + sae.b_enc
        sae.threshold.copy_(z.quantile(0.95, dim=0).clamp_min(0))  # ~5% fire per latent
    sae.train().l0_stiffness = 5.0
    eps = sae.bandwidth * D_IN**0.5
    u = (z - sae.threshold) / eps
    assert ((u.abs() < 0.5) & (u > 0)).any() and ((u.abs() < 0.5) & (u <= 0)).any()
    fast = step(sae, x, 1.0, monkeypatch)
    slow = step(sae, x, 0.0, monkeypatch)
    assert fast["sparse"] and not slow["sparse"]
    assert torch.equal(fast["f"], slow["f"]) and torch.equal(fast["since"], slow["since"])
    assert fast["l0"].item() == slow["l0"].item() == (slow["f"] > 0).sum().item() / x.shape[0]
    for key in ("loss", "mse", "aux", "x_hat"):
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-12, atol=1e-12)
    assert slow["grads"]["threshold"].abs().sum() > 0
    for name, g in slow["grads"].items():
        torch.testing.assert_close(fast["grads"][name], g, rtol=1e-9, atol=1e-12)


def test_firing_is_sparse_only_below_the_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """firing(z, floor): the (token, latent) pairs with z > floor, sorted by token, only where
    fewer than SPARSE_BELOW of z's entries pass, counted first on SAMPLE_ROWS rows, then on all;
    a floor per latent."""
    monkeypatch.setattr(sparse, "SAMPLE_ROWS", 2)
    z = torch.full((4, 32), -1.0)
    z[0, 3] = z[2, 1] = z[2, 30] = 0.5  # 3 of 128: below 1/16
    rows, cols = sparse.firing(z)
    assert rows.tolist() == [0, 2, 2] and cols.tolist() == [3, 1, 30]
    floor = torch.zeros(32)
    floor[1] = 0.7  # (2, 1) no longer passes
    rows, cols = sparse.firing(z, floor)
    assert rows.tolist() == [0, 2] and cols.tolist() == [3, 30]
    z[3, :6] = 1.0  # 9 of 128 overall (above 1/16), 1 of 64 in the first two rows
    assert sparse.firing(z) is None
    z[3, :6] = -1.0
    z[1, :4] = 1.0  # 7 of 128 overall (below), 5 of 64 in the first two rows (above)
    assert sparse.firing(z) is None


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_input_gradient_and_eval_take_the_dense_step(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input that needs a gradient gets autograd's (the sparse step gives the data none), and
    eval mode returns the dense f, ReLU(z) or z·1[z > θ], even where few latents fire."""
    monkeypatch.setattr(sparse, "SPARSE_BELOW", 1.0)
    sae = relu_sae(shift=1.5)
    if arch == "jumprelu":
        sae = build_sae(arch, D_IN, D_SAE, seed=0, l1_coeff=0.3).double().train()
        with torch.no_grad():
            sae.b_enc.fill_(-1.5 * (data() @ sae.W_enc).std().item())
    x = data().requires_grad_()
    out = sae(x)
    assert not out.f.is_sparse
    (grad,) = torch.autograd.grad(out.loss, x)
    x2 = x.detach().clone().requires_grad_()
    z = (x2 - sae.c) @ sae.W_enc + sae.b_enc
    if arch == "relu":
        f = z.relu()
        penalty = (f @ sae.W_dec.norm(dim=-1)).mean()
    else:  # the L0 penalty has no gradient to the input
        f = z * (z > sae.threshold)
        penalty = torch.zeros((), dtype=z.dtype)
    assert 0 < (f > 0).double().mean() < 0.2  # few fire: at SPARSE_BELOW 1 the step would be sparse
    x_hat = f @ sae.W_dec + sae.b_dec
    loss = ((x2 - x_hat) ** 2).sum(-1).mean() + sae.l1_coeff * penalty
    (want,) = torch.autograd.grad(loss, x2)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    f_eval = sae.eval()(x.detach()).f
    assert not f_eval.is_sparse
    torch.testing.assert_close(f_eval, f.detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_dense_step_off_cpu_keeps_the_device(arch: str) -> None:
    """Off CPU (here the meta device: shapes only) the dense step runs, backward included: no
    CPU buffer meets a tensor of another device (as on CUDA, where the step is always dense)."""
    sae = build_sae(arch, D_IN, D_SAE, seed=0).to("meta").train()
    out = sae(torch.empty(8, D_IN, device="meta"))
    out.loss.backward()
    assert not out.f.is_sparse and sae.W_enc.grad.device.type == "meta"


def test_reused_slots_are_separate_buffers() -> None:
    """The pre-activations ("z") and their gradient ("grad") reuse storage of their own."""
    with reusing_buffers():
        z1, g1 = reused((8, 4), torch.float32), reused((8, 4), torch.float32, "grad")
        z2 = reused((8, 4), torch.float32)
        assert z1.data_ptr() == z2.data_ptr() != g1.data_ptr()
