"""Any SAE saeflow can read, from a directory or a Hugging Face Hub id: `load_any(spec)`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae.formats import dictionary_learning, saelens, sparsify
from sae.models.base import CONFIG, SAE, WEIGHTS
from sae.models.registry import load_sae

FORMATS = ("saeflow", "saelens", "sparsify", "dictionary_learning")
"""What `load_any` reads, in the order it tries them."""
HUB_RE = re.compile(r"^([\w.-]+/[\w.-]+)(?::([\w./=-]+))?$")
"""`owner/repo` or `owner/repo:sae_id` (a folder of the repo, as SAELens releases lay them out)."""


@dataclass
class Imported:
    """An SAE read from elsewhere, with what is known of where it came from."""

    sae: SAE
    format: str
    dir: Path
    config: dict[str, Any]
    """The source's own config, as read (SAELens's cfg.json, sparsify's, dictionary_learning's)."""
    hook: str | None
    """The saeflow hook it was trained at, where the format says (saeflow, SAELens)."""


def detect(dir: Path) -> str:
    """The format of the SAE directory `dir` (one of FORMATS); ValueError naming what is there."""
    dir = Path(dir)
    if not dir.is_dir():
        raise FileNotFoundError(f"no SAE directory at {dir}")
    if (dir / CONFIG).is_file() and (dir / WEIGHTS).is_file() and not sparsify.is_sparsify(dir):
        return "saeflow"
    if saelens.is_saelens(dir):
        return "saelens"
    if sparsify.is_sparsify(dir):
        return "sparsify"
    if dictionary_learning.is_dictionary_learning(dir):
        return "dictionary_learning"
    found = sorted(p.name for p in dir.iterdir())[:10]
    raise ValueError(
        f"{dir} is not an SAE directory saeflow can read (found {found}); expected saeflow's "
        f"{CONFIG} + {WEIGHTS}, SAELens's {saelens.CONFIG} + {saelens.WEIGHTS}, sparsify's "
        f"{sparsify.CONFIG} + {sparsify.WEIGHTS}, or dictionary_learning's "
        f"{dictionary_learning.WEIGHTS}"
    )


def resolve(spec: str) -> Path:
    """A local directory, or `owner/repo[:sae_id]` downloaded from the Hugging Face Hub (only
    that SAE's folder; cached by huggingface_hub)."""
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        return path
    m = HUB_RE.match(spec)
    if not m:
        raise FileNotFoundError(f"{spec!r} is neither a directory nor a Hub id owner/repo[:sae_id]")
    from huggingface_hub import snapshot_download

    repo, sae_id = m.groups()
    try:
        root = snapshot_download(repo, allow_patterns=[f"{sae_id}/*"] if sae_id else None)
    except Exception as e:
        raise FileNotFoundError(f"cannot download the SAE {spec!r} from the Hub: {e}") from None
    return Path(root) / sae_id if sae_id else Path(root)


def load_any(spec: str | Path) -> Imported:
    """The SAE at `spec` (a directory or Hub id) as a saeflow SAE, whatever its format."""
    dir = resolve(str(spec))
    fmt = detect(dir)
    if fmt == "saeflow":
        sae = load_sae(dir)
        cfg = json.loads((dir / CONFIG).read_text())
        return Imported(sae, fmt, dir, cfg, (cfg.get("meta") or {}).get("hook"))
    if fmt == "saelens":
        sae, cfg = saelens.load(dir)
        return Imported(sae, fmt, dir, cfg, saelens.hook_of(cfg))
    if fmt == "sparsify":
        sae, cfg = sparsify.load(dir)
        return Imported(sae, fmt, dir, cfg, None)
    sae, cfg = dictionary_learning.load(dir)
    return Imported(sae, fmt, dir, cfg, None)
