"""BatchTopK SAE: the top k·B activations of a batch (Bussmann et al. 2024, "BatchTopK SAEs")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae.models.base import SAEOutput, spread, sq_err
from sae.models.sparse import decode_bags
from sae.models.topk import TopKSAE

MARGIN = 1.5
"""batch_topk's threshold lets about MARGIN·n values through to the final top-k."""
SAMPLE_STRIDE = 97
"""batch_topk sets its threshold from every SAMPLE_STRIDE-th value (a prime: all columns)."""


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: k latents per token on average over a batch, a threshold at inference.

        z    = ReLU((x − b_dec) @ W_enc + b_enc)                 (N, d_sae)
        f    = BatchTopK_{k·N}(z)     training: keep the k·N largest z of the whole batch
        f    = z·1[z > θ]             eval:     one threshold θ for every latent and token
        x̂    = f @ W_dec + b_dec                                 (N, d_in)
        loss = Σ_N ‖x − x̂‖² / Σ_N ‖x − x̄‖²  +  aux_coeff·aux   (batch FVU + AuxK, as TopK)
        θ    ← β·θ + (1 − β)·min{f > 0}   after each training batch (θ = 0: the first minimum)

    Tokens share a budget of k·N latents, so a hard token can use more than k and an easy one
    fewer. Training a token's code depends on the rest of its batch; at inference it must not,
    hence θ: the running average of the smallest activation the batch kept, which gives about k
    latents per token on the training distribution. θ is a buffer saved with the weights; 0 (never
    trained) keeps every positive z. With `k_train_factor` > 1 training keeps the batch's
    k'·N largest, k' = round(k_train_factor·k), and θ averages the (k·N)-th largest of them
    (TopK's). `threshold_beta` = β sets the average's horizon, about
    1/(1 − β) batches: long enough to smooth one batch's noise, short enough to forget the
    thresholds of the early, untrained SAE. The decoder, AuxK and dead latents are TopK's.
    """

    arch = "batchtopk"
    hparams = (*TopKSAE.hparams, "threshold_beta")
    optional_tensors = ()  # θ has been saved since the first BatchTopK: a file without is broken

    def encode(self, x: Tensor) -> Tensor:
        """f = z·1[z > θ]: (N, d_in) -> (N, d_sae); the inference code, whatever the mode."""
        z = self.pre_acts(x).relu()
        return z * (z > self.threshold)

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> SAEOutput:
        if not self.training:
            f = self.encode(x)  # (N, d_sae)
            x_hat = self.decode(f)
            err = sq_err(x, x_hat)  # (N,)
            fvu = err.sum() / spread(x).clamp_min(1e-12)
            return SAEOutput(x_hat, f, fvu, err.mean() / self.d_in, fvu.new_zeros(()))
        z, encoder = self.pre_acts_sparse(x)  # z (N, d_sae) without autograd
        top, flat = self._select(z)  # (k·N,) values and their indices into z.flatten()
        vals = encoder(flat // self.d_sae, flat % self.d_sae, top).relu()  # with gradients
        x_hat, recon = self._reconstruct(x, vals, flat)  # (N, d_in), ()
        err = sq_err(x, x_hat)
        aux = self._auxk(x, x_hat, z, encoder)
        f, l0 = self._fired(vals, flat // self.d_sae, flat % self.d_sae, x.shape[0])
        self._update_threshold(vals)
        return SAEOutput(x_hat, f, recon + self.aux_coeff * aux, err.mean() / self.d_in, aux, l0)

    def _select(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Training: the kept pre-activations of z (N, d_sae), k·N of them, and their indices
        into z.flatten(): the batch's largest."""
        return batch_topk(z, self.k_train * z.shape[0])

    def _reconstruct(self, x: Tensor, vals: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Training: (x̂ from the batch's kept (token, latent) pairs, the reconstruction loss:
        the batch FVU Σ_N ‖x − x̂‖² / Σ_N ‖x − x̄‖²)."""
        x_hat = _decode_flat(vals, flat, self.W_dec, x.shape[0]) + self.b_dec  # (N, d_in)
        return x_hat, sq_err(x, x_hat).sum() / spread(x).clamp_min(1e-12)

    @torch.no_grad()
    def _update_threshold(self, vals: Tensor) -> None:
        """Average θ with the smallest positive kept activation (of the k'·N kept, the (k·N)-th
        largest; no host sync: all tensors)."""
        self._average_threshold(vals, round(vals.numel() * self.k / self.k_train))


def batch_topk(z: Tensor, n: int, margin: float = MARGIN) -> tuple[Tensor, Tensor]:
    """The n largest values of z (N, m) and their indices into z.flatten(), as
    `z.flatten().topk(n, sorted=False)` gives them (ties may pick other equal values).

    A top-k over all N·m values for k = n = k_SAE·N is slow on CPU (measured 2026-12-06, (4096,
    2048), n = 65,536, 2-core AMD EPYC: 126 ms, twice TopK's whole step). Instead: a threshold
    from every `SAMPLE_STRIDE`-th value, set so that about margin·n values pass it, then the
    top-k of the values that pass (10 ms). Exact: if at least n values pass, the n-th largest
    passes, hence all n largest do; if fewer pass (the sample misjudged), the whole top-k runs.
    No random numbers: resumed runs stay bit-identical. CPU only, where it was measured: on CUDA
    the whole top-k runs (its count of passing values would cost a host sync per step)."""
    flat = z.flatten()
    sample = flat[::SAMPLE_STRIDE]
    above = math.ceil(margin * n * sample.numel() / flat.numel())  # sample values to pass
    if z.device.type != "cpu" or above >= sample.numel():
        return flat.topk(n, sorted=False)
    low = sample.kthvalue(sample.numel() - above).values
    keep = (flat >= low).nonzero().squeeze(1)  # (≈ margin·n,) candidates
    if keep.numel() < n:
        return flat.topk(n, sorted=False)
    top, at = flat[keep].topk(n, sorted=False)
    return top, keep[at]


def _decode_flat(vals: Tensor, flat: Tensor, W_dec: Tensor, n: int) -> Tensor:
    """Σ over the kept (token, latent) pairs of val·W_dec[latent]: -> (n, d_in), in fp32.

    `flat` indexes the flattened (n, d_sae) matrix. Sorted by token, the pairs form one embedding
    bag per token (of any size, empty included): k·n·d_in work instead of n·d_sae·d_in.
    """
    d_sae = W_dec.shape[0]
    flat, order = flat.sort()
    return decode_bags(vals[order], flat // d_sae, flat % d_sae, n, W_dec)
