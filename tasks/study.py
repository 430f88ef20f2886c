"""The study's MLflow experiment and its parent run (one per pipeline or sweep)."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.schema import Config
from sae.failpoint import failpoint
from sae.files import file_sha256
from sae.formats.load import load_any
from sae.models.base import CONFIG
from tasks.support import tracking
from tasks.support.home import sae_dir
from tasks.support.log import logger


def experiment_name(c: Config) -> str:
    return c.tracking.experiment or f"{c.model.name}/{c.hook}"


# MLflow calls are I/O that a busy SQLite or a restarting server can fail for a moment.
_RETRY = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2)}


def check_server(uri: str | None, timeout: float = 10.0) -> None:
    """Raise ConnectionError, naming `uri`, if it is an http(s) tracking server that does not
    answer. Why: MLflow's client retries a refused connection for minutes (7 retries with
    exponential backoff, MLFLOW_HTTP_REQUEST_MAX_RETRIES) before it says anything."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered, if with an error status (a proxy, no /health): it is there
    except OSError as e:  # URLError (refused, unknown host) or a timeout
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}); start "
            "it (mlflow server --host 127.0.0.1 --port 5000) or fix tracking.uri, or use the "
            "local store (tracking=local)"
        ) from None


def study_name(kind: str, cfgs: list[Config], labels: list[list[str]]) -> str:
    """The parent run's name, saying what it holds: `pipeline relu-1024`, `sweep sae.k=16,32,64`
    (the overrides that differ between its SAEs), `scaling 12 SAEs`."""
    if kind == "sweep":
        values: dict[str, list[str]] = {}
        for job in labels:
            for item in job:
                key, _, value = item.partition("=")
                if value not in values.setdefault(key, []):
                    values[key].append(value)
        varied = [f"{k}={','.join(v)}" for k, v in values.items() if len(v) > 1]
        return f"sweep {' '.join(varied) or f'{len(cfgs)} SAEs'}"[:250]
    if kind == "scaling":
        return f"scaling {len(cfgs)} SAEs {cfgs[0].sae.arch}"
    c = cfgs[0]
    return f"{kind} {c.run_name or f'{c.sae.arch}-{c.sae.d_sae}'}"


def check_prefect(url: str | None, timeout: float = 10.0) -> None:
    """Raise ConnectionError, naming `url`, if the Prefect API there does not answer /health
    within `timeout` s: refused, or (worse) accepted and never answered, where Prefect's client
    waits silently for minutes. None = a temporary local server: nothing to check."""
    if not url:
        return
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except OSError as e:  # refused, unknown host, or no answer in time
        why = "no answer" if isinstance(e, TimeoutError) or "timed out" in str(e) else e
        raise ConnectionError(
            f"Failed to reach API at {url}: {getattr(why, 'reason', why)} within {timeout:g} s "
            "(PREFECT_API_URL); start the server (prefect server start) or unset "
            "PREFECT_API_URL to run on a temporary local one"
        ) from None


@task(name="open_study", cache_policy=NO_CACHE, **_RETRY)
def open_study(cfg: Config, kind: str = "pipeline", name: str | None = None) -> dict[str, str]:
    """Create (once) the experiment and start the parent run (named `name`, default `kind`);
    returns their ids. Runs that killed processes left RUNNING in the experiment are marked
    KILLED on the way."""
    uri = cfg.tracking.uri
    check_server(uri)  # seconds, not MLflow's minutes of retries per attempt
    exp_id = tracking.ensure_experiment(experiment_name(cfg), uri)
    parent = tracking.start_run(exp_id, name or kind, uri=uri, tags={"saeflow.stage": kind})
    if orphans := tracking.close_orphans(exp_id, f"{kind} run {parent}", uri):
        logger().info(
            f"{len(orphans)} run(s) left RUNNING by killed processes marked KILLED: "
            + ", ".join(orphans)
        )
        # A parent run is opened in its flow's process, so that flow run died with it
        # (an SAE run's owner may be a Dask worker whose flow lives on).
        flow_runs = {t["prefect.flow_run_id"] for t in orphans.values()
                     if "prefect.flow_run_id" in t and "mlflow.parentRunId" not in t}  # fmt: skip
        crash_flow_runs(sorted(flow_runs), f"its process was killed; found by {kind} run {parent}")
    tracking.log_params(parent, tracking.flatten(asdict(cfg)), uri)
    tracking.log_config(parent, asdict(cfg), uri)
    return {
        "experiment_id": exp_id,
        "parent_run_id": parent,
        "tracking_uri": tracking.tracking_uri(uri),
    }


