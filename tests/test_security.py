"""Security: the SQL entry point cannot write, names from runs and configs cannot lead outside
the data directory, stage results are JSON (no pickles), servers bind to 127.0.0.1."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import TINY

ROOT = Path(__file__).parents[1]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "prefect" not in p.parts and p.suffix != ".lock"
    }


WRITES = [
    "COPY features TO 'x.csv'",
    "COPY (SELECT 1) TO '{features}/run_id=x/feature_stats.parquet'",  # even inside the data
    "CREATE TABLE t AS SELECT * FROM features",
    "DROP VIEW features",
    "INSTALL httpfs",
    "ATTACH '{home}/mlflow/mlflow.db' AS m",
    "SET enable_external_access = true",
    "PRAGMA version",
    "EXPORT DATABASE '{home}/dump'",
    "SELECT 1; COPY features TO 'x.csv'",  # a second statement smuggled after a read
]


@pytest.mark.parametrize("statement", WRITES)
def test_sql_refuses_anything_but_reads(study, saeflow_home: Path, statement: str, capsys) -> None:
    before = _digest(saeflow_home)
    text = statement.format(home=saeflow_home, features=saeflow_home / "features")
    assert main(["sql", text]) == 1
    err = capsys.readouterr().err
    assert "read-only" in err or "exactly one SQL statement" in err, err
    assert _digest(saeflow_home) == before


def test_sql_reads_only_the_feature_tables(study, capsys) -> None:
    assert main(["sql", "select count(*) as n from features", "--format", "csv"]) == 0
    assert int(capsys.readouterr().out.splitlines()[1]) >= 64
    for path in ("/etc/passwd", str(ROOT / "pyproject.toml")):
        assert main(["sql", f"select * from read_text('{path}')"]) == 1
        assert "Permission Error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.run_id=../../etc", "eval.run_id must be an MLflow run id"),
        ("eval.run_id=/abs/path", "eval.run_id must be an MLflow run id"),
        ("model.name=../../evil", "model.name must be letters, digits"),
        ("model.name=.hidden", "model.name must be letters, digits"),
    ],
)
def test_names_cannot_escape_the_data_directory(
    saeflow_home: Path, override: str, message: str, capsys
) -> None:
    assert main(["evaluate", *TINY, override]) == 2
    assert message in capsys.readouterr().err
    assert not (saeflow_home.parent / "evil").exists()


def test_inside_refuses_paths_out_of_home(saeflow_home: Path) -> None:
    from tasks.support.home import inside

    assert inside("reports", "abc.html") == saeflow_home / "reports" / "abc.html"
    for parts in [("..", "x"), ("reports", "../../x"), ("/etc/passwd",), ("features", "/tmp")]:
        with pytest.raises(ValueError, match="outside the data directory"):
            inside(*parts)


def test_stage_results_are_json_not_pickles() -> None:
    from tasks.evaluate import evaluate_many, features
    from tasks.train import train_saes

    for t in (train_saes, evaluate_many, features):
        assert t.persist_result and t.result_serializer == "json", t.name


def test_servers_bind_to_localhost() -> None:
    """Every server command the README gives, and the temporary Prefect server saeflow starts."""
    import os

    from flows.cli import _environment

    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    commands = re.findall(r"(?:prefect server start|mlflow (?:ui|server))[^\n]*", readme)
    assert len(commands) >= 2
    for cmd in commands:
        assert "--host 127.0.0.1" in cmd, cmd
    assert "0.0.0.0" not in readme
    saved = os.environ.pop("PREFECT_SERVER_API_HOST", None)
    try:
        _environment()
        assert os.environ["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    finally:
        os.environ.pop("PREFECT_SERVER_API_HOST", None)
        if saved is not None:
            os.environ["PREFECT_SERVER_API_HOST"] = saved
