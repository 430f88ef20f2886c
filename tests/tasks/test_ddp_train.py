"""train.processes > 1 (tasks/support/ddp.py): train_saes launches torchrun (2 gloo ranks here) and
tracks the run as it does one process's, ending with the weights of one process; ranks killed
mid-run fail the run, which then resumes to the weights of a run that never stopped; a killed
task leaves no rank running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY


@pytest.fixture(scope="module")
def cache(tiny_model: dict) -> dict[str, Any]:
    """The TINY train cache, built by the real tasks outside a flow."""
    from flows.config import load
    from tasks.cache import cache_shard, finish_cache, plan_cache

    cfg, _ = load(TINY)
    plan = plan_cache.fn(cfg, tiny_model, "train")
    for index in plan["todo"]:
        cache_shard.fn(cfg, tiny_model, plan, index)
    return finish_cache.fn(plan)


def _train(overrides: list[str], cache: dict[str, Any], experiment: str) -> dict[str, Any]:
    from flows.config import load
    from tasks.support import tracking
    from tasks.train import train_saes

    # fp32: under bf16 autocast (dtype=auto on an AVX-512 BF16 CPU) each rank rounds its
    # half-batch gradients to bf16 and the weights part by ~1e-3 relative
    # (tests/sae/training/test_ddp.py)
    cfg, _ = load([*TINY, "train.threads=1", "train.dtype=fp32", *overrides])
    return train_saes.fn([cfg], cache, tracking.ensure_experiment(experiment))[0]


def _weights(trained: dict[str, Any]) -> dict[str, torch.Tensor]:
    return load_file(str(Path(trained["checkpoint"]) / "sae.safetensors"))


@pytest.fixture(scope="module")
def one_and_two(cache: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    one = _train(["train.processes=1"], cache, "ddp")
    two = _train(["train.processes=2"], cache, "ddp")
    return one, two


def test_two_ranks_train_the_run_of_one_process(one_and_two, saeflow_home: Path) -> None:
    from tasks.support import tracking

    one, two = one_and_two
    assert one["status"] == two["status"] == "trained" and one["run_id"] != two["run_id"]
    c = tracking.client()
    run = c.get_run(two["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.processes"] == "2"
    for name in ("train/loss", "train/l0", "train/lr"):
        steps = [[m.step for m in c.get_metric_history(t["run_id"], name)] for t in one_and_two]
        assert steps[1] == steps[0] and steps[0][-1] == 64, name  # 32768 tokens / 512
    tokens = [c.get_metric_history(t["run_id"], "train/tokens")[-1].value for t in one_and_two]
    assert tokens == [32768, 32768]  # counted over the ranks, not rank 0's slice
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:  # the same global batches: equal up to float summation order, which Adam
        # amplifies where a gradient is noise-sized (lr-sized steps of either sign): measured
        # ‖b − a‖/‖a‖ ≤ 6.1e-5 (W_enc, 2-core AMD EPYC), while 29 of W_enc's 2,048 entries fall
        # outside an elementwise rtol 1e-4
        assert (b[k] - a[k]).norm() <= 2e-4 * a[k].norm() + 1e-6, k
    left = list((saeflow_home / "saes" / two["run_id"]).iterdir())
    assert sorted(p.name for p in left) == [".lock", "cfg.json", "sae.safetensors"]


@pytest.mark.slow  # ~30 s: two more torchrun launches, mostly imports
def test_killed_ranks_fail_the_run_which_resumes(
    one_and_two, cache: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.support import tracking

    job = ["train.processes=2", "train.checkpoint_every=8"]
    monkeypatch.setenv("SAEFLOW_FAILPOINT", "train.step:20")  # SIGKILL both ranks at step 20
    with pytest.raises(RuntimeError, match=r"torchrun \(2 data-parallel ranks\) exited with code"):
        _train(job, cache, "ddp-resume")
    (failed,) = tracking.client().search_runs([tracking.ensure_experiment("ddp-resume")])
    assert failed.info.status == "FAILED" and "exited with code" in failed.data.tags["error"]

    monkeypatch.delenv("SAEFLOW_FAILPOINT")
    resumed = _train(job, cache, "ddp-resume")
    assert resumed["status"] == "resumed" and resumed["run_id"] == failed.info.run_id
    run = tracking.client().get_run(resumed["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["saeflow.resumed_from_step"] == "16"
    a, b = _weights(one_and_two[1]), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed SAE differs from an unbroken run"


CHILD = """
import json, sys
from flows.config import load
from tasks.support import tracking
from tasks.train import train_saes
from tests.conftest import TINY
cfg, _ = load([*TINY, *json.loads(sys.argv[2])])
train_saes.fn([cfg], json.loads(sys.argv[1]), tracking.ensure_experiment("ddp-kill"))
"""


def _ranks(home: Path) -> list[str]:
    """Command lines of the live torchrun processes and ranks that train under `home`."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = path.read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        if "tasks.support.ddp" in cmd and str(home) in cmd:
            found.append(cmd)
    return found


@pytest.mark.slow  # ~30 s: a task in a child process trains until its first trainer state
def test_killed_task_leaves_no_rank_running(cache: dict[str, Any], saeflow_home: Path) -> None:
    job = ["train.processes=2", "train.threads=1", "train.tokens=3276800",
           "train.checkpoint_every=20"]  # fmt: skip
    before = set(saeflow_home.glob("saes/*/state/step-*.json"))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-c", CHILD, json.dumps(cache), json.dumps(job)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if set(saeflow_home.glob("saes/*/state/step-*.json")) - before:
            break
        time.sleep(0.1)
    assert _ranks(saeflow_home), child.stderr.read().decode()[-3000:] if child.stderr else ""
    os.kill(child.pid, signal.SIGKILL)  # no handler runs: the ranks must notice by themselves
    assert child.wait(30) == -signal.SIGKILL
    deadline = time.monotonic() + 15  # torchrun polls its ranks every few seconds
    while _ranks(saeflow_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ranks(saeflow_home)


def test_processes_must_divide_the_batch() -> None:
    from flows.config import ConfigError, load

    with pytest.raises(ConfigError, match=r"train\.processes=3 must divide train\.batch_size=512"):
        load([*TINY, "train.processes=3"])
