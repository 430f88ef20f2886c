"""MLflow, and only here (STYLE.md): the store, runs, params, metrics, artifacts, run tables.

Everything goes through `MlflowClient` with explicit run ids rather than the fluent active-run
stack, so tasks in different threads or processes can log to the same runs safely.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sae.failpoint import failpoint
from tasks.support import owner
from tasks.support.home import home

_BATCH = 900  # MLflow accepts at most 1000 metrics / 100 params per log_batch call
OWNER = "saeflow.owner"  # the process that runs a RUNNING run (tasks/support/owner.py)


def tracking_uri(uri: str | None = None) -> str:
    """The configured URI, else the embedded SQLite store under the data directory (created,
    once, under a file lock: see `_create_store`)."""
    if uri:
        return uri
    root = home() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    local = f"sqlite:///{root / 'mlflow.db'}"
    if local not in _CREATED:
        _create_store(local, root / ".create.lock")
    return local


_CREATED: set[str] = set()


def _create_store(uri: str, lock: Path) -> None:
    """Create (or open) the embedded store holding an exclusive file lock: two saeflow
    processes starting at once on a fresh data directory both ran MLflow's schema migrations
    and one failed ("table _alembic_tmp_tags already exists", measured)."""
    import fcntl

    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        relocate(lock.parent / "mlflow.db", lock.parent / "artifacts")
    _CREATED.add(uri)


_SAEFLOW_ARTIFACTS = re.compile(r"^(file://.*/mlflow/artifacts)(/.*)?$")


def relocate(db: Path, artifacts: Path) -> int:
    """Point the embedded store's artifact locations at `artifacts`, the data directory's own.

    MLflow stores absolute locations (an experiment's, each run's, each logged model's), so a
    moved or copied $SAEFLOW_HOME went on writing checkpoints and reports into the old one
    (measured: after `mv home home2` a run in home2 wrote under home/mlflow/artifacts). Every
    location of the form `file://<elsewhere>/mlflow/artifacts/...` is re-derived from the
    current directory, as is MLflow's Default experiment (created at ./mlruns/0 relative to the
    working directory). Runs under the lock of `_create_store`; returns the rows changed."""
    import sqlite3

    new = artifacts.as_uri()
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        old = {
            m.group(1)
            for (loc,) in con.execute("SELECT artifact_location FROM experiments")
            if loc and (m := _SAEFLOW_ARTIFACTS.match(loc)) and m.group(1) != new
        }
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master")}
        for prefix in old:
            for table, column in (
                ("experiments", "artifact_location"),
                ("runs", "artifact_uri"),
                ("logged_models", "artifact_location"),  # MLflow ≥ 3
            ):
                if table not in tables:
                    continue
                changed += con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ? "
                    f"AND (length({column}) = ? OR substr({column}, ? , 1) = '/')",
                    (new, len(prefix) + 1, len(prefix), prefix, len(prefix), len(prefix) + 1),
                ).rowcount
        changed += con.execute(
            "UPDATE experiments SET artifact_location = ? "
            "WHERE experiment_id = 0 AND substr(artifact_location, 1, ?) != ?",
            (f"{new}/0", len(new), new),
        ).rowcount
    return changed


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(uri))


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Experiment id for `name`, created once (with artifacts under the data directory)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if uri else (home() / "mlflow" / "artifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """The saeflow checkout's commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(
    experiment_id: str,
    run_name: str,
    *,
    uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a run (nested under `parent_run_id` when given) and return its id."""
    commit = git_commit()
    all_tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": "saeflow",
        "mlflow.source.type": "JOB",
        "mlflow.user": _user(),
        OWNER: owner.this_process(),
        **(tags or {}),
    }
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID") or _prefect_flow_run_id()
    if flow_run:
        all_tags["prefect.flow_run_id"] = flow_run
        if ui := prefect_ui_url():
            all_tags["prefect.flow_run_url"] = f"{ui}/runs/flow-run/{flow_run}"
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client(uri).create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def task_run_id() -> str | None:
    """The id of the Prefect task run we are in, if any."""
    try:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        return str(ctx.task_run.id) if ctx else None
    except Exception:  # Prefect's internals moved: lineage is a nicety
        return None


def prefect_ui_url() -> str | None:
    """The Prefect UI's address when a persistent server is configured (PREFECT_API_URL); a
    temporary server's runs have no page to link to."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if not PREFECT_API_URL.value():
        return None
    return (PREFECT_UI_URL.value() or "").rstrip("/") or None


