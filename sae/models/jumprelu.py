"""JumpReLU SAE with a straight-through L0 penalty (Rajamanoharan et al. 2024, "Jumping Ahead")."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae.models.base import SAE, Centred, SAEOutput, random_directions, sq_err
from sae.models.config import SAEConfig
from sae.models.sparse import Dense, Encoder, addmm_reused, decode_bags, firing
from sae.models.topk import TopKSAE

PRE_ACT_STRIDE = 8
"""The pre-activation loss is estimated on every 8th token of a batch, at an eighth of its GEMM:
an unbiased mean where rows come shuffled, as the tasks' loader gives them (library `fit` on
batches of whole sequences in order would always sample the same positions)."""


class JumpReLUSAE(Centred, SAE):
    """JumpReLU SAE, as trained for Gemma Scope: a learnt threshold per latent, an L0 penalty.

        z    = ReLU((x − c) @ W_enc + b_enc)                  (N, d_sae)   c fixed (`Centred`)
        f    = z·H(z − θ)                                     θ = `threshold` (d_sae,) >= 0
        x̂    = f @ W_dec + b_dec                              (N, d_in)
        loss = mean_N ‖x − x̂‖² + sparsity_scale·(λ·aux + κ·T/2·(aux/T − 1)²) + ρ·P
        aux  = mean_N Σ_i H(z_i − θ_i)                        the L0, before λ = `l1_coeff`
        P    = mean_N Σ_i ReLU(θ_i − h_i)·‖W_dec,i‖           ρ = `pre_act_coeff` (training)
        h    = (x − c) @ W_enc + b_enc                        z before its ReLU
    P, Anthropic's pre-activation loss, pulls each latent's pre-activation h up toward θ on the
    tokens where it does not fire, to the encoder only (θ and the norms as constants), so a
    latent that never fires (h < 0 everywhere: z, after the ReLU, would give it no gradient) is
    drawn back instead of staying dead; it is estimated on every `PRE_ACT_STRIDE`-th token
    (`PreAct`: one GEMM on those rows, the step's h reused; no gradient to an input x that
    needs one).
    κ = `l0_stiffness` is 0 but, after `FitConfig.l0_stiffness_from` of a run, the trainer sets
    it to steer to T = `target_l0` (`FitConfig.l0_stiffness`). Under torchrun each rank prices
    its own slice's L0 (the config refuses several processes with a target, so only library use
    can meet that).

    H has no useful gradient, so θ learns through straight-through estimators with the rectangle
    kernel K(u) = 1[|u| < 1/2] of bandwidth ε:
        ∂f/∂θ := −(θ/ε)·K((z − θ)/ε),   ∂H/∂θ := −(1/ε)·K((z − θ)/ε),   ∂f/∂z = H,   ∂H/∂z = 0.
    The L0 thus moves θ only; the encoder learns from the reconstruction (as in the paper) and P.
    θ is an fp32 parameter, compared and differentiated in fp32 under bf16 autocast too (a bf16 θ,
    8 significant bits, would swallow Adam's steps), and clamped at 0 after each step.

    θ is trained directly, not as the paper's exp(log_threshold): Adam moves a parameter by about
    lr per step whatever its gradient, so log θ changes θ by a factor 1 ± lr per step, and from
    the small init θ hardly moves in a run of a few thousand steps, leaving the L0 deaf to λ
    (measured on synthetic data, 300 steps at lr 3e-3: median θ 0.008 -> 0.014, L0 58 for every
    λ in 0.01..1). θ itself moves like b_enc, in the same units. SAELens and dictionary_learning
    made the same choice for the same reason.

    The decoder rows start at norm 1 and, with `unit_decoder` (Gemma Scope's choice; off by
    default since 2026-12-07, `SAEConfig.unit_decoder`), stay there by TopK's hooks (gradient
    along each row removed, rows renormalised): unit rows make f and θ comparable across
    latents, but the L0 does not see decoder norms, so the constraint only takes freedom away
    (known-answer data, target L0 16: F1 0.631 → 0.702 flat, 0.680 → 0.739 hierarchical
    without it). Free rows let a latent's scale drift, so the kernel's width ε (absolute, below)
    is no longer the same relative width for every latent; the scores above include that. λ
    keeps the name `l1_coeff`, so one config key (and the trainer's `target_l0` controller)
    works for relu and jumprelu alike.

    Training on CPU takes the sparse step (`sae.models.sparse`, as relu) where fewer than
    `SPARSE_BELOW` of the (token, latent) pairs have z > θ − ε/2: only those have a gradient
    from the reconstruction and the L0 (∂L/∂z needs H, ∂L/∂θ the kernel), so only those are
    decoded and differentiated (P's gradient, dense on its sampled rows, is `PreAct`'s).

    Units: inputs are scaled to E‖x‖ = √d_in (the trainer does that); `bandwidth` and
    `init_threshold` are in the paper's units, where E‖x‖² = 1, and are multiplied by √d_in here.

    Init: W_dec rows are random unit directions, W_enc = W_decᵀ, b_enc = 0,
    θ = init_threshold·√d_in; b_dec = 0 until the trainer sets it to the geometric median.
    """

    arch = "jumprelu"
    hparams = ("l1_coeff", "bandwidth", "init_threshold", "centre", "unit_decoder", "pre_act_coeff")
    saved_before: ClassVar[dict[str, Any]] = {"unit_decoder": True, "pre_act_coeff": 0.0}
    train_attrs = ("l1_coeff",)  # target_l0 steers l1_coeff
    l0_stiffness = 0.0  # κ of the loss above: set by the trainer's L0 controller, 0 otherwise

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.l1_coeff, self.bandwidth = float(cfg.l1_coeff), float(cfg.bandwidth)
        self.init_threshold = float(cfg.init_threshold)
        self.unit_decoder = cfg.unit_decoder
        self.pre_act_coeff = float(cfg.pre_act_coeff)
        theta = torch.full((cfg.d_sae,), self.init_threshold * math.sqrt(d_in))
        self.threshold = nn.Parameter(theta)
        with torch.no_grad():
            self.W_dec.copy_(random_directions(cfg.d_sae, d_in, 1.0))
            self.W_enc.copy_(self.W_dec.T)

    def encode(self, x: Tensor) -> Tensor:
        """f = z·H(z − θ), z = ReLU(x @ W_enc + b_enc): (N, d_in) -> (N, d_sae)."""
        z = torch.addmm(self.b_enc, x - self.c, self.W_enc).relu()
        return z * (z > self.threshold)

    def _pre_act(self, x_c: Tensor, h: Tensor) -> Tensor:
        """ρ·P: `pre_act_coeff`·mean over every `PRE_ACT_STRIDE`-th token of
        Σ_i ReLU(θ_i − h_i)·‖W_dec,i‖ for h the pre-activations before the ReLU (θ and the
        norms without gradient)."""
        norms = self.W_dec.detach().norm(dim=-1)
        rows = slice(None, None, PRE_ACT_STRIDE)
        p = PreAct.apply(x_c[rows], self.W_enc, self.b_enc, h.detach()[rows], self.threshold, norms)
        return self.pre_act_coeff * p

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> SAEOutput:
        # z before the ReLU: θ >= 0 makes z·H(z − θ) the same, and the straight-through kernel
        # K((z − θ)/ε) then sees where z really is (after a ReLU every z <= 0 sits at 0, and for
        # θ < ε/2 those zeros counted as "near the threshold", pushing θ up for nothing).
        x_c = x - self.c
        with torch.no_grad():  # one encoder product; gradients come from Dense or Encoder
            z = addmm_reused(self.b_enc, x_c, self.W_enc)  # (N, d_sae)
        eps = self.bandwidth * math.sqrt(self.d_in)
        # Only pairs with z > θ − ε/2 get a gradient: those that fire or sit in the kernel
        floor = self.threshold.detach() - eps / 2
        pairs = firing(z, floor) if self.training and not x.requires_grad else None
        if pairs is not None:
            x_hat, f, aux = self._sparse(x_c, z, *pairs, eps)
        else:
            z = Dense.apply(x_c, self.W_enc, self.b_enc, z, False)  # (N, d_sae), with gradients
            f, h = JumpStep.apply(z, self.threshold, eps)  # (N, d_sae) each; h is fp32
            x_hat = self.decode(f)  # (N, d_in)
            aux = h.sum(-1).mean()  # mean_N L0, exact in fp32
            if self.training:
                self._record_firing(f)
        recon = sq_err(x, x_hat).mean()  # mean_N ‖x − x̂‖²
        loss = recon + (self.l1_coeff * sparsity_scale) * aux
        if self.training and self.pre_act_coeff:
            loss = loss + self._pre_act(x_c, z)
        if self.l0_stiffness > 0:  # target_l0: a price that follows this batch's own L0
            t = self.target_l0
            if t is None:
                raise ValueError("l0_stiffness prices the L0 against sae.target_l0, which is None")
            loss = loss + sparsity_scale * self.l0_stiffness * t / 2 * (aux / t - 1) ** 2
        return SAEOutput(x_hat, f, loss, recon / self.d_in, aux, aux.detach())

    def _sparse(
        self, x_c: Tensor, z: Tensor, rows: Tensor, cols: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The training forward on the pairs (rows, cols) where z > θ − ε/2 alone — those that
        fire and those within the kernel's reach, the only ones with a gradient: (x̂, f as a
        sparse COO tensor without gradient, aux = mean_N L0)."""
        n = x_c.shape[0]
        vals = Encoder(x_c, self.W_enc, self.b_enc)(rows, cols, z[rows, cols])  # (nnz,)
        f, h = JumpStep.apply(vals, self.threshold.index_select(0, cols), eps)  # f 0 at z <= θ
        x_hat = decode_bags(f, rows, cols, n, self.W_dec) + self.b_dec
        f, _ = self._record_pairs(f, rows, cols, n)  # kernel-only pairs: value 0, not fired
        return x_hat, f, h.sum() / n

    # The decoder's hooks are TopK's (`unit_decoder`): they only touch W_dec.
    before_step = TopKSAE.before_step

    @torch.no_grad()
    def after_step(self) -> None:
        """`unit_decoder`: renormalise the decoder rows; θ < 0 would count every latent, zeros
        included, in L0."""
        TopKSAE.after_step(self)
        self.threshold.clamp_(min=0)


class PreAct(torch.autograd.Function):
    """(x_c, W, b, h, θ, norms) -> mean_N Σ_i ReLU(θ_i − h_i)·norms_i for h = x_c @ W + b
    computed by the caller without autograd, the value in fp32 at least; backward to W and b
    only, the GEMM in h's dtype (bf16 under autocast, as the encoder's own), the gradients in W's:
        G = −(1/N)·1[h < θ]·norms,   ∂L/∂W = x_cᵀ·G,   ∂L/∂b = Σ_N G
    (one GEMM of N·d_in·d_sae, where autograd would redo the forward product too)."""

    @staticmethod
    def forward(
        ctx: Any, x_c: Tensor, W: Tensor, b: Tensor, h: Tensor, theta: Tensor, norms: Tensor
    ) -> Tensor:
        wide = torch.promote_types(h.dtype, theta.dtype)  # fp32 at least: θ is
        theta, norms = theta.detach().to(wide), norms.to(wide)
        gap = (theta - h.to(wide)).clamp_min(0)  # (N, d_sae); no matmul, for autocast
        ctx.save_for_backward(x_c, h, theta, norms)
        ctx.w_dtype = W.dtype
        return (gap * norms).sum(-1).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, None, None, None]:
        x_c, h, theta, norms = ctx.saved_tensors
        g = (h.to(theta.dtype) < theta) * (norms * (-grad.to(theta.dtype) / h.shape[0]))
        grad_w = (x_c.to(h.dtype).T @ g.to(h.dtype)).to(ctx.w_dtype)
        return None, grad_w, g.sum(0).to(ctx.w_dtype), None, None, None


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpStep(torch.autograd.Function):
    """(z, θ, ε) -> (f = z·H(z − θ), H(z − θ)), with the straight-through gradients for θ.

    One function for both outputs: they share the comparison and the kernel. Backward, in fp32
    whatever z's dtype (θ's gradient sums N tiny terms):
        ∂L/∂z = H·∂L/∂f
        ∂L/∂θ = −(1/ε)·Σ_N K((z − θ)/ε)·(θ·∂L/∂f + ∂L/∂H)
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        wide = torch.promote_types(z.dtype, theta.dtype)  # fp32 at least: θ is
        h = (z > theta).to(wide)  # (N, d_sae)
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * h.to(z.dtype), h

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor, grad_h: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        h = z > theta
        wide = theta.dtype
        k = _rectangle((z.to(wide) - theta) / ctx.eps)  # (N, d_sae)
        grad_theta = k * (theta * grad_f.to(wide) + grad_h)
        if grad_theta.dim() > theta.dim():  # (N, d_sae) -> (d_sae,); per pair: θ[cols] given
            grad_theta = grad_theta.sum(0)
        return grad_f * h, -grad_theta / ctx.eps, None
