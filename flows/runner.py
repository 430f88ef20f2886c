"""Where a flow's mapped tasks run: threads here, or Dask workers (DESIGN §1: a lab's cluster)."""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from conf.schema import RunnerConfig


def task_runner(c: RunnerConfig) -> TaskRunner:
    """`runner=local`: Prefect's thread pool. `runner=dask`: prefect-dask's runner on a
    LocalCluster of `runner.workers` single-threaded processes, or the cluster at
    `runner.address`. The flows are the same; only where `.map`/`.submit` tasks run changes."""
    if c.kind == "local":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if c.address:
        return DaskTaskRunner(address=c.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": c.workers,
            "threads_per_worker": 1,  # torch's own threads use the cores
            "processes": True,
            "dashboard_address": ":0",  # a free port: two runs on one box must not collide
        }
    )
