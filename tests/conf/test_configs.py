"""Every config file composes against the schema; bad overrides fail with their name."""

from __future__ import annotations

import pytest

from conf.schema import Config, from_dict
from flows.config import CONF_DIR, ConfigError, expand_sweep, load

GROUPS = ["model", "data", "sae", "train", "eval", "tracking"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
EXTRA = {("data", "files"): ["data.paths=[a.txt]"], ("model", "tiny"): ["hook=blocks.0.resid_post"]}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes(group: str, option: str) -> None:
    typed, plain = load([f"{group}={option}", *EXTRA.get((group, option), [])])
    assert isinstance(typed, Config)
    assert from_dict(plain) == typed  # the dict the flows pass round-trips exactly


def test_defaults_are_the_offline_study() -> None:
    c, _ = load([])
    assert (c.model.source, c.data.source, c.sae.arch, c.hook) == (
        "builtin",
        "stdlib",
        "relu",
        "blocks.2.resid_post",
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.d_sae=-3", "sae.d_sae must be > 0, got -3"),
        ("model=nope", "Could not find 'model/nope'"),
        ("sae=nope", "Available options in 'sae'"),
        ("sae.dsae=3", "unknown key 'sae.dsae' (did you mean 'sae.d_sae'?)"),
        ("train.tokens=abc", "could not be converted to Integer"),
        ("train.device=tpu", "train.device='tpu' is not one of auto, cpu, cuda, cuda:N"),
        ("runner.devices=[cuda:0,gpu1]", "runner.devices: 'gpu1' is not one of cpu, cuda, cuda:N"),
        ("train.device=cuda:1 train.processes=2", "use train.device=cuda"),
        ("train.dtype=int8", "train.dtype='int8'"),
        ("sae.k=5000", "sae.k=5000 must be <= sae.d_sae=1024"),
        ("hook=blocks.9.resid_post", "has 4 blocks"),
        ("hook=mlp", "is not a hook point"),
        ("data.holdout=1.5", "data.holdout must be in (0, 1)"),
        ("cache.dtype=fp32", "cache.dtype='fp32'"),
        ("data.context_length=4096", "exceeds model.n_ctx=256"),
    ],
)
def test_bad_override_names_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(override.split(" "))
    assert message in str(e.value)


def test_sweep_expansion() -> None:
    jobs = expand_sweep(["sae=topk", "sae.k=8,16", "sae.d_sae=64,128"])
    assert len(jobs) == 4 and ["sae=topk", "sae.k=8", "sae.d_sae=128"] in jobs


def test_runner_devices_place_a_sweeps_saes_round_robin() -> None:
    from flows.config import place

    jobs = expand_sweep(["runner.devices=[cuda:0,cuda:1]", "sae.d_sae=64,128,256"])
    placed = [load(job)[0] for job in place(jobs)]
    assert [(c.sae.d_sae, c.train.device) for c in placed] == [
        (64, "cuda:0"), (128, "cuda:1"), (256, "cuda:0")
    ]  # fmt: skip
    assert place([["sae.d_sae=64"]]) == [["sae.d_sae=64"]]  # no devices: as given


def test_target_l0_only_where_lambda_sets_l0() -> None:
    c, _ = load(["sae=jumprelu", "sae.target_l0=20"])
    assert c.sae.target_l0 == 20
    with pytest.raises(ConfigError, match=r"sae\.target_l0 needs arch relu or jumprelu"):
        load(["sae=topk", "sae.target_l0=20"])
    with pytest.raises(ConfigError, match=r"sae\.target_l0 must be in \(0, d_sae\]"):
        load(["sae.target_l0=5000"])


@pytest.mark.parametrize("sae", [["sae=topk"], ["sae=batchtopk"], ["sae.target_l0=20"]])
def test_data_parallel_refuses_what_each_rank_would_decide_alone(sae: list[str]) -> None:
    from flows.config import ConfigError, load

    with pytest.raises(ConfigError, match=r"train.processes=2 \(data-parallel\) supports sae=relu"):
        load(["train.processes=2", *sae])
