"""Known-answer data with what makes real features hard, and the scores that compare an SAE to it.

    x = Σ_j a_j·F_j + c + ε,      F_j unit rows (n, d),  a_j ~ U(0, 1) when feature j is on

Feature j is on with probability p_j, with p_j ∝ (j + 1)^−zipf rescaled to `active` on average
(real features' frequencies span decades); `parents` features each have `children` children that
fire only when their parent does (a hierarchy: "animal" → "dog"); `correlation` ties features
through shared Gaussian factors (a copula, so each keeps its own p_j); c is a constant offset
of norm `offset` (a residual stream's mean); ε is isotropic noise of norm ≈ `noise`.

`score` matches each true feature to a distinct latent (greedily by decoder cosine) and reports
MMCS, the firing precision/recall/F1 of matched latents against the truth, and the MCC (mean
Pearson correlation of a_j with its latent's activation), beside FVU and L0; with a hierarchy,
also the F1 of the parents alone (a parent absorbed into its children misses their firings).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.activations.synthetic import mean_max_cos, unit_rows


@dataclass
class GroundTruth:
    d_in: int = 256
    """Width of the activations."""
    n_features: int = 1024
    """True features (directions)."""
    active: float = 16.0
    """Features on per sample, on average, before the clamp of each rate at 0.5 and the children's
    caps (their rates at most half their parents', or `child_rate` of them)."""
    zipf: float = 0.0
    """Firing probabilities ∝ rank^−zipf (0: all equal)."""
    parents: int = 0
    """Features with children (the first ones, the most frequent under zipf)."""
    children: int = 0
    """Children per parent; a child fires only with its parent, on a fraction of its firings."""
    child_rate: float | None = None
    """Each child's firing rate as a fraction of its parent's, the same for every child: P(child
    on | parent on) without `correlation`; with it each child's share moves with the factors it
    shares with its parent and spreads around this value. None: the child's own zipf rate, at
    most half its parent's. A child that fires on a large share of its parent's firings is what
    makes an SAE absorb the parent into the child (Chanin et al. 2024, "A is for Absorption").
    `active` counts the children at their zipf rates, not at these (the mean number on moves)."""
    correlation: float = 0.0
    """Weight in [0, 1) of 8 shared Gaussian factors in each feature's firing propensity."""
    offset: float = 0.0
    """Norm of a constant vector added to every sample."""
    noise: float = 0.0
    """Norm (about) of isotropic Gaussian noise added to every sample."""
    seed: int = 1000
    """Seeds the directions, frequencies, hierarchy and offset (samples: `batches`' seed)."""

    def __post_init__(self) -> None:
        if not self.parents * (1 + self.children) <= self.n_features:
            raise ValueError(
                f"parents·(1 + children) = {self.parents}·(1 + {self.children}) features must fit "
                f"in n_features = {self.n_features}"
            )
        if self.child_rate is not None and not 0 < self.child_rate <= 1:
            raise ValueError(f"child_rate must be in (0, 1], got {self.child_rate}")
        g = torch.Generator().manual_seed(self.seed)
        self.features = unit_rows(self.n_features, self.d_in, self.seed)  # (n, d)
        p = (torch.arange(self.n_features) + 1.0) ** -self.zipf
        self.parent = torch.full((self.n_features,), -1)  # parent index, -1: a root
        kids = torch.arange(self.parents, self.parents * (1 + self.children))
        self.parent[kids] = torch.arange(self.parents).repeat_interleave(self.children)
        self.p = p * (self.active / p.sum())  # marginal firing probabilities, mean `active`
        self.p = self.p.clamp(max=0.5)
        # a child's marginal must stay below its parent's: p(child) = p(parent)·q(child)
        has = self.parent >= 0
        if self.child_rate is None:
            self.p[has] = torch.minimum(self.p[has], 0.5 * self.p[self.parent[has]])
        else:
            self.p[has] = self.child_rate * self.p[self.parent[has]]
        self.q = torch.where(has, self.p / self.p[self.parent.clamp(min=0)], self.p)
        loadings = torch.randn(self.n_features, 8, generator=g)
        self.loadings = loadings / loadings.norm(dim=-1, keepdim=True)  # shared part: variance 1
        direction = torch.randn(self.d_in, generator=g)
        self.mean = direction * (self.offset / direction.norm())

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x (n, d_in), true coefficients a (n, n_features), zero where off)."""
        rho = self.correlation
        shared = torch.randn(n, 8, generator=g) @ self.loadings.T  # (n, n_features), var ≈ 1
        own = torch.randn(n, self.n_features, generator=g)
        u = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
        cut = torch.special.ndtri(1 - self.q)  # P(u > cut) = q for a standard normal u
        on = u > cut
        child = self.parent >= 0
        on[:, child] &= on[:, self.parent[child]]  # a child only with its parent
        a = torch.rand(n, self.n_features, generator=g) * on
        x = a @ self.features + self.mean
        if self.noise:
            x = x + torch.randn(n, self.d_in, generator=g) * (self.noise / math.sqrt(self.d_in))
        return x, a

    def batches(self, batch_size: int, seed: int = 1) -> Iterator[Tensor]:
        """Endless (batch_size, d_in) fp32 batches of x."""
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, g)[0]


def match(features: Tensor, W_dec: Tensor) -> Tensor:
    """For each true feature, a distinct latent: greedily, the most similar (decoder cosine)
    pair first. (n_features,) latent indices (-1 if the SAE has fewer latents than features)."""
    W = W_dec.detach().float()
    cos = features.float() @ (W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T  # (n, d_sae)
    out = torch.full((features.shape[0],), -1, dtype=torch.long)
    order = cos.flatten().argsort(descending=True)
    used_f, used_l = torch.zeros(cos.shape[0], dtype=torch.bool), set()
    for idx in order.tolist():
        i, j = divmod(idx, cos.shape[1])
        if used_f[i] or j in used_l:
            continue
        out[i], used_f[i] = j, True
        used_l.add(j)
        if len(used_l) == min(cos.shape):
            break
    return out


SCORE_SAMPLES = 16_384
"""`score`'s held-out samples by default."""
DEAD_SAMPLES = 262_144
"""`score`'s `dead_long` window: held-out samples a latent must stay silent on to count as dead."""


