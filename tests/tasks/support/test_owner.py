"""Runs left RUNNING by a killed process: owner tags tell a gone process from a live one (a
reused pid included), and the next study on the machine marks exactly those runs KILLED."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.support.owner import is_gone, this_process
from tests.conftest import TINY
from tests.servers import ROOT

# A child saeflow process that starts an MLflow run in the experiment named by argv[1] and
# dies without ending it (os._exit: no handler, no atexit), like a SIGKILLed `saeflow run`.
CHILD = """
import os, sys
from tasks.support import tracking
run = tracking.start_run(tracking.ensure_experiment(sys.argv[1]), "doomed")
print(run, flush=True)
os._exit(0)
"""


def _child(*args: str) -> str:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def test_owner_tags_tell_gone_processes_from_live_ones() -> None:
    mine = this_process()
    assert not is_gone(mine)
    dead = _child("from tasks.support.owner import this_process; print(this_process())")
    assert dead.rsplit("/", 2)[1] != str(os.getpid()) and is_gone(dead)
    machine, boot, pid, start = mine.rsplit("/", 3)
    assert is_gone(f"{machine}/{boot}/{pid}/{int(start) + 1}")  # our pid, reused by another
    assert is_gone(f"{machine}/another-boot/{pid}/{start}")  # this machine rebooted since
    assert not is_gone(f"elsewhere+0/{boot}/{pid}/1")  # another machine: never judged
    assert not is_gone("not an owner tag")


def test_the_next_study_marks_only_runs_of_gone_processes_killed(saeflow_home: Path) -> None:
    from flows.config import load
    from tasks.study import open_study
    from tasks.support import tracking

    cfg, _ = load([*TINY, "tracking.experiment=orphans"])
    orphan = _child(CHILD, "orphans")
    exp = tracking.ensure_experiment("orphans")
    alive = tracking.start_run(exp, "alive")  # owned by this process: still running
    remote = tracking.start_run(exp, "remote")
    tracking.set_tags(remote, {tracking.OWNER: "gpu-node-7+abc/boot/12/34"})
    c = tracking.client()
    assert {c.get_run(r).info.status for r in (orphan, alive, remote)} == {"RUNNING"}

    study = open_study.fn(cfg)
    killed = c.get_run(orphan)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert study["parent_run_id"] in killed.data.tags["saeflow.orphaned"]
    for r in (alive, remote, study["parent_run_id"]):
        assert c.get_run(r).info.status == "RUNNING", r
    tracking.reopen_run(orphan)  # resumed by this process: no longer an orphan
    assert open_study.fn(cfg) and c.get_run(orphan).info.status == "RUNNING"


def test_crash_flow_runs_marks_only_running_ones(prefect_server: str) -> None:
    from uuid import uuid4

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from tasks.study import crash_flow_runs

    @flow
    def killed() -> None: ...

    with get_client(sync_client=True) as c:
        running = str(c.create_flow_run(killed, state=Running()).id)
        done = str(c.create_flow_run(killed, state=Completed()).id)
    unknown = str(uuid4())  # a temporary server's flow run: gone with it
    assert crash_flow_runs([running, done, unknown], "its process was killed") == [running]
    with get_client(sync_client=True) as c:
        assert c.read_flow_run(running).state.is_crashed()
        assert c.read_flow_run(done).state.is_completed()
