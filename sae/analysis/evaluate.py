"""Evaluate SAEs on held-out contexts: reconstruction and downstream loss (DESIGN §6).

Downstream losses are next-token cross-entropies (nats, mean over every prediction in the
evaluation contexts) with the activation at the hook, at each non-special position, left alone
(`ce_clean`), replaced by an SAE's reconstruction (`ce_sae`), zeroed (`ce_zero`) or replaced by
its mean over the evaluation set (`ce_mean`); `kl` is the mean over predictions of
KL(p_clean ‖ p_sae). Excluded positions (BOS/EOS, outlier rows) keep their clean activation in
every variant: the SAE never trained on them.

Cost: the clean activation comes from a forward pass that stops at the hook (the prefix), and
each variant runs only the blocks after it (`sae.lm.hooks.logits_from`: the suffix). Per batch,
`evaluate_saes` runs the prefix and the clean suffix once (for KL), then one suffix per SAE;
the baselines (`ce_clean`, `ce_zero`, `ce_mean`) depend on no SAE and are computed once per
evaluation set. The direct method (a full forward for clean, for the SAE and for each ablation)
gives the same numbers and is what the tests compare with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sae.analysis.metrics import KLToClean, ReconstructionStats, loss_recovered
from sae.failpoint import failpoint
from sae.lm.hooks import HookPoint, activations_at, logits_from
from sae.models.base import SAE

Contexts = Iterable[tuple[Tensor, Tensor]]  # (token_ids (B, T), special (B, T))


def _ce(logp: Tensor, ids: Tensor) -> Tensor:
    """(B, T-1) next-token CE of ids under log-probabilities logp (B, T-1, vocab)."""
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _logprobs(logits: Tensor) -> Tensor:
    """(B, T-1, vocab) next-token log-probabilities at every position but the last."""
    return logits.log_softmax(-1)[:, :-1]  # softmax first: slicing first would copy the logits


class _Mean:
    """A float64 running mean of many tensors' elements."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, values: Tensor) -> None:
        self.total += values.double().sum().item()
        self.count += values.numel()

    @property
    def value(self) -> float:
        return self.total / self.count


def _batches(model: nn.Module, hp: HookPoint, contexts: Contexts):
    """(ids, keep mask (B, T), live activations at hp (B, T, d)) per batch, from the prefix."""
    device = next(model.parameters()).device
    for ids, special in contexts:
        ids = ids.to(device)
        yield ids, ~special.to(device), activations_at(model, [hp], ids)[hp.name]


@torch.no_grad()
def ce_baselines(model: nn.Module, hp: HookPoint, contexts: Contexts) -> dict[str, float]:
    """`ce_clean`, `ce_zero` and `ce_mean` (with the mean kept activation of the set)."""
    contexts = list(contexts)
    total, n = None, 0
    for _, keep, acts in _batches(model, hp, contexts):
        kept = acts[keep].double()  # (N, d)
        total = kept.sum(0) if total is None else total + kept.sum(0)
        n += kept.shape[0]
    if total is None or n == 0:
        raise ValueError("no evaluation tokens outside special/outlier positions")
    mean = total / n  # float64; cast to the activations' dtype where used
    ce = {name: _Mean() for name in ("ce_clean", "ce_zero", "ce_mean")}
    for ids, keep, acts in _batches(model, hp, contexts):
        m = keep.unsqueeze(-1)
        ce["ce_clean"].add(_ce(_logprobs(logits_from(model, hp, ids, acts)), ids))
        ce["ce_zero"].add(_ce(_logprobs(logits_from(model, hp, ids, acts * ~m)), ids))
        ablated = torch.where(m, mean.to(acts.dtype), acts)
        ce["ce_mean"].add(_ce(_logprobs(logits_from(model, hp, ids, ablated)), ids))
    return {name: m.value for name, m in ce.items()}


@torch.no_grad()
def evaluate_saes(
    model: nn.Module,
    hp: HookPoint,
    saes: list[SAE],
    contexts: Contexts,
    baselines: dict[str, float],
    dense_threshold: float = 0.1,
) -> list[dict[str, float]]:
    """Metrics of each SAE (DESIGN §6) from one pass over the contexts: reconstruction stats of
    the live activations at the hook, ce_sae, delta_ce, kl, loss_recovered (zero ablation) and
    loss_recovered_mean (mean ablation), plus the baselines."""
    device = next(model.parameters()).device
    saes = [sae.to(device).eval() for sae in saes]
    stats = [ReconstructionStats(sae.d_sae, dense_threshold) for sae in saes]
    ce = [_Mean() for _ in saes]
    kl = [_Mean() for _ in saes]
    for ids, keep, acts in _batches(model, hp, contexts):
        failpoint("evaluate.batch")
        kl_to_clean = KLToClean(_logprobs(logits_from(model, hp, ids, acts)))  # once per batch
        for sae, st, ce_i, kl_i in zip(saes, stats, ce, kl, strict=True):
            x = acts[keep].to(sae.W_enc.dtype)  # (N, d_in): the kept positions
            f = sae.encode(x)
            x_hat = sae.decode(f)
            st.update(x, x_hat, f)
            spliced = acts.clone()
            spliced[keep] = x_hat.to(acts.dtype)
            logp = _logprobs(logits_from(model, hp, ids, spliced))
            ce_i.add(_ce(logp, ids))  # CE and KL from one log-softmax
            kl_i.add(kl_to_clean(logp))
    out = []
    for st, ce_i, kl_i in zip(stats, ce, kl, strict=True):
        m = st.compute() | baselines
        m |= {"ce_sae": ce_i.value, "delta_ce": ce_i.value - m["ce_clean"], "kl": kl_i.value}
        m["loss_recovered"] = loss_recovered(m["ce_clean"], ce_i.value, m["ce_zero"])
        m["loss_recovered_mean"] = loss_recovered(m["ce_clean"], ce_i.value, m["ce_mean"])
        out.append(m)
    return out


def evaluate_sae(
    model: nn.Module,
    hp: HookPoint,
    sae: SAE,
    contexts: Contexts,
    baselines: dict[str, float],
    dense_threshold: float = 0.1,
) -> dict[str, float]:
    """`evaluate_saes` for one SAE."""
    return evaluate_saes(model, hp, [sae], contexts, baselines, dense_threshold)[0]
