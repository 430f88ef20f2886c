"""Per-feature statistics over held-out contexts (DESIGN §6): one row per latent.

freq          fraction of (non-special) tokens on which f_i > 0
mean_act      mean of f_i over the tokens where it is active
max_act       max of f_i
decoder_norm  ‖W_dec,i‖
top_examples  the `n_top` highest activations, each a decoded context with the token «marked»
top_logits    tokens whose unembedding has the largest dot product with W_dec,i
nearest_feature, nearest_cos   the other latent with the highest decoder cosine
act_p50, act_p90, act_p99   quantiles of f_i over the tokens where it is active (the first
              `quantile_tokens` tokens: exact there, bounded memory beyond)
cluster_id    spherical k-means of the decoder directions, k = ⌈√d_sae⌉ (related features
              cluster, as the seed papers found)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pyarrow as pa
import torch

from sae.models.base import SAE

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token_ids, special (B,T); acts (B,T,d)


class FeatureAccumulator:
    """Streaming counts, sums, maxima and top-n (activation, seq, pos) per latent."""

    def __init__(self, d_sae: int, n_top: int):
        self.n_tokens = 0
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.sums = torch.zeros(d_sae, dtype=torch.float64)
        self.top_v = torch.full((n_top, d_sae), -1.0)  # (n_top, d_sae)
        self.top_i = torch.zeros((n_top, d_sae), dtype=torch.long)  # flat token index
        self.n_top = n_top

    def update(self, f: torch.Tensor, flat_idx: torch.Tensor) -> None:
        """f: (N, d_sae) latents; flat_idx: (N,) seq·T + pos of each row."""
        self.n_tokens += f.shape[0]
        self.fires += (f > 0).sum(0, dtype=torch.float64)
        self.sums += f.sum(0, dtype=torch.float64)
        v = torch.cat([self.top_v, f.float()])  # (n_top + N, d_sae)
        k = min(self.n_top, v.shape[0])
        best_v, best_row = v.topk(k, dim=0)
        idx = torch.cat([self.top_i, flat_idx.unsqueeze(1).expand(-1, f.shape[1])])
        self.top_v, self.top_i = best_v, idx.gather(0, best_row)


@torch.no_grad()
def feature_stats(
    sae: SAE,
    batches: Iterable[Batch],
    decode: Callable[[list[int]], str],
    unembed: torch.Tensor | None,
    vocab: Callable[[int], str],
    *,
    n_top: int = 8,
    before: int = 12,
    after: int = 3,
    n_logits: int = 10,
    quantile_tokens: int = 262_144,
) -> pa.Table:
    """Feature table for `sae` over `batches` of cached held-out contexts.

    `decode(ids) -> text`; `unembed` (V, d_in) or None; `vocab(id) -> token string`.
    """
    sae = sae.cpu().eval()
    acc = FeatureAccumulator(sae.d_sae, n_top)
    seqs: list[torch.Tensor] = []
    active: list[tuple[torch.Tensor, torch.Tensor]] = []  # (latent ids, values) of f > 0
    for ids, special, acts in batches:
        b, t = ids.shape
        base = sum(s.shape[0] for s in seqs) * t
        seqs.append(ids)
        keep = ~special.reshape(-1)
        flat = (base + torch.arange(b * t))[keep]
        f = sae.encode(acts.reshape(b * t, -1)[keep].float())
        acc.update(f, flat)
        if acc.n_tokens - f.shape[0] < quantile_tokens:
            f = f[: quantile_tokens - (acc.n_tokens - f.shape[0])]
            nz = f.nonzero(as_tuple=True)
            active.append((nz[1], f[nz]))
    tokens = torch.cat(seqs)  # (S, T)
    quantiles = _quantiles(active, sae.d_sae, (0.5, 0.9, 0.99))  # (3, d_sae)
    W_dec = sae.W_dec.detach().float()  # (d_sae, d_in)
    norms = W_dec.norm(dim=1)
    freq = acc.fires / max(acc.n_tokens, 1)
    mean_act = torch.where(acc.fires > 0, acc.sums / acc.fires.clamp(min=1), 0.0)
    nearest, cos = _nearest(W_dec)
    return pa.table(
        {
            "feature_id": pa.array(range(sae.d_sae), pa.int32()),
            "freq": freq.numpy(),
            "mean_act": mean_act.numpy(),
            "max_act": acc.top_v[0].clamp(min=0).double().numpy(),
            "decoder_norm": norms.double().numpy(),
            "top_examples": _examples(acc, tokens, decode, before, after),
            "top_logits": _top_logits(W_dec, unembed, vocab, n_logits),
            "nearest_feature": nearest.int().numpy(),
            "nearest_cos": cos.double().numpy(),
            "act_p50": quantiles[0].double().numpy(),
            "act_p90": quantiles[1].double().numpy(),
            "act_p99": quantiles[2].double().numpy(),
            "cluster_id": clusters(W_dec).int().numpy(),
        }
    )


def _quantiles(
    active: list[tuple[torch.Tensor, torch.Tensor]], d_sae: int, qs: tuple[float, ...]
) -> torch.Tensor:
    """(len(qs), d_sae) quantiles (nearest rank) of each latent's active values; 0 if never."""
    if not active:
        return torch.zeros(len(qs), d_sae)
    ids = torch.cat([a for a, _ in active])
    vals = torch.cat([v for _, v in active]).float()
    vals, order = vals.sort()
    ids = ids[order]
    ids, order = ids.sort(stable=True)  # by latent, values ascending within each
    vals = vals[order]
    counts = torch.bincount(ids, minlength=d_sae)  # (d_sae,)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.zeros(len(qs), d_sae)
    has = counts > 0
    for i, q in enumerate(qs):
        at = starts + ((counts - 1).clamp(min=0).double() * q).round().long()
        out[i, has] = vals[at[has]]
    return out


