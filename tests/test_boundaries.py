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
