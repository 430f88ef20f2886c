"""Compiled CPU kernels (numba, `_kernels`) for the parts of a sparse SAE step that torch does
slowly, each with torch's own computation as the fallback.

At batch 4096, d_in 256, d_sae 2048, k 16 (a TopK step, fp32, this project's 2-core CPUs,
2026-12-07):

- `topk_rows` — each token's k largest pre-activations: 5.3 ms where `torch.topk` takes 12.4
  (it copies each row into (value, index) pairs and partly sorts them, ~3 µs a row whatever k).
  Per row: t = the smallest of the maxima of k disjoint groups (interleaved: entry j in group
  j mod k, so a trend along the latents does not lower t) is at most the k-th largest; one pass
  keeps the entries >= t (~3% of a row of pre-activations); the k largest of those by replacing
  the running minimum.
- `pair_grads` — Σ_p w_p·x[row_p] into row col_p of an (m, d) gradient over the (token,
  latent) pairs that fired: the encoder's weight gradient (0.8 ms where a sparse COO product
  took 2.9) and, with the dots <x[row_p], W[col_p]> alongside, the decoder's embedding-bag
  backward (1.5 ms against autograd's 6.4).

`pair_grads` gives each thread a range of the gradient's rows (no atomics, no per-thread
copies): every thread reads all pairs and adds its own.

The results equal torch's: `topk_rows` the same values as `torch.topk(z, k, dim=-1,
sorted=False)` per row (ties at the k-th value may pick other equal entries; the order within a
row differs), the gradients up to the order of the sums. torch computes them instead — callers
check `ready()` or the call's result — on another device, under autograd (top-k), in fp16,
without numba or where it fails (warned once), in a forked child of a process that ran a kernel
(GNU OpenMP is not fork-safe), under torch.compile, and for the top-k on small matrices or
wherever z holds a NaN (torch.topk ranks NaN largest, and the loss then reports it).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

MIN_NUMEL = 1 << 18
"""`topk_rows` on matrices smaller than this (entries) is `torch.topk`: no gain worth a
kernel call there."""

_LOCK = threading.Lock()  # numba's workqueue threading layer must not be entered twice at once
_STATE: dict[str, Any] = {}  # "module": `_kernels` or None (no numba, or it failed); "pid"


FLOATS = (torch.float32, torch.float64)
"""The float dtypes of the pair kernels; `topk_rows` also takes bf16 (autocast's z)."""


def ready(*tensors: Tensor, floats: tuple[torch.dtype, ...] = FLOATS) -> bool:
    """Whether the kernels can run on these tensors: CPU, floats of `floats` (and integer
    indices), numba loaded in this process, not inside torch.compile."""
    return (
        all(
            t.device.type == "cpu" and (t.dtype in floats or not t.is_floating_point())
            for t in tensors
        )
        and not torch.compiler.is_compiling()
        and _module() is not None
    )


def call(name: str, *args: Tensor | int) -> tuple[bool, Any]:
    """(True, result) of kernel `name` on the tensors' numpy views (CPU tensors, bf16 as its
    int16 bits; ints as they are; outputs must be contiguous, inputs are made so); (False,
    None) where numba is missing or the kernel fails (warned once: torch from then on). One
    call at a time, on `threads()`."""
    module = _module()
    if module is None:
        return False, None
    with _LOCK:  # blocking: every caller the same path, so the same bits
        try:
            import numba

            arrays = [
                (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).contiguous().numpy()
                if isinstance(a, Tensor)
                else a
                for a in args
            ]
            numba.set_num_threads(threads())
            return True, getattr(module, name)(*arrays)
        except Exception as e:  # a numba that cannot type or run it
            _disable(e)
            return False, None


def threads() -> int:
    """The kernels' threads: torch's, within numba's pool."""
    import numba

    return min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) (N, k) of each row's k largest entries of z (N, m), unsorted."""
    if not (
        z.dim() == 2
        and not z.requires_grad
        and z.numel() >= MIN_NUMEL
        and 1 <= k <= z.shape[1] // 2
        and ready(z, floats=(*FLOATS, torch.bfloat16))
    ):
        return z.topk(k, dim=-1, sorted=False)
    z = z.contiguous()
    vals = z.new_empty(z.shape[0], k)
    idx = torch.empty(z.shape[0], k, dtype=torch.int64)
    ran, failed = call("rows_topk", z, k, vals, idx)
    if not ran or failed:  # failed: a NaN in z
        return z.topk(k, dim=-1, sorted=False)
    return vals, idx


def _module() -> Any:
    """`_kernels` (imported on first use), or None: no numba, numba failed, JIT disabled, or
    this is a forked child of the process that loaded it."""
    if "module" not in _STATE:
        try:
            import numba

            if numba.config.DISABLE_JIT:  # the prange would run as Python, ~1000× slower
                raise RuntimeError("NUMBA_DISABLE_JIT is set")
            from sae.models import _kernels

            _STATE.update(module=_kernels, pid=os.getpid())
        except ImportError:
            _STATE.update(module=None)
        except Exception as e:  # e.g. no writable cache directory
            _disable(e)
    if _STATE.get("pid") != os.getpid():
        return None
    return _STATE["module"]


def _disable(error: Exception) -> None:
    _STATE.update(module=None)  # first: a warning raised as an error (-W error) still disables
    warnings.warn(f"saeflow: CPU kernels fall back to torch: {error!r}", stacklevel=3)
