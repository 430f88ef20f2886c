"""SIGKILL the pipeline at 12 points (sae/failpoint.py), re-run it: it completes, no shard or
checkpoint is corrupt, finished stages are not redone, and the SAE and its metrics equal those
of a run that was never interrupted.

Each point runs `saeflow run` twice in a child process (killed, then again) in its own data
directory holding a copy of the tiny model; the points run two at a time (two cores).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY
from tests.servers import child_env, fresh_home

JOB = [*TINY, "train.checkpoint_every=8", "tracking.experiment=faults"]
POINTS = {  # failpoint (name:n-th time) -> the stage it interrupts
    "cache.tokens": "cache",  # the packed contexts written, not yet renamed
    "cache.shard_write:2": "cache",  # a shard file written, not yet renamed
    "cache.manifest_write:3": "cache",  # the manifest mid-update
    "cache.shard_recorded:2": "cache",  # between shards
    "train.step:20": "train",  # mid-training, after two trainer states
    "checkpoint.write:2": "train",  # a trainer state half written
    "tracking.log_batch:3": "train",  # mid MLflow logging of train/* metrics
    "sae.save": "train",  # the final weights written, not yet renamed
    "evaluate.batch:2": "evaluate",  # mid-evaluation
    "features.write": "features",  # the feature table written, not yet renamed
    "report.write": "report",  # the HTML report written, not yet renamed
    "study.close": "close",  # everything done but the parent run's close
}
AFTER_TRAINING = {"evaluate", "features", "report", "close"}


def run(home: Path, api: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = child_env(home, api)
    if failpoint:
        env["SAEFLOW_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-m", "flows.cli", "run", *JOB]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def outcome(home: Path) -> dict[str, Any]:
    """The finished SAE runs' ids, eval/* metrics and weights hash, and the cache shards."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("faults")
    runs = (
        [] if exp is None else c.search_runs([exp.experiment_id], "tags.`saeflow.stage` = 'train'")
    )
    done = [r for r in runs if r.info.status == "FINISHED"]
    every = [] if exp is None else c.search_runs([exp.experiment_id])
    weights = {r.info.run_id: home / "saes" / r.info.run_id / "sae.safetensors" for r in done}
    return {
        "runs": [(r.info.run_id, r.info.status) for r in runs],
        "running": [r.info.run_id for r in every if r.info.status == "RUNNING"],
        "killed_flow_runs": [  # of the study parents that killed processes left behind
            r.data.tags["prefect.flow_run_id"]
            for r in every
            if r.info.status == "KILLED" and "mlflow.parentRunId" not in r.data.tags
        ],
        "metrics": [
            {k: v for k, v in r.data.metrics.items() if k.startswith("eval/")} for r in done
        ],
        "weights": [
            hashlib.sha256(w.read_bytes()).hexdigest() for w in weights.values() if w.is_file()
        ],
        "weights_mtime": [w.stat().st_mtime_ns for w in weights.values() if w.is_file()],
        "shards": {
            str(p.relative_to(home)): p.stat().st_mtime_ns
            for p in (home / "activations").glob("*/shard-*.parquet")
        },
    }


def kill_and_rerun(root: Path, api: str, model_dir: Path, point: str) -> dict[str, Any]:
    home = fresh_home(root / point.replace(":", "-"), model_dir)
    killed = run(home, api, point)
    between = outcome(home)
    again = run(home, api)
    return {
        "home": home,
        "killed": killed,
        "between": between,
        "again": again,
        "after": outcome(home),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory, prefect_api: str, tiny_model: dict) -> dict[str, Any]:
    """The uninterrupted reference and every point's killed + re-run outcome."""
    root, model_dir = tmp_path_factory.mktemp("faults"), Path(tiny_model["path"])
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(lambda: run(fresh_home(root / "reference", model_dir), prefect_api))
        points = {p: pool.submit(kill_and_rerun, root, prefect_api, model_dir, p) for p in POINTS}
        ref = reference.result()
        assert ref.returncode == 0, ref.stderr[-3000:]
        return {"reference": outcome(root / "reference")} | {
            p: f.result() for p, f in points.items()
        }


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_pipeline_reruns_to_the_uninterrupted_result(
    results: dict, point: str, prefect_api: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sae.activations.cache import Manifest, verify

    r, ref = results[point], results["reference"]
    assert r["killed"].returncode == -9, (point, r["killed"].returncode, r["killed"].stderr[-2000:])
    assert r["again"].returncode == 0, (point, r["again"].stderr[-3000:])
    # no corrupt shard: every cache complete and every shard matching its checksum
    caches = sorted((r["home"] / "activations").glob("*/manifest.json"))
    assert len(caches) == 2
    for m in caches:
        assert Manifest.load(m.parent).complete and verify(m.parent) == [], m.parent
    # the same SAE (bit for bit) and the same metrics as a run never interrupted
    after = r["after"]
    assert len(after["weights"]) == 1 and after["weights"] == ref["weights"], point
    assert after["metrics"] == ref["metrics"], point
    assert [s for _, s in after["runs"]] == ["FINISHED"], after["runs"]  # resumed, not restarted
    # nothing reads RUNNING: the killed process's parent (and SAE run) were marked KILLED
    assert after["running"] == [], after["running"]
    # ... and its Prefect flow run Crashed (a kill while caching comes before the parent opens)
    stage = POINTS[point]
    assert len(after["killed_flow_runs"]) == (stage != "cache"), after["killed_flow_runs"]
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        states = [c.read_flow_run(f).state for f in after["killed_flow_runs"]]
    assert all(s.is_crashed() and "process was killed" in s.message for s in states), states
    # finished stages not redone
    if stage != "cache":
        assert after["shards"] == r["between"]["shards"], "shards were recomputed"
    if stage in AFTER_TRAINING:
        assert after["weights_mtime"] == r["between"]["weights_mtime"], "the SAE was retrained"
        assert after["runs"] == r["between"]["runs"]
