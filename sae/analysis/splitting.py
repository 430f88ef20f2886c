"""Feature splitting across SAE widths ("Towards Monosemanticity", Bricken et al. 2023).

A feature of a small SAE often splits into several more specific features of a larger SAE
trained on the same activations. We match the two dictionaries by decoder direction:

    ŝ_i = s_i / ‖s_i‖,  l̂_j = l_j / ‖l_j‖          small (n_small, d_in), large (n_large, d_in)
    C_ji = l̂_j · ŝ_i                                 cosine matrix (n_large, n_small)
    parent(j) = argmax_i C_ji                        ties: the lowest i

Feature j of the larger SAE is a child of parent(j) only when C_j,parent(j) >= threshold;
otherwise it is a new feature, not a split. Every child has exactly one parent; a parent has
zero or more children, ranked by cosine (rank 1 = the most similar; ties: the lowest j). A
parent with two or more children is a feature family.

C is never held whole (1M × 4M features would be 16 TB): it is built in chunk × chunk blocks with
a running max per large feature, so peak memory is about chunk² floats whatever the widths.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import Tensor

from sae.models.base import SAE, unit_rows

SCHEMA = pa.schema(
    [
        ("parent", pa.int32()),
        ("child", pa.int32()),
        ("cos", pa.float32()),
        ("rank", pa.int32()),
        ("n_children", pa.int32()),
    ]
)


def decoder_directions(sae: SAE) -> Tensor:
    """(d_sae, d_in) unit-norm rows of `sae.W_dec`: fp32, CPU, detached."""
    return unit_rows(sae.W_dec.detach().float().cpu())


def match_features(
    small: Tensor, large: Tensor, threshold: float = 0.5, chunk: int = 4096
) -> pa.Table:
    """Parent–child table from decoder directions small (n_small, d_in) and large (n_large, d_in).

    Columns (`SCHEMA`): parent (feature of small), child (feature of large), cos (C_ji), rank
    (1 = the child closest to its parent), n_children; sorted by parent then rank. Rows need not
    be unit norm; zero rows have cosine 0 with everything, so they are nobody's child.
    """
    if small.ndim != 2 or large.ndim != 2 or small.shape[1] != large.shape[1]:
        raise ValueError(
            "small and large must be (n, d_in) matrices with the same d_in, got "
            f"small {tuple(small.shape)} and large {tuple(large.shape)}"
        )
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk}")
    small, large = unit_rows(small.float()), unit_rows(large.float())
    best = torch.full((large.shape[0],), -torch.inf, device=large.device)  # (n_large,)
    parent = torch.zeros(large.shape[0], dtype=torch.long, device=large.device)
    for j in range(0, large.shape[0], chunk):
        rows = large[j : j + chunk]  # (≤chunk, d_in)
        b, p = best[j : j + chunk], parent[j : j + chunk]  # views: updated in place
        for i in range(0, small.shape[0], chunk):
            cos, arg = (rows @ small[i : i + chunk].T).max(dim=1)  # first max on ties
            better = cos > b  # strict: on a tie the earlier block (lower i) stays
            b[better], p[better] = cos[better], arg[better] + i
    best, parent = best.cpu(), parent.cpu()
    child = (best >= threshold).nonzero().squeeze(1)  # ascending j: the tie-break for rank
    parent, cos = parent[child], best[child]
    order = cos.argsort(descending=True, stable=True)
    order = order[parent[order].argsort(stable=True)]  # by parent, then cos descending
    child, parent, cos = child[order], parent[order], cos[order]
    counts = torch.bincount(parent, minlength=small.shape[0])  # (n_small,) children per parent
    start = torch.cumsum(counts, 0) - counts  # first row of each parent's family
    rank = torch.arange(len(child)) - start[parent] + 1
    n_children = counts[parent]
    cols = (parent, child, cos, rank, n_children)
    return pa.table(
        [pa.array(c.numpy(), f.type) for c, f in zip(cols, SCHEMA, strict=True)], SCHEMA
    )


def families(table: pa.Table, min_children: int = 2) -> dict[int, list[tuple[int, float]]]:
    """Parents with at least `min_children` children -> [(child, cos)] in rank order."""
    if min_children < 1:
        raise ValueError(f"min_children must be >= 1, got {min_children}")
    out: dict[int, list[tuple[int, float]]] = {}
    rows = table.sort_by([("parent", "ascending"), ("rank", "ascending")]).to_pylist()
    for row in rows:
        if row["n_children"] >= min_children:
            out.setdefault(row["parent"], []).append((row["child"], row["cos"]))
    return out
