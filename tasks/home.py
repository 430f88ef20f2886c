"""The data directory: everything saeflow writes lives under `$SAEFLOW_HOME` (~/.saeflow)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("SAEFLOW_HOME") or Path.home() / ".saeflow").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()
