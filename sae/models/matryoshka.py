"""Matryoshka BatchTopK SAE: every prefix of the dictionary reconstructs on its own (Bussmann et
al. 2025, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders")."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from sae.models.base import sq_err
from sae.models.batchtopk import BatchTopKSAE, _decode_flat
from sae.models.config import SAEConfig


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: nested prefixes of the latents, each trained to reconstruct x.

        z, f  as BatchTopK: the top k·N pre-activations of the batch (θ at inference)
        x̂_g   = Σ_{i < m_g} f_i·W_dec,i + b_dec       prefixes m_1 < … < m_G = d_sae
        loss  = (1/G)·Σ_g Σ_N ‖x − x̂_g‖² / Σ_N ‖x − x̄‖²  +  aux_coeff·aux

    with m_g = round(`matryoshka_fractions`[g]·d_sae). The first m_1 latents must reconstruct x
    alone, so they learn the broad features; later prefixes add the specific ones. In a flat
    SAE a broad feature that always co-fires with one of its children gets absorbed into the
    child (the child's latent learns parent + child, the parent's latent stops firing there);
    the prefix losses penalise that, since the parent's own prefix then misses it. The model
    used for evaluation and inference is the whole dictionary: x̂ = x̂_G, the threshold θ, AuxK
    and the unit-norm decoder are BatchTopK's.
    """

    arch = "matryoshka"
    hparams = (*BatchTopKSAE.hparams, "matryoshka_fractions")

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.matryoshka_fractions = [float(f) for f in cfg.matryoshka_fractions]
        self.widths = prefix_widths(self.matryoshka_fractions, cfg.d_sae)

    def _reconstruct(self, x: Tensor, vals: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Training: (x̂_G, the mean over prefixes of Σ_N ‖x − x̂_g‖² / Σ_N ‖x − x̄‖²); each
        prefix decodes its own latents (G·k·N·d_in work)."""
        n, latent = x.shape[0], flat % self.d_sae
        spread = sq_err(x, x.mean(0)).sum().clamp_min(1e-12)  # Σ_N ‖x − x̄‖²
        fvus = []
        for m in self.widths:
            x_hat = _decode_flat(vals * (latent < m), flat, self.W_dec, n) + self.b_dec
            fvus.append(sq_err(x, x_hat).sum() / spread)
        return x_hat, torch.stack(fvus).mean()


def prefix_widths(fractions: list[float], d_sae: int) -> list[int]:
    """The prefix sizes m_g = round(fraction·d_sae), at least 1 and strictly increasing."""
    widths = [max(1, round(f * d_sae)) for f in fractions]
    if widths[-1] != d_sae or any(a >= b for a, b in itertools.pairwise(widths)):
        raise ValueError(
            f"sae.matryoshka_fractions={fractions} give prefixes {widths} of d_sae={d_sae}: they "
            "must increase strictly and end at the whole dictionary (last fraction 1)"
        )
    return widths
