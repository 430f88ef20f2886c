"""A cache store shared by two machines: a real S3 server (moto) on 127.0.0.1, and file://.

Machine A and machine B are two data directories (SAEFLOW_HOME) with the same store: A computes
and publishes, B fetches instead of computing; the store is write-once and checked by sha256.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from sae.activations.cache import CacheError, Manifest
from tests.conftest import TINY
from tests.servers import fresh_home


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 with bucket `caches`; yields the endpoint `host:port`."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookups off this host
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        ).create_dir("caches")
        try:
            yield endpoint
        finally:
            server.stop()


def _url(endpoint: str, prefix: str) -> str:
    return f"s3://caches/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _store_fs(url: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(url)
    return fs, root.rstrip("/")


def _machine(root: Path, tiny_model: dict) -> Path:
    """A second data directory holding only the built model: another machine."""
    return fresh_home(root, Path(tiny_model["path"]))


def _cache(home: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """The train cache of TINY on machine `home` with `store`, as the pipeline runs it:
    (plan, finished)."""
    from flows.config import load
    from tasks.cache import cache_shard, finish_cache, plan_cache
    from tasks.model import prepare_model

    monkeypatch.setenv("SAEFLOW_HOME", str(home))
    cfg, _ = load([*TINY, f"cache.store='{store}'"])
    model = prepare_model.fn(cfg)
    plan = plan_cache.fn(cfg, model, "train")
    for i in plan["todo"]:
        cache_shard.fn(cfg, model, plan, i)
    return plan, finish_cache.fn(plan)


def _files(dir: Path) -> dict[str, bytes]:
    """The §4 files of a cache: manifest and shards, by name."""
    return {
        p.name: p.read_bytes() for p in sorted(dir.glob("*")) if p.suffix in (".json", ".parquet")
    }


def _remote(url: str, key: str) -> dict[str, bytes]:
    fs, root = _store_fs(url)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{key}"))
    out = {}
    for info in infos:
        if not info.base_name.startswith("."):
            with fs.open_input_stream(info.path, compression=None) as f:
                out[info.base_name] = f.read()
    return out


@pytest.fixture(scope="module")
def machine_a(
    s3: str, tiny_model: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Machine A computed TINY's train cache and published it to the S3 store."""
    url = _url(s3, "study")
    with pytest.MonkeyPatch.context() as mp:
        home = _machine(tmp_path_factory.mktemp("machine_a"), tiny_model)
        plan, done = _cache(home, url, mp)
        yield {"url": url, "home": home, "plan": plan, "done": done, "dir": Path(done["dir"])}


def test_a_publishes_its_cache_byte_for_byte(machine_a: dict) -> None:
    assert machine_a["plan"]["todo"] and not machine_a["plan"]["reused"]  # A computed it
    local = _files(machine_a["dir"])
    assert len(local) == 5  # manifest + 4 shards
    assert _remote(machine_a["url"], machine_a["done"]["key"]) == local


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_b_fetches_instead_of_computing(
    kind: str,
    machine_a: dict,
    tiny_model: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kind == "s3":
        url = machine_a["url"]
    else:  # A's cache was made before this store was set: finishing it again publishes it
        (tmp_path / "shared").mkdir()
        url = (tmp_path / "shared").as_uri()
        _, again = _cache(machine_a["home"], url, monkeypatch)
        assert again["reused"]
    key = machine_a["done"]["key"]
    plan, done = _cache(_machine(tmp_path / "b", tiny_model), url, monkeypatch)
    assert plan["todo"] == [] and plan["fetched"]["fetched"] == 4  # no shard computed on B
    assert done["key"] == key and done["n_tokens"] == machine_a["done"]["n_tokens"]
    assert _files(Path(done["dir"])) == _files(machine_a["dir"]) == _remote(url, key)


def test_tampered_store_shard_is_refused(
    s3: str, machine_a: dict, tiny_model: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.support.store import publish

    url = _url(s3, "tampered")
    key = publish(machine_a["dir"], url)["key"]
    fs, root = _store_fs(url)
    shard = f"{root}/{key}/shard-00002.parquet"
    with fs.open_input_stream(shard, compression=None) as f:
        body = bytearray(f.read())
    body[len(body) // 2] ^= 0xFF
    with fs.open_output_stream(shard, compression=None) as f:
        f.write(bytes(body))
    home = _machine(tmp_path / "b", tiny_model)
    with pytest.raises(CacheError, match=r"shard-00002\.parquet has sha256 [0-9a-f]{64}"):
        _cache(home, url, monkeypatch)
    local = Path(home / "activations" / key)
    assert not (local / "manifest.json").exists()  # no cache on B: nothing half-trusted
    assert not (local / "shard-00002.parquet").exists()


def test_publish_never_overwrites(machine_a: dict, tmp_path: Path) -> None:
    from tasks.support.store import publish

    url, key = machine_a["url"], machine_a["done"]["key"]
    before = _remote(url, key)
    other = tmp_path / key  # the same cache, but shard 1 came out differently
    shutil.copytree(machine_a["dir"], other)
    path = other / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    m = Manifest.load(other)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    m.shards = [replace(s, sha256=sha) if s.file == path.name else s for s in m.shards]
    m.save(other)
    theirs = hashlib.sha256(before["shard-00001.parquet"]).hexdigest()
    with pytest.raises(
        CacheError, match=rf"shard-00001\.parquet already holds sha256 {theirs}.*{sha}"
    ):
        publish(other, url)
    assert _remote(url, key) == before


def test_an_interrupted_publish_holds_no_cache_and_resumes(
    s3: str, machine_a: dict, tmp_path: Path
) -> None:
    from tasks.support.store import fetch, publish

    url = _url(s3, "interrupted")
    key = publish(machine_a["dir"], url)["key"]
    fs, root = _store_fs(url)
    fs.delete_file(f"{root}/{key}/manifest.json")  # as if A died before its last upload
    assert fetch(url, key, tmp_path / key) is None
    again = publish(machine_a["dir"], url)  # the shards there are checked, not re-sent
    assert (again["uploaded"], again["same"]) == (1, 4)
    assert fetch(url, key, tmp_path / key)["fetched"] == 4


def test_store_errors_name_the_url(s3: str, machine_a: dict, tmp_path: Path) -> None:
    from flows.config import ConfigError, load
    from tasks.support.store import fetch, publish, shown

    with pytest.raises(ConfigError, match=r"cache\.store='/mnt/x' is not a store URL"):
        load([*TINY, "cache.store=/mnt/x"])
    assert "abc" not in shown("s3://b/p?access_key=me&secret_key=abc&scheme=http")
    missing = f"s3://nobucket/p?endpoint_override={s3}&scheme=http&region=us-east-1"
    with pytest.raises(FileNotFoundError, match=r"s3://nobucket/p.*bucket 'nobucket' does not"):
        publish(machine_a["dir"], missing)
    gone = (tmp_path / "not-mounted").as_uri()
    with pytest.raises(FileNotFoundError, match="not-mounted"):
        fetch(gone, machine_a["done"]["key"], tmp_path / "local")


def test_key_holds_the_cpu_kernels(tiny_model: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured (4-layer width-768 GPT-2, fp32): ATEN_CPU_CAPABILITY=default instead of AVX2
    changed 0.13% of the stored bf16 values, in 63% of rows. Such machines get different keys."""
    import torch

    from flows.config import load
    from sae.activations.cache import cache_key
    from tasks.cache import key_inputs

    c, _ = load(TINY)
    here = cache_key(key_inputs(c, tiny_model, "train"))
    other = "DEFAULT" if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert cache_key(key_inputs(c, tiny_model, "train")) != here
