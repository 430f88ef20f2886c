"""The numba kernels of `sae.models.kernels` (imported there on first use, so that importing
saeflow never imports numba; what each is for and what it replaced: there). Module-level
functions: numba's on-disk cache keys a closure by its cells, which differ in every process, so
a kernel built inside a function never hits it.

bf16 has no numpy type: its rows come as their int16 bits, compared through `_key` (the bits
with the magnitude flipped where the sign is set: ordered as the values, -0 just below +0)."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import overload


def _key(v):  # type: ignore[no-untyped-def]
    """v itself (a float), or the ordering key of bf16 bits (an int16)."""
    raise NotImplementedError  # numba only: see _key_impl


def _is_nan(v):  # type: ignore[no-untyped-def]
    """Whether v (a float, or bf16 bits) is NaN."""
    raise NotImplementedError


@overload(_key, inline="always")
def _key_impl(v):  # type: ignore[no-untyped-def]  # unannotated: as the lambdas it returns
    if isinstance(v, types.Float):
        return lambda v: v
    return lambda v: v ^ ((v >> 15) & 0x7FFF)  # sign set: flip the magnitude's order


@overload(_is_nan, inline="always")
def _is_nan_impl(v):  # type: ignore[no-untyped-def]
    if isinstance(v, types.Float):
        return lambda v: v != v
    return lambda v: (v & 0x7FFF) > 0x7F80  # exponent all ones, mantissa non-zero


@numba.njit(nogil=True, boundscheck=False, inline="always", cache=True)
def _argmin(buf: Any, k: int) -> tuple[int, Any]:
    """(position, key) of the smallest of buf[:k] (values, or bf16 bits by their key)."""
    at, low = 0, _key(buf[0])
    for q in range(1, k):
        key = _key(buf[q])
        if key < low:
            at, low = q, key
    return at, low


@numba.njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def rows_topk(z: Any, k: int, vals: Any, idx: Any) -> bool:
    """Each row's k largest of z (N, m; float32, float64 or bf16 bits as int16) into vals, idx
    (N, k); True where it could not (the caller falls back to torch.topk): a NaN in z, or fewer
    than k entries >= t (NaN only).

    t is the smallest of the maxima of k interleaved groups (group g: the entries j ≡ g mod k
    below k·⌊m/k⌋), one k-wide running maximum over the row, which also flags NaNs (vectorised:
    a scalar NaN test in the second pass cost 1 ms of 6.4 at (4096, 2048)); entries past the
    groups are scanned too."""
    n_rows, m = z.shape
    width = m // k
    block = 32  # rows per task
    n_blocks = (n_rows + block - 1) // block
    bad = np.zeros(n_blocks, np.bool_)
    for b in numba.prange(n_blocks):
        at = np.empty(m, np.int64)  # positions of the entries >= t
        top = np.empty(k, z.dtype)  # the groups' running maxima (keys)
        nan = np.empty(k, np.bool_)  # whether the group holds a NaN
        for n in range(b * block, min(n_rows, b * block + block)):
            row, v_out, i_out = z[n], vals[n], idx[n]
            lanes = row[: width * k].reshape(width, k)  # group g: column g (vectorises)
            for g in range(k):
                top[g] = _key(lanes[0, g])
                nan[g] = 0
            for w in range(width):
                for g in range(k):
                    v = lanes[w, g]
                    top[g] = max(top[g], _key(v))
                    nan[g] |= _is_nan(v)
            t = top[0]
            nans = nan[0]
            for g in range(1, k):
                t = min(t, top[g])
                nans |= nan[g]
            for j in range(width * k, m):  # the tail
                nans |= _is_nan(row[j])
            count = 0
            for j in range(m):
                at[count] = j
                count += _key(row[j]) >= t
            if nans or count < k:
                bad[b] = True
                continue
            for q in range(k):
                i_out[q] = at[q]
                v_out[q] = row[at[q]]
            low_at, low = _argmin(v_out, k)
            for i in range(k, count):
                v = row[at[i]]
                if _key(v) > low:
                    v_out[low_at], i_out[low_at] = v, at[i]
                    low_at, low = _argmin(v_out, k)
    return bad.any()


_SUMS = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; NaN and inf kept as they are


@numba.njit(parallel=True, nogil=True, boundscheck=False, fastmath=_SUMS, cache=True)
def pair_grads(
    rows: Any, cols: Any, w: Any, x: Any, out: Any, parts: int, W: Any = None, dots: Any = None
) -> None:
    """out[cols[p]] += w[p]·x[rows[p]] for every pair p (out (m, d) zero on entry), and where W
    is given, dots[p] = <x[rows[p]], W[cols[p]]>. Each of `parts` tasks (one a thread) owns a
    range of out's rows.

    The encoder's weight gradient (w = ∂L/∂z at the pairs, x its input: out = ∂L/∂Wᵀ) and the
    decoder's backward for x̂[r] = Σ_{p: rows[p] = r} w[p]·W[cols[p]] (x = ∂L/∂x̂: out = ∂L/∂W,
    dots = ∂L/∂w)."""
    n_pairs = rows.shape[0]
    m, d = out.shape
    threads = parts  # numba.get_num_threads() here would keep numba from caching the kernel
    for t in numba.prange(threads):
        lo, hi = t * m // threads, (t + 1) * m // threads
        for p in range(n_pairs):
            i = cols[p]
            if lo <= i < hi:
                v, r = w[p], rows[p]
                if W is None:  # resolved when compiled: two kernels
                    for c in range(d):
                        out[i, c] += v * x[r, c]
                else:
                    s = 0.0
                    for c in range(d):
                        g = x[r, c]
                        s += g * W[i, c]
                        out[i, c] += v * g
                    dots[p] = s
