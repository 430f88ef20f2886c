"""The bad input catalogue (TESTING.md): what a researcher mistypes, points at or breaks, and
what saeflow answers. Each case asserts (a) an error that names the bad value, file or key (and
what would be valid), (b) a non-zero exit code from the CLI (2: bad config, before any work;
1: anything else), and (c) that nothing already done is lost: the `kept` fixture compares the
shared study's caches, checkpoint, model and MLflow run before and after every case.

Cases run in-process through `flows.cli.main` (the same code as the `saeflow` command) but
for a file-size limit and an unreachable Prefect server, which need a child process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flows.cli import main
from tests.conftest import TINY

ROOT = Path(__file__).parents[2]
EXPERIMENT = "tracking.experiment=bad-input"  # keeps these runs out of the study's experiment


# --- helpers -------------------------------------------------------------------------------
def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def said(err: str) -> str:
    """The CLI's own last word: the text after the last 'saeflow: ' on stderr."""
    assert "saeflow: " in err, f"no 'saeflow: ...' error line in:\n{err[-3000:]}"
    return err[err.rindex("saeflow: ") :]


def hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_cache(dir: Path, acts: torch.Tensor, hook: str, shard_seqs: int) -> Path:
    """A complete cache in the DESIGN §4 layout holding `acts` (S, T, d) at `hook`: what a
    cache made elsewhere looks like (`saeflow train cache.dir=...`)."""
    from sae.activations.cache import Manifest, write_shard

    dir.mkdir(parents=True)
    s, t, d = acts.shape
    shards = []
    for i, first in enumerate(range(0, s, shard_seqs)):
        a = acts[first : first + shard_seqs]  # (S_i, T, d)
        flags = torch.zeros(a.shape[:2], dtype=torch.bool)
        ids = torch.zeros(a.shape[:2], dtype=torch.int64)
        shards.append(write_shard(dir, i, first, ids, flags, {hook: a}, "bf16"))
    Manifest(
        key=hashlib.sha256(str(dir).encode()).hexdigest()[:16],  # its own SAE run keys
        key_inputs={"made_by": "tests/faults/test_bad_input.py"},
        hooks={hook: d},
        dtype="bf16",
        context_length=t,
        special_token_ids=[],
        shards=shards,
        complete=True,
        n_planned=s,
        shard_seqs=shard_seqs,
    ).save(dir)
    return dir


def make_sae(home: Path, *, d_in: int = 32, hook: str = "blocks.0.resid_post") -> Path:
    """A finished MLflow run with an SAE checkpoint, as `saeflow train` leaves it."""
    from sae.models.registry import build_sae
    from tasks.support import tracking

    experiment = tracking.ensure_experiment("bad-input")
    run_id = tracking.start_run(experiment, "bad-input", tags={"saeflow.stage": "train"})
    tracking.end_run(run_id, "FINISHED")
    dir = home / "saes" / run_id
    meta = {"hook": hook, "run_id": run_id, "model": "tiny-gpt2"}
    build_sae("relu", d_in, 64, seed=0).save(dir, meta=meta)
    return dir


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str]]:
    """`saeflow ARGS...` in-process: (exit code, stderr)."""

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().err

    return run


@pytest.fixture(autouse=True)
def kept(study: dict[str, Any], saeflow_home: Path) -> Iterator[None]:
    """(c) for every case: the shared study's finished caches, checkpoint and model are
    byte-identical afterwards, and its MLflow run still FINISHED with the same metrics."""
    from tasks.support import tracking

    done = [study["train_cache"]["dir"], study["eval_cache"]["dir"]]
    done += [study["trained"]["checkpoint"], study["model"]["path"]]
    before = {d: hashes(Path(d)) for d in done}
    run_id = study["trained"]["run_id"]
    run = tracking.client().get_run(run_id)
    yield
    for d, files in before.items():
        now = hashes(Path(d))
        lost = sorted(f for f, h in files.items() if now.get(f) != h)
        assert not lost, f"changed or lost in {d}: {lost}"
    assert (saeflow_home / "mlflow" / "mlflow.db").is_file()
    after = tracking.client().get_run(run_id)
    assert after.info.status == run.info.status == "FINISHED"
    assert after.data.metrics == run.data.metrics


