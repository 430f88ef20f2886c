"""Steer the model with one SAE feature; the texts go to MLflow (the SAE's run) and the data dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config
from sae.analysis.steer import generate, intervention, next_token_probs
from sae.files import write_text
from sae.lm.hooks import load_lm, parse_hook
from sae.models.base import CONFIG
from sae.models.registry import load_sae
from tasks.model import lm_device
from tasks.support import tracking
from tasks.support.home import inside
from tasks.support.log import logger


def check_feature(cfg: Config, trained: dict[str, Any]) -> None:
    """`steer.feature` against the SAE's d_sae, from its cfg.json: before the model is loaded."""
    path = Path(trained["checkpoint"]) / CONFIG
    d_sae = int(json.loads(path.read_text())["d_sae"])
    if not 0 <= cfg.steer.feature < d_sae:
        raise ValueError(
            f"steer.feature={cfg.steer.feature} is not a latent of the SAE of run "
            f"{trained['run_id']}: valid 0..{d_sae - 1} (d_sae={d_sae})"
        )


@task(name="generate_steered", cache_policy=NO_CACHE)
def steer(cfg: Config, model: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Greedy continuations of each prompt with and without the feature; returns
    {path, feature, mode, value, rows: [{prompt, unsteered, steered}]}."""
    c = cfg
    s = c.steer
    device = lm_device(c.model)
    lm, tok = load_lm(model["path"], model["revision"], c.model.dtype, device)
    hp = parse_hook(lm, c.hook)
    sae = load_sae(Path(trained["checkpoint"])).to(device)  # the intervention runs in the LM
    fn = intervention(sae, s.feature, s.mode, s.value)
    rows = []
    for prompt in s.prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        if tok.bos_token_id is not None:  # contexts were cached with a BOS in front
            ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
        ids = ids.to(device)
        plain = generate(lm, ids, s.max_new_tokens)
        steered = generate(lm, ids, s.max_new_tokens, hp, fn)
        p0, p1 = next_token_probs(lm, ids), next_token_probs(lm, ids, hp, fn)
        rows.append(
            {
                "prompt": prompt,
                "unsteered": tok.decode(plain[0]),
                "steered": tok.decode(steered[0]),
                "top_token_unsteered": tok.decode([int(p0[0].argmax())]),
                "top_token_steered": tok.decode([int(p1[0].argmax())]),
            }
        )
    out = inside("steer", trained["run_id"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"feature-{s.feature}-{s.mode}-{s.value:g}.json"
    result = {"feature": s.feature, "mode": s.mode, "value": s.value, "hook": c.hook, "rows": rows}
    write_text(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    tracking.log_artifact(trained["run_id"], path, "steering", c.tracking.uri)
    logger().info(f"steering feature {s.feature} ({s.mode} {s.value:g}) -> {path}")
    return {"path": str(path), **result}
