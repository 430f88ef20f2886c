"""Data-parallel training of one group of SAEs under torchrun (train.processes > 1).

The task's process keeps the MLflow runs, their locks and the final save (tasks/train.py);
`fit` writes the group's spec (the configs as their `asdict`) into a temporary directory beside the
first SAE and runs

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tasks.support.ddp SPEC

whose ranks (`main`) each build the same SAEs and loader (`tasks.support.fitting.fit_group`), read
every global batch and train on rows[rank::N] with the gradients averaged (sae/training/fit.py).
Rank 0 alone logs train/* to MLflow and writes the trainer states into the runs' state directories
(so a killed group resumes as one process's would), then writes the trained SAEs for `fit` to
return.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from conf.schema import Config, TrainConfig, from_dict
from sae.hardware import resolve_device
from sae.models.base import SAE
from sae.models.registry import load_sae
from tasks.support.fitting import fit_group, load_states, step_loggers
from tasks.support.home import sae_dir
from tasks.support.log import logger

SPEC = "spec.json"
TAIL_CHARS = 4000
"""How much of the ranks' last output a failure's RuntimeError quotes."""
STOP_S = 30
"""Seconds torchrun gets to stop its ranks after SIGTERM, before SIGKILL."""


def fit(
    cfgs: list[Config],
    run_ids: list[str],
    cache: dict[str, Any],
    d_in: int,
    step: int | None,
) -> list[SAE]:
    """Train the group on train.processes ranks, resumed from trainer states of `step` (None:
    afresh); the trained SAEs (CPU, fp32, eval), as `fit_group` returns them in one process."""
    t = cfgs[0].train
    cuda = _uses_cuda(t)
    if cuda and t.processes > torch.cuda.device_count():
        raise ValueError(
            f"train.processes={t.processes} ranks need one GPU each; this machine has "
            f"{torch.cuda.device_count()}"
        )
    first = sae_dir(run_ids[0])
    for old in first.glob(".ddp-*"):  # a killed task's; the caller holds the run's lock
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".ddp-", dir=first))
    try:
        outs = [work / f"sae-{i}" for i in range(len(run_ids))]
        spec = {"cfgs": [asdict(c) for c in cfgs], "run_ids": run_ids, "cache": cache,
                "d_in": d_in, "step": step, "out": [str(o) for o in outs],
                "watch_stdin": True}  # fmt: skip
        (work / SPEC).write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={t.processes}", "-m", "tasks.support.ddp",
               str(work / SPEC)]  # fmt: skip
        _run(cmd, _env(t, cuda), t.processes)
        return [load_sae(o) for o in outs]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _uses_cuda(t: TrainConfig) -> bool:
    return resolve_device(t.device).type == "cuda"


def _env(t: TrainConfig, cuda: bool) -> dict[str, str]:
    """The ranks' environment: saeflow importable; OMP threads train.threads, else 1 on CPU
    (the ranks share the cores; torch's default would give each of them all)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if t.threads:
        env["OMP_NUM_THREADS"] = str(t.threads)
    elif not cuda:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], env: dict[str, str], ranks: int) -> None:
    """Run torchrun with its output in the task's log; RuntimeError with the ranks' last output
    if it fails. On any exception here (KeyboardInterrupt too) torchrun and its ranks end."""
    log = logger()
    tail: deque[str] = deque(maxlen=200)
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd, env=env, stdin=pipe, stdout=pipe, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        for line in proc.stdout or ():
            tail.append(line.rstrip("\n"))
            log.info(f"ddp: {tail[-1]}")
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        if proc.stdin:
            proc.stdin.close()
    if code != 0:
        raise RuntimeError(
            f"torchrun ({ranks} data-parallel ranks) exited with code {code}; "
            f"the ranks' last output:\n" + "\n".join(tail)[-TAIL_CHARS:]
        )


def _stop(proc: subprocess.Popen) -> None:
    """End torchrun and its ranks. The ranks run in sessions of their own, out of reach of a
    group kill: closing their stdin ends them (`_exit_with_parent`); torchrun's own group gets
    SIGTERM (it then stops its ranks), and SIGKILL after STOP_S."""
    if proc.stdin:
        proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _exit_with_parent() -> None:
    """Exit this rank once stdin, a pipe from the task's process, reads EOF: when that process
    is gone, even by SIGKILL, which runs no cleanup. (os.read, not sys.stdin: a daemon thread
    blocked inside a Python file object can abort the interpreter's shutdown.)"""

    def watch() -> None:
        while os.read(0, 4096):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="saeflow-parent-watch", daemon=True).start()


@record  # torchrun's failure summary then shows the exception of the rank that failed
def main(spec_path: Path) -> None:
    """One rank: train the spec's group on this rank's slice of every batch."""
    spec = json.loads(spec_path.read_text())
    if spec.get("watch_stdin"):
        _exit_with_parent()
    typed = [from_dict(cfg) for cfg in spec["cfgs"]]  # the one conversion back
    run_ids, step = spec["run_ids"], spec["step"]
    cuda = _uses_cuda(typed[0].train)
    if cuda:  # one GPU per rank, before NCCL binds to one
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        rank = torch.distributed.get_rank()
        if rank == 0:  # its progress lines reach the task's log through our stdout
            logging.getLogger("saeflow").addHandler(logging.StreamHandler(sys.stdout))
            logging.getLogger("saeflow").setLevel(logging.INFO)
        on_steps = step_loggers(typed, run_ids, bar=False) if rank == 0 else [None] * len(typed)
        resume = load_states(run_ids, step) if step is not None else None
        try:
            saes = fit_group(
                typed, run_ids, Path(spec["cache"]["dir"]), spec["d_in"], resume, on_steps
            )
        finally:
            for log in on_steps:
                if log is not None:
                    log.flush()
        if rank == 0:
            for sae, out in zip(saes, spec["out"], strict=True):
                sae.save(Path(out))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
