"""The language model a study reads: the builtin offline default, or any Hub id / local dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config, ModelConfig
from sae.hardware import resolve_device
from sae.lm.builtin import build_stdlib_lm
from sae.lm.config import check_hook
from tasks.support.home import inside
from tasks.support.log import Progress, logger


def lm_device(c: ModelConfig) -> torch.device:
    """Where the language model runs (`model.device`; auto = cuda when torch sees a GPU). Every
    task that loads the model calls it first: cuda without CUDA fails before any work."""
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "model.device='cuda' but torch sees no CUDA device on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "use model.device=auto or model.device=cpu"
        )
    return resolve_device(c.device)


def _weights_hash(path: Path) -> str:
    """Hash of a local model's weight files (names, sizes, contents): its identity in cache keys."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _check_hooks(c: Config, hf: Any) -> None:
    """Hooks past a Hub model's last block fail here, before any caching (the schema knows only
    the builtin model's depth)."""
    n = getattr(hf, "num_hidden_layers", None)
    if not isinstance(n, int):
        return  # an unusual config: parse_hook checks against the loaded model
    for key, hook in [("hook", c.hook)] + [("cache.hooks", h) for h in c.cache.hooks]:
        check_hook(key, hook, n, c.model.path)


@task(name="prepare_model", cache_policy=NO_CACHE)
def prepare_model(cfg: Config) -> dict[str, Any]:
    """Build (once) or locate the model; return its `path` for `from_pretrained` and its
    `identity` (weights hash or Hub commit) for activation cache keys."""
    c = cfg.model
    lm_device(c)  # before building a model that could not run where it was asked to
    if c.source == "hub":
        from transformers import AutoConfig

        local = Path(c.path).expanduser()
        if local.is_dir():
            _check_hooks(cfg, AutoConfig.from_pretrained(local))
            return {
                "path": str(local.resolve()),
                "revision": None,
                "identity": _weights_hash(local),
            }
        if c.path.startswith(("/", "./", "../", "~")):  # meant as a directory, not a Hub id
            raise FileNotFoundError(
                f"model.path={c.path!r} is not a directory; a local model is a directory "
                "written by save_pretrained, a Hub id looks like 'gpt2' or 'EleutherAI/pythia-70m'"
            )
        hf = AutoConfig.from_pretrained(c.path, revision=c.revision)
        _check_hooks(cfg, hf)
        commit = getattr(hf, "_commit_hash", None)
        return {
            "path": c.path,
            "revision": c.revision,
            "identity": f"{c.path}@{commit or c.revision}",
        }
    digest = hashlib.sha256(json.dumps(c.recipe(), sort_keys=True).encode())
    out = inside("models", f"{c.name}-{digest.hexdigest()[:10]}")
    log = logger()
    progress = Progress("building the LM", "step")
    build = build_stdlib_lm(out, c, log=log.info, progress=progress)
    progress.close()
    log.info(
        f"model {c.name} at {out}: held-out CE {build['heldout_ce']:.3f} nats vs unigram "
        f"{build['unigram_ce']:.3f}"
    )
    return {
        "path": str(out),
        "revision": None,
        "identity": build["weights_sha256"],
        "heldout_ce": build["heldout_ce"],
        "unigram_ce": build["unigram_ce"],
    }
