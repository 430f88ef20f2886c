"""dictionary_learning's checkpoint: a directory with `ae.pt` (a state dict, read with
`torch.load(weights_only=True)` only) and `config.json` (`trainer.dict_class`, `activation_dim`,
`dict_size`, `k`, `submodule_name`, …). Its classes, as saeflow architectures:

    AutoEncoder                 f = ReLU(encoder(x − bias)),     x̂ = decoder(f) + bias    -> relu
    AutoEncoderTopK             f = TopK_k(ReLU(encoder(x − b_dec)))                      -> topk
    BatchTopKSAE, MatryoshkaBatchTopKSAE   f = z·1[z > threshold], z = ReLU(encoder(x − b_dec))
                                                                                     -> batchtopk
    JumpReluAutoEncoder         z = x·W_enc + b_enc (x − b_dec with apply_b_dec_to_input),
                                f = ReLU(z·1[z > threshold])                          -> jumprelu
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.models.base import SAE
from sae.models.registry import build_sae

WEIGHTS, CONFIG = "ae.pt", "config.json"
CLASSES = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
}
"""dictionary_learning's dictionary classes -> the saeflow architecture they load as."""


def is_dictionary_learning(dir: Path) -> bool:
    return (Path(dir) / WEIGHTS).is_file()


def load(dir: Path) -> tuple[SAE, dict[str, Any]]:
    """The dictionary_learning directory `dir` as a saeflow SAE (fp32, eval) and its config."""
    dir = Path(dir)
    try:
        cfg = json.loads((dir / CONFIG).read_text()) if (dir / CONFIG).is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{dir / CONFIG} is not valid JSON ({e})") from None
    trainer = cfg.get("trainer", {}) if isinstance(cfg, dict) else {}
    try:
        state: dict[str, Tensor] = torch.load(dir / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{dir / WEIGHTS} is not a weights-only torch state dict ({e})") from None
    name = trainer.get("dict_class") or _guess(state)
    arch = CLASSES.get(name)
    if arch is None:
        raise ValueError(
            f"{dir}: dictionary class {name!r} is not supported; supported: {', '.join(CLASSES)}"
        )
    s = {k: v.float() for k, v in state.items() if torch.is_tensor(v)}
    try:
        if "W_enc" in s:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: (d_in, d_sae) matrices
            W_enc, b_enc, W_dec, b_dec = s["W_enc"], s["b_enc"], s["W_dec"], s["b_dec"]
        else:
            W_enc, b_enc = s["encoder.weight"].T.contiguous(), s["encoder.bias"]
            W_dec = s["decoder.weight"].T.contiguous()
            b_dec = s["bias"] if arch == "relu" else s["b_dec"]
    except KeyError as e:
        raise ValueError(f"{dir / WEIGHTS} lacks the tensor {e} of a {name}") from None
    d_in, d_sae = W_enc.shape
    hp: dict[str, Any] = {}
    if arch in ("topk", "batchtopk"):
        k = trainer.get("k", state.get("k"))
        hp["k"] = int(k.item() if torch.is_tensor(k) else k)
    sae = build_sae(arch, d_in, d_sae, **hp)
    if arch == "relu" or (arch == "jumprelu" and trainer.get("apply_b_dec_to_input")):
        b_enc = b_enc - b_dec @ W_enc  # ReLU((x − b_dec)·W + b) = ReLU(x·W + (b − b_dec·W))
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch in ("batchtopk", "jumprelu"):
        threshold = s.get("threshold")
        if threshold is None or bool((threshold < 0).any()):  # -1: not learnt yet
            raise ValueError(f"{dir / WEIGHTS}: the {name} has no learnt threshold")
        weights["threshold"] = threshold.reshape(()) if arch == "batchtopk" else threshold
    sae.load_state_dict(weights)
    return sae.eval(), cfg


def _guess(state: dict[str, Any]) -> str:
    if "W_enc" in state:
        return "JumpReluAutoEncoder"
    if "bias" in state:
        return "AutoEncoder"
    return "BatchTopKSAE" if "threshold" in state else "AutoEncoderTopK"
