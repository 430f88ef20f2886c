"""The architectures by name, and building / loading an SAE from a name or a checkpoint dir."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae.base import CONFIG, SAE, WEIGHTS
from sae.batchtopk import BatchTopKSAE
from sae.jumprelu import JumpReLUSAE
from sae.relu import ReluSAE
from sae.topk import TopKSAE

ARCHS: dict[str, type[SAE]] = {
    cls.arch: cls for cls in (ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)
}


def hparam_names(arch: str) -> list[str]:
    """The keyword hyper-parameters `build_sae` accepts for `arch` (beyond d_in, d_sae)."""
    params = inspect.signature(_arch(arch).__init__).parameters
    return [n for n in params if n not in ("self", "d_in", "d_sae")]


def build_sae(arch: str, d_in: int, d_sae: int, *, seed: int | None = None, **hparams: Any) -> SAE:
    """A freshly initialised SAE of architecture `arch` (one of `ARCHS`).

    `hparams` are the architecture's keyword arguments (`hparam_names(arch)`); `seed`, if given,
    makes the initialisation reproducible without touching torch's global RNG state.
    """
    cls = _arch(arch)
    valid = hparam_names(arch)
    for name in hparams:
        if name not in valid:
            raise ValueError(f"unknown hyper-parameter {name!r} for arch {arch!r}; valid: {valid}")
    if seed is None:
        return cls(d_in, d_sae, **hparams)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(d_in, d_sae, **hparams)


def load_sae(dir: Path) -> SAE:
    """The SAE saved by `SAE.save(dir)`: `cfg.json` + `sae.safetensors` (no pickle), eval mode."""
    dir = Path(dir)
    for name in (CONFIG, WEIGHTS):
        if not (dir / name).is_file():
            raise FileNotFoundError(f"no SAE checkpoint at {dir}: {dir / name} is missing")
    cfg = json.loads((dir / CONFIG).read_text())
    cfg.pop("meta", None)
    try:
        arch, d_in, d_sae = cfg.pop("arch"), cfg.pop("d_in"), cfg.pop("d_sae")
    except KeyError as e:
        raise ValueError(f"{dir / CONFIG} lacks the key {e.args[0]!r}") from None
    sae = build_sae(arch, d_in, d_sae, **cfg)
    tensors = load_file(str(dir / WEIGHTS))
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        raise ValueError(
            f"{dir / WEIGHTS} does not match {dir / CONFIG}: tensors {found}, "
            f"expected {expected} for {arch} d_in={d_in} d_sae={d_sae}"
        )
    sae.load_state_dict({k: v.float() for k, v in tensors.items()})
    return sae.eval()


def _arch(arch: str) -> type[SAE]:
    if arch not in ARCHS:
        raise ValueError(f"unknown SAE arch {arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[arch]
