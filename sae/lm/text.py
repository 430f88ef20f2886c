"""Text sources, a stable held-out split, tokenisation and GPT-2-style context packing.

A *document* is one string (a file, a JSONL line, a Parquet row). Whole documents go to either the
train or the eval split, decided by a hash of their key, so the split is the same on every machine
and no eval text leaks into training through a shared document.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Literal

SOURCES = ("stdlib", "files", "hf")
SPLITS = ("train", "eval")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Directory names whose .py files are test suites (stdlib `test/`, `idlelib/idle_test/`,
# `lib2to3/tests/`, `ctypes/test/`, ...): deliberately odd code, often not UTF-8.
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
_ENCODE_CHUNK = 64  # documents per batch-encode call: enough to amortise the Rust call


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own `.py` files, sorted: no site-packages, tests or non-UTF-8 files.

    On CPython 3.11 this is ~734 files, ~12.1 MB.
    """
    return list(_stdlib_files())


@functools.cache
def _stdlib_files() -> tuple[Path, ...]:
    files = []
    for dirpath, dirnames, filenames in os.walk(_stdlib_root()):
        # pruning in place keeps os.walk out of site-packages (10x more files than the stdlib)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and _is_utf8(path):
                files.append(path)
    return tuple(sorted(files))


def _is_utf8(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def split_of(key: str, holdout: float = 0.03) -> Literal["train", "eval"]:
    """`"eval"` for a stable fraction `holdout` of keys: blake2b(key) / 2**64 < holdout.

    The hash, unlike Python's `hash`, is the same in every process and on every machine.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") / 2**64 < holdout else "train"


def documents(
    source: str,
    split: str,
    *,
    paths: Sequence[str] = (),
    holdout: float = 0.03,
    max_bytes: int = 0,
    hf_name: str = "",
    hf_config: str | None = None,
    hf_split: str = "train",
    text_column: str = "text",
) -> Iterator[str]:
    """Yield the texts of one split of a source, in a deterministic order.

    source="stdlib": `stdlib_files()`, keyed by path relative to the stdlib root.
    source="files": `paths` of `.txt` (one document), `.jsonl` (`"text"` per line) or `.parquet`
    (`text` column, one document per row) files, or directories of them; keyed `f"{path}:{index}"`.
    source="hf": the `datasets` dataset `hf_name` (config, split), streamed, `text_column` of
    each row, keyed `f"{hf_name}:{row}"`; `paths` are its `data_files` (local builders such as
    `hf_name="json"` read them offline).
    `max_bytes > 0` stops after that many UTF-8 bytes (the last document is cut to fit).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "stdlib":
        keyed = _stdlib_documents()
    elif source == "files":
        if not paths:
            raise ValueError("source='files' needs paths=[...] of .txt/.jsonl/.parquet files")
        keyed = _file_documents(_expand(paths))  # expanded now so a bad path fails at the call
    elif source == "hf":
        if not hf_name:
            raise ValueError("source='hf' needs hf_name (a dataset name or a builder like 'json')")
        keyed = _hf_documents(hf_name, hf_config, hf_split, text_column, list(paths))
    else:
        raise ValueError(f"unknown text source {source!r}; valid sources: {SOURCES}")
    selected = (text for key, text in keyed if split_of(key, holdout) == split)
    return _cap_bytes(selected, max_bytes) if max_bytes > 0 else selected


def _hf_documents(
    name: str, config: str | None, split: str, column: str, data_files: list[str]
) -> Iterator[tuple[str, str]]:
    """Rows of a Hugging Face dataset, streamed (no full download before the first row)."""
    from datasets import load_dataset  # heavy import, only for this source

    ds = load_dataset(name, config, split=split, streaming=True, data_files=data_files or None)
    for i, row in enumerate(ds):
        if column not in row:
            raise ValueError(f"dataset {name!r} has no column {column!r}; it has {sorted(row)}")
        yield f"{name}:{i}", row[column] or ""


def _cap_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    left = max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= left:
            # errors="ignore" drops a multi-byte character cut in half at the boundary
            yield data[:left].decode("utf-8", errors="ignore")
            return
        left -= len(data)
        yield text


def _stdlib_documents() -> Iterator[tuple[str, str]]:
    root = _stdlib_root()
    for path in stdlib_files():
        yield path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")


def _expand(paths: Sequence[str]) -> list[Path]:
    """Files named in `paths`, directories replaced by their supported files (sorted, recursive)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"text file or directory not found: {name!r}")
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES)
        elif path.suffix in FILE_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(f"unsupported text file {name!r}; valid suffixes: {FILE_SUFFIXES}")
    return files


def _file_documents(files: list[Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        if path.suffix == ".txt":
            yield f"{path}:0", path.read_text(encoding="utf-8")
        elif path.suffix == ".jsonl":
            for index, text in _jsonl_texts(path):
                yield f"{path}:{index}", text
        else:
            for index, text in enumerate(_parquet_texts(path)):
                yield f"{path}:{index}", text


def _jsonl_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line index, text) per non-blank line; the index counts blank lines so ids stay stable."""
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            record: Any = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f"{path}:{index + 1}: expected a JSON object with a string "
                    f"'text' field, got {line[:80]!r}"
                )
            yield index, record["text"]


def _parquet_texts(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no 'text' column; columns are {parquet.schema_arrow.names}")
    for batch in parquet.iter_batches(columns=["text"]):
        yield from (text or "" for text in batch.column(0).to_pylist())


def pack(
    token_ids: Iterable[list[int]],
    context_length: int,
    *,
    bos_id: int | None,
    eos_id: int | None,
) -> Iterator[list[int]]:
    """GPT-2-style packing: one stream `d0 eos d1 eos d2 ...` cut into contexts of `context_length`.

    With `bos_id`, each context is `[bos_id] + next context_length-1 stream tokens`, so every
    context starts the same way whatever document it cuts into. Empty documents are skipped (no
    double separator); the last partial context is dropped.
    """
    body = context_length - (bos_id is not None)
    if body < 1:
        raise ValueError(
            f"context_length must be >= {2 if bos_id is not None else 1} "
            f"(bos_id={bos_id}), got {context_length}"
        )
    prefix = [] if bos_id is None else [bos_id]
    buffer: list[int] = []
    first = True
    for ids in token_ids:
        if not ids:
            continue
        if not first and eos_id is not None:
            buffer.append(eos_id)
        first = False
        buffer.extend(ids)
        n_full = len(buffer) // body
        for i in range(n_full):
            yield prefix + buffer[i * body : (i + 1) * body]
        del buffer[: n_full * body]


def token_contexts(
    tokenizer: Any,
    docs: Iterable[str],
    context_length: int,
    *,
    prepend_bos: bool = True,
    max_contexts: int | None = None,
) -> Iterator[list[int]]:
    """Tokenise `docs` (no special tokens from the tokenizer) and `pack` them into contexts.

    Separator = `tokenizer.eos_token_id`; BOS = `bos_token_id`, else the EOS id (GPT-2 uses
    `<|endoftext|>` for both); with neither, contexts are plain slices of the stream.
    """
    eos_id = tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    contexts = pack(
        _encode_chunks(tokenizer, docs),
        context_length,
        bos_id=bos_id if prepend_bos else None,
        eos_id=eos_id,
    )
    return contexts if max_contexts is None else islice(contexts, max_contexts)


def _encode_chunks(tokenizer: Any, docs: Iterable[str]) -> Iterator[list[int]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            yield from _encode(tokenizer, chunk)
            chunk = []
    if chunk:
        yield from _encode(tokenizer, chunk)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: whole documents are longer than model_max_length on purpose (we pack them)
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]
