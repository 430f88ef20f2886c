"""SIGKILL the caching process at several points; the re-run finishes the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The child builds a cache of 24 one-context shards with a deliberately slow forward pass, so
# the parent can kill it between, or in the middle of, shard writes.
CHILD = r"""
import sys, time, torch
from pathlib import Path
from transformers import GPT2Config, GPT2LMHeadModel
from sae.activations.cache import Manifest
from sae.activations.extract import build_cache
from sae.lm.hooks import HookPoint


def build(dir, delay):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16,
                                       vocab_size=50)).eval()
    model.transformer.h[0].register_forward_pre_hook(lambda m, a: time.sleep(delay))
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 50, (24, 16), generator=g).tolist()
    plan = Manifest(key="k", key_inputs={}, hooks={"blocks.1.resid_post": 32}, dtype="bf16",
                    context_length=16, special_token_ids=[0], n_planned=24, shard_seqs=1)
    return build_cache(Path(dir), model, [HookPoint(1, "resid_post")], iter(ctx), plan,
                       batch_size=1, log=lambda s: None)


if __name__ == "__main__":
    build(sys.argv[1], float(sys.argv[2]))
"""
_child: dict = {}
exec(CHILD.replace('if __name__ == "__main__":', "if False:"), _child)  # the same code here


def _run(dir: Path, delay: float) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[3])}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(dir), str(delay)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _listed(dir: Path) -> int:
    try:
        return len(json.loads((dir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    m = _child["build"](tmp_path_factory.mktemp("reference"), 0.0)
    return [s.sha256 for s in m.shards]


@pytest.mark.parametrize("kill_after", [0, 1, 5, 17])
def test_kill_and_resume_is_byte_identical(tmp_path: Path, reference, kill_after: int) -> None:
    """kill_after=0: killed before any shard is recorded (while tokenising or computing)."""
    proc = _run(tmp_path, 0.03)
    deadline = time.monotonic() + 60
    while _listed(tmp_path) < kill_after and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    if kill_after == 0:
        while not any(tmp_path.glob("*.npy")) and proc.poll() is None:
            time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.parquet")}
    listed = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    assert len(listed) < 24, "the child finished before it was killed"
    _child["build"](tmp_path, 0.0)  # the re-run, in this process
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["complete"] and [s["sha256"] for s in m["shards"]] == reference
    for s in listed:  # shards recorded before the kill were not recomputed
        assert (tmp_path / s["file"]).stat().st_mtime_ns == finished[s["file"]]
