"""`kill <saeflow>` (SIGTERM) mid-run: saeflow stops like on Ctrl-C, exit 130, and the temporary
Prefect server it started goes with it (it used to outlive the run)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import TINY
from tests.servers import child_env, fresh_home


def _cmdline(p: psutil.Process) -> str:
    """A child's command line; '' for one that has just exited (a zombie until reaped: psutil
    raises on it, which failed this test once in a full-suite run)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def test_sigterm_stops_saeflow_and_its_temporary_server(tiny_model: dict, tmp_path: Path) -> None:
    home = fresh_home(tmp_path / "home", Path(tiny_model["path"]))
    env = child_env(home, "")
    env.pop("PREFECT_API_URL")  # saeflow starts its own temporary server
    cmd = [sys.executable, "-m", "flows.cli", "run", *TINY, "tracking.experiment=term"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline, children = time.monotonic() + 180, []
    while time.monotonic() < deadline and proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        if any("uvicorn" in _cmdline(c) for c in children):
            break
        time.sleep(0.5)
    assert children, "saeflow started no Prefect server"
    time.sleep(3)  # into the flow run
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted; finished work is kept" in out
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline() for c in alive]