def crash_flow_runs(flow_run_ids: list[str], message: str) -> list[str]:
    """Mark Crashed those of the Prefect flow runs that still read Running; their ids. A flow
    run the server does not know (a temporary server's, gone with it) is skipped."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    crashed: list[str] = []
    if not flow_run_ids:
        return crashed  # no client: outside a flow it would start a temporary server
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                state = client.read_flow_run(flow_run_id).state
            except ObjectNotFound:
                continue
            if state is not None and state.is_running():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                crashed.append(flow_run_id)
    if crashed:
        logger().info(f"Prefect flow run(s) of killed processes marked Crashed: {crashed}")
    return crashed


@task(name="close_study", cache_policy=NO_CACHE, **_RETRY)
def close_study(
    cfg: Config,
    parent_run_id: str,
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> None:
    uri = cfg.tracking.uri
    failpoint("study.close")
    if tags:
        tracking.set_tags(parent_run_id, tags, uri)
    tracking.end_run(parent_run_id, status, uri)


@task(name="find_sae", cache_policy=NO_CACHE)
def find_sae(cfg: Config) -> dict[str, str]:
    """{run_id, checkpoint} of `eval.run_id`, of the SAE `eval.sae` imported, or of the study's
    latest finished SAE run."""
    c = cfg
    if c.eval.sae is not None:
        return import_sae(c)
    run_id = c.eval.run_id
    if run_id is None:
        exp = tracking.client(c.tracking.uri).get_experiment_by_name(experiment_name(cfg))
        runs = (
            []
            if exp is None
            else tracking.client(c.tracking.uri).search_runs(
                [exp.experiment_id],
                "tags.`saeflow.stage` != 'pipeline' and tags.`saeflow.stage` != 'import' "
                "and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
            )
        )
        runs = [r for r in runs if sae_dir(r.info.run_id).is_dir()]
        if not runs:
            raise FileNotFoundError(
                f"no trained SAE in experiment {experiment_name(cfg)!r}; "
                "train one first or pass eval.run_id=<MLflow run id>"
            )
        run_id = runs[0].info.run_id
    checkpoint = sae_dir(run_id)
    if not checkpoint.is_dir():
        raise FileNotFoundError(
            f"eval.run_id={run_id!r}: no SAE was trained under this run id (no {checkpoint}); "
            'list the trained ones with: saeflow sql "select run_id, run_name, status from runs"'
        )
    if not (checkpoint / "sae.safetensors").is_file():
        raise FileNotFoundError(
            f"run {run_id} has no checkpoint at {checkpoint} (its training did not finish); "
            "re-run its saeflow train to resume it"
        )
    if (hook := _trained_at(checkpoint)) not in (None, c.hook):
        raise ValueError(
            f"the SAE of run {run_id} was trained at hook {hook!r}, not hook={c.hook!r}: "
            f"pass hook={hook}"
        )
    return {"run_id": run_id, "checkpoint": str(checkpoint)}


def model_width(c: Config) -> int | None:
    """The model's residual width, from its config alone (None where that cannot be read)."""
    if c.model.source == "builtin":
        return c.model.n_embd
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(c.model.path, revision=c.model.revision).hidden_size)
    except (OSError, ValueError, AttributeError):
        return None


