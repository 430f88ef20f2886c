"""Each row's k largest entries of a CPU matrix in two passes over the row, where `torch.topk`
copies the row into (value, index) pairs and partly sorts them.

A TopK SAE's training step picks each token's k largest pre-activations: at batch 4096 and
d_sae 2048, `torch.topk` took 12.4 ms of a ~55 ms fp32 step on this project's 2-core CPUs
(2026-12-07), ~3 µs a row whatever k. `topk_rows` takes 5.3 ms there (numba, both cores):

1. t = the smallest of the maxima of k disjoint groups of the row (interleaved: entry j in
   group j mod k, so a trend along the latents does not lower t): k entries are >= t, so t is
   at most the k-th largest;
2. one pass writes the positions of the entries >= t (~3% of a row of pre-activations);
3. the k largest of those few by replacing the running minimum.

numba (`_rowtopk_kernel`, imported on first use) is saeflow's one compiled kernel beside
torch's; the result equals `torch.topk(z, k, dim=-1, sorted=False)`'s as a set per row (ties at
the k-th value may pick other equal entries; the order within a row differs). Elsewhere —
another device, autograd, bf16, small matrices, no numba or a numba that fails (warned once),
a forked child of a process that ran it (GNU OpenMP is not fork-safe), a NaN anywhere in z
(torch.topk ranks NaN largest) — it is `torch.topk`.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

MIN_NUMEL = 1 << 18
"""Matrices smaller than this (entries) take `torch.topk`: the kernel's first use in a process
loads it (~1 s; compiled once, then cached on disk), which small matrices (tests, toy SAEs)
need not pay."""

_LOCK = threading.Lock()  # numba's workqueue threading layer must not be entered twice at once
_KERNEL: dict[str, Any] = {}  # "fn": the kernel or None (no numba, or it failed); "pid": where


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) (N, k) of each row's k largest entries of z (N, m), unsorted; see the
    module's docstring for when the numba kernel runs and what it returns."""
    kernel = _kernel() if _eligible(z, k) else None
    if kernel is None:
        return z.topk(k, dim=-1, sorted=False)
    z = z.contiguous()
    vals = z.new_empty(z.shape[0], k)
    idx = torch.empty(z.shape[0], k, dtype=torch.int64)
    with _LOCK:  # blocking: every caller gets the same path, so the same bits
        try:
            import numba

            numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
            failed = kernel(z.numpy(), k, vals.numpy(), idx.numpy())
        except Exception as e:  # a numba that cannot type or run it: torch.topk from now on
            _disable(e)
            failed = True
    if failed:  # a NaN: torch.topk's ranking (NaN largest), which the loss then reports
        return z.topk(k, dim=-1, sorted=False)
    return vals, idx


def _eligible(z: Tensor, k: int) -> bool:
    return (
        z.device.type == "cpu"
        and z.dim() == 2
        and z.dtype in (torch.float32, torch.float64)
        and not z.requires_grad
        and z.numel() >= MIN_NUMEL
        and 1 <= k <= z.shape[1] // 2
        and not torch.compiler.is_compiling()
    )


def _kernel() -> Any:
    """The kernel (loaded on first use), or None: no numba, numba failed, JIT disabled, or this
    is a forked child of the process that loaded it."""
    if "fn" not in _KERNEL:
        try:
            import numba

            if numba.config.DISABLE_JIT:  # the prange would run as Python, ~1000× slower
                raise RuntimeError("NUMBA_DISABLE_JIT is set")
            from sae.models import _rowtopk_kernel

            _KERNEL.update(fn=_rowtopk_kernel.rows_topk, pid=os.getpid())
        except ImportError:
            _KERNEL.update(fn=None)
        except Exception as e:  # e.g. no writable cache directory
            _disable(e)
    if _KERNEL.get("pid") != os.getpid():
        return None
    return _KERNEL["fn"]


def _disable(error: Exception) -> None:
    warnings.warn(f"saeflow: per-token top-k falls back to torch.topk: {error!r}", stacklevel=3)
    _KERNEL.update(fn=None)
