"""Each row's k largest entries of a CPU matrix in two passes over the row, where `torch.topk`
copies the row into (value, index) pairs and partly sorts them.

A TopK SAE's training step picks each token's k largest pre-activations: at batch 4096 and
d_sae 2048, `torch.topk` took 12.4 ms of a ~55 ms fp32 step on this project's 2-core CPUs
(2026-12-07), ~3 µs a row whatever k. `topk_rows` takes 6.1 ms there (numba, both cores):

1. t = the smallest of the maxima of k disjoint groups of the row (contiguous slices of
   ⌊m/k⌋): k entries are >= t, so t is at most the k-th largest;
2. one pass writes the positions of the entries >= t (~3% of a row of pre-activations);
3. the k largest of those few by replacing the running minimum.

numba is saeflow's one compiled kernel beside torch's; the result equals `torch.topk(z, k,
dim=-1, sorted=False)`'s as a set per row (ties at the k-th value may pick other equal entries;
the order within a row differs). Elsewhere — another device, autograd, bf16, small matrices,
no numba, a NaN anywhere in z (torch.topk ranks NaN largest) — it is `torch.topk`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

MIN_NUMEL = 1 << 18
"""Matrices smaller than this (entries) take `torch.topk`: the kernel's first use compiles it
(~2 s, then cached on disk), which small matrices (tests, toy SAEs) need not pay."""

_LOCK = threading.Lock()  # numba's workqueue threading layer must not be entered twice at once
_KERNEL: list[Any] = []  # the compiled kernel, or None where numba is missing


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) (N, k) of each row's k largest entries of z (N, m), unsorted; see the
    module's docstring for when the numba kernel runs and what it returns."""
    kernel = _kernel() if _eligible(z, k) else None
    if kernel is None or not _LOCK.acquire(blocking=False):
        return z.topk(k, dim=-1, sorted=False)
    try:
        import numba

        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        z = z.contiguous()
        vals = z.new_empty(z.shape[0], k)
        idx = torch.empty(z.shape[0], k, dtype=torch.int64)
        if kernel(z.numpy(), k, vals.numpy(), idx.numpy()):  # a NaN, or fewer than k >= t
            return z.topk(k, dim=-1, sorted=False)
        return vals, idx
    finally:
        _LOCK.release()


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
    """The compiled kernel (compiled on first use, cached on disk), or None without numba."""
    if not _KERNEL:
        try:
            _KERNEL.append(_compile())
        except ImportError:
            _KERNEL.append(None)
    return _KERNEL[0]


def _compile() -> Any:
    import numba
    import numpy as np

    @numba.njit(nogil=True, boundscheck=False, inline="always")
    def argmin(buf: Any, k: int) -> tuple[int, Any]:
        at, low = 0, buf[0]
        for q in range(1, k):
            if buf[q] < low:
                at, low = q, buf[q]
        return at, low

    @numba.njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def rows_topk(z: Any, k: int, vals: Any, idx: Any) -> bool:
        """Writes each row's k largest into vals, idx; True where it could not (the caller
        falls back): a NaN in z, or fewer than k entries >= t (only with NaNs)."""
        n_rows, m = z.shape
        width = m // k  # k groups of `width` entries; the tail past k·width is only scanned
        block = 32  # rows per task
        n_blocks = (n_rows + block - 1) // block
        bad = np.zeros(n_blocks, np.bool_)
        for b in numba.prange(n_blocks):
            at = np.empty(m, np.int64)  # positions of the entries >= t
            for n in range(b * block, min(n_rows, b * block + block)):
                row, v_out, i_out = z[n], vals[n], idx[n]
                t = row[0:width].max()
                for g in range(1, k):
                    t = min(t, row[g * width : (g + 1) * width].max())
                count, nans = 0, 0
                for j in range(m):
                    v = row[j]
                    at[count] = j
                    count += v >= t
                    nans += v != v
                if nans or count < k:
                    bad[b] = True
                    continue
                for q in range(k):
                    i_out[q] = at[q]
                    v_out[q] = row[at[q]]
                low_at, low = argmin(v_out, k)
                for i in range(k, count):
                    v = row[at[i]]
                    if v > low:
                        v_out[low_at], i_out[low_at] = v, at[i]
                        low_at, low = argmin(v_out, k)
        return bad.any()

    return rows_topk
