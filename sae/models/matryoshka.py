"""Matryoshka SAE: every prefix of the dictionary reconstructs on its own (Bussmann et al. 2025,
"Learning Multi-Level Features with Matryoshka Sparse Autoencoders"), with each token's top k
(TopK) or the batch's top k·N (BatchTopK, the paper's) latents."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch
from torch import Tensor

from sae.models.base import spread, sq_err
from sae.models.batchtopk import BatchTopKSAE, _decode_flat
from sae.models.config import SAEConfig
from sae.models.kernels import topk_rows
from sae.models.topk import TopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka SAE: nested prefixes of the latents, each trained to reconstruct x.

        z     = (x − b_dec) @ W_enc + b_enc                              (N, d_sae)
        f     = TopK_k'(z)·1[z > θ] per token                `matryoshka_topk` = "token"
        f     = BatchTopK_{k·N}(z) (θ at inference)          `matryoshka_topk` = "batch"
        x̂_g   = Σ_{i < m_g} f_i·W_dec,i + b_dec       prefixes m_1 < … < m_G = d_sae
        loss  = (1/G)·Σ_g Σ_N ‖x − x̂_g‖² / Σ_N ‖x − x̄‖²  +  aux_coeff·aux

    with m_g = round(`matryoshka_fractions`[g]·d_sae). The first m_1 latents must reconstruct x
    alone, so they learn the broad features; later prefixes add the specific ones. In a flat
    SAE a broad feature that always co-fires with one of its children gets absorbed into the
    child (the child's latent learns parent + child, the parent's latent stops firing there);
    the prefix losses penalise that, since the parent's own prefix then misses it. The model
    used for evaluation and inference is the whole dictionary: x̂ = x̂_G; AuxK and the
    decoder's norm (`unit_decoder`) are TopK's, as are k' = round(`k_train_factor`·k) and θ
    with "token" (θ 0 at k' = k); with "batch", θ is BatchTopK's.
    """

    arch = "matryoshka"
    hparams = (*BatchTopKSAE.hparams, "matryoshka_fractions", "matryoshka_topk")
    saved_before: ClassVar[dict[str, Any]] = {
        **BatchTopKSAE.saved_before,
        "matryoshka_topk": "batch",
    }

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.matryoshka_fractions = [float(f) for f in cfg.matryoshka_fractions]
        self.matryoshka_topk = cfg.matryoshka_topk
        self.widths = prefix_widths(self.matryoshka_fractions, cfg.d_sae)

    @property
    def encodes_as(self) -> str:
        return "topk" if self.matryoshka_topk == "token" else "batchtopk"

    def encode(self, x: Tensor) -> Tensor:
        """f (N, d_in) -> (N, d_sae): each token's top k ("token") or z·1[z > θ] ("batch")."""
        if self.encodes_as == "topk":
            return TopKSAE.encode(self, x)
        return super().encode(x)

    def _select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Training: each token's k largest pre-activations ("token") or the batch's k·N
        largest ("batch"); values and indices into z.flatten()."""
        if self.matryoshka_topk == "batch":
            return super()._select(z)
        top, idx = topk_rows(z, self.k_train)  # (N, k')
        rows = torch.arange(z.shape[0], device=z.device).unsqueeze(1)
        return top.flatten(), (rows * self.d_sae + idx).flatten()

    def _update_threshold(self, vals: Tensor) -> None:
        """θ as TopK's ("token": learnt only where k_train_factor > 1) or BatchTopK's ("batch")."""
        if self.matryoshka_topk == "batch":
            super()._update_threshold(vals)
        else:
            TopKSAE._update_threshold(self, vals)

    def _reconstruct(self, x: Tensor, vals: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Training: (x̂_G, the mean over prefixes of Σ_N ‖x − x̂_g‖² / Σ_N ‖x − x̄‖²); each
        prefix decodes its own latents (G·k·N·d_in work)."""
        n, latent = x.shape[0], flat % self.d_sae
        total = spread(x).clamp_min(1e-12)  # Σ_N ‖x − x̄‖²
        fvus = []
        for m in self.widths:
            x_hat = _decode_flat(vals * (latent < m), flat, self.W_dec, n) + self.b_dec
            fvus.append(sq_err(x, x_hat).sum() / total)
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
