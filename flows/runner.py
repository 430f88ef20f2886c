"""Where a flow's mapped tasks run: threads here, or Dask or Ray workers (DESIGN §1: a lab's
cluster)."""

from __future__ import annotations

import os

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from conf.schema import RunnerConfig

RAY_OBJECT_STORE_BYTES = 512 * 1024**2
"""A Ray instance of our own: its shared-memory object store. Ray's default is 30% of RAM,
reserved in /dev/shm; our tasks pass paths and small dicts (never tensors), so the store holds
next to nothing and the RAM belongs to torch in the workers."""


RUNNER_CLASSES = {"local": "ThreadPoolTaskRunner", "dask": "DaskTaskRunner", "ray": "RayTaskRunner"}
"""runner.kind -> the class name of its Prefect task runner."""


def runs_on(c: RunnerConfig) -> bool:
    """Whether the flow run in progress maps its tasks on `c`'s kind of runner (True outside a
    flow run). A served or deployed flow runs on the runner its server was started with; a
    `runner=` override in its form asks for another, which `flows.pipeline` honours by running
    the flow again as a subflow on it."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is None or type(ctx.task_runner).__name__ == RUNNER_CLASSES[c.kind]


def task_runner(c: RunnerConfig) -> TaskRunner:
    """`runner=local`: Prefect's thread pool. `runner=dask`: prefect-dask's runner on a
    LocalCluster of `runner.workers` single-threaded processes, or the cluster at
    `runner.address`. `runner=ray`: prefect-ray's runner on a Ray instance of its own with
    `runner.workers` CPUs, or the cluster at `runner.address`. The flows are the same; only
    where `.map`/`.submit` tasks run changes."""
    if c.kind == "local":
        return ThreadPoolTaskRunner()
    if c.kind == "ray":
        return _ray(c)
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


def _ray(c: RunnerConfig) -> TaskRunner:
    """prefect-ray calls `ray.init` on entering the flow run and `ray.shutdown` on leaving it
    when it started Ray, which stops the raylet, GCS and workers of an instance of our own."""
    from prefect_ray import RayTaskRunner

    if c.address == "auto":
        # prefect-ray drops `auto` (a bare ray.init(), which starts a new instance when none is
        # found); passed through, Ray joins this machine's cluster or fails saying so.
        return RayTaskRunner(address="auto", init_kwargs={"address": "auto"})
    if c.address:
        return RayTaskRunner(address=c.address)
    # A bare ray.init() would join a cluster named by RAY_ADDRESS or left in /tmp/ray by an
    # earlier `ray start`; `local` always starts our own, which we then shut down.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to ray.io unless asked
    return RayTaskRunner(
        init_kwargs={
            "address": "local",
            "num_cpus": c.workers,  # one CPU per task: at most `workers` tasks at once
            "include_dashboard": False,  # a web server (and its port) nobody asked for
            "object_store_memory": RAY_OBJECT_STORE_BYTES,
        }
    )
