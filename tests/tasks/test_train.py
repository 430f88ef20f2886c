"""Training as tracked runs (tasks/train.py): a sweep trains SAEs that share a stream in one
group, each its own nested MLflow run; asked again it reuses them; a killed `saeflow train`
resumes in the same MLflow run and ends with the weights of a run that never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import TINY


def test_sweep_trains_a_group_in_nested_runs_then_reuses_them(prefect_server, tiny_model) -> None:
    from flows.pipeline import sweep
    from tasks.support import tracking

    jobs = [[*TINY, "train.lr=0.002", "sae=relu"], [*TINY, "train.lr=0.002", "sae=topk", "sae.k=4"]]
    first = sweep(jobs=jobs)
    c = tracking.client()
    runs = [c.get_run(j["trained"]["run_id"]) for j in first["jobs"]]
    assert [j["trained"]["status"] for j in first["jobs"]] == ["trained", "trained"]
    assert [r.data.params["sae.arch"] for r in runs] == ["relu", "topk"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == first["study"]["parent_run_id"]
        # one train_saes task read the cache once for both: one Prefect task run id
        assert r.data.tags["saeflow.group"] == runs[0].data.tags["saeflow.group"]
        assert not (Path(os.environ["SAEFLOW_HOME"]) / "saes" / r.info.run_id / "state").exists()
    assert first["jobs"][1]["metrics"]["l0"] == pytest.approx(4.0, abs=0.5)

    again = sweep(jobs=jobs)  # served from Prefect's stage cache
    assert [j["trained"]["status"] for j in again["jobs"]] == ["cached", "cached"]
    assert [j["trained"]["run_id"] for j in again["jobs"]] == [r.info.run_id for r in runs]
    assert again["study"]["parent_run_id"] != first["study"]["parent_run_id"]


def test_resume_false_trains_afresh(prefect_server, tiny_model) -> None:
    from flows.pipeline import train_flow

    one = train_flow([*TINY, "train.lr=0.003"])
    two = train_flow([*TINY, "train.lr=0.003", "train.resume=false"])
    assert two["status"] == "trained" and two["run_id"] != one["run_id"]


def test_killed_training_resumes_in_the_same_run(
    prefect_server, tiny_model, saeflow_home: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import train_flow
    from tasks.support import tracking

    job = [*TINY, "train.tokens=409600", "train.checkpoint_every=20", "train.threads=1",
           "tracking.experiment=resume"]  # fmt: skip
    env = os.environ | {
        "PYTHONPATH": str(Path(__file__).parents[2]),
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }
    before = set((saeflow_home / "saes").glob("*/state/step-*.json"))
    cmd = [sys.executable, "-m", "flows.cli", "train", *job]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if set((saeflow_home / "saes").glob("*/state/step-*.json")) - before:
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL, child.stderr.read().decode()
    (state,) = set((saeflow_home / "saes").glob("*/state/step-*.json")) - before
    run_id = state.parents[1].name
    assert tracking.client().get_run(run_id).info.status == "RUNNING"  # killed: nobody ended it

    resumed = train_flow(job)
    assert resumed["status"] == "resumed" and resumed["run_id"] == run_id
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["saeflow.resumed_from_step"]) >= 20
    ref = train_flow([*job[:-1], "tracking.experiment=resume-reference"])
    assert ref["status"] == "trained"
    a = load_file(str(Path(resumed["checkpoint"]) / "sae.safetensors"))
    b = load_file(str(Path(ref["checkpoint"]) / "sae.safetensors"))
    assert all((a[k] == b[k]).all() for k in b), "the resumed SAE differs from an unbroken run"
    history = {m.step: m.value for m in tracking.client().get_metric_history(run_id, "train/loss")}
    ref_history = tracking.client().get_metric_history(ref["run_id"], "train/loss")
    assert history == {m.step: m.value for m in ref_history}


def test_runs_trained_before_a_default_changed_keep_their_keys() -> None:
    """sae.centre (False → True) and train.scale (norm → spread) changed defaults after runs
    were keyed without them: those runs' settings still hash as before (the fields left out),
    and today's defaults get keys of their own, never an old run's SAE."""
    import dataclasses
    import hashlib
    import json

    from flows.config import load
    from tasks.train import ADDED, UNKEYED, run_key

    old, _ = load([*TINY, "sae.centre=false", "train.scale=norm"])
    new, _ = load(TINY)
    sae = {k: v for k, v in dataclasses.asdict(old.sae).items()
           if k not in (*ADDED["sae"], "matryoshka_topk", "k_train_factor",
                        "unit_decoder", "pre_act_coeff")}  # fmt: skip
    train = {k: v for k, v in dataclasses.asdict(old.train).items()
             if k not in (*ADDED["train"], *UNKEYED, "processes")}  # fmt: skip
    spec = {"cache": "c", "hook": old.hook, "sae": sae, "train": train,
            "exclude_special": old.cache.exclude_special}  # fmt: skip
    then = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    assert run_key(old, "c") == then != run_key(new, "c")


def test_runs_from_before_an_arch_hparam_was_added_keep_their_keys() -> None:
    """sae.matryoshka_topk (the code's BatchTopK before, "token" now by default): a matryoshka
    run at "batch" keeps the key it had without the field; other archs never key it. The same
    for sae.k_train_factor (1 before) in the top-k family, and sae.unit_decoder (true before,
    false now by default) in the top-k family and jumprelu."""
    import dataclasses
    import hashlib
    import json

    from flows.config import load
    from tasks.train import ADDED, UNKEYED, run_key

    def before(c) -> str:  # the key as computed before the field existed
        sae = {k: v for k, v in dataclasses.asdict(c.sae).items()
               if k not in ("matryoshka_topk", "k_train_factor", "unit_decoder", "pre_act_coeff")
               and (k not in ADDED["sae"] or k == "centre")}  # fmt: skip
        train = {k: v for k, v in dataclasses.asdict(c.train).items()
                 if k not in (*ADDED["train"], *UNKEYED, "processes")}  # fmt: skip
        spec = {"cache": "c", "hook": c.hook, "sae": sae, "train": train,
                "exclude_special": c.cache.exclude_special}  # fmt: skip
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    unit = "sae.unit_decoder=true"  # as the top-k family and jumprelu trained before the field
    old, _ = load([*TINY, "sae=matryoshka", "sae.matryoshka_topk=batch", unit, "train.scale=norm"])
    new, _ = load([*TINY, "sae=matryoshka", unit, "train.scale=norm"])
    other, _ = load([*TINY, "sae=batchtopk", unit, "train.scale=norm"])
    assert run_key(old, "c") == before(old) != run_key(new, "c")
    assert run_key(other, "c") == before(other)
    for arch, hp in (("topk", [unit]), ("relu", [])):  # topk at its decay then (0.2; now 0.3)
        was, _ = load([*TINY, f"sae={arch}", *hp, "train.scale=norm", "train.lr_decay_frac=0.2"])
        assert run_key(was, "c") == before(was)
    wider, _ = load([*TINY, "sae=topk", "sae.k_train_factor=1.5", unit, "train.scale=norm"])
    assert run_key(wider, "c") != before(wider)
    free, _ = load([*TINY, "sae=topk", "train.scale=norm", "train.lr_decay_frac=0.2"])
    assert run_key(free, "c") != before(free)  # today's default trains otherwise: a key of its own


def test_lr_decay_none_is_the_archs_default_and_keyed_as_its_value() -> None:
    """train.lr_decay_frac None resolves to DEFAULT_LR_DECAY[arch] in the config (logged and
    keyed as that number): relu's runs keep their keys (0.2, as before the field could be
    None); topk's default (0.3) trains otherwise, so it gets a key of its own."""
    from flows.config import load
    from tasks.train import run_key

    relu, _ = load(TINY)
    relu_02, _ = load([*TINY, "train.lr_decay_frac=0.2"])
    topk, _ = load([*TINY, "sae=topk"])
    topk_02, _ = load([*TINY, "sae=topk", "train.lr_decay_frac=0.2"])
    topk_03, _ = load([*TINY, "sae=topk", "train.lr_decay_frac=0.3"])
    assert (relu.train.lr_decay_frac, topk.train.lr_decay_frac) == (0.2, 0.3)
    assert run_key(relu, "c") == run_key(relu_02, "c")
    assert run_key(topk, "c") == run_key(topk_03, "c") != run_key(topk_02, "c")