@pytest.fixture(autouse=True)
def no_retry_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache tasks retry after 5-10 s; the errors are the same without the wait."""
    from flows import pipeline

    monkeypatch.setattr(pipeline.plan_cache, "retry_delay_seconds", 0)
    monkeypatch.setattr(pipeline.cache_shard, "retry_delay_seconds", 0)


@pytest.fixture
def external(study: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the study's finished train cache, to break on purpose."""
    return Path(shutil.copytree(study["train_cache"]["dir"], tmp_path / "cache"))


# --- (1) overrides: exit 2, before any work ------------------------------------------------
BAD_OVERRIDES = [  # (id, overrides, what the error must say)
    ("unknown-key", ["sae.dsae=3"], ["unknown key 'sae.dsae' (did you mean 'sae.d_sae'?)",
                                     "valid keys of sae: sae.arch, sae.d_sae"]),
    ("unknown-section", ["trian.lr=0.1"], ["unknown key 'trian' (did you mean 'train'?)"]),
    ("unknown-option", ["sae=topkk"],
     ["Could not find 'sae/topkk'", "options in 'sae': batchtopk jumprelu matryoshka relu topk"]),
    ("wrong-type-int", ["sae.d_sae=abc"], ["sae.d_sae=abc", "could not be converted to Integer"]),
    ("wrong-type-float", ["train.lr=fast"], ["train.lr=fast", "could not be converted to Float"]),
    ("topk-k-zero", ["sae=topk", "sae.k=0"], ["sae.k must be > 0, got 0"]),
    ("k-above-d_sae", ["sae=topk", "sae.k=128"], ["sae.k=128 must be <= sae.d_sae=64"]),
    ("k-train-factor-below-1", ["sae=topk", "sae.k_train_factor=0.5"],
     ["sae.k_train_factor must be a finite number >= 1, got 0.5"]),
    ("k-train-past-d_sae", ["sae=topk", "sae.k=40", "sae.k_train_factor=2"],
     ["sae.k_train_factor=2 trains round(2·k) = 80 latents per token, more than sae.d_sae=64"]),
    ("l0-stiffness-from-past-1", ["sae=jumprelu", "sae.target_l0=8", "train.l0_stiffness_from=2"],
     ["train.l0_stiffness_from must be in [0, 1], got 2.0"]),
    ("d_sae-zero", ["sae.d_sae=0"], ["sae.d_sae must be > 0, got 0"]),
    ("d_sae-negative", ["sae.d_sae=-3"], ["sae.d_sae must be > 0, got -3"]),
    ("train-tokens-zero", ["train.tokens=0"], ["train.tokens must be > 0, got 0"]),
    ("batch-size-negative", ["train.batch_size=-512"], ["train.batch_size must be > 0, got -512"]),
    ("cache-tokens-zero", ["cache.tokens=0"], ["cache.tokens must be > 0, got 0"]),
    ("eval-batch-zero", ["eval.batch_size=0"], ["eval.batch_size must be > 0, got 0"]),
    ("context-zero", ["data.context_length=0"], ["data.context_length must be > 0, got 0"]),
    ("context-past-model", ["data.context_length=65"], ["data.context_length=65 exceeds",
                                                          "model.n_ctx=64"]),
    ("layer-past-model", ["hook=blocks.2.resid_post"], ["'blocks.2.resid_post' does not exist",
                                                        "has 2 blocks (0..1)"]),
    ("hook-kind", ["hook=blocks.0.resid_mid"], ["'blocks.0.resid_mid' is not a hook point",
                                               "resid_pre|attn_out|mlp_out|resid_post"]),
    ("extra-hook", ["cache.hooks=[blocks.9.mlp_out]"], ["cache.hooks='blocks.9.mlp_out' does not"]),
    ("bad-choice", ["train.device=tpu"],
     ["train.device='tpu' is not one of auto, cpu, cuda, cuda:N"]),
    ("files-without-paths", ["data=files"], ["data.paths is required when data.source=files"]),
    ("hub-without-path", ["model.source=hub"], ["model.path is required when model.source=hub"]),
    ("tracking-scheme", ["tracking.uri=htp://127.0.0.1:5000"], ["unknown scheme 'htp'",
                                                               "tracking.uri='htp://", "http, "]),
]  # fmt: skip


