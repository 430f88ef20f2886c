"""Trainer states on disk: safetensors + JSON, never pickle (DESIGN §5).

A state of step N is two files in the state directory, written in this order, each to a temporary
name and renamed into place:

    step-NNNNNNNN.safetensors    tensors: SAE parameters and buffers, Adam moments, RNG states
    step-NNNNNNNN.json           everything else: step, input scale, schedules, loader position

A step exists once its JSON does (the tensors are written first), so a process killed at any
moment leaves the previous states whole. The newest `keep` states are kept: a sweep that saves N
SAEs one after the other can always find a step that every one of them reached.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae.failpoint import failpoint
from sae.files import atomic_write, write_text

STATE_VERSION = 1
_NAME = re.compile(r"step-(\d{8})\.json")


class CheckpointError(ValueError):
    """A trainer state that cannot be read or does not belong to this run."""


@dataclass(frozen=True)
class TrainState:
    step: int
    tensors: dict[str, torch.Tensor]
    values: dict[str, Any]
    """JSON-able: the trainer's scalars, the SAE config, and the loader position ('loader')."""

    @property
    def loader(self) -> dict[str, Any] | None:
        return self.values.get("loader")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each one's name, dtype, shape and raw bytes. Why:
    a safetensors file checks its header, not its data; a flipped bit in a weight would load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # bf16 too: numpy lacks it
    return h.hexdigest()


def steps(dir: Path) -> list[int]:
    """Steps with a complete state in `dir`, ascending ([] if none or no dir)."""
    dir = Path(dir)
    if not dir.is_dir():
        return []
    found = (_NAME.fullmatch(p.name) for p in dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def save(dir: Path, state: TrainState, keep: int = 2) -> None:
    """Write `state` atomically, then delete all but the newest `keep` states."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    stem = dir / f"step-{state.step:08d}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
    failpoint("checkpoint.write")  # tensors in place, their JSON not yet: not a state
    head = {"version": STATE_VERSION, "step": state.step, "tensors_sha256": digest(tensors)}
    text = json.dumps(head | state.values, indent=1)
    write_text(stem.with_suffix(".json"), text + "\n")
    for old in steps(dir)[:-keep]:
        (dir / f"step-{old:08d}.json").unlink(missing_ok=True)  # JSON first: never half a state
        (dir / f"step-{old:08d}.safetensors").unlink(missing_ok=True)


def load(dir: Path, step: int | None = None) -> TrainState | None:
    """The state of `step` (default the newest) in `dir`; None if there is none."""
    found = steps(dir)
    if step is None:
        if not found:
            return None
        step = found[-1]
    elif step not in found:
        raise CheckpointError(f"no trainer state for step {step} in {dir}; there are {found}")
    stem = Path(dir) / f"step-{step:08d}"
    try:
        values = json.loads(stem.with_suffix(".json").read_text())
        tensors = load_file(str(stem.with_suffix(".safetensors")))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"trainer state {stem}.* is unreadable: {e}") from e
    if values.pop("version", None) != STATE_VERSION or values.pop("step", None) != step:
        raise CheckpointError(f"{stem}.json is not a version-{STATE_VERSION} state of step {step}")
    expected = values.pop("tensors_sha256", None)  # None: saved before states carried it
    if expected is not None and digest(tensors) != expected:
        older = [s for s in found if s < step]
        raise CheckpointError(
            f"trainer state {stem}.safetensors is corrupt: its tensors do not match the sha256 "
            f"in {stem}.json; "
            + (f"delete both files to resume from step {older[-1]}, or " if older else "")
            + "train afresh with train.resume=false"
        )
    return TrainState(step, tensors, values)
