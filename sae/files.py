"""Files written whole or not at all, and files' checksums: the two helpers every writer of the
data directory shares (trainer states, manifests, shards, weights, reports, feature tables)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from sae.failpoint import failpoint


def atomic_write(
    path: Path, write: Callable[[Path], object], *, point: str | None = None, fsync: bool = True
) -> None:
    """`write(tmp)` into a temp name beside `path` (unique to this process and thread), fsync
    (unless `fsync=False`), rename it over `path`: a reader, or a process killed at any moment,
    sees the old file or the new one, never half of one. `point` names the failpoint between the
    write and the rename (tests/faults kill there). A failed write leaves no temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if point is not None:
        failpoint(point)
    os.replace(tmp, path)


def write_text(path: Path, text: str, *, point: str | None = None) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), point=point)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
