"""Evaluate SAEs on held-out contexts: reconstruction and downstream loss (DESIGN §6).

Downstream losses are next-token cross-entropies (nats, mean over every prediction in the
evaluation contexts) with the activation at the hook, at each non-special position, left alone
(`ce_clean`), replaced by an SAE's reconstruction (`ce_sae`), zeroed (`ce_zero`) or replaced by
its mean over the evaluation set (`ce_mean`); `kl` is the mean over predictions of
KL(p_clean ‖ p_sae). Excluded positions (BOS/EOS, outlier rows) keep their clean activation in
every variant: the SAE never trained on them.

`protocol="saebench"` computes the same names as SAELens's evaluation (`sae_lens.evals`, as
SAEBench reports them): the kept positions are those whose input token is not special (no
outlier filter); `ce_zero` zeroes the activation at every position, BOS included; CE is the
mean over predictions made at kept positions; `kl` is KL(p_clean ‖ p_sae) averaged over every
kept position, the last included; `mse` is mean ‖x − x̂‖² summed over dimensions (saeflow's
divides by d_in). Explained variance and L0 have one definition in both.

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
from sae.analysis.protocol import PROTOCOLS
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

    def add(self, values: Tensor, where: Tensor | None = None) -> None:
        """Add `values`' elements (only those where the mask `where` is true, if given)."""
        values = values if where is None else values[where]
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
def ce_baselines(
    model: nn.Module, hp: HookPoint, contexts: Contexts, protocol: str = "saeflow"
) -> dict[str, float]:
    """`ce_clean`, `ce_zero` and `ce_mean` (with the mean kept activation of the set)."""
    bench = _protocol(protocol)
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
        where = keep[:, :-1] if bench else None  # predictions made at kept positions
        zeroed = torch.zeros_like(acts) if bench else acts * ~m
        ablated = torch.where(m, mean.to(acts.dtype), acts)
        for name, a in (("ce_clean", acts), ("ce_zero", zeroed), ("ce_mean", ablated)):
            ce[name].add(_ce(_logprobs(logits_from(model, hp, ids, a)), ids), where)
    return {name: m.value for name, m in ce.items()}


@torch.no_grad()
def evaluate_saes(
    model: nn.Module,
    hp: HookPoint,
    saes: list[SAE],
    contexts: Contexts,
    baselines: dict[str, float],
    dense_threshold: float = 0.1,
    protocol: str = "saeflow",
) -> list[dict[str, float]]:
    """Metrics of each SAE (DESIGN §6, or SAELens's with protocol="saebench") from one pass
    over the contexts: reconstruction stats of the live activations at the hook, ce_sae,
    delta_ce, kl, loss_recovered (zero ablation) and loss_recovered_mean (mean ablation), plus
    the baselines (`ce_baselines` of the same protocol)."""
    bench = _protocol(protocol)
    device = next(model.parameters()).device
    saes = [sae.to(device).eval() for sae in saes]
    stats = [ReconstructionStats(sae.d_sae, dense_threshold) for sae in saes]
    ce = [_Mean() for _ in saes]
    kl = [_Mean() for _ in saes]
    for ids, keep, acts in _batches(model, hp, contexts):
        failpoint("evaluate.batch")
        clean = logits_from(model, hp, ids, acts).log_softmax(-1)  # (B, T, vocab)
        kl_to_clean = KLToClean(clean if bench else clean[:, :-1])  # once per batch
        del clean
        for sae, st, ce_i, kl_i in zip(saes, stats, ce, kl, strict=True):
            x = acts[keep].to(sae.W_enc.dtype)  # (N, d_in): the kept positions
            x_hat = torch.empty_like(x)
            for rows, f in sae.encode_blocks(x):  # never (N, d_sae) at once
                x_hat[rows] = sae.decode(f)
                st.update(x[rows], x_hat[rows], f)
            spliced = acts.clone()
            spliced[keep] = x_hat.to(acts.dtype)
            logp = logits_from(model, hp, ids, spliced).log_softmax(-1)  # (B, T, vocab)
            if bench:  # CE of predictions at kept positions; KL at every kept position
                ce_i.add(_ce(logp[:, :-1], ids), keep[:, :-1])
                kl_i.add(kl_to_clean(logp), keep)
            else:  # CE and KL over every prediction
                ce_i.add(_ce(logp[:, :-1], ids))
                kl_i.add(kl_to_clean(logp[:, :-1]))
    out = []
    for sae, st, ce_i, kl_i in zip(saes, stats, ce, kl, strict=True):
        m = st.compute() | baselines
        if bench:
            m["mse"] *= sae.d_in  # SAELens: summed over dimensions
        m |= {"ce_sae": ce_i.value, "delta_ce": ce_i.value - m["ce_clean"], "kl": kl_i.value}
        m["loss_recovered"] = loss_recovered(m["ce_clean"], ce_i.value, m["ce_zero"])
        m["loss_recovered_mean"] = loss_recovered(m["ce_clean"], ce_i.value, m["ce_mean"])
        out.append(m)
    return out


def _protocol(protocol: str) -> bool:
    """True for saebench; ValueError for an unknown protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol == "saebench"


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