@torch.no_grad()
def score(
    truth: GroundTruth,
    encode_decode: Callable[[Tensor], tuple[Tensor, Tensor]],
    W_dec: Tensor,
    n: int = SCORE_SAMPLES,
    seed: int = 99,
    dead_n: int = DEAD_SAMPLES,
) -> dict[str, float]:
    """FVU, L0, MMCS, the fraction of latents dead (never active on the held-out samples), and
    for matched latents the firing precision, recall, F1 and the MCC, on n held-out samples
    (all averaged over true features that fired in them), and the F1 of the parents alone
    (NaN without a hierarchy): a parent absorbed into its children misses their firings.
    `dead_long`: the fraction never active on dead_n held-out samples (the n, then more drawn
    after them, n at a time): n = 16,384 cannot tell a latent that fires once in 100k samples
    (measured: relu's rarest on offset data) from one that never fires.
    `encode_decode`: x (n, d_in) -> (f (n, d_sae), x̂ (n, d_in)), the SAE's own."""
    g = torch.Generator().manual_seed(seed)
    x, a = truth.sample(n, g)
    f, x_hat = encode_decode(x)
    active = (f != 0).any(0)
    for start in range(n, dead_n, n):
        more, _ = truth.sample(min(n, dead_n - start), g)
        active |= (encode_decode(more)[0] != 0).any(0)
    f, x_hat = f.float(), x_hat.float()
    fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    m = match(truth.features, W_dec)
    ok = (m >= 0) & (a > 0).any(0)
    fm, am = f[:, m[ok]], a[:, ok]  # (n, matched)
    fired, true_on = fm > 0, am > 0
    tp = (fired & true_on).sum(0).float()
    precision = tp / fired.sum(0).clamp(min=1)
    recall = tp / true_on.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    fc, ac = fm - fm.mean(0), am - am.mean(0)
    corr = (fc * ac).sum(0) / (fc.norm(dim=0) * ac.norm(dim=0)).clamp(min=1e-12)
    parents = torch.nonzero(ok).squeeze(1) < truth.parents  # of the scored features
    return {
        "fvu": fvu,
        "l0": (f != 0).sum(-1).float().mean().item(),
        "mmcs": mean_max_cos(truth.features, W_dec),
        "dead": ((f != 0).sum(0) == 0).float().mean().item(),
        "dead_long": (~active).float().mean().item(),
        "precision": precision.mean().item(),
        "recall": recall.mean().item(),
        "f1": f1.mean().item(),
        "mcc": corr.mean().item(),
        "f1_parents": f1[parents].mean().item() if parents.any() else math.nan,
    }
