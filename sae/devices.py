"""Device and dtype names as a config spells them (no torch: `conf/` checks them with these).

The torch side — resolving `auto`, whether bf16 matmuls are native — is `sae.hardware`.
"""

from __future__ import annotations

import re

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""Where an SAE trains: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, or cuda:N (GPU N:
a sweep can put one SAE on each)."""
LM_DEVICES = ("auto", "cpu", "cuda")
"""Where the language model runs (`model.device`)."""
TRAIN_DTYPES = ("auto", "bf16", "fp32")
"""auto = bf16 where the device has fast bf16 matmuls (CUDA, CPUs with AVX512-BF16/AMX), else
fp32 (measured: bf16 is far slower on AVX2). bf16 = autocast with fp32 master weights."""
LM_DTYPES = ("bf16", "fp16", "fp32")
"""Dtypes a language model's forward pass runs in (`model.dtype`)."""


def check_device(key: str, value: str, *, auto: bool = True, sep: str = "=") -> None:
    """`value` is auto (if allowed), cpu, cuda or cuda:N; the error names `key`."""
    if not DEVICE.fullmatch(value) or (value == "auto" and not auto):
        valid = "auto, cpu, cuda, cuda:N" if auto else "cpu, cuda, cuda:N"
        raise ValueError(f"{key}{sep}{value!r} is not one of {valid}")
