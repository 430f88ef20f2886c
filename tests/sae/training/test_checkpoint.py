"""Trainer states (sae/training/checkpoint.py) and what fit does with them: exact resume, also
after a SIGKILL; the NaN guard keeps the last good state; fit_many equals separate fits."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.activations.synthetic import sparse_batches, unit_rows
from sae.models.config import DEFAULT_LR, DEFAULT_LR_DECAY
from sae.models.registry import build_sae
from sae.training import checkpoint
from sae.training.checkpoint import CheckpointError
from sae.training.fit import FitConfig, fit, fit_many
from tests.sae.activations.test_loader import make_cache

D, D_SAE, B, STEPS = 32, 64, 256, 30
HP = {
    "relu": {"l1_coeff": 1.0},
    "topk": {"k": 4, "dead_tokens": 1024},  # AuxK is on from step 4: its state matters
    "batchtopk": {"k": 4, "dead_tokens": 1024},
    "jumprelu": {"l1_coeff": 1.0},
}


def stream(skip: int = 0):
    return itertools.islice(sparse_batches(unit_rows(96, D, seed=1000), B, active=3), skip, None)


def cfg(**kw) -> FitConfig:
    base = dict(tokens=STEPS * B, batch_size=B, lr=3e-3, log_every=1, checkpoint_every=5)
    return FitConfig(**(base | kw))


def losses(logs: list[tuple[int, dict]]) -> dict[int, dict]:
    """Step -> metrics without the wall-clock rate."""
    return {s: {k: v for k, v in m.items() if k != "tokens_per_s"} for s, m in logs}


@pytest.mark.parametrize(
    ("arch", "target_l0"), [("relu", 6.0), ("topk", None), ("batchtopk", None), ("jumprelu", 6.0)]
)
def test_resume_continues_the_same_run_bit_for_bit(
    tmp_path: Path, arch: str, target_l0: float | None
) -> None:
    c, hp = cfg(), HP[arch] | ({"target_l0": target_l0} if target_l0 else {})
    whole: list = []
    sae = fit(build_sae(arch, D, D_SAE, seed=0, **hp), stream(), c,
              lambda s, m: whole.append((s, m)), checkpoint=tmp_path)  # fmt: skip
    assert checkpoint.steps(tmp_path) == [20, 25]  # the newest two of 5, 10, …, 25
    state = checkpoint.load(tmp_path)
    assert state is not None and state.step == 25 and state.loader is None
    assert {"adam.W_enc.exp_avg", "adam.W_dec.exp_avg_sq", "rng.cpu"} <= set(state.tensors)

    rest: list = []
    resumed = fit(build_sae(arch, D, D_SAE, seed=7, **hp), stream(skip=25), c,
                  lambda s, m: rest.append((s, m)), checkpoint=tmp_path, resume=state)  # fmt: skip
    assert [s for s, _ in rest] == [26, 27, 28, 29, 30]
    assert losses(rest) == {s: m for s, m in losses(whole).items() if s > 25}
    for name, value in sae.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_resume_refuses_another_runs_state(tmp_path: Path) -> None:
    fit(build_sae("relu", D, D_SAE, seed=0), stream(), cfg(), checkpoint=tmp_path)
    state = checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"step 25 was saved with fit=.*'lr': 0.003"):
        fit(build_sae("relu", D, D_SAE), stream(), cfg(lr=1e-3, checkpoint_every=0), resume=state)
    with pytest.raises(CheckpointError, match="saved with sae="):
        fit(build_sae("relu", D, D_SAE, l1_coeff=5.0), stream(), cfg(), resume=state,
            checkpoint=tmp_path)  # fmt: skip


def test_resume_refuses_a_state_trained_at_another_default_lr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.lr None means the arch's default (`DEFAULT_LR`): a state saved under one default
    does not resume under another (jumprelu's moved 1e-3 -> 1e-2 on 2026-12-06)."""
    fit(build_sae("relu", D, D_SAE, seed=0), stream(), cfg(lr=None), checkpoint=tmp_path)
    state = checkpoint.load(tmp_path)
    assert state is not None and state.values["peak_lr"] == DEFAULT_LR["relu"]
    monkeypatch.setitem(DEFAULT_LR, "relu", 1e-2)
    with pytest.raises(CheckpointError, match=r"saved with peak_lr=0.003 but this run has 0.01"):
        fit(build_sae("relu", D, D_SAE), stream(skip=25), cfg(lr=None), resume=state)