def _work(home: Path) -> list[str]:
    """What the stages have made: caches and SAE checkpoints."""
    return sorted(f"{d}/{p.name}" for d in ("activations", "saes") for p in (home / d).iterdir())


@pytest.mark.parametrize(
    ("overrides", "expect"), [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES]
)
def test_bad_override_is_named_before_any_work(
    cli, saeflow_home: Path, overrides: list[str], expect: list[str]
) -> None:
    work = _work(saeflow_home)
    code, err = cli("run", *TINY, *overrides)
    assert code == 2, err[-2000:]
    assert said(err).startswith("saeflow: bad config: ")
    for text in expect:
        assert text in said(err), said(err)
    assert _work(saeflow_home) == work


def test_force_of_a_stage_that_does_not_exist(cli) -> None:
    code, err = cli("run", "--force", "trian", *TINY)
    assert code == 2
    valid = "['cache', 'train', 'evaluate', 'features', 'all']"
    assert f"bad config: force: unknown stage(s) ['trian']; choose from {valid}" in said(err)


def test_sweep_with_one_bad_job_runs_none(cli, saeflow_home: Path) -> None:
    work = _work(saeflow_home)
    code, err = cli("run", "-m", *TINY, "sae.d_sae=32,-1", EXPERIMENT)
    assert code == 2
    assert "sae.d_sae must be > 0, got -1" in said(err)
    assert _work(saeflow_home) == work  # the good job did not start either


@pytest.mark.parametrize(
    ("grid", "expect"),
    [
        (["scaling.d_sae=[16,32]", "scaling.tokens=[8192]"], "spans 2 compute budget(s)"),
        (["scaling.lr=[]"], "scaling.lr must be a non-empty list of values > 0"),
        (["scaling.d_sae=[16,16,32]"], "scaling.d_sae has repeated values: [16, 16, 32]"),
        (["scaling.budget_bin=1"], "scaling.budget_bin must be > 1, got 1.0"),
        (["sae=topk", "sae.k=24", "scaling.d_sae=[16,32,64]"], "sae.k=24 must be <= sae.d_sae=16"),
    ],
    ids=["too-few-budgets", "no-lr", "repeated-size", "bin-of-one", "k-above-a-size"],
)
def test_scaling_grid_that_cannot_fit_is_refused_before_any_work(
    cli, saeflow_home: Path, grid: list[str], expect: str
) -> None:
    work = _work(saeflow_home)
    code, err = cli("scaling", *TINY, *grid, EXPERIMENT)
    assert code == 2, err[-2000:]
    assert said(err).startswith("saeflow: bad config: ") and expect in said(err), said(err)
    assert _work(saeflow_home) == work


# --- (2) the model and its hooks -----------------------------------------------------------
def test_hook_past_a_hub_models_last_block(cli, study: dict[str, Any]) -> None:
    hub = ["model.source=hub", f"model.path={study['model']['path']}"]
    t0 = time.monotonic()
    code, err = cli("cache", *TINY, *hub, "hook=blocks.5.resid_post")
    assert code == 1
    assert "hook='blocks.5.resid_post' does not exist" in said(err)
    assert "has 2 blocks (0..1)" in said(err)
    assert time.monotonic() - t0 < 20  # before any caching


def test_local_model_dir_that_does_not_exist(cli, tmp_path: Path) -> None:
    code, err = cli("cache", *TINY, "model.source=hub", f"model.path={tmp_path}/no-model")
    assert code == 1
    assert f"model.path='{tmp_path}/no-model' is not a directory" in said(err)


# --- (3) activation caches -----------------------------------------------------------------
def test_cache_dir_without_manifest(cli, tmp_path: Path) -> None:
    code, err = cli("train", *TINY, f"cache.dir={tmp_path}", EXPERIMENT)
    assert code == 1
    assert f"no activation cache at {tmp_path}: manifest.json is missing" in said(err)


def test_manifest_that_is_not_json(cli, external: Path) -> None:
    (external / "manifest.json").write_text('{"key": "abc", "hooks": ')
    code, err = cli("train", *TINY, f"cache.dir={external}", EXPERIMENT)
    assert code == 1
    assert f"{external}/manifest.json is corrupt" in said(err)


