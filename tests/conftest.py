"""Shared fixtures: a private data directory, a tiny builtin model, a real Prefect server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.servers import BIN, free_port, serving

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

    cfg, _ = load(TINY)
    return prepare_model.fn(cfg)


@pytest.fixture(scope="session")
def prefect_server(prefect_api: str):
    """In-process flows of the session run against the real server of `prefect_api`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield prefect_api


@pytest.fixture(scope="session")
def study(prefect_server, tiny_model, saeflow_home: Path) -> dict:
    """One pipeline on the tiny model (TINY), shared by the tests that read its output."""
    from flows.pipeline import pipeline

    return pipeline(TINY)


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
    with serving(
        cmd, env, root / "server.log", f"http://127.0.0.1:{port}/api/health", "prefect server"
    ):
        yield f"http://127.0.0.1:{port}/api"