def test_resume_under_the_archs_lr_decay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.lr_decay_frac None is recorded as the arch's value (`DEFAULT_LR_DECAY`): a state
    saved then resumes under an explicit equal value (as states from before None, saved at
    0.2, resume relu runs) and not once the default has moved."""
    fit(build_sae("topk", D, D_SAE, seed=0, k=4), stream(), cfg(), checkpoint=tmp_path)
    state = checkpoint.load(tmp_path)
    assert state is not None and state.values["fit"]["lr_decay_frac"] == 0.3
    fit(build_sae("topk", D, D_SAE, k=4), stream(skip=25), cfg(lr_decay_frac=0.3), resume=state)
    monkeypatch.setitem(DEFAULT_LR_DECAY, "topk", 0.2)
    with pytest.raises(CheckpointError, match=r"lr_decay_frac': 0.3.*but this run has"):
        fit(build_sae("topk", D, D_SAE, k=4), stream(skip=25), cfg(), resume=state)


@pytest.mark.parametrize(("arch", "target_l0"), [("relu", 6.0), ("topk", None)])
def test_a_state_from_before_the_stiffness_and_none_decay_resumes(
    tmp_path: Path, arch: str, target_l0: float | None
) -> None:
    """A trainer state saved before 2026-12-07 has no l0_stiffness fields and lr_decay_frac
    0.2: it resumes a relu run (target or not: κ does nothing there) under today's defaults;
    topk's default decay has moved to 0.3, so its old state resumes only at 0.2."""
    hp = HP[arch] | ({"target_l0": target_l0} if target_l0 else {})
    fit(build_sae(arch, D, D_SAE, seed=0, **hp), stream(), cfg(lr_decay_frac=0.2),
        checkpoint=tmp_path)  # fmt: skip
    state = checkpoint.load(tmp_path)
    assert state is not None
    for name in ("l0_stiffness", "l0_stiffness_from"):
        del state.values["fit"][name]  # as written before the fields
    if arch == "relu":
        fit(build_sae(arch, D, D_SAE, **hp), stream(skip=25), cfg(), resume=state)
    else:
        with pytest.raises(CheckpointError, match=r"'lr_decay_frac': 0.2"):
            fit(build_sae(arch, D, D_SAE, **hp), stream(skip=25), cfg(), resume=state)
        fit(build_sae(arch, D, D_SAE, **hp), stream(skip=25), cfg(lr_decay_frac=0.2), resume=state)


def test_a_state_from_before_unit_decoder_resumes_only_with_unit_rows(tmp_path: Path) -> None:
    """A topk trainer state saved before `sae.unit_decoder` (rows held at norm 1 then) has no
    such key: it resumes at unit_decoder true, the run it was, and not at today's false."""
    hp = HP["topk"] | {"unit_decoder": True}
    fit(build_sae("topk", D, D_SAE, seed=0, **hp), stream(), cfg(), checkpoint=tmp_path)
    state = checkpoint.load(tmp_path)
    assert state is not None and state.values["sae"]["unit_decoder"] is True
    del state.values["sae"]["unit_decoder"]  # as written before the field
    with pytest.raises(CheckpointError, match=r"'unit_decoder': False"):
        fit(build_sae("topk", D, D_SAE, **HP["topk"]), stream(skip=25), cfg(), resume=state)
    sae = fit(build_sae("topk", D, D_SAE, **hp), stream(skip=25), cfg(), resume=state)
    norms = sae.W_dec.norm(dim=-1)  # 1/s each: the input scale s is folded in at the end
    torch.testing.assert_close(norms, norms[:1].expand(D_SAE))


def test_unreadable_or_missing_state(tmp_path: Path) -> None:
    assert checkpoint.load(tmp_path / "none") is None
    fit(build_sae("relu", D, D_SAE, seed=0), stream(), cfg(), checkpoint=tmp_path)
    with pytest.raises(CheckpointError, match=r"no trainer state for step 5 .*\[20, 25\]"):
        checkpoint.load(tmp_path, 5)
    weights = tmp_path / "step-00000025.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step-00000025.* is unreadable"):
        checkpoint.load(tmp_path)