def test_manifest_of_another_format_version(cli, external: Path) -> None:
    manifest = json.loads((external / "manifest.json").read_text())
    (external / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    code, err = cli("train", *TINY, f"cache.dir={external}", EXPERIMENT)
    assert code == 1
    assert "format_version 99, this saeflow reads 1" in said(err)


def test_cache_without_the_configured_hook(cli, external: Path) -> None:
    code, err = cli("train", *TINY, "hook=blocks.1.resid_post", f"cache.dir={external}", EXPERIMENT)
    assert code == 1
    assert "hook 'blocks.1.resid_post' is not in this cache" in said(err)
    assert "it holds ['blocks.0.resid_post']" in said(err)


def test_external_cache_at_a_hook_the_default_model_lacks_trains(cli, tmp_path: Path) -> None:
    """An external cache needs no model: its hook is checked against the cache, not against
    the builtin model's depth (tiny has 2 blocks; this cache is at block 6)."""
    acts = torch.randn(64, 16, 32, generator=torch.Generator().manual_seed(0))
    cache = write_cache(tmp_path / "c6", acts, "blocks.6.resid_post", 16)
    code, err = cli("train", *TINY, "hook=blocks.6.resid_post", f"cache.dir={cache}", EXPERIMENT)
    assert code == 0, err[-3000:]


def _damage(shard: Path, how: str) -> None:
    if how == "bit-flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        shard.unlink()


@pytest.mark.parametrize("how", ["bit-flip", "truncated", "deleted"])
def test_damaged_external_cache_is_named_and_left_alone(
    cli, external: Path, saeflow_home: Path, how: str
) -> None:
    _damage(external / "shard-00001.parquet", how)
    broken = hashes(external)
    saes = sorted((saeflow_home / "saes").iterdir())
    code, err = cli("train", *TINY, f"cache.dir={external}", "train.seed=11", EXPERIMENT)
    assert code == 1
    assert f"cache {external}: shard(s) shard-00001.parquet are missing or fail" in said(err)
    assert "cache.verify=false" in said(err)
    assert hashes(external) == broken  # an external cache is never written
    assert sorted((saeflow_home / "saes").iterdir()) == saes  # refused before training


@pytest.fixture(scope="module")
def own_cache(study: dict[str, Any]) -> dict[str, Any]:
    """A cache built for these tests under $SAEFLOW_HOME (not the study's: it is broken here)."""
    from flows.pipeline import cache_flow

    return cache_flow([*TINY, "cache.tokens=8192"])["train"]


@pytest.mark.parametrize("how", ["bit-flip", "truncated", "deleted"])
def test_damaged_cache_is_named_then_repaired(cli, own_cache: dict[str, Any], how: str) -> None:
    dir = Path(own_cache["dir"])
    good = hashes(dir)
    _damage(dir / "shard-00001.parquet", how)
    code, err = cli("cache", *TINY, "cache.tokens=8192")
    assert code == 1
    assert f"cache {dir}: shard(s) shard-00001.parquet fail their checksum" in said(err)
    assert "re-run with cache.repair=true" in said(err)
    assert hashes(dir)["shard-00000.parquet"] == good["shard-00000.parquet"]
    code, err = cli("cache", *TINY, "cache.tokens=8192", "cache.repair=true")
    assert code == 0, err[-2000:]
    assert hashes(dir)["shard-00001.parquet"] == good["shard-00001.parquet"]


def test_manifest_d_in_unlike_its_shards(cli, external: Path) -> None:
    manifest = json.loads((external / "manifest.json").read_text())
    manifest["hooks"] = {"blocks.0.resid_post": 48}  # the shards hold d_in = 32
    (external / "manifest.json").write_text(json.dumps(manifest))
    code, err = cli("train", *TINY, f"cache.dir={external}", "train.seed=12", EXPERIMENT)
    assert code == 1
    assert "column 'blocks.0.resid_post' is fixed_size_binary[64], expected" in said(err)
    assert "fixed_size_binary(96) for d_in=48" in said(err)


def test_manifest_dtype_unlike_its_shards(cli, external: Path) -> None:
    manifest = json.loads((external / "manifest.json").read_text())
    (external / "manifest.json").write_text(json.dumps(manifest | {"dtype": "fp16"}))
    code, err = cli("train", *TINY, f"cache.dir={external}", "train.seed=13", EXPERIMENT)
    assert code == 1
    assert "shard-0000" in said(err)
    assert "holds bf16 activations but the manifest says dtype='fp16'" in said(err)


def test_cache_smaller_than_one_batch(cli) -> None:
    code, err = cli("train", *TINY, "cache.tokens=256", EXPERIMENT)
    assert code == 1
    assert "holds 256 tokens, fewer than one batch (train.batch_size=512)" in said(err)


# --- (4) NaN/inf activations: training stops naming the step, keeps the last good state ----
def _poisoned_run(cli, tmp_path: Path, value: float, seed: int) -> tuple[int, str, list[str]]:
    """Train on a 4-shard cache whose last shard (in the loader's order) is all `value`;
    states every 4 steps, 4 steps per shard: good states at 4, 8, 12, the bad batch at 13."""
    from sae.activations.loader import plan

    torch.manual_seed(seed)
    acts = torch.randn(64, 64, 32)  # 64 sequences of 64 tokens, d_in 32; 16 per shard
    last = plan(seed, 0, (1024,) * 4, 1024)[-1][0]
    acts[16 * last : 16 * (last + 1)] = value
    cache = write_cache(tmp_path / "cache", acts, "blocks.0.resid_post", 16)
    args = [f"cache.dir={cache}", f"train.seed={seed}", "train.tokens=4096"]
    args += ["train.batch_size=256", "train.shuffle_rows=1024", "train.checkpoint_every=4"]
    return (*cli("train", *TINY, *args, EXPERIMENT), args)


@pytest.mark.parametrize(
    ("value", "seed"), [(float("nan"), 21), (float("inf"), 22)], ids=["nan", "inf"]
)
def test_non_finite_activations_stop_training_at_the_step(
    cli, tmp_path: Path, value: float, seed: int
) -> None:
    from sae.training.checkpoint import load

    code, err, _ = _poisoned_run(cli, tmp_path, value, seed)
    assert code == 1
    assert "FloatingPointError: loss became NaN/inf at step 13" in said(err)
    assert "the last good state (step 12) is in " in said(err)
    state_dir = Path(said(err).rsplit(" is in ", 1)[1].strip())
    state = load(state_dir)
    assert state is not None and state.step == 12
    assert all(bool(torch.isfinite(t.float()).all()) for t in state.tensors.values())
    assert not (state_dir.parent / "sae.safetensors").exists()  # no final weights from NaNs


def test_trainer_state_of_another_config(cli, tmp_path: Path) -> None:
    code, err, args = _poisoned_run(cli, tmp_path, float("nan"), seed=23)
    assert code == 1
    state_dir = Path(said(err).rsplit(" is in ", 1)[1].strip())
    step = state_dir / "step-00000012.json"
    values = json.loads(step.read_text())
    values["sae"]["d_sae"] = 128  # as if another config's run had left it there
    step.write_text(json.dumps(values))
    saved = hashes(state_dir)
    code, err = cli("train", *TINY, *args, EXPERIMENT)  # resumes that run's newest state
    assert code == 1
    assert "CheckpointError: the trainer state of step 12 was saved with sae=" in said(err)
    assert "'d_sae': 128" in said(err) and "train.resume=false" in said(err)
    assert hashes(state_dir) == saved


# --- (5) trained SAEs and their checkpoints ------------------------------------------------
def test_eval_run_id_that_does_not_exist(cli) -> None:
    code, err = cli("evaluate", *TINY, "eval.run_id=0123456789abcdef")
    assert code == 1
    assert "eval.run_id='0123456789abcdef': no SAE was trained under this run id" in said(err)
    assert "saeflow sql" in said(err)


def test_corrupt_sae_weights(cli, saeflow_home: Path) -> None:
    sae = make_sae(saeflow_home)
    weights = sae / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, err = cli("evaluate", *TINY, f"eval.run_id={sae.name}")
    assert code == 1
    assert f"{weights} is not a readable safetensors file" in said(err)


def test_sae_weights_with_a_flipped_bit(cli, saeflow_home: Path) -> None:
    from tests.sae.training.test_checkpoint import flip_last_byte

    sae = make_sae(saeflow_home)
    flip_last_byte(sae / "sae.safetensors")  # still a valid file: only the sha256 tells
    code, err = cli("evaluate", *TINY, f"eval.run_id={sae.name}")
    assert code == 1
    assert f"{sae / 'sae.safetensors'} is corrupt: its tensors do not match the sha256" in said(err)


def test_cfg_json_that_is_not_json(cli, saeflow_home: Path) -> None:
    sae = make_sae(saeflow_home)
    (sae / "cfg.json").write_text('{"arch": "relu", ')
    code, err = cli("evaluate", *TINY, f"eval.run_id={sae.name}")
    assert code == 1
    assert f"{sae / 'cfg.json'} is not valid JSON" in said(err)


def test_weights_of_another_architecture(cli, saeflow_home: Path) -> None:
    sae = make_sae(saeflow_home)  # relu: the same tensor names and shapes as topk
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("l1_coeff", "init_norm", "centre")}
    (sae / "cfg.json").write_text(json.dumps(cfg | {"arch": "topk", "k": 4}))
    code, err = cli("evaluate", *TINY, f"eval.run_id={sae.name}")
    assert code == 1
    assert "the weights are a relu SAE's, the config says arch='topk'" in said(err)


