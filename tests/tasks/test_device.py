"""`model.device`: where the language model runs for caching, evaluation and steering, and how
the activation cache key says so (CPU keys exactly as before; cuda adds the GPU)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from flows.config import ConfigError, load
from sae.activations.cache import FORMAT_VERSION, Manifest, cache_key, sequences
from tests.conftest import TINY

# key_inputs needs only these of prepare_model's result (no tokenizer.json there: the identity
# stands in for it), so the key tests build no model.
MODEL = {"path": "/nonexistent/tiny-gpt2", "revision": None, "identity": "weights-sha"}
H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")


def _key_inputs_before(c: Any, split: str) -> dict[str, Any]:
    """tasks.cache.key_inputs as it was before model.device, spelled out: CPU caches made then
    must keep their keys."""
    n_tokens = c.cache.tokens if split == "train" else c.eval.tokens
    d = c.data
    return {
        "format_version": FORMAT_VERSION,
        "model": {"path": c.model.name, "identity": MODEL["identity"], "dtype": c.model.dtype},
        "tokenizer": MODEL["identity"],
        "hooks": [c.hook],
        "dtype": c.cache.dtype,
        "context_length": d.context_length,
        "data": {
            "source": d.source,
            "paths": sorted(d.paths),
            "hf_name": d.hf_name,
            "hf_config": d.hf_config,
            "hf_split": d.hf_split,
            "text_column": d.text_column,
            "holdout": d.holdout,
            "max_bytes": d.max_bytes,
            "split": split,
        },
        "n_contexts": math.ceil(n_tokens / d.context_length),
        "prepend_bos": d.prepend_bos,
        "context_order": "shuffled",
        "special_policy": "flag bos/eos/pad; exclude from training",
        "outlier_factor": c.cache.outlier_factor,
        "shard_tokens": c.cache.shard_tokens,
        "batch_size": c.cache.batch_size,
        "kernels": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(),
        },
    }


def test_model_device_is_validated() -> None:
    assert load(TINY)[0].model.device == "auto"
    with pytest.raises(ConfigError, match=r"model\.device='tpu' is not one of auto, cpu, cuda"):
        load([*TINY, "model.device=tpu"])


@no_cuda
def test_auto_runs_on_the_cpu_here_and_keeps_the_cpu_cache_key() -> None:
    from tasks.cache import key_inputs
    from tasks.model import lm_device

    auto, _ = load(TINY)
    cpu, _ = load([*TINY, "model.device=cpu"])
    assert lm_device(auto.model) == torch.device("cpu") == lm_device(cpu.model)
    for split in ("train", "eval"):
        before = _key_inputs_before(auto, split)
        assert key_inputs(auto, MODEL, split) == before
        assert key_inputs(cpu, MODEL, split) == before
        assert key_inputs(auto, MODEL, split, torch.device("cpu")) == before
        assert cache_key(key_inputs(auto, MODEL, split)) == cache_key(before)


def test_a_cuda_key_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tested without a GPU: the device is passed, the GPU's name and capability faked."""
    from tasks.cache import key_inputs

    name, capability = H100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    c, _ = load(TINY)
    cpu = key_inputs(c, MODEL, "train", torch.device("cpu"))
    cuda = key_inputs(c, MODEL, "train", torch.device("cuda"))
    assert set(cpu["kernels"]) == {"torch", "transformers", "cpu"}  # no device fields on cpu
    gpu = {"device": "cuda", "gpu": name, "sm": "9.0", "cuda": str(torch.version.cuda)}
    assert cuda["kernels"] == cpu["kernels"] | gpu
    assert {k: v for k, v in cuda.items() if k != "kernels"} == {
        k: v for k, v in cpu.items() if k != "kernels"
    }
    assert cache_key(cuda) != cache_key(cpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert cache_key(key_inputs(c, MODEL, "train", torch.device("cuda"))) != cache_key(cuda)


@no_cuda
def test_cuda_without_cuda_fails_naming_model_device(saeflow_home: Path) -> None:
    """Each task that would load the model stops first, before building or caching anything."""
    from tasks.cache import plan_cache
    from tasks.evaluate import evaluate_many
    from tasks.model import prepare_model
    from tasks.steer import steer

    cfg, _ = load([*TINY, "model.device=cuda"])
    trained = {"run_id": "r", "checkpoint": str(saeflow_home / "no-sae")}
    calls = {
        "prepare_model": lambda: prepare_model.fn(cfg),
        "plan_cache": lambda: plan_cache.fn(cfg, MODEL, "eval"),
        "evaluate": lambda: evaluate_many.fn(cfg, MODEL, {"dir": "/none", "key": "k"}, [trained]),
        "steer": lambda: steer.fn(cfg, MODEL, trained),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"model\.device='cuda'.*no CUDA device") as e:
            call()
        assert "model.device=auto or model.device=cpu" in str(e.value), name


def test_a_shard_runs_only_where_its_cache_was_planned() -> None:
    """A worker whose device or kernels differ from the planner's would write other bytes
    under the same key: it refuses."""
    from tasks.cache import check_kernels, kernels

    def manifest(key_inputs: dict[str, Any]) -> Manifest:
        return Manifest(
            key="k",
            key_inputs=key_inputs,
            hooks={"blocks.0.resid_post": 32},
            dtype="bf16",
            context_length=64,
            special_token_ids=[0],
            n_planned=4,
            shard_seqs=2,
        )

    here = kernels()
    check_kernels(manifest({"kernels": here}), here)
    check_kernels(manifest({}), here)  # made by hand, without kernels: nothing to compare
    gpu = here | {"device": "cuda", "gpu": H100[0], "sm": "9.0", "cuda": "12.8"}
    with pytest.raises(ValueError, match=r"cache k was planned for .*'device': 'cuda'"):
        check_kernels(manifest({"kernels": gpu}), here)


# --- on a GPU -----------------------------------------------------------------------------


def _cache(cfg: dict[str, Any], model: dict[str, Any], split: str) -> dict[str, Any]:
    """The split's cache of `cfg`, built by the real tasks outside a flow."""
    from tasks.cache import cache_shard, finish_cache, plan_cache

    plan = plan_cache.fn(cfg, model, split)
    for index in plan["todo"]:
        cache_shard.fn(cfg, model, plan, index)
    return finish_cache.fn(plan)


@pytest.fixture(scope="module")
def on_both(tiny_model: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """TINY's caches and the eval metrics of one random ReLU SAE, with model.device=cpu and
    =cuda, logged to a real MLflow run of the session's store."""
    from sae.models.registry import build_sae
    from tasks.evaluate import evaluate_many
    from tasks.support import tracking

    run_id = tracking.start_run(tracking.ensure_experiment("device-check"), "device-check")
    out: dict[str, Any] = {"cfg": {}, "cache": {}, "metrics": {}}
    for device in ("cpu", "cuda"):
        cfg, _ = load([*TINY, f"model.device={device}"])
        out["cfg"][device] = cfg
        for split in ("train", "eval"):
            out["cache"][device, split] = _cache(cfg, tiny_model, split)
        if "trained" not in out:
            eval_dir = Path(out["cache"][device, "eval"]["dir"])
            d_in = Manifest.load(eval_dir).d_in(load(TINY)[0].hook)
            sae_dir = tmp_path_factory.mktemp("sae")
            build_sae("relu", d_in, 64, seed=0).save(sae_dir)
            out["trained"] = {"run_id": run_id, "checkpoint": str(sae_dir)}
        eval_cache = out["cache"][device, "eval"]
        out["metrics"][device] = evaluate_many.fn(cfg, tiny_model, eval_cache, [out["trained"]])[0]
    yield out


@pytest.mark.gpu
def test_cuda_cache_and_metrics_equal_the_cpu_ones(on_both: dict[str, Any]) -> None:
    hook = load(TINY)[0].hook
    for split in ("train", "eval"):
        cpu, cuda = on_both["cache"]["cpu", split], on_both["cache"]["cuda", split]
        kernels = Manifest.load(Path(cuda["dir"])).key_inputs["kernels"]
        assert kernels["device"] == "cuda" and kernels["gpu"] == torch.cuda.get_device_name()
        assert "device" not in Manifest.load(Path(cpu["dir"])).key_inputs["kernels"]
        assert cpu["key"] != cuda["key"] and cpu["n_tokens"] == cuda["n_tokens"]
        rows = [list(sequences(Path(c["dir"]), hook, 16)) for c in (cpu, cuda)]
        for (ids0, ex0, acts0), (ids1, ex1, acts1) in zip(*rows, strict=True):
            assert torch.equal(ids0, ids1) and torch.equal(ex0, ex1)
            assert acts1.dtype == torch.bfloat16
            torch.testing.assert_close(acts1, acts0)  # bf16 tolerances: 1.6e-2 rel, 1e-5 abs
    cpu, cuda = on_both["metrics"]["cpu"], on_both["metrics"]["cuda"]
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        assert math.isclose(cuda[name], cpu[name], rel_tol=1e-3, abs_tol=1e-3), (
            name,
            cpu[name],
            cuda[name],
        )


@pytest.mark.gpu
def test_features_and_steering_with_the_model_on_cuda(
    on_both: dict[str, Any], tiny_model: dict
) -> None:
    from tasks.evaluate import features
    from tasks.steer import steer

    cfg, trained = on_both["cfg"]["cuda"], on_both["trained"]
    written = features.fn(cfg, tiny_model, on_both["cache"]["cuda", "eval"], trained)
    assert written["n_features"] == 64 and Path(written["path"]).is_file()
    steered = steer.fn(cfg, tiny_model, trained)
    assert len(steered["rows"]) == len(load(TINY)[0].steer.prompts)
    assert all(r["unsteered"] and r["steered"] for r in steered["rows"])
