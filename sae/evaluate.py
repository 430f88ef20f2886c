"""Evaluate an SAE on held-out contexts: reconstruction and downstream loss (DESIGN §6).

Downstream losses are next-token cross-entropies (nats, mean over every prediction in the
evaluation contexts) with the hook activation at each non-special position left alone
(`ce_clean`), replaced by the SAE's reconstruction (`ce_sae`) or zeroed (`ce_zero`). Excluded
positions (BOS/EOS, outlier rows) keep their clean activation in all three: the SAE never
trained on them.
`ce_clean` and `ce_zero` do not depend on the SAE, so `ce_baselines` runs once per evaluation set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from sae.base import SAE
from sae.hooks import HookPoint, next_token_ce, spliced
from sae.metrics import ReconstructionStats, loss_recovered

Contexts = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (token_ids (B,T), special (B,T))


def _mean_ce(
    model: nn.Module,
    hp: HookPoint,
    contexts: Contexts,
    replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> float:
    """Mean next-token CE with `replace(acts, keep_mask)` applied at the hook (None = clean)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, special in contexts:
        ids, mask = ids.to(device), ~special.to(device)
        if replace is None:
            ce = next_token_ce(model, ids)
        else:
            with spliced(model, hp, lambda a, m=mask: replace(a, m)):
                ce = next_token_ce(model, ids)
        total += ce.double().sum().item()
        count += ce.numel()
    return total / count


def ce_baselines(model: nn.Module, hp: HookPoint, contexts: Contexts) -> dict[str, float]:
    """`ce_clean` and `ce_zero` (hook output zeroed at non-special positions)."""
    contexts = list(contexts)

    def zero(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return acts * ~mask.unsqueeze(-1)

    return {
        "ce_clean": _mean_ce(model, hp, contexts, None),
        "ce_zero": _mean_ce(model, hp, contexts, zero),
    }


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    hp: HookPoint,
    sae: SAE,
    contexts: Contexts,
    baselines: dict[str, float],
    dense_threshold: float = 0.1,
) -> dict[str, float]:
    """One spliced forward pass per token: reconstruction stats of the live activations at the
    hook, `ce_sae`, and `loss_recovered` = (ce_zero − ce_sae) / (ce_zero − ce_clean)."""
    stats = ReconstructionStats(sae.d_sae, dense_threshold=dense_threshold)
    device = next(model.parameters()).device
    sae = sae.to(device).eval()

    def reconstruct(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = acts[mask].to(sae.W_enc.dtype)  # (N, d_in): the non-special positions
        f = sae.encode(x)
        x_hat = sae.decode(f)
        stats.update(x, x_hat, f)
        out = acts.clone()
        out[mask] = x_hat.to(acts.dtype)
        return out

    ce_sae = _mean_ce(model, hp, contexts, reconstruct)
    out = stats.compute()
    out |= baselines | {"ce_sae": ce_sae, "delta_ce": ce_sae - baselines["ce_clean"]}
    out["loss_recovered"] = loss_recovered(baselines["ce_clean"], ce_sae, baselines["ce_zero"])
    return out
