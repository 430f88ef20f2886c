"""Known-answer activations: sparse sums of ground-truth directions (Sharkey et al. 2022).

    x = scale·Σ_j a_j·F_j + offset,   F_j unit rows of F (n, d),   a_j ~ U(0, 1) when on

with each feature on independently with probability active/n, so about `active` per sample. An SAE
that learns the data's features has decoder rows close to the F_j: `mean_max_cos` (MMCS) near 1.
`scale` and `offset` put the data far from E‖x‖ = √d and zero mean, as real activations are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def unit_rows(n: int, d: int, seed: int) -> Tensor:
    """(n, d) random unit rows from torch.Generator(seed). Draw true features with a seed other
    than the SAE's: build_sae(seed=s) draws its decoder from the stream unit_rows(seed=s) uses."""
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=-1, keepdim=True)


def sparse_batches(
    features: Tensor,
    batch_size: int,
    active: float,
    seed: int = 1,
    scale: float = 10.0,
    offset: float = 3.0,
) -> Iterator[Tensor]:
    """Endless (batch_size, d) fp32 batches of the model above, seeded by `seed`.

    Only the on features are summed (an embedding bag): O(B·n) random draws and O(B·active·d)
    arithmetic, not a dense (B, n) @ (n, d) product, so generating data costs little next to the
    SAE it feeds.
    """
    g = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    while True:
        on = torch.rand(batch_size, n, generator=g) < active / n  # (B, n)
        a = torch.rand(batch_size, n, generator=g)  # (B, n); only the on entries are used
        row, col = on.nonzero(as_tuple=True)  # sorted by row
        offsets = torch.searchsorted(row, torch.arange(batch_size))
        x = F.embedding_bag(col, features, offsets, mode="sum", per_sample_weights=a[row, col])
        yield x * scale + offset


def mean_max_cos(features: Tensor, W_dec: Tensor) -> float:
    """MMCS: for each true feature (row of `features`), its best cosine with a decoder row
    (row of W_dec (d_sae, d)), averaged over the features."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (features.float() @ W.T).max(1).values.mean().item()
