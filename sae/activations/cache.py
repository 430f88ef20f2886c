"""The activation cache: sequence-contiguous Parquet shards + an atomic manifest (DESIGN §4).

    <dir>/manifest.json            written last, atomically; a shard not listed does not exist
    <dir>/shard-00000.parquet      rows in (seq_id, pos) order
        seq_id int64, pos int32, token_id int32, special bool,
        <hook> fixed_size_binary(d_in * 2)   raw bf16/fp16 bytes, uncompressed, no dictionary/stats

Shard i always holds the same sequences (shard_seqs · i onwards), so an interrupted build resumes
at the first missing shard and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae.files import atomic_write, file_sha256, write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
META_COLUMNS = ["seq_id", "pos", "token_id", "special", "outlier"]


class CacheError(RuntimeError):
    """A cache that is missing, corrupt or does not match what was asked of it."""


def cache_key(inputs: dict) -> str:
    """Short content hash of everything that determines the activations."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]  # the format of every existing key


@dataclass
class Shard:
    file: str
    rows: int
    first_seq: int
    n_seqs: int
    sha256: str


@dataclass
class Manifest:
    key: str
    key_inputs: dict
    hooks: dict[str, int]  # hook name -> d_in
    dtype: str
    context_length: int
    special_token_ids: list[int]
    shards: list[Shard] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION
    n_planned: int = 0
    """Sequences the finished cache will hold; shard i holds sequences [i·shard_seqs, …)."""
    shard_seqs: int = 0
    outlier_factor: float = 0.0
    """Rows whose activation norm exceeds this × the shard's median are flagged (0 = off)."""

    @property
    def n_shards(self) -> int:
        """Shards in the plan (the finished cache)."""
        return -(-self.n_planned // self.shard_seqs) if self.shard_seqs else len(self.shards)

    @property
    def n_sequences(self) -> int:
        return sum(s.n_seqs for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.rows for s in self.shards)

    def save(self, dir: Path) -> None:
        """Temp file + fsync + rename: readers see the old manifest or the new, never half."""
        body = asdict(self) | {"n_sequences": self.n_sequences, "n_tokens": self.n_tokens}
        write_text(dir / MANIFEST, json.dumps(body, indent=1), point="cache.manifest_write")

    @classmethod
    def load(cls, dir: Path) -> Manifest:
        path = Path(dir) / MANIFEST
        if not path.is_file():
            raise CacheError(f"no activation cache at {dir}: {MANIFEST} is missing")
        try:
            body = json.loads(path.read_text())
            if body.get("format_version") != FORMAT_VERSION:
                raise CacheError(
                    f"{path}: format_version {body.get('format_version')!r}, "
                    f"this saeflow reads {FORMAT_VERSION}"
                )
            body.pop("n_sequences", None)
            body.pop("n_tokens", None)
            body["shards"] = [Shard(**s) for s in body["shards"]]
            return cls(**body)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CacheError(f"{path} is corrupt: {e}") from e

    def d_in(self, hook: str) -> int:
        if hook not in self.hooks:
            raise CacheError(f"hook {hook!r} is not in this cache; it holds {sorted(self.hooks)}")
        return self.hooks[hook]


def _to_binary(acts: torch.Tensor, dtype: str) -> pa.Array:
    """(N, d) float tensor -> fixed_size_binary(d * 2) array over the same bytes."""
    raw = acts.to(STORE_DTYPES[dtype]).contiguous().view(torch.int16).numpy()  # (N, d)
    width = raw.shape[1] * raw.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), raw.shape[0], [None, pa.py_buffer(raw.tobytes())]
    )


