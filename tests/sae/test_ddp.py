"""Data-parallel training (torchrun, gloo on CPU): two processes, each on half of every global
batch with gradients averaged, end with the weights of one process on the whole batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.models import build_sae
from tests.servers import ROOT


def test_two_ranks_train_the_weights_of_one(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", worker, str(tmp_path / "two")]  # fmt: skip
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "sae.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:  # the same up to float summation order
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    start = build_sae("relu", 32, 128, seed=0, l1_coeff=1.0).state_dict()
    assert not torch.allclose(a["W_dec"], start["W_dec"])  # and they did train
