"""The package boundaries of STYLE.md, kept by a test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
IMPORT = re.compile(r"^\s*(?:import|from)\s+([a-z_]+)", re.M)


def _imports(package: str) -> dict[str, set[str]]:
    return {
        str(p.relative_to(ROOT)): set(IMPORT.findall(p.read_text()))
        for p in (ROOT / package).rglob("*.py")
    }


def test_sae_is_pure_torch() -> None:
    banned = {"prefect", "mlflow", "hydra", "omegaconf", "tasks", "flows", "conf", "duckdb"}
    bad = {f: mods & banned for f, mods in _imports("sae").items() if mods & banned}
    assert not bad


def test_the_config_imports_no_torch() -> None:
    """conf/ builds on the core's configs (sae/*/config.py): they must stay importable without
    torch, which takes seconds to import and is not needed to check a config."""
    import subprocess
    import sys

    code = "import sys, conf.schema, flows.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_tasks_hold_tasks_and_import_no_circle() -> None:
    """Each module directly in tasks/ defines a Prefect task; helpers live in tasks/support/,
    which never imports a task module."""
    for p in (ROOT / "tasks").glob("*.py"):
        if p.name != "__init__.py":
            assert "@task(" in p.read_text(), f"{p} holds no task: move it to tasks/support/"
    for f in _imports("tasks/support"):
        text = (ROOT / f).read_text()
        assert not re.search(r"^from tasks\.(?!support)", text, re.M), f"{f} imports a task module"


def test_only_tasks_talk_to_mlflow() -> None:
    for package in ("sae", "flows", "dashboards", "conf"):
        bad = [f for f, mods in _imports(package).items() if "mlflow" in mods]
        assert not bad, f"{bad} import mlflow; tracking belongs in tasks/"


def test_nothing_loads_pickles() -> None:
    for p in ROOT.rglob("*.py"):
        if ".venv" in p.parts or p.name == "test_boundaries.py":
            continue
        for line in p.read_text().splitlines():
            assert not re.search(r"\b(import pickle|pickle\.loads?\(|dill|joblib\.load)", line), (
                f"{p}: {line}"
            )
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{p}: {line}"
