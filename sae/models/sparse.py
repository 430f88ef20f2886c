"""Sparse pieces of an SAE's training step on CPU: the encoder's product is computed once
without autograd, and only the latents that fire carry gradients.

An SAE step's dense form costs five (N, d_in) x (d_in, d_sae) products (the encoder, the decoder,
and three in the backward); with L0 latents of d_sae firing per token, only the encoder's forward
must be dense: the decoder reads L0 rows per token, and ∂loss/∂z is zero wherever a latent did not
fire, so both weight gradients cost N·L0·d_in. `Encoder` hands out the firing parts of
z = x_c @ W + b with gradients, `decode_rows` / `decode_bags` decode L0 rows per token, and
`Dense` is the dense fallback (a ReLU SAE early in training fires half its latents) that
reuses the z already computed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.models import kernels
from sae.models.base import reused

SPARSE_BELOW = 1 / 16
"""`firing` takes the sparse step where fewer than this fraction of the (token, latent) pairs
fire: below it the sparse step was faster (a ReLU SAE, d_in 256, d_sae 2048, batches of 4096, fp32,
2-core AMD EPYC, 2026-12-07: at L0 37 of 2048 71k samples/s sparse, 23k dense; at L0 210, 20k
sparse)."""


SAMPLE_ROWS = 256
"""`firing` first counts on this many rows of z: a dense step pays a sixteenth of a full count
at batch 4096."""


def firing(z: Tensor, floor: Tensor | float = 0.0) -> tuple[Tensor, Tensor] | None:
    """The (token, latent) pairs where z > floor (a number, or one per latent), sorted by token,
    if the step is to be sparse, else None (the caller takes the dense step). Sparse on CPU in
    eager mode where fewer than `SPARSE_BELOW` of z's entries pass, on the first `SAMPLE_ROWS`
    rows and on all: host syncs, free on CPU, never taken elsewhere."""
    if z.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    for part in (z[:SAMPLE_ROWS], z):
        on = part > floor
        if torch.count_nonzero(on) >= SPARSE_BELOW * on.numel():  # 20× faster than bool .sum()
            return None
    rows, cols = on.nonzero().unbind(1)
    return rows, cols


class Encoder:
    """Parts of z = x_c @ W + b (z itself computed without autograd) with gradients to W and b,
    at the cost of the part: `encoder(rows, cols, values)` -> z[rows, cols], the values the
    caller read from z (`SparseGather`), `columns(cols)` -> z[:, cols] (a GEMM on those
    columns)."""

    def __init__(self, x_c: Tensor, W: Tensor, b: Tensor):
        self.x_c, self.W, self.b = x_c, W, b

    def __call__(self, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
        return SparseGather.apply(self.x_c, self.W, self.b, rows, cols, values)

    def columns(self, cols: Tensor) -> Tensor:
        return torch.addmm(self.b.index_select(0, cols), self.x_c, self.W.index_select(1, cols))


class SparseGather(torch.autograd.Function):
    """(x, W, b, rows, cols, values) -> values = z[rows, cols] of z = x @ W + b; sparse backward.

        ∂L/∂W = xᵀ·G,   ∂L/∂b = Σ_N G,   G (N, d_sae) zero but G[rows, cols] = ∂L/∂out

    G is a sparse matrix of len(rows) entries, so ∂W costs len(rows)·d_in multiply-adds. x gets
    no gradient (the encoder's input is data).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, W: Tensor, b: Tensor, rows: Tensor, cols: Tensor, values: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, rows, cols)
        ctx.d_sae, ctx.dtype = W.shape[1], W.dtype
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, None, None, None]:
        x, rows, cols = ctx.saved_tensors
        g = grad.to(ctx.dtype)  # W's (fp32 master weights) whatever autocast computed in
        x = x.to(ctx.dtype)
        grad_Wt = x.new_zeros(ctx.d_sae, x.shape[1])  # ∂L/∂Wᵀ (d_sae, d_in)
        ran = (
            _backward_by_kernel(x, g)
            and kernels.call("pair_grads", rows, cols, g, x, grad_Wt, kernels.threads())[0]
        )
        if not ran:
            G_t = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), g, (ctx.d_sae, x.shape[0]), check_invariants=False
            )  # Gᵀ (d_sae, N)
            grad_Wt = torch.sparse.mm(G_t, x)
        grad_b = g.new_zeros(ctx.d_sae).index_add_(0, cols, g)
        return None, grad_Wt.T, grad_b, None, None, None


def decode_rows(vals: Tensor, idx: Tensor, W_dec: Tensor, rows: Tensor | None = None) -> Tensor:
    """Σ_j vals[n, j]·W_dec[idx[n, j]]: (N, k), (N, k), (d_sae, d_in) -> (N, d_in), in fp32.

    An embedding bag reads only the k chosen rows per token: N·k·d_in work instead of the dense
    product's N·d_sae·d_in, with gradients to both the values and W_dec. `rows`, each pair's
    token (arange(N) repeated k times), where the caller has it.
    """

    def pairs() -> tuple[Tensor, Tensor]:
        n, k = idx.shape
        at = torch.arange(n, device=idx.device).repeat_interleave(k) if rows is None else rows
        return at, idx.flatten()

    return _decode(
        vals, W_dec, lambda v, W: F.embedding_bag(idx, W, per_sample_weights=v, mode="sum"), pairs
    )