def test_stiffness_is_keyed_only_where_it_acts() -> None:
    """train.l0_stiffness acts only with a target_l0 on jumprelu: relu's target runs and
    jumprelu's runs without a target keep their keys; the default κ gets a key of its own
    (κ 0, the code before the field, is `FORMER`: left out of the key)."""
    from flows.config import load
    from sae.training.config import FitConfig
    from tasks.train import ADDED, _unless_default, run_key

    def key(*over: str) -> str:
        c, _ = load([*TINY, *over])
        return run_key(c, "c")

    assert key("sae.target_l0=20") == key("sae.target_l0=20", "train.l0_stiffness=0")
    assert key("sae=jumprelu") == key("sae=jumprelu", "train.l0_stiffness=0")
    steered = ("sae=jumprelu", "sae.target_l0=20")
    assert key(*steered) != key(*steered, "train.l0_stiffness=0")
    assert key(*steered) != key(*steered, "train.l0_stiffness_from=0.8")  # where κ acts from
    # 0.6, the default from stop 29 to stop 33, is FORMER: such runs keep the key they had
    # (the field left out of it); today's 0.3 trains otherwise and is keyed
    assert key(*steered) != key(*steered, "train.l0_stiffness_from=0.6")
    assert _unless_default({"l0_stiffness_from": 0.6}, FitConfig, ADDED["train"]) == {}
    assert _unless_default({"l0_stiffness_from": 0.3}, FitConfig, ADDED["train"]) == {
        "l0_stiffness_from": 0.3
    }
    at_zero = (*steered, "train.l0_stiffness=0")  # κ 0: from changes nothing, nor the key
    assert key(*at_zero) == key(*at_zero, "train.l0_stiffness_from=0.8")


