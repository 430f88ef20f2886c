"""The metrics of DESIGN §6, one definition each, as pure functions plus a streaming accumulator.

Notation: x (N, d_in) activations, x̂ (N, d_in) reconstructions, f (N, d_sae) latents, x̄ the mean
of x over tokens. Every function computes in float64 and returns a Python float.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mse(x: Tensor, x_hat: Tensor) -> float:
    """mse = (1/N) Σ_n ‖x_n − x̂_n‖² / d_in: mean over tokens and dimensions."""
    return (x.double() - x_hat.double()).pow(2).mean().item()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: fvu = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²."""
    x = x.double()
    return ((x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """explained_variance = 1 − fvu."""
    return 1.0 - fvu(x, x_hat)


def l0(f: Tensor) -> float:
    """l0 = (1/N) Σ_n #{i : f_n,i ≠ 0}: mean number of non-zero latents per token."""
    return (f != 0).sum(-1).double().mean().item()


def fire_counts(f: Tensor) -> Tensor:
    """(d_sae,) int64: on how many of the N tokens each latent is non-zero."""
    return (f != 0).sum(0)


def dead_frac(fire_counts: Tensor) -> float:
    """Fraction of latents that never fired (fire count 0) over the window the counts cover."""
    return (fire_counts == 0).double().mean().item()


def dense_frac(fire_counts: Tensor, n_tokens: int, threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than `threshold` (default 10%) of the n_tokens tokens."""
    return (fire_counts.double() / n_tokens > threshold).double().mean().item()


def loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(ce_ablated − ce_sae) / (ce_ablated − ce_clean): 1 = as good as clean, 0 = as bad as the
    ablation (zeroed or mean activation at the hook)."""
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean)


def kl_per_token(logp_clean: Tensor, logp_sae: Tensor) -> Tensor:
    """KL(p_clean ‖ p_sae) = Σ_v p_clean(v)·(log p_clean(v) − log p_sae(v)) per position:
    (..., vocab) log-probabilities -> (...,) nats."""
    return (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)


class KLToClean:
    """`kl_per_token(logp_clean, ·)` for many logp_sae against one clean distribution, as
    Σ_v p·log p − Σ_v p·log q: p and its negative entropy are computed once, and each call is a
    single fused dot product per position (no (…, vocab) temporaries)."""

    def __init__(self, logp_clean: Tensor):
        self.p = logp_clean.exp()
        self.neg_entropy = torch.linalg.vecdot(self.p, logp_clean)

    def __call__(self, logp_sae: Tensor) -> Tensor:
        return self.neg_entropy - torch.linalg.vecdot(self.p, logp_sae)


class ReconstructionStats:
    """Streaming `mse, fvu, explained_variance, l0, dead_frac, dense_frac` over many batches.

    Keeps, in float64: S_err = Σ‖x − x̂‖², S_x = Σx (d_in,), S_xx = Σ‖x‖², the token count N,
    S_nnz = Σ_n #{f_n ≠ 0}, and per-latent fire counts (d_sae,). Then
        mse = S_err / (N·d_in),   fvu = S_err / (S_xx − ‖S_x‖²/N),   l0 = S_nnz / N,
    which equal the batch functions on the concatenated data. The dead/dense window is the
    `tokens` seen by `update`.
    """

    def __init__(self, d_sae: int, dense_threshold: float = 0.1):
        self.dense_threshold = dense_threshold
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64)
        self.n_tokens = 0
        self.d_in: int | None = None
        self.sum_err = self.sum_xx = self.sum_nnz = 0.0
        self.sum_x: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """Add a batch: x, x̂ (N, d_in), f (N, d_sae)."""
        x, x_hat = x.detach().double(), x_hat.detach().double()
        fired = f.detach() != 0  # (N, d_sae), reduced where it lives
        if self.sum_x is None:
            self.d_in, self.sum_x = x.shape[-1], torch.zeros(x.shape[-1], dtype=torch.float64)
        self.sum_err += (x - x_hat).pow(2).sum().item()
        self.sum_x += x.sum(0).cpu()
        self.sum_xx += x.pow(2).sum().item()
        self.sum_nnz += fired.sum().item()
        self.fire_counts += fired.sum(0).cpu()
        self.n_tokens += x.shape[0]

    def compute(self) -> dict[str, float]:
        """{mse, fvu, explained_variance, l0, dead_frac, dense_frac, tokens} over all updates."""
        if self.sum_x is None or self.d_in is None:
            raise ValueError("ReconstructionStats.compute() before any update()")
        n = self.n_tokens
        total_var = self.sum_xx - self.sum_x.pow(2).sum().item() / n  # Σ‖x − x̄‖²
        fvu_ = self.sum_err / total_var
        return {
            "mse": self.sum_err / (n * self.d_in),
            "fvu": fvu_,
            "explained_variance": 1.0 - fvu_,
            "l0": self.sum_nnz / n,
            "dead_frac": dead_frac(self.fire_counts),
            "dense_frac": dense_frac(self.fire_counts, n, self.dense_threshold),
            "tokens": float(n),
        }