def _decode(vals: Tensor, W: Tensor, bag: Any, pairs: Any) -> Tensor:
    """bag(vals, W) (an embedding bag, vals cast to W's dtype), differentiated by `PairDecode`
    under autograd where the kernels run (`pairs()` -> its (rows, cols), only then)."""
    vals = vals.to(W.dtype)
    if torch.is_grad_enabled() and (vals.requires_grad or W.requires_grad) and kernels.ready(W):
        return PairDecode.apply(vals, W, *pairs(), bag)
    return bag(vals, W)


def _backward_by_kernel(*tensors: Tensor) -> bool:
    """Whether a backward may take a kernel: where they run, and no graph is being built of the
    gradients (`create_graph=True`, grad mode on in the backward: numpy views carry none)."""
    return not torch.is_grad_enabled() and kernels.ready(*tensors)


class PairDecode(torch.autograd.Function):
    """(vals, W, rows, cols, bag) -> bag(vals, W), an embedding bag: x̂[rows[p]] = Σ_p
    vals[p]·W[cols[p]] (vals of any shape, flattened in the order of the pairs), with the
    backward by the `pair_grads` kernel (autograd's through `bag` where it cannot run):

        ∂L/∂W[i] = Σ_{p: cols[p] = i} vals[p]·∂L/∂x̂[rows[p]]
        ∂L/∂vals[p] = <∂L/∂x̂[rows[p]], W[cols[p]]>
    """

    @staticmethod
    def forward(ctx: Any, vals: Tensor, W: Tensor, rows: Tensor, cols: Tensor, bag: Any) -> Tensor:
        ctx.save_for_backward(vals, W, rows, cols)
        ctx.bag = bag
        return bag(vals, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        vals, W, rows, cols = ctx.saved_tensors
        grad = grad.to(W.dtype)
        grad_W = W.new_zeros(W.shape)  # contiguous: the kernel writes into it
        grad_vals = W.new_empty(vals.numel())
        ran = (
            _backward_by_kernel(W, grad)
            and kernels.call(
                "pair_grads",
                *(rows, cols, vals.reshape(-1), grad, grad_W, kernels.threads(), W, grad_vals),
            )[0]
        )
        if not ran:
            with torch.enable_grad():
                v, w = vals.detach().requires_grad_(), W.detach().requires_grad_()
                grad_vals, grad_W = torch.autograd.grad(ctx.bag(v, w), [v, w], grad)
        return grad_vals.view_as(vals), grad_W, None, None, None


def addmm_reused(bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """torch.addmm(bias, a, b) without gradients, on CPU into `reused` storage (in autocast's
    dtype where CPU autocast is on); elsewhere (CUDA's allocator caches; torch.compile traces)
    a plain addmm."""
    if a.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.addmm(bias, a, b)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else a.dtype
    out = reused((a.shape[0], b.shape[1]), dtype)
    with torch.autocast("cpu", enabled=False):
        return torch.addmm(bias.to(dtype), a.to(dtype), b.to(dtype), out=out)


def scatter_dense(vals: Tensor, idx: Tensor, d_sae: int) -> Tensor:
    """Scatter (N, k) values at their indices into a zero (N, d_sae) matrix."""
    return vals.new_zeros(vals.shape[0], d_sae).scatter_(-1, idx, vals)  # in place: no copy


def decode_bags(vals: Tensor, rows: Tensor, cols: Tensor, n: int, W_dec: Tensor) -> Tensor:
    """Σ_j vals[j]·W_dec[cols[j]] over each token's pairs, the (token, latent) pairs (rows, cols)
    sorted by token, -> (n, d_in), in W_dec's dtype, with gradients to vals and W_dec: one
    embedding bag per token (of any size; an empty one decodes to 0), L0·n·d_in work."""
    counts = torch.bincount(rows, minlength=n)  # each token's bag size
    offsets = counts.cumsum(0) - counts  # where each bag starts

    def bag(v: Tensor, W: Tensor) -> Tensor:
        return F.embedding_bag(cols, W, offsets, mode="sum", per_sample_weights=v)

    return _decode(vals, W_dec, bag, lambda: (rows, cols))


class Dense(torch.autograd.Function):
    """(x_c, W, b, z, relu) -> z, or ReLU(z) where `relu`, for z = x_c @ W + b computed by the
    caller without autograd (ReLU in place: z's storage becomes f's); backward as autograd's for
    the same expression, x_c without gradient:

        G = ∂L/∂f·1[f > 0] (relu) or ∂L/∂z,   ∂L/∂W = x_cᵀ·G,   ∂L/∂b = Σ_N G

    (and ∂L/∂x_c = G·Wᵀ where x_c needs it) in z's dtype (bf16 under autocast, as autograd's
    would be), returned in W's. The caller keeps one encoder product for both paths: it decides
    dense or sparse from z itself.
    """

    @staticmethod
    def forward(ctx: Any, x_c: Tensor, W: Tensor, b: Tensor, z: Tensor, relu: bool) -> Tensor:
        f = z.clamp_min_(0) if relu else z
        ctx.save_for_backward(x_c, W, f)
        ctx.relu = relu
        return f

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor, None, None]:
        x_c, W, f = ctx.saved_tensors
        G = grad
        if ctx.relu and f.device.type == "cpu":  # grad·1[f > 0] into storage kept (CPU)
            out = reused(f.shape, grad.dtype, "grad")
            G = torch.ops.aten.threshold_backward.grad_input(grad, f, 0, grad_input=out)
        elif ctx.relu:
            G = torch.ops.aten.threshold_backward(grad, f, 0)
        grad_x = torch.mm(G, W.to(G.dtype).T).to(x_c.dtype) if ctx.needs_input_grad[0] else None
        grad_W = torch.mm(x_c.to(G.dtype).T, G).to(W.dtype)
        return grad_x, grad_W, G.sum(0).to(W.dtype), None, None