def import_sae(c: Config) -> dict[str, str]:
    """The SAE `eval.sae` names (`sae.formats.load.load_any`), as an MLflow run of the study's
    experiment with its weights in saeflow's layout: {run_id, checkpoint}. The same content
    imported again is the same run (tag `saeflow.import_key`, the files' sha256). Its hook and
    width are checked against `hook` and the model before any work."""
    spec = c.eval.sae
    assert spec is not None
    imported = load_any(spec)
    sae = imported.sae
    if imported.hook is not None and imported.hook != c.hook:
        raise ValueError(
            f"eval.sae={spec}: the SAE was trained at hook {imported.hook!r}, not "
            f"hook={c.hook!r}: pass hook={imported.hook}"
        )
    if (width := model_width(c)) is not None and sae.d_in != width:
        raise ValueError(
            f"eval.sae={spec}: the SAE reads d_in={sae.d_in}, but model {c.model.name} "
            f"has width {width} at {c.hook}"
        )
    files = sorted(p for p in imported.dir.iterdir() if p.is_file())
    key = hashlib.sha256("".join(file_sha256(p) for p in files).encode()).hexdigest()[:32]
    uri = c.tracking.uri
    experiment_id = tracking.ensure_experiment(experiment_name(c), uri)
    for run in tracking.client(uri).search_runs(
        [experiment_id],
        f"tags.`saeflow.import_key` = '{key}' and attributes.status = 'FINISHED'",
    ):
        if (sae_dir(run.info.run_id) / "sae.safetensors").is_file():
            return {"run_id": run.info.run_id, "checkpoint": str(sae_dir(run.info.run_id))}
    tags = {
        "saeflow.stage": "import",
        "saeflow.source": str(spec)[:5000],
        "saeflow.format": imported.format,
        "saeflow.import_key": key,
    }
    name = f"import-{imported.format}-{sae.arch}-{sae.d_sae}"
    run_id = tracking.start_run(experiment_id, name, uri=uri, tags=tags)
    try:
        params = {f"sae.{k}": v for k, v in sae.config().items()}
        params |= tracking.flatten(imported.config, "source.")
        tracking.log_params(run_id, {k: v for k, v in params.items() if len(str(v)) <= 6000}, uri)
        meta = {"hook": c.hook, "source": str(spec), "format": imported.format}
        sae.save(sae_dir(run_id), meta=meta)
    except BaseException:
        tracking.end_run(run_id, "FAILED", uri)
        raise
    tracking.end_run(run_id, "FINISHED", uri)
    logger().info(f"imported {imported.format} SAE {spec} as MLflow run {run_id}")
    return {"run_id": run_id, "checkpoint": str(sae_dir(run_id))}


def _trained_at(checkpoint: Path) -> str | None:
    """The hook in the checkpoint's cfg.json (None if it does not say: load_sae then names
    what is wrong with the file)."""
    try:
        return json.loads((checkpoint / CONFIG).read_text())["meta"]["hook"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@task(name="link_runs", cache_policy=NO_CACHE, **_RETRY)
def link_runs(cfg: Config, experiment_id: str, runs: dict[str, str]) -> None:
    """Lineage back from Prefect: the flow run gets a link artifact to each MLflow run (`runs`:
    label -> run id; shown on its Artifacts tab) and a tag `mlflow:<run id>` per run (shown in
    the runs list). MLflow runs carry `prefect.flow_run_id`/`_url` from `tracking.start_run`."""
    from prefect.artifacts import create_link_artifact
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    c = cfg
    for label, run_id in runs.items():
        link = tracking.mlflow_ui_url(c.tracking.uri, c.tracking.ui_url, experiment_id, run_id)
        create_link_artifact(
            link,
            link_text=f"MLflow run {run_id} ({label})",
            key=f"mlflow-{label}".lower().replace("_", "-")[:60],
            description=f"MLflow run of this flow run's {label}",
        )
    flow_run_id = get_run_context().task_run.flow_run_id
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(flow_run_id).tags
        new = [f"mlflow:{r}" for r in runs.values() if f"mlflow:{r}" not in tags]
        client.update_flow_run(flow_run_id, tags=[*tags, *new])
