"""Servers on localhost for tests: start one in its own process group, wait for it, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parents[1]
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


@contextmanager
def serving(
    cmd: list[str], env: dict[str, str], log: Path, health: str, what: str
) -> Iterator[None]:
    """A server for the duration of the block, once `health` answers 200."""
    proc = start(cmd, env, log)
    try:
        wait_http(health, proc, 120, what)
        yield
    finally:
        stop(proc)


def fresh_home(home: Path, model_dir: Path) -> Path:
    """A data directory holding only a copy of the built model (so no child rebuilds it)."""
    import shutil

    shutil.copytree(model_dir, home / "models" / model_dir.name)
    return home


def child_env(home: Path, api: str) -> dict[str, str]:
    """The environment of a `python -m flows.cli` child on its own data directory, reporting
    to the session's Prefect server; one torch thread (children share two cores)."""
    env = os.environ | {
        "SAEFLOW_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("SAEFLOW_FAILPOINT", None)
    return env
