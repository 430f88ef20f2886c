"""Activation caches on a shared filesystem or an object store (`cache.store`), write-once.

    <store>/<key>/shard-NNNNN.parquet   the local cache's shard files, same names, same bytes
    <store>/<key>/manifest.json         uploaded last: a key without it (or not complete) is absent

`publish` uploads a sealed local cache; `fetch` downloads a complete one, checking every shard's
sha256 against the manifest before it is renamed into the local cache. An object is never
overwritten: publishing bytes that differ from what the store holds raises, naming both hashes
(the cache key fixes the content, so a difference means a bug, a tampered store or a key that
misses an input). Any URL `pyarrow.fs.FileSystem.from_uri` takes: `s3://bucket/prefix`
(`?endpoint_override=host:port&scheme=http`, credentials from the AWS_* variables),
`gs://bucket/prefix`, `file:///mnt/shared/caches`. The plan's `tokens.npy` is not published: a
complete cache never reads it, and it is rebuilt from the data if a shard is ever recomputed.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse

import pyarrow.fs as pafs

from sae.activations.cache import MANIFEST, CacheError, Manifest, Shard, cache_key
from sae.activations.extract import locked
from sae.files import file_sha256

CHUNK = 8 << 20
"""Bytes per read/write while streaming an object (hashing as it goes)."""
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""A key or a file name: one path component, not hidden, no way out of the key's prefix."""
_SECRETS = ("secret_key", "session_token", "access_key")


def shown(url: str) -> str:
    """`url` with its credentials (if any were put in the query) masked, for logs and errors."""
    u = urlparse(url)
    query = [(k, "***" if k in _SECRETS else v) for k, v in parse_qsl(u.query)]
    return u._replace(query=urlencode(query, safe=":/")).geturl()


@contextmanager
def _naming(url: str) -> Iterator[None]:
    """I/O errors of the store carry its URL; the errno is kept (a full local disk is final)."""
    try:
        yield
    except (CacheError, FileNotFoundError):
        raise
    except OSError as e:
        msg = f"cache store {shown(url)}: {e}"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e


def _open(url: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) of the store, after checking that its bucket or directory exists
    (pyarrow reports a missing bucket only at the first write)."""
    try:
        fs, root = pafs.FileSystem.from_uri(url)
    except ValueError as e:  # pyarrow.ArrowInvalid: a bad scheme or query parameter
        raise ValueError(f"cache.store={shown(url)!r} is not a store pyarrow can open: {e}") from e
    root = root.rstrip("/")
    top = root if isinstance(fs, pafs.LocalFileSystem) else root.split("/")[0]
    with _naming(url):
        info = fs.get_file_info(top)
    if info.type != pafs.FileType.Directory:
        what = "directory" if isinstance(fs, pafs.LocalFileSystem) else "bucket"
        raise FileNotFoundError(
            f"cache store {shown(url)}: {what} {top!r} does not exist; create it (or mount the "
            "shared filesystem), or fix cache.store"
        )
    return fs, root


def _check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name):
        raise CacheError(f"{what} {name!r} is not a plain file name; refusing to use it in a store")
    return name


def _remote_sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_if_there(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A small object's bytes, or None if there is none."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def _tmp(name: str) -> str:
    """A hidden temp name (no reader lists it), unique across machines writing one store."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def _place(fs: pafs.FileSystem, tmp: str, dst: str) -> bool:
    """Move the uploaded `tmp` to `dst` unless `dst` exists; False if it did (tmp removed).

    On a shared filesystem a hard link is atomic and never replaces; an object store has no
    create-if-absent in pyarrow, so two publishers racing on one object can both write it (the
    same bytes, as the key fixes them)."""
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            os.link(tmp, dst)
            return True
        except FileExistsError:
            return False
        except OSError:  # a mount without hard links (some FUSE and SMB ones): check, rename
            if os.path.exists(dst):
                return False
            os.rename(tmp, dst)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)
    if fs.get_file_info(dst).type == pafs.FileType.File:
        fs.delete_file(tmp)
        return False
    fs.move(tmp, dst)
    return True


def _upload(fs: pafs.FileSystem, src: Path, dst: str, sha256: str) -> bool:
    """Upload `src` to `dst` via a hidden temp object; False if `dst` already existed.

    Hashed while it streams: a local file that no longer matches its manifest is never placed
    (a partial or wrong upload stays under the temp name, which no reader lists)."""
    tmp = f"{dst.rsplit('/', 1)[0]}/{_tmp(src.name)}"
    h = hashlib.sha256()
    with open(src, "rb") as f, fs.open_output_stream(tmp, compression=None) as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != sha256:
        fs.delete_file(tmp)
        raise CacheError(
            f"{src} has sha256 {h.hexdigest()}, its manifest says {sha256}: not published; "
            "re-run with cache.repair=true to recompute it"
        )
    return _place(fs, tmp, dst)


def _write_once(fs: pafs.FileSystem, url: str, src: Path, dst: str, sha256: str) -> str:
    """'uploaded', or 'same' when the store already holds these bytes; raises if it holds
    others, naming the object and both hashes."""
    exists = fs.get_file_info(dst).type == pafs.FileType.File
    if not exists and _upload(fs, src, dst, sha256):
        return "uploaded"
    remote = _remote_sha256(fs, dst)
    if remote != sha256:
        raise CacheError(
            f"cache store {shown(url)}: {dst} already holds sha256 {remote}, this machine's "
            f"{src} has {sha256}; a store object is never overwritten. The same key gave "
            "different bytes: compare the two (a tampered store, or an input the key misses), "
            "then delete the store's copy or set cache.store=null"
        )
    return "same"


