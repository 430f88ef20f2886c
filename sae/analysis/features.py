"""Per-feature statistics over held-out contexts (DESIGN §6): one row per latent.

freq          fraction of (non-special) tokens on which f_i > 0
mean_act      mean of f_i over the tokens where it is active
max_act       max of f_i
decoder_norm  ‖W_dec,i‖
top_examples  the `n_top` highest activations, each a decoded context with the token «marked»
top_logits    tokens whose unembedding has the largest dot product with W_dec,i
nearest_feature, nearest_cos   the other latent with the highest decoder cosine: exact up to
              `EXACT_NEIGHBOURS` latents; beyond, searched among the members of the `PROBE`
              clusters whose centres are nearest (an inverted-file search: the cosine found is
              a lower bound of the true one; the neighbour is the exact one for ≥ 99% of
              planted, clustered directions (tests), for 17.8% of the nearly random directions
              of an SAE trained 4 steps (BENCHMARKS.md))
act_p50, act_p90, act_p99   quantiles of f_i over the tokens where it is active: exact over the
              first tokens whose active values fit `quantile_values` (all of them at the usual
              sizes), bounded memory beyond
cluster_id    spherical k-means of the decoder directions, k = ⌈√d_sae⌉ (related features
              cluster, as the seed papers found), its centres fitted on a sample of
              `SAMPLE_PER_CENTRE`·k rows when d_sae is larger, then every row assigned

Memory and time are linear in d_sae: latents are computed `BLOCK_ELEMENTS` values at a time
(`SAE.encode_blocks`), per-latent state is O(n_top·d_sae), and nothing is all-pairs beyond
`EXACT_NEIGHBOURS` latents. The work runs on the SAE's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pyarrow as pa
import torch
from torch import Tensor

from sae.models.base import SAE, row_blocks, unit_rows

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token_ids, special (B,T); acts (B,T,d)

EXACT_NEIGHBOURS = 16_384
"""Up to this many latents, nearest neighbours are exact (all pairs, in blocks)."""
PROBE = 8
"""Beyond `EXACT_NEIGHBOURS`: clusters searched per latent for its nearest neighbour."""
SAMPLE_PER_CENTRE = 64
"""k-means centres are fitted on at most this many rows per centre (then all rows assigned)."""


class FeatureAccumulator:
    """Streaming counts, sums, maxima and top-n (activation, seq, pos) per latent."""

    def __init__(self, d_sae: int, n_top: int, device: torch.device | str = "cpu"):
        self.n_tokens = 0
        self.fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sums = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.top_v = torch.full((n_top, d_sae), -1.0, device=device)  # (n_top, d_sae)
        self.top_i = torch.zeros((n_top, d_sae), dtype=torch.long, device=device)  # flat index
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
    quantile_values: int = 1 << 24,
) -> pa.Table:
    """Feature table for `sae` over `batches` of cached held-out contexts, computed on the
    SAE's device. `decode(ids) -> text`; `unembed` (V, d_in) or None; `vocab(id) -> token`."""
    sae = sae.eval()
    device = sae.W_dec.device
    acc = FeatureAccumulator(sae.d_sae, n_top, device)
    seqs: list[torch.Tensor] = []
    active: list[tuple[torch.Tensor, torch.Tensor]] = []  # (latent ids, values) of f > 0
    kept_values = 0
    for ids, special, acts in batches:
        b, t = ids.shape
        base = sum(s.shape[0] for s in seqs) * t
        seqs.append(ids)
        keep = ~special.reshape(-1)
        flat = (base + torch.arange(b * t))[keep].to(device)
        x = acts.reshape(b * t, -1)[keep].to(device, sae.W_enc.dtype)
        for rows, f in sae.encode_blocks(x):
            acc.update(f, flat[rows])
            if kept_values < quantile_values:
                nz = f.nonzero(as_tuple=True)
                active.append((nz[1].cpu(), f[nz].float().cpu()))
                kept_values += nz[0].numel()
    tokens = torch.cat(seqs)  # (S, T)
    quantiles = _quantiles(active, sae.d_sae, (0.5, 0.9, 0.99))  # (3, d_sae)
    del active
    W_dec = sae.W_dec.detach().float()  # (d_sae, d_in), on the device
    norms = W_dec.norm(dim=1)
    freq = acc.fires / max(acc.n_tokens, 1)
    mean_act = torch.where(acc.fires > 0, acc.sums / acc.fires.clamp(min=1), 0.0)
    label, probes = _kmeans(W_dec, probe=PROBE if sae.d_sae > EXACT_NEIGHBOURS else 1)
    nearest, cos = _nearest(W_dec, probes)
    return pa.table(
        {
            "feature_id": pa.array(range(sae.d_sae), pa.int32()),
            "freq": freq.cpu().numpy(),
            "mean_act": mean_act.cpu().numpy(),
            "max_act": acc.top_v[0].clamp(min=0).double().cpu().numpy(),
            "decoder_norm": norms.double().cpu().numpy(),
            "top_examples": _examples(acc, tokens, decode, before, after),
            "top_logits": _top_logits(W_dec, unembed, vocab, n_logits),
            "nearest_feature": nearest.int().cpu().numpy(),
            "nearest_cos": cos.double().cpu().numpy(),
            "act_p50": quantiles[0].double().numpy(),
            "act_p90": quantiles[1].double().numpy(),
            "act_p99": quantiles[2].double().numpy(),
            "cluster_id": label.int().cpu().numpy(),
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
    like any picked), so well-separated groups each get a centre; deterministic. Centres are
    fitted on a seeded sample of `SAMPLE_PER_CENTRE`·k rows when there are more (time linear
    in d_sae), then every row goes to its nearest centre."""
    return _kmeans(W_dec, k, iters, seed)[0]


def _kmeans(
    W_dec: Tensor, k: int | None = None, iters: int = 10, seed: int = 0, probe: int = 1
) -> tuple[Tensor, Tensor]:
    """(label (n,), probes (n, probe)): each row's cluster and its `probe` nearest centres,
    nearest first (probes[:, 0] == label)."""
    unit = unit_rows(W_dec.float())
    n = unit.shape[0]
    k = min(n, k or math.ceil(math.sqrt(n)))
    g = torch.Generator().manual_seed(seed)
    fit = unit
    if n > SAMPLE_PER_CENTRE * k:
        fit = unit[torch.randperm(n, generator=g)[: SAMPLE_PER_CENTRE * k].to(unit.device)]
    picked = [int(torch.randint(fit.shape[0], (1,), generator=g))]
    closest = fit @ fit[picked[0]]  # (rows,) best cosine to a picked row
    for _ in range(k - 1):
        picked.append(int(closest.argmin()))
        closest = torch.maximum(closest, fit @ fit[picked[-1]])
    centres = fit[picked]  # (k, d_in)
    for _ in range(iters):
        label = _nearest_centres(fit, centres, 1)[:, 0]  # (rows,)
        sums = torch.zeros_like(centres).index_add_(0, label, fit)
        empty = sums.norm(dim=1) == 0
        centres = torch.where(empty[:, None], centres, sums / sums.norm(dim=1, keepdim=True))
    probes = _nearest_centres(unit, centres, min(probe, k))
    return probes[:, 0], probes


def _nearest_centres(unit: Tensor, centres: Tensor, m: int) -> Tensor:
    """(n, m) indices of each row's m most similar centres, in blocks of rows."""
    return torch.cat(
        [(unit[r] @ centres.T).topk(m, dim=1).indices for r in row_blocks(len(unit), len(centres))]
    )


def _examples(
    acc: FeatureAccumulator,
    tokens: torch.Tensor,
    decode: Callable[[list[int]], str],
    before: int,
    after: int,
) -> pa.Array:
    """list<struct<text, activation, seq_id, pos>> per latent; only examples with f > 0."""
    t = tokens.shape[1]
    seqs = tokens.tolist()
    rows = []
    for values, flats in zip(acc.top_v.T.tolist(), acc.top_i.T.tolist(), strict=True):
        ex = []
        for v, flat in zip(values, flats, strict=True):
            if v <= 0:
                break
            s, p = divmod(flat, t)
            seq = seqs[s]
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
    """Tokens each decoder direction promotes most through the unembedding (logit lens),
    in blocks of rows (a dense d_sae × vocab product is 200 GB at 1M latents and GPT-2)."""
    if unembed is None:
        return pa.array([[] for _ in range(W_dec.shape[0])], pa.list_(pa.string()))
    U = unembed.to(W_dec.device, torch.float32)  # (V, d_in)
    top = torch.cat(
        [(W_dec[r] @ U.T).topk(n, dim=1).indices.cpu() for r in row_blocks(len(W_dec), len(U))]
    )  # (d_sae, n)
    names = [vocab(j) for j in range(len(U))]
    return pa.array([[names[j] for j in row] for row in top.tolist()], pa.list_(pa.string()))


def _nearest(W_dec: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """For each decoder row, the most similar other row by cosine: exact (all pairs, in
    blocks) up to `EXACT_NEIGHBOURS` rows; beyond, among the members of each row's `probes`
    clusters (n, p), nearest centre first."""
    unit = unit_rows(W_dec.float())
    n = unit.shape[0]
    best = torch.full((n,), -2.0, device=unit.device)
    idx = torch.zeros(n, dtype=torch.long, device=unit.device)
    if n <= EXACT_NEIGHBOURS:
        _search(unit, torch.arange(n, device=unit.device), torch.arange(n, device=unit.device),
                best, idx)  # fmt: skip
        return idx, best
    label = probes[:, 0]
    members = torch.argsort(label, stable=True)
    counts = torch.bincount(label, minlength=int(probes.max()) + 1).tolist()
    queries = probes.flatten()  # (n·p,): the clusters each row searches
    order = torch.argsort(queries, stable=True)
    asking = torch.div(order, probes.shape[1], rounding_mode="floor")  # the row, by cluster
    asks = torch.bincount(queries, minlength=len(counts)).tolist()
    m0 = q0 = 0
    for size, n_ask in zip(counts, asks, strict=True):
        if size and n_ask:
            _search(unit, asking[q0 : q0 + n_ask], members[m0 : m0 + size], best, idx)
        m0, q0 = m0 + size, q0 + n_ask
    return idx, best


def _search(unit: Tensor, rows: Tensor, among: Tensor, best: Tensor, idx: Tensor) -> None:
    """Update best/idx of `rows` with their most similar row of `among` (itself excluded)."""
    cand = unit[among]  # (m, d_in)
    for r in row_blocks(len(rows), len(among)):
        q = rows[r]
        sim = unit[q] @ cand.T  # (block, m)
        sim[q.unsqueeze(1) == among.unsqueeze(0)] = -2.0  # not itself
        c, j = sim.max(dim=1)
        better = c > best[q]
        best[q] = torch.where(better, c, best[q])
        idx[q] = torch.where(better, among[j], idx[q])
