"""`runner=dask`: the same flows with shards and training groups on Dask workers (a
LocalCluster of 2 processes) give the same cache, byte for byte, as the local runner."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.servers import child_env, fresh_home


def _shards(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.glob("shard-*")}


@pytest.mark.slow  # ~2 min: a cluster or a worker in its own processes; `./saeflow test -m slow`
def test_dask_workers_cache_what_the_local_runner_does(
    study, prefect_api: str, tiny_model: dict, tmp_path: Path
) -> None:
    home = fresh_home(tmp_path / "home", Path(tiny_model["path"]))
    env = child_env(home, prefect_api)
    cmd = [sys.executable, "-m", "flows.cli", "cache", *TINY, "runner=dask", "runner.workers=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DaskTaskRunner" in done.stderr or "dask" in done.stderr.lower()
    for split in ("train_cache", "eval_cache"):
        local = Path(study[split]["dir"])
        on_dask = home / "activations" / local.name  # the same content key
        assert _shards(on_dask) == _shards(local) and _shards(local), split
