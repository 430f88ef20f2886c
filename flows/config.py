"""Hydra at the edge: overrides -> a validated `Config` and the plain dict the flows pass around."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf
from conf.schema import Config, register

CONF_DIR = Path(conf.__file__).parent


class ConfigError(ValueError):
    """An override or value that the schema rejects; the message names it."""


def load(overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict[str, Any]]:
    """Compose `conf/config.yaml` with `overrides`, validate, return (typed config, plain dict).

    Uses the compose API, not `@hydra.main`: the latter parses the process's argv and exits,
    which breaks inside a Prefect worker (STACK.md).
    """
    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        typed = OmegaConf.to_object(cfg)  # runs every __post_init__ check
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_clean(e)) from None
    return typed, OmegaConf.to_container(cfg, resolve=True)


def _clean(e: Exception) -> str:
    """First lines of Hydra/OmegaConf errors, without their 'full_key/object_type' noise, and
    for an unknown key the valid keys at its level."""
    text = str(e)
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += f"\n{e.__cause__}"  # Hydra puts the reason (e.g. a type mismatch) here
    if m := re.search(r"Could not override '([^']+)'", text):
        return _unknown_key(m.group(1))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    keep = [
        ln
        for ln in lines
        if not ln.lstrip().startswith(("full_key", "object_type", "reference_type"))
    ]
    return "\n".join(keep[:6]) or type(e).__name__


def _unknown_key(key: str) -> str:
    """`sae.dsae` -> "unknown key 'sae.dsae' (did you mean 'sae.d_sae'?); keys of sae: ..."."""
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        hints = get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return _unknown_key(".".join(parts[: i + 1]))
        node = hints[part]
    valid = [f.name for f in dataclasses.fields(node)]
    prefix = ".".join(parts[:-1])
    full = [f"{prefix}.{v}" if prefix else v for v in valid]
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    hint = f" (did you mean {full[valid.index(close[0])]!r}?)" if close else ""
    return (
        f"unknown key {key!r}{hint}; valid keys{' of ' + prefix if prefix else ''}: "
        + ", ".join(full)
    )


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra multirun syntax -> one override list per job: `a=1,2 b=x,y` gives 4 jobs."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(_clean(e)) from None
    choices = []
    for o in parsed:
        key = o.get_key_element()
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in product(*choices)]


def place(jobs: list[list[str]]) -> list[list[str]]:
    """`runner.devices` (of the first job: a study has one runner): job i gets
    `train.device=devices[i mod n]`, so each device trains a group of its own."""
    devices = load(jobs[0])[0].runner.devices if jobs else []
    return [[*job, f"train.device={devices[i % len(devices)]}"] if devices else job
            for i, job in enumerate(jobs)]  # fmt: skip


def check_grid(c: Config) -> None:
    """A scaling grid must span ≥ 3 compute budgets and ≥ 3 (d_sae, tokens) cells for its fits:
    said before hours of training, not after."""
    from sae.analysis.scaling import grid_budgets

    s = c.scaling
    budgets = grid_budgets(c.sae.arch, s.d_sae, s.tokens, c.sae.k, s.budget_bin)
    if budgets < 3 or len(s.d_sae) * len(s.tokens) < 3:
        raise ConfigError(
            f"scaling.d_sae={s.d_sae} × scaling.tokens={s.tokens} spans {budgets} compute "
            f"budget(s) (bins of ×{s.budget_bin:g}); the fits need ≥ 3: add sizes or token counts"
        )


def scaling_jobs(base: list[str]) -> list[list[str]]:
    """`saeflow scaling`'s jobs: `base` plus one (d_sae, tokens, lr) of the grid each, run
    name `<arch>-<d_sae>-<tokens>tok-lr<lr>`; the grid and every job validated."""
    typed, _ = load(base)
    check_grid(typed)
    s, arch = typed.scaling, typed.sae.arch
    grid = [(n, t, lr) for n in s.d_sae for t in s.tokens for lr in s.lr]
    jobs = [
        [
            *base,
            f"sae.d_sae={n}",
            f"train.tokens={t}",
            f"train.lr={lr!r}",
            f"run_name={arch}-{n}-{t}tok-lr{lr:g}",
        ]
        for n, t, lr in grid
    ]
    for job in jobs:
        load(job)
    return jobs
