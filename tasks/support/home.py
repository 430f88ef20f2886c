"""The data directory: everything saeflow writes lives under `$SAEFLOW_HOME` (~/.saeflow)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("SAEFLOW_HOME") or Path.home() / ".saeflow").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


SQLITE_HEADER = b"SQLite format 3\x00"


def check_home() -> Path:
    """The data directory, checked before any work: it can be created and written (a file is
    made and removed), and the embedded MLflow store, if there is one, is an SQLite database.
    Raises PermissionError / ValueError naming the path and the way out."""
    name = os.environ.get("SAEFLOW_HOME") or str(Path.home() / ".saeflow")
    try:
        root = home()
        probe = root / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"the data directory SAEFLOW_HOME={name} is not writable ({e.strerror or e}); "
            "point SAEFLOW_HOME at a writable directory"
        ) from None
    db = root / "mlflow" / "mlflow.db"
    if db.is_file() and db.stat().st_size > 0:
        with open(db, "rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise ValueError(
                    f"the MLflow store {db} is not an SQLite database (damaged?); move it aside "
                    "to start a new store (the checkpoints and caches in SAEFLOW_HOME stay), or "
                    "restore it from a backup"
                )
    return root


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
