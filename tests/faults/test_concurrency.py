"""Concurrency: eight processes logging to the embedded MLflow store at once lose no metric and
fail on no lock; two pipelines asking for one activation cache at once build it once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY
from tests.servers import ROOT, child_env, fresh_home

LOGGER = """
import sys
from tasks.support import tracking
exp, i = sys.argv[1], int(sys.argv[2])
run = tracking.start_run(exp, f"writer-{i}", tags={"writer": str(i)})
tracking.log_params(run, {f"p{j}": j for j in range(150)})
for chunk in range(10):  # 10 batches of 20 steps x 5 metrics, as the trainer sends them
    steps = range(chunk * 20, chunk * 20 + 20)
    tracking.log_history(run, [(s, {f"train/m{k}": s * 10 + k for k in range(5)}) for s in steps])
    tracking.set_tags(run, {"chunk": str(chunk)})
tracking.log_metrics(run, {"eval/l0": float(i)})
tracking.end_run(run)
"""


def test_eight_runs_log_to_the_embedded_store_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = os.environ | {"SAEFLOW_HOME": str(home), "PYTHONPATH": str(ROOT)}
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    (home / "mlflow").mkdir(parents=True)
    exp = MlflowClient(uri).create_experiment("concurrent")  # once, before fanning out (STACK.md)
    procs = [
        subprocess.Popen([sys.executable, "-c", LOGGER, exp, str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(e[-1500:] for e in errors)
    c = MlflowClient(uri)
    runs = c.search_runs([exp])
    assert sorted(int(r.data.tags["writer"]) for r in runs) == list(range(8))
    for r in runs:
        assert r.info.status == "FINISHED" and len(r.data.params) == 150
        assert r.data.tags["chunk"] == "9" and r.data.metrics["eval/l0"] == float(
            r.data.tags["writer"]
        )
        for k in range(5):
            history = c.get_metric_history(r.info.run_id, f"train/m{k}")
            assert sorted((m.step, m.value) for m in history) == [
                (s, s * 10 + k) for s in range(200)
            ]


def test_two_pipelines_asking_for_one_cache_build_it_once(
    tmp_path: Path, prefect_api: str, tiny_model: dict
) -> None:
    from sae.activations.cache import Manifest, verify

    home = fresh_home(tmp_path / "home", Path(tiny_model["path"]))
    job = [*TINY, "cache.tokens=65536", "cache.shard_tokens=2048", "eval.tokens=8192"]
    env = child_env(home, prefect_api)
    cmd = [sys.executable, "-m", "flows.cli", "cache", *job]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for _, e in logs)
    caches = sorted((home / "activations").iterdir())
    assert len(caches) == 2  # one train and one eval cache, not two of each
    shards = 0
    for d in caches:
        m = Manifest.load(d)
        assert m.complete and verify(d) == [] and len(m.shards) == m.n_shards
        shards += m.n_shards
        assert not list(d.glob(".shard-*.tmp")), "half-written shards left behind"
    # each shard computed by exactly one of the two: progress lines count computed shards
    computed = [len(re.findall(r"cache \w+: shard \d+/\d+", out + err)) for out, err in logs]
    assert sum(computed) == shards, computed


def test_two_identical_trainings_at_once_train_once(
    tmp_path: Path, prefect_api: str, tiny_model: dict
) -> None:
    """Two `saeflow train` of one config at once: the second waits for the first (a lock per
    run key) and reuses its SAE; one FINISHED SAE run (there used to be two)."""
    from mlflow.tracking import MlflowClient

    home = fresh_home(tmp_path / "home", Path(tiny_model["path"]))
    env = child_env(home, prefect_api)
    subprocess.run([sys.executable, "-m", "flows.cli", "cache", *TINY], env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    cmd = [sys.executable, "-m", "flows.cli", "train", *TINY, "train.tokens=1048576"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for _, e in logs)
    statuses = sorted(re.search(r"'status': '(\w+)'", out).group(1) for out, _ in logs)
    assert statuses == ["reused", "trained"], statuses  # not "cached": they overlapped
    assert sum("another process is training SAE" in err for _, err in logs) == 1
    c = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    saes = [r for r in runs if "saeflow.run_key" in r.data.tags]  # not the two flows' parents
    assert [r.info.status for r in saes] == ["FINISHED"]