def clusters(W_dec: torch.Tensor, k: int | None = None, iters: int = 10, seed: int = 0):
    """(d_sae,) cluster of each decoder direction: spherical k-means (cosine), k = ⌈√d_sae⌉,
    started from farthest-point picks (a row drawn with `seed`, then each time the row least
    like any picked), so well-separated groups each get a centre; deterministic."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    n = unit.shape[0]
    k = min(n, k or math.ceil(math.sqrt(n)))
    picked = [int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))]
    closest = unit @ unit[picked[0]]  # (n,) best cosine to a picked row
    for _ in range(k - 1):
        picked.append(int(closest.argmin()))
        closest = torch.maximum(closest, unit @ unit[picked[-1]])
    centres = unit[picked]  # (k, d_in)
    for _ in range(iters):
        label = (unit @ centres.T).argmax(1)  # (n,)
        sums = torch.zeros_like(centres).index_add_(0, label, unit)
        empty = sums.norm(dim=1) == 0
        centres = torch.where(empty[:, None], centres, sums / sums.norm(dim=1, keepdim=True))
    return (unit @ centres.T).argmax(1)


def _examples(
    acc: FeatureAccumulator,
    tokens: torch.Tensor,
    decode: Callable[[list[int]], str],
    before: int,
    after: int,
) -> pa.Array:
    """list<struct<text, activation, seq_id, pos>> per latent; only examples with f > 0."""
    t = tokens.shape[1]
    rows = []
    for i in range(acc.top_v.shape[1]):
        ex = []
        for v, flat in zip(acc.top_v[:, i].tolist(), acc.top_i[:, i].tolist(), strict=True):
            if v <= 0:
                break
            s, p = divmod(flat, t)
            seq = tokens[s].tolist()
            text = (
                decode(seq[max(0, p - before) : p])
                + "«"
                + decode(seq[p : p + 1])
                + "»"
                + decode(seq[p + 1 : p + 1 + after])
            )
            ex.append({"text": text, "activation": v, "seq_id": s, "pos": p})
        rows.append(ex)
    kind = pa.list_(
        pa.struct(
            [
                ("text", pa.string()),
                ("activation", pa.float32()),
                ("seq_id", pa.int64()),
                ("pos", pa.int32()),
            ]
        )
    )
    return pa.array(rows, type=kind)


def _top_logits(
    W_dec: torch.Tensor, unembed: torch.Tensor | None, vocab: Callable[[int], str], n: int
) -> pa.Array:
    """Tokens each decoder direction promotes most through the unembedding (logit lens)."""
    if unembed is None:
        return pa.array([[] for _ in range(W_dec.shape[0])], pa.list_(pa.string()))
    top = (W_dec @ unembed.float().T).topk(n, dim=1).indices  # (d_sae, n)
    return pa.array([[vocab(j) for j in row] for row in top.tolist()], pa.list_(pa.string()))


def _nearest(W_dec: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each decoder row, the most similar other row by cosine; chunked to bound memory."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    idx, cos = [], []
    for start in range(0, unit.shape[0], chunk):
        sim = unit[start : start + chunk] @ unit.T  # (chunk, d_sae)
        rows = torch.arange(start, min(start + chunk, unit.shape[0]))
        sim[torch.arange(len(rows)), rows] = -2.0  # not itself
        c, j = sim.max(dim=1)
        idx.append(j)
        cos.append(c)
    return torch.cat(idx), torch.cat(cos)
