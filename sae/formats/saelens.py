"""SAELens's directory format (v6): `cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`.

Out (`export`): every saeflow architecture as the SAELens architecture that computes the same
f and x̂ (FORMATS.md):

    saeflow               SAELens     f                                   apply_b_dec_to_input
    relu                  standard    ReLU(x·W_enc + b_enc)                     false
    topk                  topk        ReLU(TopK_k((x − b_dec)·W_enc + b_enc))   true
    jumprelu              jumprelu    ReLU(z)·1[z > θ], z = x·W_enc + b_enc     false
    batchtopk             jumprelu    the same on x − b_dec, θ learnt (scalar)  true

and matryoshka as what its f is (`SAE.encodes_as`): topk, or batchtopk with matryoshka_topk=batch.

saeflow folds its input scale into the weights, so `normalize_activations` is "none".
In (`load`): standard, topk and jumprelu directories, either value of apply_b_dec_to_input
(folded into b_enc where saeflow's architecture reads the other), any float dtype (read as fp32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae.files import atomic_write, write_text
from sae.formats.hooks import from_transformer_lens, to_transformer_lens
from sae.models.base import SAE
from sae.models.registry import build_sae

CONFIG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
ARCHITECTURE = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
}
"""saeflow's architecture (`SAE.encodes_as`) -> the SAELens architecture it is exported as."""
IMPORTED = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
"""SAELens's architecture -> the saeflow architecture it is loaded as."""
VERSION = "saeflow"
"""`metadata.sae_lens_training_version` of an export: trained by saeflow, not by SAELens."""
FORMAT_VERSION = "6.0.0"
"""`metadata.sae_lens_version` of an export: the SAELens format it follows. Without it,
SAELens 6.54 reads the config as pre-6.0 and drops the whole metadata block (measured)."""


