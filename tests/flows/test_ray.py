"""`runner=ray`: the same flows with shards on Ray workers (an instance of the run's own with 2
CPUs) give the same cache, byte for byte, and the same sweep SAEs as the local runner, and leave
no Ray process behind.
prefect-ray is an optional extra (`.[ray]`); without it `runner=ray` fails at load."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flows.config import ConfigError, load
from tests.conftest import TINY
from tests.flows.test_dask import sweep_groups_match_the_local_runner
from tests.servers import child_env, fresh_home


def _shards(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.glob("shard-*")}


def _ray_processes(tmpdir: str) -> dict[int, str]:
    """pid -> command line of each process started with RAY_TMPDIR=`tmpdir`: the raylet, GCS,
    agents and workers of one Ray instance (workers retitle themselves `ray::…`)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked, or not ours to read
            continue
        if f"RAY_TMPDIR={tmpdir}".encode() in environ:
            found[int(proc.name)] = cmd.strip()
    return found


def test_runner_ray_without_prefect_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # find_spec then reports it missing
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]' in the saeflow checkout"):
        load(["runner=ray"])


def test_runner_ray_starts_a_small_instance_of_its_own() -> None:
    pytest.importorskip("prefect_ray")
    from flows.runner import RAY_OBJECT_STORE_BYTES, task_runner

    own = task_runner(load(["runner=ray", "runner.workers=3"])[0].runner)
    assert own.init_kwargs["address"] == "local"  # never a stale cluster from /tmp/ray
    assert own.init_kwargs["num_cpus"] == 3
    assert own.init_kwargs["object_store_memory"] == RAY_OBJECT_STORE_BYTES
    joined = task_runner(load(["runner=ray", "runner.address=ray://head:10001"])[0].runner)
    assert joined.address == "ray://head:10001" and "num_cpus" not in joined.init_kwargs


@pytest.mark.slow  # ~1 min: a Ray instance and its workers in their own processes
def test_ray_workers_cache_what_the_local_runner_does(
    study, prefect_api: str, tiny_model: dict, tmp_path: Path
) -> None:
    pytest.importorskip("prefect_ray")
    home = fresh_home(tmp_path / "home", Path(tiny_model["path"]))
    # Ray's own temp dir (logs, sockets), short: a unix socket path must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="saeflow-ray-")
    env = child_env(home, prefect_api) | {"RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "flows.cli", "cache", *TINY, "runner=ray", "runner.workers=2"]
    log = tmp_path / "cache.log"
    seen: dict[int, str] = {}  # every Ray process of the run, sampled while it runs
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= _ray_processes(ray_tmp)
                time.sleep(0.5)
            if proc.poll() is None:  # past the deadline
                proc.kill()
        text = log.read_text()
        assert proc.wait() == 0, text[-3000:]
        assert "Creating a local Ray instance" in text, text[-3000:]
        assert any("raylet" in c for c in seen.values()), seen  # ours, not an existing cluster
        for split in ("train_cache", "eval_cache"):
            local = Path(study[split]["dir"])
            on_ray = home / "activations" / local.name  # the same content key
            assert _shards(on_ray) == _shards(local) and _shards(local), split
        # The runner shut down the instance it started: no raylet, GCS, agent or worker remains.
        deadline = time.monotonic() + 15
        while (left := _ray_processes(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow  # ~1 min
def test_ray_workers_train_a_sweeps_groups_as_the_local_runner_does(
    study, prefect_api: str, tiny_model: dict, tmp_path: Path
) -> None:
    pytest.importorskip("prefect_ray")
    ray_tmp = tempfile.mkdtemp(prefix="saeflow-ray-")  # short: see above
    try:
        sweep_groups_match_the_local_runner(
            "ray", study, prefect_api, tiny_model, tmp_path, RAY_TMPDIR=ray_tmp
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