def _from_binary(col: pa.ChunkedArray | pa.Array, d_in: int, dtype: str) -> torch.Tensor:
    """fixed_size_binary column -> (N, d_in) tensor in the stored dtype, zero-copy per chunk."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = []
    for c in chunks:
        buf = np.frombuffer(c.buffers()[1], dtype=np.int16)  # no copy
        flat = buf[c.offset * d_in : (c.offset + len(c)) * d_in]
        parts.append(torch.from_numpy(flat).view(STORE_DTYPES[dtype]).view(len(c), d_in))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def write_shard(
    dir: Path,
    index: int,
    first_seq: int,
    token_ids: torch.Tensor,
    special: torch.Tensor,
    acts: dict[str, torch.Tensor],
    dtype: str,
    outlier: torch.Tensor | None = None,
) -> Shard:
    """Write one shard of whole sequences. token_ids, special, outlier: (S, T); acts: (S, T, d).

    The temp name is unique per process and thread: concurrent writers of the same shard (two
    runs asking for one cache) each rename a complete, identical file into place.
    """
    s, t = token_ids.shape
    if outlier is None:
        outlier = torch.zeros_like(special)
    cols = {
        "seq_id": pa.array(np.repeat(np.arange(first_seq, first_seq + s, dtype=np.int64), t)),
        "pos": pa.array(np.tile(np.arange(t, dtype=np.int32), s)),
        "token_id": pa.array(token_ids.reshape(-1).numpy().astype(np.int32)),
        "special": pa.array(special.reshape(-1).numpy()),
        "outlier": pa.array(outlier.reshape(-1).numpy()),
    }
    meta = {"saeflow.dtype": dtype}
    for hook, a in acts.items():
        cols[hook] = _to_binary(a.reshape(s * t, -1), dtype)
        meta[f"saeflow.d_in.{hook}"] = str(a.shape[-1])
    table = pa.table(cols).replace_schema_metadata(meta)
    name = f"shard-{index:05d}.parquet"

    # The layout DESIGN §4 measured at ~3 GB/s: no compression, dictionary or stats on activations.
    def write(tmp: Path) -> None:
        pq.write_table(
            table,
            tmp,
            compression="none",
            use_dictionary=False,
            write_statistics=["seq_id", "pos", "token_id"],
            row_group_size=s * t,
        )

    try:  # the failpoint: a shard written, not yet renamed into place
        # no fsync, as before: a shard is checked against the sha256 the manifest records
        atomic_write(dir / name, write, point="cache.shard_write", fsync=False)
    except OSError as e:  # a full disk (ENOSPC) or a file-size limit (EFBIG), typically
        reason = os.strerror(e.errno) if e.errno else str(e)  # the half shard is gone
        raise OSError(
            e.errno,
            f"cannot write shard {dir / name}: {reason}; free space on that disk or move "
            "SAEFLOW_HOME, then re-run: the shards already written are kept",
        ) from e
    return Shard(name, s * t, first_seq, s, file_sha256(dir / name))


def read_shard(
    dir: Path, shard: Shard, hooks: Iterable[str], manifest: Manifest
) -> tuple[pa.Table, dict[str, torch.Tensor]]:
    """(meta columns, {hook: (rows, d_in) tensor}) of one shard; errors name the shard."""
    path = Path(dir) / shard.file
    hooks = list(hooks)
    try:
        table = pq.read_table(path, columns=META_COLUMNS + hooks)
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read shard {path}: {e}") from e
    if table.num_rows != shard.rows:
        raise CacheError(f"shard {path} has {table.num_rows} rows, manifest says {shard.rows}")
    acts = {h: _from_binary(table[h], manifest.d_in(h), manifest.dtype) for h in hooks}
    return table.select(META_COLUMNS), acts


def excluded(meta: pa.Table) -> np.ndarray:
    """(rows,) bool: special tokens and outlier rows, as flagged at caching time."""
    special = meta["special"].to_numpy(zero_copy_only=False)
    if "outlier" not in meta.column_names:
        return special
    return special | meta["outlier"].to_numpy(zero_copy_only=False)


def verify(dir: Path, manifest: Manifest | None = None) -> list[str]:
    """Shards whose file is missing or whose checksum differs from the manifest's."""
    manifest = manifest or Manifest.load(dir)
    bad = []
    for s in manifest.shards:
        p = Path(dir) / s.file
        if not p.is_file() or file_sha256(p) != s.sha256:
            bad.append(s.file)
    return bad


def sequences(
    dir: Path, hook: str, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """In-order (token_ids (B,T), excluded (B,T), acts (B,T,d_in)) over the whole cache.

    `excluded` marks special tokens and outlier rows: kept for context, never fed to an SAE.
    """
    m = Manifest.load(dir)
    t, d = m.context_length, m.d_in(hook)
    for shard in m.shards:
        meta, acts = read_shard(dir, shard, [hook], m)
        tok = torch.from_numpy(meta["token_id"].to_numpy().astype(np.int64)).view(-1, t)
        spec = torch.from_numpy(excluded(meta)).view(-1, t)
        a = acts[hook].view(-1, t, d)
        for i in range(0, tok.shape[0], batch_size):
            yield tok[i : i + batch_size], spec[i : i + batch_size], a[i : i + batch_size]
