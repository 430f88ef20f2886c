"""Run under torchrun (gloo): train one relu SAE data-parallel on synthetic batches in dtype
argv[2] (fp32|bf16); rank 0 writes the weights to argv[1]. Without torchrun: the same training
in one process."""

from __future__ import annotations

import os
import sys
from itertools import islice
from pathlib import Path

import torch

from sae.activations.synthetic import sparse_batches, unit_rows
from sae.models.registry import build_sae
from sae.training.fit import FitConfig, fit

BATCH, STEPS = 512, 40


def main(out: Path, dtype: str) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    features = unit_rows(256, 32, seed=7)
    batches = list(islice(sparse_batches(features, BATCH, active=4, seed=3), STEPS))
    sae = build_sae("relu", 32, 128, seed=0, l1_coeff=1.0)
    cfg = FitConfig(tokens=BATCH * STEPS, batch_size=BATCH, lr=1e-3, log_every=10, device="cpu",
                    dtype=dtype)  # fmt: skip
    fit(sae, batches, cfg)
    if not distributed or torch.distributed.get_rank() == 0:
        sae.save(out)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
