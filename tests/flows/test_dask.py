"""`runner=dask`: the same flows with shards and training groups on Dask workers (a
LocalCluster of 2 processes) give the same cache, byte for byte, and the same SAEs as the local
runner."""

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


@pytest.mark.slow  # ~2 min, as above
def test_dask_workers_train_a_sweeps_groups_as_the_local_runner_does(
    study, prefect_api: str, tiny_model: dict, tmp_path: Path
) -> None:
    sweep_groups_match_the_local_runner("dask", study, prefect_api, tiny_model, tmp_path)


def sweep_groups_match_the_local_runner(
    runner: str, study: dict, prefect_api: str, tiny_model: dict, tmp_path: Path, **env: str
) -> None:
    """A sweep of two stream groups on `runner`'s 2 workers: two training tasks, nested runs
    evaluated, and the SAE the study also trained equal to the local runner's."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    home = fresh_home(tmp_path / "home", Path(tiny_model["path"]))
    # two token counts: two stream groups, each a task submitted to a worker of its own
    cmd = [sys.executable, "-m", "flows.cli", "run", "-m", *TINY, "train.tokens=16384,32768",
           f"runner={runner}", "runner.workers=2"]  # fmt: skip
    done = subprocess.run(cmd, env=child_env(home, prefect_api) | env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if "saeflow.run_key" in r.data.tags
    ]
    assert sorted(r.data.params["train.tokens"] for r in runs) == ["16384", "32768"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["saeflow.group"] for r in runs}) == 2  # two training tasks
    assert all("eval/fvu" in r.data.metrics for r in runs)
    same = next(r for r in runs if r.data.params["train.tokens"] == "32768")  # = the study's job
    ours = load_file(str(home / "saes" / same.info.run_id / "sae.safetensors"))
    local = load_file(str(Path(study["trained"]["checkpoint"]) / "sae.safetensors"))
    for k in local:
        torch.testing.assert_close(ours[k], local[k], rtol=1e-5, atol=1e-6, msg=k)
