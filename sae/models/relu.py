"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates", April 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from sae.models.base import SAE, Centred, SAEOutput, random_directions, sq_err
from sae.models.config import SAEConfig
from sae.models.sparse import Dense, Encoder, addmm_reused, decode_bags, firing


class ReluSAE(Centred, SAE):
    """ReLU SAE, Anthropic's April 2024 recipe.

        f    = ReLU((x − c) @ W_enc + b_enc)               (N, d_sae)   c fixed: the data's median
        x̂    = f @ W_dec + b_dec                            (N, d_in)
        loss = mean_N ‖x − x̂‖² + λ·sparsity_scale·aux
        aux  = mean_N Σ_i f_i·‖W_dec,i‖₂                    L1 weighted by decoder row norms

    c is the geometric median of the first batch (`centre_on`, by the trainer), fixed: unlike a
    learned b_dec it does not move, so Adam's per-coordinate steps on W_enc do not shift every
    latent's effective bias by lr·‖c‖₁ per step (with a large offset, as real residual streams
    have, that killed every latent: L0 0). At the end c is folded exactly into b_enc
    (`fold_centre`: b_enc ← b_enc − c @ W_enc), so the saved SAE is f = ReLU(x @ W_enc + b_enc).
    The decoder is unconstrained, as in Anthropic's recipe:
    weighting f_i by ‖W_dec,i‖ stops the optimiser from shrinking f while growing W_dec. The
    squared error is summed over dimensions (not averaged), so λ = `l1_coeff` means what it
    means in the paper for inputs scaled to E‖x‖ = √d_in (the trainer does that).

    Training on CPU takes the sparse step (`sae.models.sparse`) where fewer than `SPARSE_BELOW`
    of the (token, latent) pairs fire: only those are decoded and differentiated (f is then a
    sparse COO tensor), the dense step's numbers (in fp32; under bf16 autocast the sparse step
    decodes in fp32) at a fraction of its cost (a step at L0 37 of 2048, d_in 256, batch 4096:
    60 ms against 170 ms; a whole run on known-answer data 1.8× faster).

    Init: W_dec rows are random directions of norm `init_norm`, W_enc = W_decᵀ, b_enc = 0;
    b_dec = 0 until the trainer sets it to the geometric median of a sample.
    """

    arch = "relu"
    hparams = ("l1_coeff", "init_norm", "centre")
    train_attrs = ("l1_coeff",)  # target_l0 steers l1_coeff

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.l1_coeff, self.init_norm = float(cfg.l1_coeff), float(cfg.init_norm)
        with torch.no_grad():
            self.W_dec.copy_(random_directions(cfg.d_sae, d_in, self.init_norm))
            self.W_enc.copy_(self.W_dec.T)

    def encode(self, x: Tensor) -> Tensor:
        """f = ReLU((x − c) @ W_enc + b_enc): (N, d_in) -> (N, d_sae) (c = 0 once folded)."""
        return torch.addmm(self.b_enc, x - self.c, self.W_enc).relu()

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> SAEOutput:
        x_c = x - self.c
        with torch.no_grad():  # one encoder product; gradients come from Dense or Encoder
            z = addmm_reused(self.b_enc, x_c, self.W_enc)  # (N, d_sae) pre-activations
        fired = firing(z) if self.training and not x.requires_grad else None
        if fired is not None:  # few latents fire: (token, latent) pairs, sorted by token
            x_hat, f, aux, l0 = self._sparse(x_c, z, *fired)
        else:
            f = Dense.apply(x_c, self.W_enc, self.b_enc, z, True)  # (N, d_sae)
            x_hat = self.decode(f)  # (N, d_in)
            l1 = f @ self.W_dec.norm(dim=-1)  # (N,) Σ_i f_i·‖W_dec,i‖ (bf16 under autocast)
            aux = l1.to(torch.promote_types(l1.dtype, torch.float32)).mean()
            l0 = None
            if self.training:
                self._record_firing(f)
                l0 = torch.count_nonzero(f.detach() > 0).float() / x.shape[0]
        recon = sq_err(x, x_hat).mean()  # mean_N ‖x − x̂‖²
        loss = recon + (self.l1_coeff * sparsity_scale) * aux
        return SAEOutput(x_hat, f, loss, recon / self.d_in, aux, l0)

    def _sparse(
        self, x_c: Tensor, z: Tensor, rows: Tensor, cols: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training forward on the firing pairs (rows, cols) of z alone: (x̂, f as a sparse
        COO tensor without gradient, aux, L0), N·L0·d_in work past the encoder's product."""
        n = x_c.shape[0]
        vals = Encoder(x_c, self.W_enc, self.b_enc)(rows, cols, z[rows, cols])  # (nnz,)
        x_hat = decode_bags(vals, rows, cols, n, self.W_dec) + self.b_dec
        l1 = vals.to(self.W_dec.dtype) * self.W_dec.norm(dim=-1)[cols]  # f_i·‖W_dec,i‖, f_i > 0
        f, l0 = self._record_pairs(vals, rows, cols, n)
        return x_hat, f, l1.sum() / n, l0
