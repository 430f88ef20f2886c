"""Real servers on localhost for the deployment and browser tests: `saeflow serve` against the
session's Prefect server (tests/conftest.py), and an MLflow server over its tracking store."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import BIN, ROOT, free_port, serving, start, stop


@pytest.fixture(scope="session")
def served(prefect_api: str, tiny_model: dict, saeflow_home: Path) -> Iterator[str]:
    """`saeflow serve <TINY>` against `prefect_api`, once its deployments are registered."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import FLOWS
    from tests.conftest import TINY

    env = os.environ | {
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": str(ROOT),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # pick up UI-started runs within 2 s, not 10
    }
    cmd = [sys.executable, "-m", "flows.cli", "serve", *TINY]  # TINY pre-fills the run forms
    proc = start(cmd, env, saeflow_home / "serve.log")
    try:
        deadline = time.monotonic() + 120
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"saeflow serve exited: {(saeflow_home / 'serve.log')}")
                with get_client(sync_client=True) as client:
                    if len(client.read_deployments()) == len(FLOWS):
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("saeflow serve registered no deployments in 120s")
                time.sleep(1)
        yield prefect_api
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def mlflow_ui(saeflow_home: Path) -> Iterator[str]:
    """`mlflow server` over the session's tracking store (lean settings from STACK.md)."""
    from tasks.support import tracking

    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", tracking.tracking_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with serving(
        cmd,
        env,
        saeflow_home / "mlflow-server.log",
        f"http://127.0.0.1:{port}/health",
        "mlflow server",
    ):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh `mlflow server` as a lab would run it (SQLite here for Postgres, a directory
    for object storage), artifacts proxied through it."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with serving(cmd, env, root / "server.log", f"http://127.0.0.1:{port}/health", "mlflow server"):
        yield f"http://127.0.0.1:{port}"