def publish(local_dir: Path, url: str) -> dict[str, Any]:
    """Upload the sealed cache in `local_dir` to `<url>/<key>/`: shards first, manifest last.

    Returns {key, uploaded, same, bytes, seconds}. A store whose manifest is byte-equal to ours
    already holds this cache (the manifest goes last): nothing is read or written then."""
    local_dir = Path(local_dir)
    m = Manifest.load(local_dir)
    if not m.complete:
        raise CacheError(f"cache {local_dir} is incomplete; only a sealed cache is published")
    key = _check_name(m.key, "cache key")
    fs, root = _open(url)
    prefix, body = f"{root}/{key}", (local_dir / MANIFEST).read_bytes()
    t0, counts, sent = time.perf_counter(), {"uploaded": 0, "same": 0}, 0
    with _naming(url):
        remote = f"{prefix}/{MANIFEST}"
        if _read_if_there(fs, remote) == body:
            counts["same"] = len(m.shards) + 1
            return {"key": key, **counts, "bytes": 0, "seconds": time.perf_counter() - t0}
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories
            fs.create_dir(prefix)
        for s in m.shards:
            src = local_dir / _check_name(s.file, "shard")
            outcome = _write_once(fs, url, src, f"{prefix}/{s.file}", s.sha256)
            counts[outcome] += 1
            sent += src.stat().st_size if outcome == "uploaded" else 0
        sha = hashlib.sha256(body).hexdigest()
        tmp = local_dir / _tmp(MANIFEST)  # a snapshot: the local manifest may be rewritten
        tmp.write_bytes(body)
        try:
            counts[_write_once(fs, url, tmp, remote, sha)] += 1
        finally:
            tmp.unlink(missing_ok=True)
    return {"key": key, **counts, "bytes": sent, "seconds": time.perf_counter() - t0}


def _parse(body: bytes, local_dir: Path) -> Manifest:
    """A manifest's bytes, parsed by the one reader of the format (with its errors)."""
    tmp = local_dir / _tmp("remote-manifest")
    tmp.mkdir()
    try:
        (tmp / MANIFEST).write_bytes(body)
        return Manifest.load(tmp)
    finally:
        (tmp / MANIFEST).unlink(missing_ok=True)
        tmp.rmdir()


def _remote_manifest(
    fs: pafs.FileSystem, prefix: str, key: str, local_dir: Path
) -> tuple[bytes, Manifest] | None:
    """The store's manifest for `key` (bytes, parsed) if it is complete, else None."""
    path = f"{prefix}/{MANIFEST}"
    if (body := _read_if_there(fs, path)) is None:
        return None
    m = _parse(body, local_dir)
    if m.key != key or cache_key(m.key_inputs) != key:
        raise CacheError(
            f"{path} describes cache {m.key} (inputs hash to {cache_key(m.key_inputs)}), not "
            f"{key}; the store is mixed up: delete {prefix} from it"
        )
    return (body, m) if m.complete else None


def _download(fs: pafs.FileSystem, url: str, src: str, dst: Path, shard: Shard) -> int:
    """Stream `src` to a temp file beside `dst`, check its sha256, rename it into place."""
    tmp = dst.parent / _tmp(dst.name)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(src, compression=None) as f, open(tmp, "wb") as out:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != shard.sha256:
            raise CacheError(
                f"cache store {shown(url)}: shard {src} has sha256 {h.hexdigest()}, its manifest "
                f"says {shard.sha256}; the store's copy is corrupt or was changed: delete "
                f"{src.rsplit('/', 1)[0]} from the store to have it published again, or set "
                "cache.store=null to compute this cache locally"
            )
        os.replace(tmp, dst)
        return dst.stat().st_size
    finally:
        tmp.unlink(missing_ok=True)


def fetch(url: str, key: str, local_dir: Path) -> dict[str, Any] | None:
    """Download the store's complete cache `key` into `local_dir`; None if it has none.

    Shards already in `local_dir` with the manifest's sha256 are kept; the others are fetched
    and checked before they are renamed into place; the store's manifest goes last, byte for
    byte. Returns {key, fetched, kept, bytes, seconds}."""
    key, local_dir = _check_name(key, "cache key"), Path(local_dir)
    fs, root = _open(url)
    prefix, t0 = f"{root}/{key}", time.perf_counter()
    local_dir.mkdir(parents=True, exist_ok=True)
    with _naming(url):
        found = _remote_manifest(fs, prefix, key, local_dir)
        if found is None:
            return None
        body, m = found
        got = kept = 0
        for s in m.shards:
            dst = local_dir / _check_name(s.file, "shard")
            if dst.is_file() and file_sha256(dst) == s.sha256:
                kept += 1
                continue
            got += _download(fs, url, f"{prefix}/{s.file}", dst, s)
    with locked(local_dir):  # against a run of this machine recording a shard meanwhile
        tmp = local_dir / _tmp(MANIFEST)
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local_dir / MANIFEST)
    return {
        "key": key,
        "fetched": len(m.shards) - kept,
        "kept": kept,
        "bytes": got,
        "seconds": time.perf_counter() - t0,
    }