def mlflow_ui_url(uri: str | None, ui_url: str | None, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows a run (tracking.ui_url, else an http(s) tracking URI, else the
    README's `mlflow ui` on 127.0.0.1:5000)."""
    base = ui_url or (uri if uri and uri.startswith(("http://", "https://")) else None)
    base = (base or "http://127.0.0.1:5000").rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.context import get_run_context

        ctx = get_run_context()
        run = getattr(ctx, "flow_run", None) or getattr(ctx, "task_run", None)
        return str(getattr(run, "flow_run_id", None) or getattr(run, "id", "")) or None
    except Exception:  # outside a flow or task: no lineage to record
        return None


def log_params(run_id: str, params: dict[str, Any], uri: str | None = None) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int = 0, uri: str | None = None
) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), _BATCH):
        client(uri).log_batch(run_id, metrics=items[i : i + _BATCH])


def log_history(
    run_id: str, history: list[tuple[int, dict[str, float]]], uri: str | None = None
) -> None:
    """Many steps' metrics in few calls: [(step, {key: value}), ...]."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for step, ms in history for k, v in ms.items()]
    for i in range(0, len(items), _BATCH):
        failpoint("tracking.log_batch")
        client(uri).log_batch(run_id, metrics=items[i : i + _BATCH])


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(
    run_id: str, path: Path, artifact_path: str | None = None, uri: str | None = None
) -> None:
    c = client(uri)
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


SYSTEM_EVERY_S = 10.0
"""Seconds between two samples of system metrics (CPU, memory, GPU) during training."""


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str | None = None) -> Iterator[None]:
    """MLflow's system metrics (`system/cpu_utilization_percentage`, `system/system_memory_*`,
    `system/gpu_*` where a GPU is seen) on `run_id` while the block runs, every SYSTEM_EVERY_S
    seconds from a background thread; never fails the block."""
    monitor = None
    with contextlib.suppress(Exception):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_EVERY_S, tracking_uri=tracking_uri(uri)
        )
        monitor.start()
    try:
        yield
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()


def log_figures(run_id: str, figures: dict[str, Any], folder: str, uri: str | None = None) -> None:
    """Matplotlib figures as `folder/<name>`, shown on the run page (MLflow's `log_figure`)."""
    for name, fig in figures.items():
        client(uri).log_figure(run_id, fig, f"{folder}/{name}")


def log_dataset(
    run_id: str, name: str, digest: str, source: str, context: str, uri: str | None = None
) -> None:
    """An input dataset of the run (MLflow's Datasets panel): an activation cache, its content
    key as digest, its manifest as source; `context` is training or evaluation."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "resolving a local path without a scheme"
        warnings.simplefilter("ignore")
        dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest[:36])
    tags = [InputTag("mlflow.data.context", context)]
    client(uri).log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])


def log_config(run_id: str, config: dict[str, Any], uri: str | None = None) -> None:
    """The resolved config as `config/config.yaml` (what `saeflow run` with it would redo)."""
    from omegaconf import OmegaConf

    client(uri).log_text(run_id, OmegaConf.to_yaml(config), "config/config.yaml")


def log_table(
    run_id: str, table: dict[str, list[Any]], artifact_file: str, uri: str | None = None
) -> None:
    """A table artifact the MLflow UI shows as a table (columns as lists of equal length)."""
    client(uri).log_table(run_id, table, artifact_file)


def reopen_run(run_id: str, uri: str | None = None) -> None:
    """Mark a killed or failed run RUNNING again (it is being resumed), owned by this process:
    the owner first, so that no other study sees it RUNNING under its dead first owner."""
    set_tags(run_id, {OWNER: owner.this_process()}, uri)
    client(uri).update_run(run_id, status="RUNNING")


def close_orphans(experiment_id: str, by: str, uri: str | None = None) -> dict[str, dict]:
    """End KILLED every RUNNING run of the experiment whose owning process is gone (killed
    outright, so nothing ended its run; `tasks/support/owner.py`), tagging it `saeflow.orphaned`
    with who found it (`by`). Returns {run_id: its tags}. A resumable training run stays resumable:
    resume takes any status but FINISHED."""
    c = client(uri)
    found = c.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50_000)
    closed = {}
    for run in found:
        tag = run.data.tags.get(OWNER)
        if tag and owner.is_gone(tag):
            note = f"its process ({tag}) ended without ending it; found by {by}"
            set_tags(run.info.run_id, {"saeflow.orphaned": note}, uri)
            end_run(run.info.run_id, "KILLED", uri)
            closed[run.info.run_id] = run.data.tags
    return closed


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status)


def _column(name: str) -> str:
    """MLflow key -> SQL column: `eval/loss_recovered` -> `eval_loss_recovered` (DESIGN §10)."""
    return re.sub(r"[/.\-]", "_", name)


PAGE = 1000
"""Runs (and experiments) per MLflow search call; every page is read."""


def all_experiments(c: MlflowClient) -> list[Any]:
    """Every experiment, page by page (one search returns at most PAGE)."""
    out, token = [], None
    while True:
        page = c.search_experiments(max_results=PAGE, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def all_runs(c: MlflowClient, experiment_ids: list[str]) -> list[Any]:
    """Every run of these experiments, page by page (one search returns at most PAGE)."""
    out, token = [], None
    while experiment_ids:
        page = c.search_runs(experiment_ids, max_results=PAGE, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            break
    return out


def runs_table(uri: str | None = None) -> pa.Table:
    """One row per run: run_id, run_name, experiment, status, parent_run_id, start_time, tags
    used for lineage, then a column per param (numeric where every value parses) and per final
    metric."""
    c = client(uri)
    exps = {e.experiment_id: e.name for e in all_experiments(c)}
    rows: list[dict[str, Any]] = []
    for run in all_runs(c, list(exps)):
        info, data = run.info, run.data
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "run_name": data.tags.get("mlflow.runName") or info.run_name,
            "experiment": exps.get(info.experiment_id),
            "status": info.status,
            "parent_run_id": data.tags.get("mlflow.parentRunId"),
            "start_time": info.start_time,
            "cache_key": data.tags.get("cache_key"),
            "git_commit": data.tags.get("git_commit"),
        }
        # The fixed columns win over a param of the same name (the config's own `run_name`).
        params = {_column(k): _number(v) for k, v in data.params.items()}
        row |= {k: v for k, v in params.items() if k not in row}
        row |= {_column(k): v for k, v in data.metrics.items()}
        rows.append(row)
    return _table(rows, ["run_id", "run_name", "experiment", "status", "parent_run_id"])


def metrics_table(uri: str | None = None) -> pa.Table:
    """Step history of every metric of every run: run_id, key, step, value, timestamp."""
    c = client(uri)
    rows = []
    for run in all_runs(c, [e.experiment_id for e in all_experiments(c)]):
        for key in run.data.metrics:
            for m in c.get_metric_history(run.info.run_id, key):
                rows.append(
                    {
                        "run_id": run.info.run_id,
                        "key": key,
                        "step": m.step,
                        "value": m.value,
                        "timestamp": m.timestamp,
                    }
                )
    return _table(rows, ["run_id", "key", "step", "value", "timestamp"])


def _number(v: str) -> Any:
    """MLflow keeps params as text: give numbers back as numbers, `None` as NULL."""
    if v == "None":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _table(rows: list[dict[str, Any]], first: list[str]) -> pa.Table:
    """Rows with differing keys -> one table; a column mixing numbers and text becomes text."""
    names = first + sorted({k for r in rows for k in r} - set(first))
    cols = {}
    for n in names:
        values = [r.get(n) for r in rows]
        try:
            cols[n] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols[n] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(cols) if rows else pa.table({n: pa.array([], pa.string()) for n in first})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sae': {'k': 16}} -> {'sae.k': 16}: MLflow params with dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
