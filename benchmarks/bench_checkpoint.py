"""What checking SAE weights costs, in one run, at d_in 768 (GPT-2 small's residual stream):
`SAE.save` (which hashes the tensors with sha256 into the safetensors header) against a bare
`save_file` of the same tensors, and `load_sae` of that file (which checks the sha256) against
`load_sae` of the same tensors in the older header without a sha256 (no check).

    python benchmarks/bench_checkpoint.py   # writes the Checkpoints section of BENCHMARKS.md
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

from benchmd import cpu, main, timed
from safetensors.torch import load_file, save_file

from sae.models.base import CONFIG, WEIGHTS
from sae.models.registry import build_sae, load_sae
from sae.training.checkpoint import digest

START, END = "<!-- bench_checkpoint:start -->", "<!-- bench_checkpoint:end -->"
D_IN = 768


def run(repeats: int) -> str:
    rows = []
    for d_sae in (16_384, 65_536):
        sae = build_sae("relu", D_IN, d_sae, seed=0)
        tensors = {k: v.detach().float().contiguous() for k, v in sae.state_dict().items()}
        mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
        with tempfile.TemporaryDirectory() as tmp:
            ours, old = Path(tmp) / "ours", Path(tmp) / "old"
            save = timed(lambda: sae.save(ours), repeats)  # noqa: B023 (called at once)
            bare = old / WEIGHTS
            old.mkdir()
            save_bare = timed(lambda: save_file(tensors, str(bare)), repeats)  # noqa: B023
            save_file(load_file(str(ours / WEIGHTS)), str(bare), metadata={"arch": "relu"})
            shutil.copy(ours / CONFIG, old / CONFIG)
            load = timed(lambda: load_sae(ours), repeats)  # noqa: B023
            load_bare = timed(lambda: load_sae(old), repeats)  # noqa: B023
            hashed = timed(lambda: digest(tensors), repeats)  # noqa: B023
        rows.append(
            f"| {d_sae:,} | {mb:,.0f} | {save:.3f} / {save_bare:.3f} = {save / save_bare:.2f}× "
            f"| {load:.3f} / {load_bare:.3f} = {load / load_bare:.2f}× "
            f"| {hashed:.3f} ({mb / hashed:,.0f} MB/s) |"
        )
    lines = [
        START,
        "## Checkpoints (`python benchmarks/bench_checkpoint.py`)",
        "",
        f"{datetime.date.today()}, {cpu()}, no GPU. A relu SAE at d_in {D_IN}, fp32; seconds, "
        f"median of {repeats} after a warm-up (files in the page cache). Ours: `SAE.save` "
        "(cfg.json + weights, each renamed into place, the tensors' sha256 in the header) "
        "against a bare `save_file`; `load_sae` (builds the SAE, checks the config and the "
        "sha256) against `load_sae` of the same tensors with an older header (no sha256: no "
        "check).",
        "",
        "| d_sae | MB | save: ours / bare save_file | load: checked / unchecked | sha256 alone |",
        "|---|---|---|---|---|",
        *rows,
        "",
        END,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(__doc__, run, START, END, repeats=5)
