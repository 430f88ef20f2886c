"""Text sources, a stable held-out split, tokenisation and GPT-2-style context packing.

A *document* is one string (a file, a JSONL line, a Parquet row). Documents go to either the
train or the eval split, decided by a hash of their key, so the split is the same on every machine
and no eval text leaks into training through a shared document. A document of a `files` or `hf`
source longer than `chunk_chars` (a book, a corpus dumped as one file) is cut into chunks at line
ends, and a `holdout` share of its chunks (at least one), spread through it and chosen by its
key's hash, goes to eval: a corpus of one huge document still gets both splits. (The stdlib
source keeps every file whole: its split is part of the builtin model's recipe.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
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
CHUNK_CHARS = 100_000
"""Documents longer than this (characters) are split into chunks for the train/eval split."""
ERRORS = ("strict", "replace", "skip")
"""What a byte that does not decode does: fail naming the file and offset, become U+FFFD, or
leave the whole file out."""
_BINARY_PROBE = 8192  # bytes searched for a NUL: text has none, binary files almost always do


class Documents:
    """An iterable over one split's texts, counting what it read: `read` (documents or chunks
    seen, either split), `kept` (those of this split), `chars` (their characters), `skipped`
    (files left out by errors="skip", with the reason)."""

    def __init__(self, texts: Iterator[tuple[str, str]], split: str, max_bytes: int = 0):
        self._texts, self.split, self.max_bytes = texts, split, max_bytes
        self.read = self.kept = self.chars = 0
        self.skipped: list[str] = []

    def __iter__(self) -> Iterator[str]:
        left = self.max_bytes
        for split, text in self._texts:
            self.read += 1
            if split != self.split:
                continue
            if self.max_bytes > 0:
                data = text.encode("utf-8")
                if len(data) >= left:
                    # errors="ignore" drops a multi-byte character cut in half at the boundary
                    text = data[:left].decode("utf-8", errors="ignore")
                    self._count(text)
                    yield text
                    return
                left -= len(data)
            self._count(text)
            yield text

    def _count(self, text: str) -> None:
        self.kept += 1
        self.chars += len(text)

    def why_empty(self, holdout: float, chunk_chars: int) -> str:
        """Why this split got (almost) no text, for an error message."""
        other = "eval" if self.split == "train" else "train"
        skipped = ""
        if self.skipped:
            skipped = f"; {len(self.skipped)} file(s) skipped ({self.skipped[0]})"
        return (
            f"the {self.split} split got {self.chars:,} characters from {self.kept} of the "
            f"{self.read} documents read (the rest went to {other}: documents up to "
            f"data.chunk_chars={chunk_chars:,} characters are held out whole, by a hash of "
            f"their key, at data.holdout={holdout:g}){skipped}"
        )


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
    chunk_chars: int = CHUNK_CHARS,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> Documents:
    """The texts of one split of a source, in a deterministic order (a `Documents`: iterate it;
    it counts what it read).

    source="stdlib": `stdlib_files()`, keyed by path relative to the stdlib root.
    source="files": `paths` of `.txt` (one document), `.jsonl` (`"text"` per line) or `.parquet`
    (`text` column, one document per row) files, or directories of them; keyed `f"{path}:{index}"`.
    source="hf": the `datasets` dataset `hf_name` (config, split), streamed, `text_column` of
    each row, keyed `f"{hf_name}:{row}"`; `paths` are its `data_files` (local builders such as
    `hf_name="json"` read them offline).
    `max_bytes > 0` stops after that many UTF-8 bytes (the last document is cut to fit).
    Files are decoded with `encoding`; a byte that does not decode, or a binary file, raises
    ValueError naming the file and offset (errors="strict"), becomes U+FFFD ("replace"), or
    leaves the file out ("skip", listed in `.skipped`). Documents of files/hf sources longer
    than `chunk_chars` are split into chunks (module docstring); 0 keeps them whole.
    """
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "stdlib":
        keyed = _stdlib_documents()
    elif source == "files":
        if not paths:
            raise ValueError("source='files' needs paths=[...] of .txt/.jsonl/.parquet files")
        skipped: list[str] = []
        files = _expand(paths)  # expanded now so a bad path fails at the call
        keyed = _file_documents(files, encoding, errors, skipped)
    elif source == "hf":
        if not hf_name:
            raise ValueError("source='hf' needs hf_name (a dataset name or a builder like 'json')")
        keyed = _hf_documents(hf_name, hf_config, hf_split, text_column, list(paths))
    else:
        raise ValueError(f"unknown text source {source!r}; valid sources: {SOURCES}")
    chunks = 0 if source == "stdlib" else chunk_chars
    out = Documents(_assign(keyed, holdout, chunks), split, max_bytes)
    if source == "files":
        out.skipped = skipped
    return out


def _assign(
    keyed: Iterable[tuple[str, str]], holdout: float, chunk_chars: int
) -> Iterator[tuple[str, str]]:
    """(split, text) per document, or per chunk of a document longer than `chunk_chars`. Such a
    document is cut into n = max(⌈length / chunk_chars⌉, ⌈1 / holdout⌉) chunks, so n·holdout ≥ 1,
    and floor(n·holdout + u) of them go to eval (u ∈ [0, 1) from its key's hash: the expected
    share is `holdout`, and never none), evenly spaced from an offset its hash also picks, among
    those n (a short last piece that cuts at line ends leave is never the one held out)."""
    for key, text in keyed:
        if not chunk_chars or len(text) <= chunk_chars:
            yield split_of(key, holdout), text
            continue
        n = max(math.ceil(len(text) / chunk_chars), math.ceil(1 / holdout) if holdout else 1)
        parts = _chunks(text, math.ceil(len(text) / n))
        digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest())
        m = min(n, math.floor(n * holdout + (digest % 10_000) / 10_000))
        held = {(math.floor((j + 0.5) * n / m) + digest) % n for j in range(m)} if m else set()
        for i, part in enumerate(parts):
            yield ("eval" if i in held else "train"), part


def _chunks(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, at a line end where the piece has
    one (else mid-line: a corpus in one line)."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


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
            if path.is_symlink():  # exists() follows links: a loop or a dangling target
                try:
                    target = path.resolve(strict=True)
                except (RuntimeError, OSError) as e:  # 3.11 RuntimeError, 3.13 ELOOP
                    if "loop" in str(e).lower() or getattr(e, "errno", None) == 40:
                        raise FileNotFoundError(f"{name!r} is a symlink loop") from None
                    target = Path(os.readlink(path))
                raise FileNotFoundError(f"{name!r} links to {str(target)!r}, which is missing")
            raise FileNotFoundError(f"text file or directory not found: {name!r}")
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES)
        elif path.suffix in FILE_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(f"unsupported text file {name!r}; valid suffixes: {FILE_SUFFIXES}")
    return files


def _file_documents(
    files: list[Path], encoding: str, errors: str, skipped: list[str]
) -> Iterator[tuple[str, str]]:
    for path in files:
        if path.suffix == ".parquet":
            for index, text in enumerate(_parquet_texts(path)):
                yield f"{path}:{index}", text
            continue
        try:
            text = read_text(path, encoding, errors)
        except _Skip as e:
            skipped.append(f"{path}: {e}")
            continue
        if path.suffix == ".txt":
            yield f"{path}:0", text
        else:
            for index, line in _jsonl_texts(path, text):
                yield f"{path}:{index}", line


class _Skip(Exception):
    """A file errors="skip" leaves out (the message says why)."""


def read_text(path: Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The file decoded; a binary file (a NUL byte near the start), a byte that does not decode
    or an unreadable file raise ValueError naming it (or `_Skip` with errors="skip")."""
    try:
        data = path.read_bytes()
    except OSError as e:
        problem = "a symlink loop" if e.errno == 40 else e.strerror or str(e)
        if errors == "skip":
            raise _Skip(problem) from None
        raise ValueError(f"cannot read text file {str(path)!r}: {problem}") from None
    if (nul := data.find(b"\0", 0, _BINARY_PROBE)) >= 0:
        if errors == "skip":
            raise _Skip(f"binary (a NUL byte at {nul})")
        raise ValueError(
            f"{str(path)!r} is a binary file, not text (a NUL byte at byte {nul}); remove it "
            "from data.paths, or set data.errors=skip to leave such files out"
        )
    try:
        return data.decode(encoding, errors="replace" if errors == "replace" else "strict")
    except UnicodeDecodeError as e:
        if errors == "skip":
            raise _Skip(f"not {encoding} at byte {e.start}") from None
        raise ValueError(
            f"{str(path)!r} is not valid {encoding} at byte {e.start} ({e.reason}, "
            f"{data[e.start : e.start + 4]!r}); set data.encoding to its encoding, "
            "data.errors=replace to read such bytes as U+FFFD, or data.errors=skip to leave "
            "such files out"
        ) from None


def _jsonl_texts(path: Path, content: str) -> Iterator[tuple[int, str]]:
    """(line index, text) per non-blank line; the index counts blank lines so ids stay stable.
    Lines end at "\\n" only (a JSON string may hold U+2028, which `splitlines` would cut at)."""
    for index, line in enumerate(content.split("\n")):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{index + 1}: not JSON ({e.msg}): {line[:80]!r}") from None
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
