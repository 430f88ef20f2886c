"""Real servers on localhost for the deployment and browser tests: a Prefect server (with its
UI), `saeflow serve` against it, and an MLflow server over the session's tracking store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f}s")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A server in its own process group (so its children die with it), logging to `log`."""
    out = open(log, "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, saeflow_home: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with its UI; yields the API URL (…/api)."""
    root = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    env = os.environ | {
        "PREFECT_HOME": str(root),
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start(cmd, env, root / "server.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, 120, "prefect server")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)


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
    from tasks import tracking

    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", tracking.tracking_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = start(cmd, env, saeflow_home / "mlflow-server.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 120, "mlflow server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