def flip_last_byte(path: Path) -> None:
    """One bit of the last tensor's data changed: the file still parses, a weight moves."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_state_whose_tensors_changed_is_named_with_the_step_before(tmp_path: Path) -> None:
    fit(build_sae("relu", D, D_SAE, seed=0), stream(), cfg(), checkpoint=tmp_path)
    flip_last_byte(tmp_path / "step-00000025.safetensors")
    with pytest.raises(CheckpointError, match=r"step-00000025.safetensors is corrupt: its tensors "
                       r"do not match the sha256 .* to resume from step 20"):  # fmt: skip
        checkpoint.load(tmp_path)
    assert checkpoint.load(tmp_path, 20).step == 20  # the older state is whole


def test_nan_stops_the_run_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    def poisoned():
        for step, x in enumerate(stream(), start=1):
            if step == 12:
                x[3, 2] = float("nan")
            yield x

    with pytest.raises(FloatingPointError, match=r"step 12.*last good state \(step 10\)"):
        fit(build_sae("relu", D, D_SAE, seed=0), poisoned(), cfg(), checkpoint=tmp_path)
    assert checkpoint.steps(tmp_path) == [5, 10]
    state = checkpoint.load(tmp_path)
    assert state is not None and all(torch.isfinite(t).all() for t in state.tensors.values())


def test_fit_many_equals_separate_fits() -> None:
    archs = ["relu", "topk", "batchtopk"]
    c = cfg(checkpoint_every=0)
    alone, logs_alone = [], []
    for arch in archs:
        logs: list = []
        alone.append(fit(build_sae(arch, D, D_SAE, seed=0, **HP[arch]), stream(), c,
                         lambda s, m, logs=logs: logs.append((s, m))))  # fmt: skip
        logs_alone.append(losses(logs))
    logs_many: list[list] = [[] for _ in archs]
    many = fit_many(
        [build_sae(a, D, D_SAE, seed=0, **HP[a]) for a in archs],
        stream(),
        [c] * len(archs),
        [lambda s, m, logs=logs: logs.append((s, m)) for logs in logs_many],
    )
    for a, b, la, lb in zip(alone, many, logs_alone, logs_many, strict=True):
        assert la == losses(lb)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_fit_many_rejects_configs_that_cannot_share_batches() -> None:
    saes = [build_sae("relu", D, D_SAE), build_sae("relu", D, D_SAE)]
    with pytest.raises(ValueError, match="same batch_size"):
        fit_many(saes, stream(), [cfg(checkpoint_every=0), cfg(checkpoint_every=0, batch_size=7)])
    # checkpoint_every (default 100) writes states only where fit is given a directory
    fit(saes[0], stream(), cfg())


# --- a real kill -------------------------------------------------------------------------------

# The child trains a relu SAE from a Parquet cache through the ActivationLoader, logging every
# step's loss to a file; a sleep per step gives the parent time to kill it mid-run. With
# "resume" it continues from the newest trainer state, loader position included.
CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from sae.training import checkpoint
from sae.activations.loader import ActivationLoader
from sae.models.registry import build_sae
from sae.training.fit import FitConfig, fit

cache, state_dir, log, mode, delay = sys.argv[1:6]
torch.set_num_threads(1)
state = checkpoint.load(Path(state_dir)) if mode == "resume" else None
loader = ActivationLoader(Path(cache), "blocks.0.resid_post", 32, buffer_rows=128, seed=3,
                          state=state.loader if state else None)
cfg = FitConfig(tokens=60 * 32, batch_size=32, lr=3e-3, log_every=1, checkpoint_every=4)
with open(log, "a") as f:
    def on_step(step, m):
        f.write(json.dumps([step, m["loss"], m["l0"]]) + "\n")
        f.flush()
        time.sleep(float(delay))
    fit(build_sae("relu", 8, 32, seed=0), loader, cfg, on_step,
        checkpoint=Path(state_dir), resume=state)
"""


def _child(cache: Path, state: Path, log: Path, mode: str, delay: float) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[3])}
    args = [sys.executable, "-c", CHILD, str(cache), str(state), str(log), mode, str(delay)]
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)


def _logged(log: Path) -> list[list]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_killed_run_resumes_with_the_same_losses(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    make_cache(tmp_path / "cache", n_shards=7)  # 7 shards × 64 rows of d 8; several epochs
    ref = _child(tmp_path / "cache", tmp_path / "ref", tmp_path / "ref.jsonl", "fresh", 0)
    assert ref.wait(120) == 0, ref.stderr.read()
    reference = {step: rest for step, *rest in _logged(tmp_path / "ref.jsonl")}
    assert sorted(reference) == list(range(1, 61))

    kill_at = random.Random().randint(6, 50)  # "random": the message names it if this fails
    run = _child(tmp_path / "cache", tmp_path / "state", tmp_path / "run.jsonl", "fresh", 0.05)
    deadline = time.monotonic() + 60
    while len(_logged(tmp_path / "run.jsonl")) < kill_at and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(30) == -signal.SIGKILL
    killed = _logged(tmp_path / "run.jsonl")
    assert len(killed) < 60, f"the run finished before the kill at step {kill_at}"
    resumed = _child(tmp_path / "cache", tmp_path / "state", tmp_path / "run.jsonl", "resume", 0)
    assert resumed.wait(120) == 0, resumed.stderr.read()

    logged = _logged(tmp_path / "run.jsonl")  # steps after the last state come twice
    assert {step for step, *_ in logged} == set(reference), f"killed at step {kill_at}"
    for step, *rest in logged:
        assert rest == reference[step], f"step {step} differs (killed at step {kill_at})"
