"""`saeflow`: the public command line (DESIGN §10)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tasks.support.home import check_home, home

USAGE = """saeflow run [-m] [--force STAGE] [overrides]   the pipeline: cache -> train -> evaluate
saeflow cache|train|evaluate [overrides]   one stage
saeflow scaling [overrides]          a scaling-law study: scaling.d_sae × tokens × lr, fits
saeflow steer [steer.feature=N steer.value=X eval.run_id=ID]   generate with a feature
saeflow export [export.format=saelens export.dir=DIR eval.run_id=ID|eval.sae=PATH]   an SAE out
saeflow sql "SELECT ..."|<dashboard>|list [--param V]... [--format table|csv|json]
            [--tracking-uri URI] [--timeout S] [--memory-limit SIZE] [--threads N]
saeflow serve [overrides]            Prefect deployments of the flows, for the Prefect UI
saeflow deploy --pool NAME [overrides]   the same deployments on a work pool's workers"""


def _environment() -> None:
    """Defaults that must be in place before Prefect is imported: its state under the data dir,
    no telemetry (which logs 'database is locked' tracebacks, STACK.md)."""
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")  # a temporary server: local only
    # Its default 20 s start-up limit failed `saeflow run` on a busy 2-core machine (measured).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (`kill`, a scheduler's stop) and Ctrl-C: queued tasks will not start
    (`tasks.support.stop`), then unwind. Without the handler SIGTERM kills Python at once and the
    temporary Prefect server saeflow started outlives it (measured)."""
    from tasks.support.stop import STOP

    STOP.set()
    raise KeyboardInterrupt


def _summary(result: dict[str, Any]) -> str:
    m, study = result["metrics"], result["study"]
    uri = study["tracking_uri"]
    return "\n".join(
        [
            "",
            f"MLflow run     {result['trained']['run_id']} (parent {study['parent_run_id']})",
            f"  tracking URI {uri}",
            f"  open the UI  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
            f"checkpoint     {result['trained']['checkpoint']}",
            f"feature table  {result['features']['path']}",
            f"activations    {result['train_cache']['dir']}"
            + (" (reused)" if result["train_cache"]["reused"] else ""),
            f"eval           explained_variance={m['explained_variance']:.3f} "
            f"loss_recovered={m['loss_recovered']:.3f} dead_frac={m['dead_frac']:.3f} "
            f"l0={m['l0']:.1f} ce_clean={m['ce_clean']:.3f} ce_sae={m['ce_sae']:.3f}",
            'query          saeflow sql "select run_id, count(*) from features group by run_id"',
        ]
    )


def _sweep_summary(result: dict[str, Any]) -> str:
    study = result["study"]
    lines = [
        "",
        f"sweep          {len(result['jobs'])} SAEs under MLflow run {study['parent_run_id']}",
        f"  open the UI  mlflow ui --backend-store-uri {study['tracking_uri']} "
        "--host 127.0.0.1 --port 5000",
        f"{'run_id':<34}{'status':<9}{'EV':>7}{'LR':>7}{'dead':>7}{'L0':>7}  overrides",
    ]
    for job in result["jobs"]:
        m, t = job["metrics"], job["trained"]
        lines.append(
            f"{t['run_id']:<34}{t['status']:<9}{m['explained_variance']:7.3f}"
            f"{m['loss_recovered']:7.3f}{m['dead_frac']:7.3f}{m['l0']:7.1f}  "
            + " ".join(job["overrides"])
        )
    return "\n".join(lines)


def _scaling_summary(result: dict[str, Any]) -> str:
    s, study = result["scaling"], result["study"]
    lines = [
        _sweep_summary(result),
        "",
        f"{'fit':<8}{'exponent':>10}{'90% interval':>20}{'points':>8}   "
        f"at {s['fits'][0]['budget']:.3g} FLOPs",
    ]
    for f in s["fits"]:
        interval = f"[{f['exponent_lo']:.3f}, {f['exponent_hi']:.3f}]"
        lines.append(
            f"{f['quantity']:<8}{f['exponent']:>10.3f}{interval:>20}{f['n_points']:>8}   "
            f"{f['at_budget']:.4g}"
        )
    lines += [
        f"report         {s['report']}",
        f"tables         {s['dir']} (points, fits, splits)",
        "query          saeflow sql scaling_fits --param " + study["parent_run_id"],
    ]
    return "\n".join(lines)


def _steer_summary(result: dict[str, Any]) -> str:
    lines = [
        f"feature {result['feature']} of run {result['run_id']} at {result['hook']}: "
        f"{result['mode']} {result['value']:g}   ({result['path']})"
    ]
    for row in result["rows"]:
        lines += [
            "",
            f"prompt     {row['prompt']!r}",
            f"unsteered  {row['unsteered']!r}",
            f"steered    {row['steered']!r}",
        ]
    return "\n".join(lines)


def _stage(name: str, overrides: list[str], multirun: bool, force: list[str]) -> int:
    from flows.config import ConfigError, scaling_jobs
    from flows.config import jobs as compose_jobs

    composed = compose_jobs(overrides, multirun)  # every job validated before any work
    jobs, typed = [job for job, _ in composed], [c for _, c in composed]
    if name == "scaling":
        for job, c in composed:
            scaling_jobs(job, c)
    from tasks.support.stage import (
        forced,  # Prefect, which makes its home on import: after validation
    )

    try:
        forced(force)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from flows import pipeline as p
    from tasks.study import check_prefect, check_server

    check_prefect(os.environ.get("PREFECT_API_URL"))  # a silent server hung here for minutes
    for uri in dict.fromkeys(t.tracking.uri for t in typed):
        check_server(uri)  # now, in seconds: not after hours of caching, nor minutes of retries

    from flows.runner import task_runner

    flow = {
        "run": p.pipeline,
        "cache": p.cache_flow,
        "train": p.train_flow,
        "evaluate": p.evaluate_flow,
        "steer": p.steer_flow,
        "export": p.export_flow,
        "scaling": p.scaling,
    }[name].with_options(task_runner=task_runner(typed[0].runner))
    if name == "run" and multirun:
        sweep = p.sweep.with_options(task_runner=task_runner(typed[0].runner))
        print(_sweep_summary(sweep(jobs=jobs, force=force)))
        return 0
    for job in jobs:
        result = flow(job) if name in ("steer", "export") else flow(job, force=force)
        if name == "run":
            print(_summary(result))
        elif name == "scaling":
            print(_scaling_summary(result))
        elif name == "steer":
            print(_steer_summary(result))
        elif name == "export":
            for e in result["exports"]:
                print(f"run {e['run_id']}: {e['format']} -> {e['dir']}")
        else:
            print(result)
    return 0


def _sql(text: str, fmt: str, params: list[str], args: argparse.Namespace) -> int:
    from dashboards.sql import dashboards, render
    from tasks.support.sql import sql

    if text == "list":
        for name, about in dashboards().items():
            print(f"{name:<28}{about}")
        return 0
    given = {"timeout": args.timeout, "memory_limit": args.memory_limit, "threads": args.threads}
    limits = {k: v for k, v in given.items() if v is not None}  # else dashboards/sql.py's
    # Parameters go to DuckDB as the strings typed (' 8' and '007' stay themselves); compared
    # with a number column, DuckDB casts them, and `$1::INTEGER` says so where it cannot tell.
    table = sql(text, list(params), args.tracking_uri, **limits)
    print(render(table, fmt).rstrip("\n"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saeflow", usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "cache", "train", "evaluate", "steer", "export", "scaling"):
        s = sub.add_parser(name)
        s.add_argument("-m", "--multirun", action="store_true")
        s.add_argument(
            "--force",
            action="append",
            default=[],
            metavar="STAGE",
            help="redo a stage rather than reuse it: cache, train, evaluate, features, all",
        )
        s.add_argument("overrides", nargs="*")
    s = sub.add_parser("sql")
    s.add_argument("query", help="SQL, a dashboards/*.sql name, a .sql file, or 'list'")
    s.add_argument("--param", action="append", default=[], help="$1, $2, … in order")
    s.add_argument("--format", default="table", choices=("table", "csv", "json"))
    s.add_argument(
        "--tracking-uri", default=None, help="an MLflow server or store (default: local)"
    )
    # no defaults here: dashboards/sql.py owns them (TIMEOUT_S, MEMORY_LIMIT, THREADS)
    s.add_argument("--timeout", type=float, help="seconds before the query stops")
    s.add_argument("--memory-limit", help="DuckDB's memory_limit, e.g. 8GB")
    s.add_argument("--threads", type=int, help="DuckDB's worker threads")
    s = sub.add_parser("deploy")
    s.add_argument("--pool", required=True, help="a Prefect work pool (prefect work-pool create)")
    s.add_argument("overrides", nargs="*", help="defaults for every deployment's overrides")
    s = sub.add_parser("serve")
    s.add_argument("overrides", nargs="*", help="defaults for every deployment's overrides")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)
    try:
        check_home()  # writable, its MLflow store readable: before anything is made there
    except (PermissionError, ValueError) as e:
        print(f"saeflow: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    _environment()  # before anything imports Prefect: it reads its settings once, at import
    from tasks.support.owner import end_orphan_servers

    if ended := end_orphan_servers(Path(os.environ["PREFECT_HOME"])):
        print(f"saeflow: stopped {len(ended)} temporary Prefect server(s) left by a killed run "
              f"(pids {', '.join(map(str, ended))})", file=sys.stderr)  # fmt: skip
    from flows.config import ConfigError

    try:
        if args.command == "sql":
            return _sql(args.query, args.format, args.param, args)
        if args.command == "deploy":
            from flows.config import load

            load(args.overrides)
            from flows.deploy import deploy

            for d in deploy(args.pool, args.overrides):
                print(f"deployment {d} on work pool {args.pool}")
            return 0
        if args.command == "serve":
            from flows.config import load

            load(args.overrides)  # the forms' defaults must be valid too
            from flows.serve import serve

            return serve(args.overrides)
        return _stage(args.command, args.overrides, args.multirun, args.force)
    except ConfigError as e:
        print(f"saeflow: bad config: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saeflow: interrupted; finished work is kept, re-run to continue", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"saeflow: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
