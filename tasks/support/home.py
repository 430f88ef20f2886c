"""The data directory: everything saeflow writes lives under `$SAEFLOW_HOME` (~/.saeflow)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("SAEFLOW_HOME") or Path.home() / ".saeflow").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def inside(*parts: str) -> Path:
    """home()/parts..., refusing any part that would lead outside the data directory
    (`..`, an absolute path, a separator in a name taken from a run or config)."""
    root = home()
    path = root.joinpath(*parts).resolve()
    if root not in path.parents and path != root:
        raise ValueError(f"{'/'.join(parts)!r} would lead outside the data directory {root}")
    return path


def sae_dir(run_id: str) -> Path:
    """Where a trained SAE of MLflow run `run_id` lives: its weights, trainer states and lock
    (a run id that would lead outside the data directory is refused)."""
    return inside("saes", run_id)