def test_older_codes_keys_are_found_by_naming_the_values_they_trained_with() -> None:
    """The keys the code of earlier stops computed for these settings (run there, 2026-12-08):
    stop 33's (2923f8b) steered jumprelu, the code before the L0 price (21d44a4^), whose
    jumprelu had κ 0 and unit decoder rows, and topk's before free rows and before its decay
    moved. README's resume recipe names these overrides."""
    from flows.config import load
    from tasks.train import run_key

    def key(*over: str) -> str:
        c, _ = load([*TINY, *over])
        return run_key(c, "c")

    steered = ("sae=jumprelu", "sae.target_l0=20", "sae.pre_act_coeff=0")  # 0: before stop 36
    assert key(*steered, "train.l0_stiffness_from=0.6") == "df13cbe86a077a17"  # stop 33
    before_price = (*steered, "train.l0_stiffness=0", "sae.unit_decoder=true")
    assert key(*before_price) == "090992a65783211f"
    assert key("sae.target_l0=20") == "69727be3c592d4fc"  # relu: the same key throughout
    unit = ("sae=topk", "sae.unit_decoder=true")  # before free rows (b950700^)
    assert key(*unit) == "788a23bcd7247eea"
    assert key(*unit, "train.lr_decay_frac=0.2") == "c9023986fd0c3546"  # before 0.3 (d08f6ab^)


def test_lr_warmup_is_checked_against_the_archs_decay() -> None:
    """train.lr_warmup_frac 0.75 fits relu's 0.2 decay, not topk's 0.3: named at load."""
    from flows.config import load

    load([*TINY, "train.lr_warmup_frac=0.75"])
    with pytest.raises(Exception, match=r"got 0.3 \(None: the architecture's default\)"):
        load([*TINY, "sae=topk", "train.lr_warmup_frac=0.75"])
