"""`runner=dask`: the same flows with shards and training groups on Dask workers (a
LocalCluster of 2 processes) give the same cache, byte for byte, as the local runner."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.servers import ROOT


def _shards(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.glob("shard-*")}


@pytest.mark.slow  # ~2 min: a cluster or a worker in its own processes; `./saeflow test -m slow`
def test_dask_workers_cache_what_the_local_runner_does(
    study, prefect_api: str, tiny_model: dict, tmp_path: Path
) -> None:
    home, model_dir = tmp_path / "home", Path(tiny_model["path"])
    shutil.copytree(model_dir, home / "models" / model_dir.name)
    env = os.environ | {
        "SAEFLOW_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "flows.cli", "cache", *TINY, "runner=dask", "runner.workers=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DaskTaskRunner" in done.stderr or "dask" in done.stderr.lower()
    for split in ("train_cache", "eval_cache"):
        local = Path(study[split]["dir"])
        on_dask = home / "activations" / local.name  # the same content key
        assert _shards(on_dask) == _shards(local) and _shards(local), split