def export(
    sae: SAE,
    dir: Path,
    *,
    model_name: str,
    hook: str,
    context_size: int,
    prepend_bos: bool,
    dataset_path: str,
    log10_frequency: Tensor | None = None,
) -> dict[str, Any]:
    """Write `sae` (raw-input units, as saeflow saves it) as a SAELens directory `dir` that
    `sae_lens.SAE.load_from_disk(dir)` loads as it is; `log10_frequency` (d_sae,) becomes
    `sparsity.safetensors`. Returns the cfg.json written."""
    arch = ARCHITECTURE.get(sae.encodes_as)
    if arch is None:
        raise ValueError(f"arch {sae.arch!r} has no SAELens equivalent here")
    if sae.encodes_as == "topk" and sae.threshold > 0:
        raise ValueError(
            f"this {sae.arch} SAE keeps the top {sae.k_train} of each token above a learnt "
            f"threshold {sae.threshold.item():.4g} (sae.k_train_factor > 1); SAELens's TopK has no "
            "threshold and its JumpReLU no top k, so neither computes the same f"
        )
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    W_enc, b_enc = sae.W_enc.detach().float(), sae.b_enc.detach().float()
    W_dec, b_dec = sae.W_dec.detach().float(), sae.b_dec.detach().float()
    by_b_dec = sae.encodes_as in ("topk", "batchtopk")  # they encode x − b_dec
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if sae.arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().float()
    elif arch == "jumprelu":  # batchtopk: one learnt threshold for every latent
        tensors["threshold"] = sae.threshold.detach().float().expand(sae.d_sae)
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": by_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": to_transformer_lens(hook),
            "hook_head_index": None,
            "context_size": context_size,
            "prepend_bos": prepend_bos,
            "dataset_path": dataset_path,
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": VERSION,
            "training_architecture": sae.arch,
        },
    }
    if arch == "topk":
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(dir / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    if log10_frequency is not None:
        freq = log10_frequency.detach().float().contiguous()
        if freq.shape != (sae.d_sae,):
            raise ValueError(f"log10_frequency has shape {tuple(freq.shape)}, not ({sae.d_sae},)")
        atomic_write(dir / SPARSITY, lambda tmp: save_file({"sparsity": freq}, str(tmp)))
    write_text(dir / CONFIG, json.dumps(cfg, indent=2))
    return cfg


def is_saelens(dir: Path) -> bool:
    return (Path(dir) / CONFIG).is_file() and (Path(dir) / WEIGHTS).is_file()


def read_config(dir: Path) -> dict[str, Any]:
    """cfg.json, with SAELens's pre-6.0 keys renamed and its metadata under "metadata"."""
    path = Path(dir) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable SAELens config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds {type(cfg).__name__}, not a SAELens config object")
    meta = dict(cfg.get("metadata") or {})
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path"):
        if key not in meta and key in cfg:
            meta[key] = cfg[key]
    cfg["metadata"] = meta
    if "architecture" not in cfg:  # SAELens before 3.x wrote no architecture: standard
        cfg["architecture"] = (
            "topk" if "k" in (cfg.get("activation_fn_kwargs") or {}) else "standard"
        )
    return cfg


def load(dir: Path) -> tuple[SAE, dict[str, Any]]:
    """The SAELens directory `dir` as a saeflow SAE (fp32, eval mode) and its cfg.json.
    Errors name the file and what in it saeflow cannot read."""
    dir = Path(dir)
    cfg = read_config(dir)
    path = dir / CONFIG
    arch = IMPORTED.get(cfg["architecture"])
    if arch is None:
        raise ValueError(
            f"{path}: SAELens architecture {cfg['architecture']!r} is not supported; "
            f"supported: {', '.join(IMPORTED)}"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ValueError(
            f"{path}: normalize_activations={norm!r} is not supported (its scale is not in the "
            "weights); supported: none"
        )
    if (cfg.get("metadata") or {}).get("hook_head_index") is not None:
        raise ValueError(f"{path}: SAEs on one attention head (hook_head_index) are not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(
            f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported"
        )
    try:
        t = load_file(str(dir / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{dir / WEIGHTS} is not a readable safetensors file ({e})") from None
    want = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if missing := sorted(want - set(t)):
        raise ValueError(f"{dir / WEIGHTS} lacks {missing} for a {cfg['architecture']} SAE")
    W_enc, b_enc = t["W_enc"].float(), t["b_enc"].float()
    W_dec, b_dec = t["W_dec"].float(), t["b_dec"].float()
    d_in, d_sae = int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[1]))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(
                f"{dir / WEIGHTS}: {name} has shape {tuple(t[name].shape)}, {path} says {shape}"
            )
    hp: dict[str, Any] = {}
    if arch == "topk":
        hp["k"] = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise ValueError(f"{path}: rescale_acts_by_decoder_norm=true is not supported")
    applied = bool(cfg.get("apply_b_dec_to_input", True))
    if arch == "topk" and not applied:  # saeflow's topk encodes x − b_dec
        b_enc = b_enc + b_dec @ W_enc
    elif arch != "topk" and applied:  # saeflow's relu and jumprelu encode x
        b_enc = b_enc - b_dec @ W_enc
    sae = build_sae(arch, d_in, d_sae, **hp)
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        threshold = t["threshold"].float()
        if not bool((threshold >= 0).all()):  # saeflow's f = ReLU(z)·1[z > θ] needs θ >= 0
            raise ValueError(f"{dir / WEIGHTS}: negative thresholds are not supported")
        state["threshold"] = threshold
    sae.load_state_dict(state)
    return sae.eval(), cfg


def hook_of(cfg: dict[str, Any]) -> str | None:
    """The saeflow hook a SAELens config names (None if it names none)."""
    name = (cfg.get("metadata") or {}).get("hook_name")
    return None if name is None else from_transformer_lens(name)


def log10_frequency(freq: Tensor) -> Tensor:
    """SAELens's `sparsity` tensor from firing frequencies (d_sae,): log10, a latent that never
    fired at −10."""
    return freq.double().clamp_min(1e-10).log10().float()


__all__ = ["ARCHITECTURE", "IMPORTED", "export", "hook_of", "is_saelens", "load", "log10_frequency"]
