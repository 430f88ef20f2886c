"""EleutherAI sparsify's checkpoint: a directory with `cfg.json` (`k`, `d_in`, `num_latents` or
`expansion_factor`, …) and `sae.safetensors` (`encoder.weight` (d_sae, d_in), `encoder.bias`,
`W_dec` (d_sae, d_in), `b_dec`). Its encoder, TopK_k(ReLU(encoder(x − b_dec))), is saeflow's
topk with W_enc = encoder.weightᵀ; its decoder is f·W_dec + b_dec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from sae.models.base import SAE
from sae.models.registry import build_sae

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"


def is_sparsify(dir: Path) -> bool:
    """A sparsify directory: its weights name `encoder.weight` (saeflow's name `W_enc`)."""
    dir = Path(dir)
    if not ((dir / CONFIG).is_file() and (dir / WEIGHTS).is_file()):
        return False
    try:
        cfg = json.loads((dir / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and "arch" not in cfg and "k" in cfg


def load(dir: Path) -> tuple[SAE, dict[str, Any]]:
    """The sparsify directory `dir` as a saeflow topk SAE (fp32, eval) and its cfg.json."""
    dir = Path(dir)
    cfg = json.loads((dir / CONFIG).read_text())
    if (activation := cfg.get("activation", "topk")) != "topk":
        raise ValueError(f"{dir / CONFIG}: activation={activation!r} is not supported (topk is)")
    for key in ("skip_connection", "transcode"):
        if cfg.get(key):
            raise ValueError(f"{dir / CONFIG}: {key}=true (a transcoder) is not supported")
    try:
        t = load_file(str(dir / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{dir / WEIGHTS} is not a readable safetensors file ({e})") from None
    if missing := sorted({"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(t)):
        raise ValueError(f"{dir / WEIGHTS} lacks {missing} for a sparsify SAE")
    W_enc = t["encoder.weight"].float().T.contiguous()  # (d_in, d_sae)
    d_in, d_sae = W_enc.shape
    if "d_in" in cfg and int(cfg["d_in"]) != d_in:
        raise ValueError(f"{dir / CONFIG} says d_in={cfg['d_in']}, the weights have {d_in}")
    sae = build_sae("topk", d_in, d_sae, k=int(cfg["k"]))
    sae.load_state_dict(
        {
            "W_enc": W_enc,
            "b_enc": t["encoder.bias"].float(),
            "W_dec": t["W_dec"].float(),
            "b_dec": t["b_dec"].float(),
        }
    )
    return sae.eval(), cfg
