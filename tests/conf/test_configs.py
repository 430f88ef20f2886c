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
        ("sae=topk sae.k=5000", "sae.k=5000 must be <= sae.d_sae=1024"),
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
    placed = place([load(job)[0] for job in jobs])
    assert [(c.sae.d_sae, c.train.device) for c in placed] == [
        (64, "cuda:0"), (128, "cuda:1"), (256, "cuda:0")
    ]  # fmt: skip
    one = [load(["sae.d_sae=64"])[0]]
    assert place(one) == one  # no devices: as given


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


# --- one default, one check, one docstring per value (issue 15) --------------------------------

SELECTORS = {"sae": "arch", "model": "source", "data": "source", "runner": "kind"}
"""The key a group option's file names: what it selects, even where that is the default."""


def _fields(cls: type) -> dict[str, object]:
    import dataclasses

    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_yaml_holds_only_what_differs_from_the_schema(group: str, option: str) -> None:
    """No YAML file repeats a default: every default is one dataclass field's."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    section = typing.get_type_hints(Config)[group]
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")) or {}
    fields = _fields(section)
    for key, value in raw.items():
        assert key in fields, f"{group}/{option}.yaml: {key} is no field of {section.__name__}"
        f = fields[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if key != SELECTORS.get(group):
            assert value != default, f"{group}/{option}.yaml repeats {group}.{key}={value!r}"
    root = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    assert set(root) == {"defaults"}  # the root file selects groups; it sets no value


def test_every_config_value_has_a_docstring() -> None:
    """Each value of every config dataclass is followed by its docstring in the source."""
    import ast
    import dataclasses
    import inspect
    import typing

    seen, missing = set(), []

    def walk(cls: type) -> None:
        for klass in cls.__mro__:
            if not dataclasses.is_dataclass(klass) or klass in seen:
                continue
            seen.add(klass)
            body = ast.parse(inspect.getsource(klass)).body[0].body
            hints = typing.get_type_hints(klass)
            for stmt, nxt in zip(body, [*body[1:], None], strict=True):
                if not isinstance(stmt, ast.AnnAssign) or stmt.target.id not in hints:
                    continue  # ClassVars aside
                if dataclasses.is_dataclass(hints[stmt.target.id]):
                    continue  # a section: its values carry the docstrings
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                    missing.append(f"{klass.__name__}.{stmt.target.id}")
        for kind in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(kind):
                walk(kind)

    walk(Config)
    assert not missing, f"fields without a docstring: {missing}"


def test_the_core_configs_are_the_schemas_sections() -> None:
    """`sae` is the core's SAE config; `train` extends the trainer's; `model` the LM recipe's;
    an object built from a composed config equals one built from the same values directly."""
    import dataclasses

    from sae.lm.config import LMSpec
    from sae.models.config import SAEConfig
    from sae.models.registry import build, build_sae
    from sae.training.config import FitConfig

    c, plain = load(["sae=topk", "sae.k=8", "sae.dead_tokens=1000", "train.lr=0.003"])
    assert type(c.sae) is SAEConfig and isinstance(c.train, FitConfig)
    assert isinstance(c.model, LMSpec)
    assert SAEConfig(**plain["sae"]) == c.sae
    assert FitConfig(**c.train.fit_values()).fit_values() == c.train.fit_values()
    assert from_dict(dataclasses.asdict(c)) == c
    a = build(c.sae, 16, seed=0)
    hp = {k: v for k, v in plain["sae"].items() if k in a.hparams}
    b = build_sae("topk", 16, c.sae.d_sae, seed=0, **hp)
    assert a.config() == b.config() and a.dead_tokens == 1000
    assert all(v.equal(b.state_dict()[k]) for k, v in a.state_dict().items())


def test_every_float_is_checked_for_nan() -> None:
    """NaN and inf fail the check of a value whose meaning is a finite number."""
    for override in ["sae.l1_coeff=nan", "train.lr=nan", "train.lr=inf", "steer.value=nan",
                     "cache.outlier_factor=nan", "sae.aux_coeff=inf"]:  # fmt: skip
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load([override])


def test_a_scaling_grid_is_composed_once() -> None:
    """`saeflow scaling`'s 36 default jobs come from one compose of the base config."""
    import flows.config as fc

    before = fc.COMPOSES
    base = ["model=tiny", "hook=blocks.0.resid_post"]
    jobs = fc.scaling_jobs(base, load(base)[0])
    assert fc.COMPOSES - before == 1 and len(jobs) == 36
    _, c = jobs[-1]
    assert (c.sae.d_sae, c.train.tokens, c.train.lr) == (2048, 614_400, 0.03)
    assert c.run_name == "relu-2048-614400tok-lr0.03"
