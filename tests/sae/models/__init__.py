"""Tests of `sae.models`, and a helper they share."""

from __future__ import annotations

import json
from pathlib import Path

from sae.models.base import SAE
from sae.models.registry import load_sae


def load_without(sae: SAE, dir: Path, field: str) -> SAE:
    """`sae` saved to `dir` with `field` dropped from its cfg.json, as a file written before the
    field existed, then loaded."""
    sae.save(dir)
    path = dir / "cfg.json"
    cfg = json.loads(path.read_text())
    del cfg[field]
    path.write_text(json.dumps(cfg))
    return load_sae(dir)
