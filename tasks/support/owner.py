"""Which process owns a RUNNING MLflow run, and whether that process is gone.

A run ended by its own code is FINISHED, FAILED or KILLED; a process killed outright (SIGKILL,
OOM, a lost node) ends nothing, and its runs would read RUNNING forever in the MLflow UI and the
`runs` view. Each run therefore carries its owner, `host/machine/boot/pid/start`, and the next
study on the same machine closes the runs whose owner no longer exists.

A process is told apart by its pid *and* its start time (`/proc/<pid>/stat`, field 22), so a
reused pid is not mistaken for the owner; a different boot id on the same machine means every
process of the old boot is gone. Runs owned on another machine are never judged: nothing here
can see its processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot; None if there is none.
    Off Linux (no /proc) a live pid gives '' (the start time is unknown)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        # comm (field 2) may hold spaces and parentheses: fields are counted after the last ')'
        return stat.rsplit(")", 1)[1].split()[19]
    if Path("/proc/self/stat").exists():
        return None  # Linux, and no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process: it exists
    return ""


def _machine() -> str:
    """This machine: its hostname and /etc/machine-id (containers may share either alone)."""
    return f"{socket.gethostname()}+{_read('/etc/machine-id')}"


def this_process() -> str:
    """The owner tag for runs this process starts or resumes."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    return f"{_machine()}/{boot}/{os.getpid()}/{_start_time(os.getpid())}"


def is_gone(owner: str) -> bool:
    """Whether the process named by an owner tag certainly no longer exists. False when it
    cannot tell: another machine, or a tag it does not parse."""
    try:
        machine, boot, pid, start = owner.rsplit("/", 3)
        pid_int = int(pid)
    except ValueError:
        return False
    if machine != _machine():
        return False
    if boot and boot != _read("/proc/sys/kernel/random/boot_id"):
        return True  # this machine rebooted since
    now = _start_time(pid_int)
    return now is None or (bool(start) and bool(now) and now != start)


EPHEMERAL_APP = "prefect.server.api.server:create_app"
"""The uvicorn app of the temporary Prefect server a run without PREFECT_API_URL starts."""


def orphan_servers(prefect_home: Path) -> list[int]:
    """Pids of temporary Prefect servers of this data directory whose saeflow process is gone
    (SIGKILL or the OOM killer leaves them re-parented and listening): their command line runs
    EPHEMERAL_APP, their environment says PREFECT__SERVER_EPHEMERAL=1 with this PREFECT_HOME,
    and their parent is init or no longer exists. Never a server someone started by hand."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if EPHEMERAL_APP not in (p.info["cmdline"] or []):
                continue
            env = p.environ()
            if env.get("PREFECT__SERVER_EPHEMERAL") != "1":
                continue
            if Path(env.get("PREFECT_HOME", "/nonexistent")).resolve() != prefect_home.resolve():
                continue
            if p.info["ppid"] == 1 or not psutil.pid_exists(p.info["ppid"]):
                found.append(p.info["pid"])
        except (psutil.Error, OSError):
            continue
    return found


def end_orphan_servers(prefect_home: Path, grace: float = 5.0) -> list[int]:
    """Stop `orphan_servers` (SIGTERM, then SIGKILL after `grace` s); their pids."""
    import psutil

    procs = []
    for pid in orphan_servers(prefect_home):
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in procs]
