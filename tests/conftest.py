"""Shared fixtures: a private data directory, a tiny builtin model, a Prefect test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before Prefect is imported anywhere: no telemetry (its task logs 'database is locked').
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")

# Tiny ops gain nothing from a second thread, and lose 3-7x when another process holds the
# other core (STACK.md).
torch.set_num_threads(1)

TINY = [
    "model=tiny",
    "hook=blocks.0.resid_post",
    "cache.tokens=16384",
    "cache.shard_tokens=4096",
    "eval.tokens=4096",
    "eval.batch_size=8",
    "sae.d_sae=64",
    "train.tokens=32768",
    "train.batch_size=512",
    "train.shuffle_rows=4096",
    "train.log_every=4",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def saeflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the session (the tiny model is built once into it)."""
    root = tmp_path_factory.mktemp("saeflow_home")
    os.environ["SAEFLOW_HOME"] = str(root)
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    return root


@pytest.fixture(scope="session")
def tiny_model(saeflow_home: Path) -> dict:
    """The tiny builtin GPT-2 (2 layers, width 32), built by the real code path."""
    from flows.config import load
    from tasks.model import prepare_model

    _, cfg = load(TINY)
    return prepare_model.fn(cfg)


@pytest.fixture(scope="session")
def prefect_server(saeflow_home: Path):
    """A real, temporary Prefect API for the session (started once: ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def study(prefect_server, tiny_model, saeflow_home: Path) -> dict:
    """One pipeline on the tiny model (TINY), shared by the tests that read its output."""
    from flows.pipeline import pipeline

    return pipeline(TINY)
