"""What torch offers on this machine: the device a config's name resolves to, whether bf16
matmuls are native, and torch's CPU thread count for a block of work."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without CUDA, or 'cuda:N' past this
    machine's GPUs -> RuntimeError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if d.type == "cuda" and d.index is not None and d.index >= n:
        valid = f"cuda:0 … cuda:{n - 1}, " if n else ""
        raise RuntimeError(
            f"device {device!r}: this machine has {n} CUDA device(s); use {valid}cpu or auto"
        )
    return d


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 / AMX). Without them
    (an AVX2-only CPU) bf16 matmuls are emulated: measured ~40-50x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where bf16 matmuls are fast on `device`, else 'fp32'."""
    fast = cpu_has_fast_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported()
    if dtype == "auto":
        return "bf16" if fast else "fp32"
    if dtype == "bf16" and not fast:
        warnings.warn(
            f"dtype='bf16' on a {device.type} without native bf16 matmuls is much slower than "
            "fp32; use dtype='auto' or 'fp32'",
            stacklevel=3,
        )
    return dtype


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch CPU threads (0 = leave torch's setting), then restore."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
