"""The architectures by name, and building / loading an SAE from a name or a checkpoint dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sae.models.base import CONFIG, HEADER, SAE, WEIGHTS
from sae.models.batchtopk import BatchTopKSAE
from sae.models.config import SAEConfig
from sae.models.jumprelu import JumpReLUSAE
from sae.models.matryoshka import MatryoshkaSAE
from sae.models.relu import ReluSAE
from sae.models.topk import TopKSAE
from sae.training.checkpoint import digest

ARCHS: dict[str, type[SAE]] = {
    cls.arch: cls for cls in (ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)
}


def hparam_names(arch: str) -> list[str]:
    """The architecture's hyper-parameters: the `SAEConfig` fields it reads and saves."""
    return list(_arch(arch).hparams)


def build(cfg: SAEConfig, d_in: int, *, seed: int | None = None) -> SAE:
    """A freshly initialised SAE of `cfg` for inputs of width `d_in`; `seed`, if given, makes
    the initialisation reproducible without touching torch's global RNG state."""
    cls = _arch(cfg.arch)
    if seed is None:
        return cls(d_in, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(d_in, cfg)


def build_sae(arch: str, d_in: int, d_sae: int, *, seed: int | None = None, **hparams: Any) -> SAE:
    """`build(SAEConfig(arch, d_sae, **hparams), d_in, seed=seed)`: hyper-parameters by name
    (`hparam_names(arch)`, and `target_l0`; the rest keep `SAEConfig`'s defaults)."""
    valid = [*hparam_names(arch), "target_l0"]
    for name in hparams:
        if name not in valid:
            raise ValueError(f"unknown hyper-parameter {name!r} for arch {arch!r}; valid: {valid}")
    return build(SAEConfig(arch=arch, d_sae=d_sae, **hparams), d_in, seed=seed)


def load_sae(dir: Path) -> SAE:
    """The SAE saved by `SAE.save(dir)`: `cfg.json` + `sae.safetensors` (no pickle), eval mode.

    Errors name the file: missing, unreadable, or weights that do not belong to the config.
    """
    dir = Path(dir)
    for name in (CONFIG, WEIGHTS):
        if not (dir / name).is_file():
            raise FileNotFoundError(f"no SAE checkpoint at {dir}: {dir / name} is missing")
    cfg = _read_config(dir / CONFIG)
    arch, d_in, d_sae = cfg.pop("arch"), cfg.pop("d_in"), cfg.pop("d_sae")
    sae = build_sae(arch, d_in, d_sae, **(_arch(arch).saved_before | cfg))
    tensors, saved_arch = _read_weights(dir / WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    for name in sae.optional_tensors:  # files from before the tensor: load_state_dict sets 0
        found.setdefault(name, expected[name])
    if found != expected:
        raise ValueError(
            f"{dir / WEIGHTS} does not match {dir / CONFIG}: tensors {found}, "
            f"expected {expected} for {arch} d_in={d_in} d_sae={d_sae}"
        )
    if saved_arch is not None and saved_arch != arch:
        raise ValueError(
            f"{dir / WEIGHTS} does not match {dir / CONFIG}: the weights are a {saved_arch} "
            f"SAE's, the config says arch={arch!r}"
        )
    sae.load_state_dict({k: v.float() for k, v in tensors.items()})
    return sae.eval()


def _read_config(path: Path) -> dict[str, Any]:
    """cfg.json without its "meta"; it must name arch, d_in and d_sae."""
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the SAE checkpoint is corrupt") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds {type(cfg).__name__}, not an SAE config object")
    cfg.pop("meta", None)
    for key in ("arch", "d_in", "d_sae"):
        if key not in cfg:
            raise ValueError(f"{path} lacks the key {key!r}")
    return cfg


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors, checked against the sha256 in their header, and the arch the header names
    (either None: saved before it was recorded)."""
    try:
        with safe_open(str(path), "pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            tensors, meta = {k: f.get_tensor(k) for k in names}, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}): the SAE checkpoint is corrupt"
        ) from None
    try:
        header = json.loads(meta[HEADER]) if HEADER in meta else meta  # older files: `arch`
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header's {HEADER!r} is not a JSON object: corrupt file")
    if "sha256" in header and digest(tensors) != header["sha256"]:
        raise ValueError(
            f"{path} is corrupt: its tensors do not match the sha256 in its header (a changed "
            "byte in the weights); restore the file or retrain (train.resume=false)"
        )
    return tensors, header.get("arch")


def _arch(arch: str) -> type[SAE]:
    if arch not in ARCHS:
        raise ValueError(f"unknown SAE arch {arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[arch]
