"""TopK SAE with the AuxK loss on dead latents (Gao et al. 2024, "Scaling and evaluating SAEs")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sae.models.base import SAE, SAEOutput, random_directions, spread, sq_err
from sae.models.config import SAEConfig
from sae.models.kernels import topk_rows
from sae.models.sparse import Encoder, addmm_reused, decode_rows, scatter_dense

AUX_DENSE = 8
"""AuxK decodes the dead latents as one dense sub-dictionary while #dead <= AUX_DENSE·aux_k."""


class TopKSAE(SAE):
    """TopK SAE: the k largest latents per token, AuxK on dead latents.

        z    = (x − b_dec) @ W_enc + b_enc                   (N, d_sae) pre-activations
        f    = TopK_k'(z)·1[z > θ]                           keep the k' largest z, zero the rest
        x̂    = f @ W_dec + b_dec                             (N, d_in)
        loss = Σ_N ‖x − x̂‖² / Σ_N ‖x − x̄‖²  +  aux_coeff·aux     (batch FVU + AuxK)
        e    = x − x̂ (no gradient);  ê = ReLU(TopK_aux_k(z over dead latents)) @ W_dec
        aux  = Σ_N ‖e − ê‖² / Σ_N ‖e − ē‖²                   (0 if none is dead, or in eval)

    Both terms are normalised MSEs as in OpenAI's reference code (`normalized_mse`), so
    `aux_coeff` = 1/32 weighs them as in the paper. A latent is dead once it has not fired for
    `dead_tokens` training tokens; AuxK uses min(aux_k, #dead) of them. The decoder rows start
    at norm 1; with `unit_decoder` (Gao et al.'s choice, off by default since 2026-12-07: see
    `SAEConfig.unit_decoder`) the trainer's hooks keep them there: `before_step` removes each
    row's gradient component parallel to the row, `after_step` renormalises the rows.

    θ = 0 (the default) keeps every positive one of the k. With `k_train_factor` = r > 1,
    training keeps each token's top k' = round(r·k) (z, f, the loss and AuxK above read k'),
    and θ, a buffer saved with the weights, is learnt as BatchTopK's: the running average
    (`threshold_beta`) of each batch's (k·N)-th largest kept value. At inference a token keeps
    those of its top k' above θ: k on average on the training distribution, fewer on a token
    with few features, whose smallest values a fixed k would keep as noise (known-answer
    hierarchical data, 2M samples, L0 16 at inference: F1 0.71 at r 1.5 where TopK at r 1
    reaches 0.61; on flat data FVU 0.114 against 0.111).

    Init: W_dec rows are random unit directions, W_enc = W_decᵀ, b_enc = 0; b_dec = 0 until the
    trainer sets it to the geometric median of a sample.
    """

    arch = "topk"
    hparams = ("k", "k_train_factor", "aux_k", "aux_coeff", "dead_tokens", "unit_decoder")
    saved_before: ClassVar[dict[str, Any]] = {"k_train_factor": 1.0, "unit_decoder": True}
    train_attrs = ("tokens_trained",)  # AuxK waits for dead_tokens of training
    optional_tensors = ("threshold",)  # files from before θ: 0, no threshold, as they were

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        self.k, self.aux_coeff, self.dead_tokens = cfg.k, float(cfg.aux_coeff), cfg.dead_tokens
        self.k_train_factor = float(cfg.k_train_factor)
        self.unit_decoder = cfg.unit_decoder
        self.k_train = cfg.k_train  # k': the top k' per token trained
        self.aux_k = d_in // 2 if cfg.aux_k is None else cfg.aux_k
        self.tokens_trained = 0  # training tokens seen by forward; no latent is dead before
        self.threshold_beta = float(cfg.threshold_beta)
        self.register_buffer("threshold", torch.zeros(()))  # θ, saved in sae.safetensors
        with torch.no_grad():
            self.W_dec.copy_(random_directions(cfg.d_sae, d_in, 1.0))
            self.W_enc.copy_(self.W_dec.T)

    def pre_acts(self, x: Tensor) -> Tensor:
        """z = (x − b_dec) @ W_enc + b_enc: (N, d_in) -> (N, d_sae)."""
        return torch.addmm(self._encoder_bias(), x - self.b_dec.detach(), self.W_enc)

    def _encoder_bias(self) -> Tensor:
        """(d_sae,) b_enc − (b_dec − b_dec) @ W_enc: b_enc in value; b_dec's gradient through the
        encoder is taken via this vector, sparing autograd an (N, d_sae) @ (d_sae, d_in) product
        for grad(x − b_dec) (the encoder reads x − b_dec with b_dec detached). W_enc detached
        here: its gradient through the bracket is bracket ⊗ grad = 0 exactly."""
        return self.b_enc - (self.b_dec - self.b_dec.detach()) @ self.W_enc.detach()

    def encode(self, x: Tensor) -> Tensor:
        """f = TopK_k'(z)·1[z > θ]: (N, d_in) -> (N, d_sae) with at most k' non-zeros per row."""
        vals, idx = topk_rows(self.pre_acts(x), self.k_train)
        return scatter_dense(self._above(vals), idx, self.d_sae)

    def _above(self, vals: Tensor) -> Tensor:
        """vals·1[vals > θ]: ReLU where θ = 0."""
        return vals * (vals > self.threshold)

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> SAEOutput:
        z, encoder = self.pre_acts_sparse(x)  # z (N, d_sae) without autograd
        top, idx = topk_rows(z, self.k_train)  # (N, k') values and latents
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.k_train)
        vals = encoder(rows, idx.flatten(), top.flatten()).view_as(idx)  # with gradients
        vals = vals.relu() if self.training else self._above(vals)  # θ: at inference only
        x_hat = decode_rows(vals, idx, self.W_dec, rows) + self.b_dec  # (N, d_in)
        err = sq_err(x, x_hat)  # (N,)
        fvu = err.sum() / spread(x).clamp_min(1e-12)
        if not self.training:
            f = scatter_dense(vals, idx, self.d_sae)  # (N, d_sae)
            return SAEOutput(x_hat, f, fvu, err.mean() / self.d_in, fvu.new_zeros(()))
        aux = self._auxk(x, x_hat, z, encoder)
        f, l0 = self._fired(vals.flatten(), rows, idx.flatten(), x.shape[0])
        self._update_threshold(vals.flatten())
        loss = fvu + self.aux_coeff * aux
        return SAEOutput(x_hat, f, loss, err.mean() / self.d_in, aux, l0)

    @torch.no_grad()
    def _update_threshold(self, vals: Tensor) -> None:
        """With k' > k: average θ with the (k·N)-th largest of the batch's kept values vals
        (k'·N,) (no host sync: all tensors). With k' = k θ stays 0."""
        if self.k_train > self.k:
            self._average_threshold(vals, round(vals.numel() * self.k / self.k_train))

    def _average_threshold(self, vals: Tensor, n: int) -> None:
        """θ ← β·θ + (1 − β)·(the n-th largest positive of vals) (θ = 0: that value; fewer than
        n positive: the smallest positive; none: θ stays)."""
        v = vals.detach().float()
        low = v.masked_fill(v <= 0, float("inf")).min()
        if 0 < n < v.numel():
            nth = v.kthvalue(v.numel() - n + 1).values  # the n-th largest
            low = torch.where(nth > 0, nth, low)
        beta = self.threshold_beta
        new = torch.where(self.threshold > 0, beta * self.threshold + (1 - beta) * low, low)
        self.threshold.copy_(torch.where(torch.isfinite(low), new, self.threshold))

    @torch.compiler.disable  # Python counters: traced, each new value would recompile
    @torch.no_grad()
    def _dead(self) -> tuple[Tensor, int]:
        """(the dead latents' ids (#dead,), how many AuxK uses: min(aux_k, #dead), 0 = no AuxK
        this step)."""
        if self.aux_coeff == 0 or self.tokens_trained < self.dead_tokens:
            return self.tokens_since_fired.new_zeros(0), 0
        cols = (self.tokens_since_fired >= self.dead_tokens).nonzero().squeeze(1)
        return cols, min(self.aux_k, cols.numel())  # one host sync per step; free on CPU

    @torch.compiler.disable
    @torch.no_grad()
    def _fired(self, vals: Tensor, rows: Tensor, cols: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Training: count the n tokens, then `_record_pairs`: (f as a sparse COO tensor, mean
        L0)."""
        self.tokens_trained += n
        return self._record_pairs(vals, rows, cols, n)

    def pre_acts_sparse(self, x: Tensor) -> tuple[Tensor, Encoder]:
        """z = pre_acts(x) computed without autograd, and an `Encoder` that hands out parts of
        z with gradients to W_enc, b_enc, b_dec: encoder(rows, cols, values) -> z[rows, cols] at
        O(len(rows)·d_in), encoder.columns(cols) -> z[:, cols] at O(N·len(cols)·d_in), never
        the dense O(N·d_sae·d_in) backward.

        Only the k chosen pre-activations per token reach the loss, so ∂loss/∂z is sparse; the
        dense backward (N·d_sae·d_in for ∂W_enc) would cost as much as the forward product.
        Inside `reusing_buffers` (the trainer's loop) z lives in storage the thread reuses: valid
        until the thread's next pre_acts_sparse, i.e. through this forward and its backward.
        """
        x_c = x - self.b_dec.detach()
        bias = self._encoder_bias()  # (d_sae,)
        with torch.no_grad():
            z = addmm_reused(bias, x_c, self.W_enc)  # (N, d_sae)
        return z, Encoder(x_c, self.W_enc, bias)

    def _auxk(self, x: Tensor, x_hat: Tensor, z: Tensor, encoder: Encoder) -> Tensor:
        """AuxK: the dead latents' top-aux_k pre-activations reconstruct the residual e = x − x̂.

        Only the dead latents' columns of z are read (N·#dead values, not N·d_sae). While
        #dead <= `AUX_DENSE`·aux_k the dead latents are one dense sub-dictionary (their top
        aux_k per token kept by a mask): two GEMMs of N·#dead·d_in each way beat gathering
        N·aux_k scattered rows (measured 2026-12-06, d_in 256, N 4096: the gather path took a
        step from 65 to 200 ms once aux_k reached 128); beyond that, the sparse gather."""
        cols, aux_k = self._dead()  # the dead latents
        if not aux_k:
            return z.new_zeros((), dtype=torch.float32)
        e = (x - x_hat).detach()  # (N, d_in)
        picked = None  # each token's top aux_k dead latents (values, positions in cols)
        if aux_k < cols.numel():
            picked = z.index_select(1, cols).topk(aux_k, dim=-1, sorted=False)
        if cols.numel() <= AUX_DENSE * aux_k:
            f = encoder.columns(cols).relu()  # (N, #dead), with gradients
            if picked is not None:
                f = f * torch.zeros_like(f, dtype=torch.bool).scatter_(1, picked.indices, True)
            e_hat = f.to(self.W_dec.dtype) @ self.W_dec.index_select(0, cols)  # (N, d_in)
        else:  # more than AUX_DENSE·aux_k dead, so picked is set
            idx = cols[picked.indices]  # (N, aux_k) latent ids
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(aux_k)
            vals = encoder(rows, idx.flatten(), picked.values.flatten()).view_as(idx).relu()
            e_hat = decode_rows(vals, idx, self.W_dec, rows)
        return sq_err(e, e_hat).sum() / spread(e).clamp_min(1e-12)

    @torch.no_grad()
    def before_step(self) -> None:
        """`unit_decoder`: remove from each decoder row's gradient its component along the
        (unit) row."""
        g = self.W_dec.grad
        if self.unit_decoder and g is not None:
            g.sub_((g * self.W_dec).sum(-1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def after_step(self) -> None:
        """`unit_decoder`: renormalise the decoder rows to unit norm."""
        if self.unit_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
