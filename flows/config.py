"""Hydra at the edge: override strings -> validated, typed `Config` jobs, composed once.

The CLI, `serve`/`deploy` and each flow's first step turn overrides into `Config`s here; from
then on sweeps, scaling grids, device placement and tasks carry those objects (changed with
`dataclasses.replace`, which runs every check again), never override strings to parse again.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
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


COMPOSES = 0
"""Hydra composes run by this process (a test counts them)."""


def load(overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict[str, Any]]:
    """Compose `conf/config.yaml` with `overrides`, validate, return (typed config, its asdict).

    Uses the compose API, not `@hydra.main`: the latter parses the process's argv and exits,
    which breaks inside a Prefect worker (STACK.md).
    """
    global COMPOSES
    COMPOSES += 1
    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        typed = OmegaConf.to_object(cfg)  # runs every __post_init__ check
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_clean(e)) from None
    return typed, dataclasses.asdict(typed)


def replace(c: Config, **sections: dict[str, Any]) -> Config:
    """`c` with fields changed, e.g. `replace(c, sae={"d_sae": 64}, run_name="x")`: a dict for
    a section changes its fields; every check runs again (a bad value is a ConfigError)."""
    try:
        changes = {
            k: dataclasses.replace(getattr(c, k), **v) if isinstance(v, dict) else v
            for k, v in sections.items()
        }
        return dataclasses.replace(c, **changes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
    if (i := next((j for j, ln in enumerate(keep) if "Available options" in ln), None)) is not None:
        # Hydra lists one option per line: all of them, on the one line, whatever their number
        listed = list(itertools.takewhile(lambda ln: ln[:1] in ("\t", " "), keep[i + 1 :]))
        options = " ".join(ln.strip() for ln in listed)
        keep = [*keep[:i], f"{keep[i].strip()} {options}"]  # then only Hydra's search path
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


def jobs(overrides: list[str], multirun: bool = False) -> list[tuple[list[str], Config]]:
    """(overrides, typed config) per job: one, or with `multirun` one per combination of
    Hydra's sweep syntax (`sae.k=16,32`); each composed once."""
    expanded = expand_sweep(overrides) if multirun else [list(overrides)]
    return [(job, load(job)[0]) for job in expanded]


def place(configs: list[Config]) -> list[Config]:
    """`runner.devices` (of the first job: a study has one runner): job i gets
    `train.device=devices[i mod n]`, so each device trains a group of its own."""
    devices = configs[0].runner.devices if configs else []
    if not devices:
        return list(configs)
    return [replace(c, train={"device": devices[i % len(devices)]}) for i, c in enumerate(configs)]


def scaling_jobs(base: list[str], c: Config) -> list[tuple[list[str], Config]]:
    """`saeflow scaling`'s jobs from its composed base config `c` (overrides `base`): one per
    (d_sae, tokens, lr) of the grid, run name `<arch>-<d_sae>-<tokens>tok-lr<lr>`; the grid and
    every job validated. The overrides returned with each job only label it."""
    s, arch = c.scaling, c.sae.arch
    try:
        s.check_grid(arch, c.sae.k)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = []
    for n in s.d_sae:
        for t in s.tokens:
            for lr in s.lr:
                name = f"{arch}-{n}-{t}tok-lr{lr:g}"
                label = [*base, f"sae.d_sae={n}", f"train.tokens={t}", f"train.lr={lr!r}"]
                job = replace(c, sae={"d_sae": n}, train={"tokens": t, "lr": lr}, run_name=name)
                out.append(([*label, f"run_name={name}"], job))
    return out