def test_sae_trained_at_another_hook(cli, saeflow_home: Path) -> None:
    sae = make_sae(saeflow_home, hook="blocks.1.resid_post")
    code, err = cli("evaluate", *TINY, f"eval.run_id={sae.name}")
    assert code == 1
    assert "trained at hook 'blocks.1.resid_post', not hook='blocks.0.resid_post'" in said(err)
    assert "pass hook=blocks.1.resid_post" in said(err)


def test_sae_of_another_width(cli, saeflow_home: Path) -> None:
    sae = make_sae(saeflow_home, d_in=48)  # e.g. trained on another model's cache
    code, err = cli("evaluate", *TINY, f"eval.run_id={sae.name}")
    assert code == 1
    assert f"the SAE of run {sae.name} takes d_in=48, but the activations at " in said(err)
    assert "blocks.0.resid_post have d_in=32" in said(err)


# --- (6) text data -------------------------------------------------------------------------
def _data(path: Path) -> list[str]:
    return ["data=files", f"data.paths=[{path}]", EXPERIMENT]


def test_empty_dataset(cli, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    code, err = cli("cache", *TINY, *_data(tmp_path / "empty.txt"))
    assert code == 1
    assert "the data source produced no full context of 64 tokens" in said(err)
    assert "smaller data.context_length" in said(err)


def test_dataset_shorter_than_one_context(cli, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("def f():\n    return 1\n")
    code, err = cli("cache", *TINY, *_data(tmp_path / "short.txt"))
    assert code == 1
    assert "the data source produced no full context of 64 tokens" in said(err)


def test_data_path_that_does_not_exist(cli, tmp_path: Path) -> None:
    code, err = cli("cache", *TINY, *_data(tmp_path / "nope.txt"))
    assert code == 1
    assert f"text file or directory not found: '{tmp_path}/nope.txt'" in said(err)


def test_data_file_of_an_unsupported_kind(cli, tmp_path: Path) -> None:
    (tmp_path / "text.csv").write_text("text\nhello\n")
    code, err = cli("cache", *TINY, *_data(tmp_path / "text.csv"))
    assert code == 1
    assert f"unsupported text file '{tmp_path}/text.csv'; valid suffixes: " in said(err)


def test_jsonl_without_a_text_field(cli, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"body": "x = 1"}\n' * 50)
    code, err = cli("cache", *TINY, *_data(tmp_path / "docs.jsonl"))
    assert code == 1
    assert "expected a JSON object with a string 'text' field" in said(err)


def test_one_big_single_line_file_caches_both_splits(cli, tmp_path: Path) -> None:
    """A corpus of one 3 MB line used to end in "no full context" (its one document went to
    train, the eval split got nothing): long documents are now chunked and ~3% held out."""
    text = "".join(f"x{i} = f(x{i - 1}) + {i}; " for i in range(1, 150_000))  # one line
    (tmp_path / "one.txt").write_text(text)
    code, err = cli("cache", *TINY, *_data(tmp_path / "one.txt"))
    assert code == 0, err[-3000:]


def test_a_split_left_empty_says_which_and_why(cli, tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("def f(x):\n    return x\n" * 400)
    code, err = cli("cache", *TINY, *_data(tmp_path / "small.txt"), "data.chunk_chars=0")
    assert code == 1
    msg = said(err)
    assert "the data source produced no full context of 64 tokens" in msg
    assert "split got 0 characters from 0 of the 1 documents read" in msg
    assert "data.chunk_chars=0 characters are held out whole" in msg


def test_bad_bytes_and_binary_files_are_named_with_the_way_out(cli, tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1") * 30_000)  # chunked
    code, err = cli("cache", *TINY, *_data(tmp_path / "latin.txt"))
    assert code == 1
    assert f"'{tmp_path}/latin.txt' is not valid utf-8 at byte 3" in said(err)
    assert "data.errors=replace" in said(err) and "data.encoding" in said(err)
    code, err = cli("cache", *TINY, *_data(tmp_path / "latin.txt"), "data.encoding=latin-1")
    assert code == 0, err[-3000:]
    (tmp_path / "weights.txt").write_bytes(b"\x00\x01" * 100)
    code, err = cli("cache", *TINY, *_data(tmp_path / "weights.txt"))
    assert code == 1 and "is a binary file, not text (a NUL byte at byte 0)" in said(err)
    code, err = cli("cache", *TINY, *_data(tmp_path / "weights.txt"), "data.encoding=klingon")
    assert code == 2 and "data.encoding='klingon' is not a known codec" in err


def test_a_symlink_loop_is_named_as_one(cli, tmp_path: Path) -> None:
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    code, err = cli("cache", *TINY, *_data(tmp_path / "loop.txt"))
    assert code == 1 and f"'{tmp_path}/loop.txt' is a symlink loop" in said(err)


def test_a_data_directory_that_cannot_be_written_is_named_first(
    cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: 2 min of "attempt to write a readonly database" and a Prefect time-out. (Root
    writes through permission bits, so the test uses a place no one can create.)"""
    monkeypatch.setenv("SAEFLOW_HOME", "/proc/saeflow-home")
    code, err = cli("train", *TINY)
    assert code == 1
    assert "the data directory SAEFLOW_HOME=/proc/saeflow-home is not writable" in said(err)
    assert "point SAEFLOW_HOME at a writable directory" in said(err)


def test_a_damaged_mlflow_store_is_named_with_the_way_out(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").write_bytes(b"not a database\n" * 100)
    monkeypatch.setenv("SAEFLOW_HOME", str(tmp_path))
    for args in (["sql", "select 1"], ["train", *TINY]):
        code, err = cli(*args)
        assert code == 1
        assert f"the MLflow store {tmp_path}/mlflow/mlflow.db is not an SQLite database" in said(
            err
        )
        assert "move it aside to start a new store" in said(err)


def test_a_moved_data_directory_writes_only_inside_itself(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: MLflow keeps absolute artifact locations, so after `mv home home2` a run in home2
    wrote its feature table and report under home/mlflow/artifacts. (The evaluation runs in a
    process of its own, as after a move: MLflow keeps a run's artifact store per process.)"""
    from prefect.settings import PREFECT_API_URL

    from tasks.support import tracking

    old, new = tmp_path / "home", tmp_path / "home2"
    monkeypatch.setenv("SAEFLOW_HOME", str(old))
    code, err = cli("train", *TINY)
    assert code == 0, err[-2000:]
    shutil.move(old, new)
    monkeypatch.setenv("SAEFLOW_HOME", str(new))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "evaluate", *TINY],
        env=_child_env(PREFECT_API_URL=str(PREFECT_API_URL.value())),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not old.exists()  # nothing written where the directory used to be
    c = tracking.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    (run,) = [r for r in c.search_runs(exps) if "saeflow.run_key" in r.data.tags]
    assert run.info.artifact_uri == (new / "mlflow/artifacts").as_uri() + (
        f"/{run.info.run_id}/artifacts"
    )
    logged = new / "mlflow/artifacts" / run.info.run_id / "artifacts"
    assert (logged / "checkpoint").is_dir() and (logged / "features").is_dir()


# --- (7) the disk --------------------------------------------------------------------------
def test_disk_too_small_for_the_cache(cli, saeflow_home: Path) -> None:
    caches = sorted((saeflow_home / "activations").iterdir())
    code, err = cli("cache", *TINY, "cache.tokens=100000000000000")
    assert code == 1
    assert "not enough disk for cache" in said(err) and "lower cache.tokens" in said(err)
    assert sorted((saeflow_home / "activations").iterdir()) == caches  # refused before writing


def _file_size_limit(limit: int) -> Callable[[], None]:
    def set_limit() -> None:
        # Ignored, SIGXFSZ no longer kills the child: a write past the limit fails with EFBIG,
        # as one fails with ENOSPC on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def _child_env(**extra: str) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | extra


def test_full_disk_names_the_shard_and_a_rerun_finishes(cli, saeflow_home: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    job = [*TINY, "cache.tokens=12288"]  # shards of ~330 kB; the plan and tokens fit
    env = _child_env(PREFECT_API_URL=str(PREFECT_API_URL.value()))
    child = subprocess.run(
        [sys.executable, "-m", "flows.cli", "cache", *job],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(200_000),
    )
    assert child.returncode == 1, child.stderr[-3000:]
    assert f"saeflow: OSError: [Errno {errno.EFBIG}] cannot write shard " in child.stderr
    assert ".parquet: File too large; free space on that disk" in said(child.stderr)
    assert not list((saeflow_home / "activations").glob("*/.shard-*.tmp"))  # no half shards
    code, err = cli("cache", *job)  # room again: the same command finishes the cache
    assert code == 0, err[-2000:]


# --- (8) servers ---------------------------------------------------------------------------
def test_unreachable_mlflow_server_fails_fast(cli) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, err = cli("run", *TINY, "tracking=server", f"tracking.uri={uri}")
    assert code == 1
    assert f"ConnectionError: MLflow tracking server {uri} is unreachable" in said(err)
    assert "tracking=local" in said(err)
    assert time.monotonic() - t0 < 15  # MLflow's own retries would take minutes


def test_unreachable_mlflow_server_fails_a_served_flow_fast(study: dict[str, Any]) -> None:
    from flows.config import load
    from tasks.study import open_study

    uri = f"http://127.0.0.1:{free_port()}"
    cfg, _ = load([*TINY, "tracking=server", f"tracking.uri={uri}"])
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"MLflow tracking server {uri} is unreachable"):
        open_study.fn(cfg)  # one attempt; Prefect retries it thrice (~14 s in all)
    assert time.monotonic() - t0 < 5


def _run_with_prefect_at(url: str) -> str:
    """`saeflow run` in a child with PREFECT_API_URL=url: it must fail (exit 1) within 90 s
    (mostly imports, ~15 s here; no retries for minutes); its last word."""
    t0 = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *TINY, EXPERIMENT],
        env=_child_env(PREFECT_API_URL=url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 1, child.stderr[-3000:]
    assert time.monotonic() - t0 < 90
    return said(child.stderr)


def test_unreachable_prefect_server_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    assert f"Failed to reach API at {url}" in _run_with_prefect_at(url)


def test_a_prefect_server_that_never_answers_fails_fast() -> None:
    """A socket that accepts and never replies: Prefect's client waited silently (> 400 s)."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        said_ = _run_with_prefect_at(url)
    assert f"Failed to reach API at {url}: no answer within 10 s" in said_


def test_an_sae_too_large_for_memory_is_refused_with_the_numbers(cli, saeflow_home: Path) -> None:
    """`sae.d_sae` past the machine's memory used to allocate until the kernel killed it."""
    from tasks.support import tracking

    code, err = cli("train", *TINY, "sae.d_sae=400000000", EXPERIMENT)
    assert code == 1
    msg = said(err)
    assert "training relu-400000000 at d_in=32 needs ~" in msg and "GB is free on cpu" in msg
    assert "lower sae.d_sae or train.batch_size" in msg
    names = [r["run_name"] for r in tracking.runs_table().to_pylist()]
    assert "relu-400000000" not in names  # no SAE run started (its study's parent: FAILED)
