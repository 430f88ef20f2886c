"""The SAE's config: its architecture and every hyper-parameter, one default and one check each.

No torch here: `conf/schema.py` uses this class as the `sae` section of the config, so a value
is written, defaulted, checked and documented once. An architecture reads the fields it names
in its `hparams` (and saves exactly those in `cfg.json`); the others are ignored by it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from sae.checks import choice, non_negative, positive

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
"""Architecture names, each a module of `sae.models`."""
K_ARCHS = ("topk", "batchtopk", "matryoshka")
"""Architectures whose L0 is set by `k`."""
STEERED = ("relu", "jumprelu")
"""Architectures whose L0 is set by a sparsity coefficient λ (so `target_l0` can steer it);
the others set it with `k`."""
DEFAULT_LR = {"relu": 3e-3, "topk": 3e-3, "batchtopk": 3e-3, "jumprelu": 1e-2, "matryoshka": 3e-3}
"""Peak lr where `train.lr` is None, by architecture (measured: BENCHMARKS.md, ground truth;
relu 1e-3 → 3e-3 on 2026-12-05: default study EV 0.922 at L0 33.0 → 0.929 at L0 34.3 with
the centred encoder, and known-answer MMCS 0.869 → 0.994 in one pass of 1M samples; jumprelu
1e-3 → 1e-2 on 2026-12-06: Adam moves θ by ~lr a step, so at 1e-3 the L0 penalty could not
lower θ far enough in a run of hundreds of steps (known-answer data, target_l0 16: L0 160,
MMCS 0.197; at 1e-2: L0 15.8, MMCS 0.982), and on the default study (pipeline, 2-core AMD
EPYC) EV 0.959 at L0 21.0 with 2% dead (lr 1e-3, λ 1) → 0.979 at L0 19.0 with 61% dead (lr
1e-2, λ 0.2, `conf/sae/jumprelu.yaml`))."""
DEFAULT_LR_DECAY = {"relu": 0.2, "topk": 0.3, "batchtopk": 0.2, "jumprelu": 0.2, "matryoshka": 0.2}
"""Fraction of the steps over which lr decays to 0 where `train.lr_decay_frac` is None, by
architecture. topk 0.2 → 0.3 on 2026-12-07 (known-answer data, 2M samples, d_sae 2048, k 16:
flat MMCS 0.9978 → 0.9980, FVU 0.1107 → 0.1101; offset 0.9978 → 0.9980, 0.1107 → 0.1102; at the
cost of hierarchical F1 0.613 → 0.606 and, on the default study, EV 0.962 → 0.961 with dead 6.2%
→ 6.8%); the others were not measured at 0.3 and keep 0.2."""


@dataclass
class SAEConfig:
    arch: str = "relu"
    """`relu` (Anthropic April 2024: ReLU, decoder-norm-weighted L1), `topk` (Gao et al. 2024),
    `batchtopk` (Bussmann et al. 2024), `jumprelu` (Rajamanoharan et al. 2024) or `matryoshka`
    (Matryoshka BatchTopK, Bussmann et al. 2025)."""
    d_sae: int = 1024
    """Number of latents."""
    l1_coeff: float = 2.0
    """relu, jumprelu: sparsity coefficient λ (L1 for relu, L0 for jumprelu), for inputs scaled
    to E‖x‖ = √d_in. `sae=jumprelu` (`conf/sae/jumprelu.yaml`) sets 0.2: an L0 penalty wants a
    ~10× smaller λ than relu's L1 (default study: L0 19 at 0.2, 4 at 2)."""
    centre: bool = True
    """relu, jumprelu: encode x − c for c the data's geometric median, fixed (folded into b_enc
    when saved). Keeps relu alive on data with a large offset (known-answer data, offset 10:
    every latent dead without it, MMCS 0.994 with it) and costs nothing on the default study
    (relu at lr 3e-3: EV 0.929 at L0 34.3 centred, 0.928 at L0 21.5 not; jumprelu at its then lr
    1e-3 and λ 1: EV 0.960 at L0 20.5 centred, 0.962 at L0 19.7 not). Measured 2026-12-05; it
    was off before."""
    init_norm: float = 0.1
    """relu: norm of the decoder rows at initialisation (W_enc starts as W_decᵀ)."""
    k: int = 16
    """topk, batchtopk, matryoshka: active latents per token (the batch ones: on average over
    the batch)."""
    k_train_factor: float = 1.0
    """topk, batchtopk, matryoshka: training keeps round(k_train_factor·k) latents per token
    (batchtopk: on average); above 1, a threshold θ learnt during training (`TopKSAE`) keeps k
    of them per token on average at inference, so a token with few features drops the small,
    spurious values a fixed k would keep. Measured 2026-12-07 (L0 16 at inference), matryoshka
    at 1 / 1.5 / 2: known-answer hierarchical data (2M samples) F1 0.620 / 0.695 / 0.720, FVU
    0.111 / 0.105 / 0.115; flat data F1 0.677 / 0.686, FVU 0.121 / 0.149; but the default study
    (real activations) EV 0.960 / 0.949 / 0.902 with 11% / 73% / 85% of latents dead (one θ
    for all latents silences those whose values are small): hence 1 by default."""
    aux_k: int | None = None
    """topk, batchtopk, matryoshka: dead latents the AuxK loss may use per token (None =
    d_in // 2)."""
    aux_coeff: float = 1 / 32
    """topk, batchtopk, matryoshka: weight of the AuxK loss on dead latents."""
    dead_tokens: int = 200_000
    """topk, batchtopk, matryoshka: training tokens without firing after which a latent counts
    as dead for
    AuxK (AuxK starts once this many tokens have been trained)."""
    unit_decoder: bool = False
    """topk, batchtopk, matryoshka, jumprelu: keep each decoder row at norm 1 while training
    (Gao et al., Gemma Scope, sparsify: the row's gradient along itself removed, the row
    renormalised after each step); False leaves the rows' norms to Adam. Where no penalty reads
    the norms (these four), a row's norm and its latent's scale trade freely, so the constraint
    only removes freedom: measured 2026-12-07 (known-answer data, 2M samples, d_sae 2048, L0 16,
    unit → free), hierarchical data F1 topk 0.605 → 0.679, matryoshka 0.623 → 0.672, batchtopk
    0.481 → 0.645, jumprelu 0.680 → 0.739, MMCS 0.931 → 0.972 (topk), 0.941 → 0.976 (jumprelu);
    flat data topk MMCS 0.9977 → 0.9982, FVU 0.1103 → 0.1098, jumprelu FVU 0.163 → 0.122;
    default study EV topk 0.961 → 0.961 with dead 5.9% → 2.1%, matryoshka 0.959 → 0.961 (dead
    12.2% → 5.0%). False by default since then; files saved before are `True`. relu's decoder
    norms weigh its L1 and are never constrained."""
    pre_act_coeff: float = 1e-3
    """jumprelu: weight of Anthropic's pre-activation loss (Circuits Updates, January 2025;
    SAELens's `pre_act_loss_coefficient`), mean_N Σ_i ReLU(θ_i − h_i)·‖W_dec,i‖ for h the
    pre-activations before the ReLU, which pulls every latent's h toward its threshold where it
    does not fire, so latents that never fire are drawn back (θ and the norms get no gradient
    from it; 0 = off). Measured 2026-12-08 at 0 / 1e-3 / 3e-3: on the default study (real
    activations, d_sae 1024) at λ 0.2 dead 54% / 16% / 1.3% of latents, EV 0.978 / 0.979 /
    0.977 at L0 18.4 / 19.5 / 21.3; steered to L0 16 dead 58% / 17% / 0.9%, EV 0.971 / 0.969 /
    0.967; on known-answer data (2M samples, steered to L0 16) F1 hard 0.737 / 0.738 / 0.728,
    tree 0.666 / 0.662 / 0.640, latents silent on 262k held-out samples 10–20% / 0.15–0.4% / 0.
    1e-3 by default: the dead latents fall by two thirds, the known-answer scores within one
    run's spread; 3e-3 leaves almost none, at a cost. SAELens applies it to dead latents only;
    here that left 41–45% dead at 1e-3..1e-2 (a latent that fires once in the 200k-token window
    is not dead, yet silent on held-out tokens)."""
    threshold_beta: float = 0.9
    """batchtopk, and topk / matryoshka with `k_train_factor` > 1: β of the running average that
    sets the inference threshold θ (a horizon of about 1/(1 − β) batches)."""
    bandwidth: float = 1e-3
    """jumprelu: width ε of the straight-through rectangle kernel, in units where E‖x‖² = 1."""
    init_threshold: float = 1e-3
    """jumprelu: the threshold θ at initialisation, in units where E‖x‖² = 1."""
    matryoshka_fractions: list[float] = field(default_factory=lambda: [0.0625, 0.25, 1.0])
    """matryoshka: the nested prefixes that must each reconstruct x, as fractions of d_sae
    (increasing, the last 1: the whole dictionary)."""
    matryoshka_topk: str = "token"
    """matryoshka: which latents fire: each token's k largest ("token", as TopK) or the batch's
    k·N largest with a learnt threshold at inference ("batch", BatchTopK as in Bussmann et al.
    2025). "token" by measurement (BENCHMARKS.md, known-answer data, 2M samples, 2026-12-07):
    BatchTopK's one threshold lets tokens of large norm take many latents (per-token L0 std 8.7
    where the true count's is 4), and on the hierarchical data F1 0.620 token, 0.444 batch."""
    target_l0: float | None = None
    """relu, jumprelu: steer λ during training so the run ends at this L0 (None = fixed λ)."""

    @property
    def k_train(self) -> int:
        """k' = round(k_train_factor·k): the latents a top-k SAE trains per token."""
        return round(self.k_train_factor * self.k)

    def __post_init__(self) -> None:
        choice("sae", "arch", self.arch, ARCHS)
        positive("sae", d_sae=self.d_sae, k=self.k, init_norm=self.init_norm)
        positive("sae", dead_tokens=self.dead_tokens, bandwidth=self.bandwidth)
        positive("sae", init_threshold=self.init_threshold)
        for name in ("d_sae", "k", "dead_tokens"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"sae.{name} must be an int, got {getattr(self, name)!r}")
        if self.arch in K_ARCHS and self.k > self.d_sae:
            raise ValueError(f"sae.k={self.k} must be <= sae.d_sae={self.d_sae}")
        f = self.k_train_factor
        if not (isinstance(f, int | float) and math.isfinite(f) and f >= 1):
            raise ValueError(f"sae.k_train_factor must be a finite number >= 1, got {f!r}")
        if self.arch in K_ARCHS and self.k_train > self.d_sae:
            raise ValueError(
                f"sae.k_train_factor={f:g} trains round({f:g}·k) = {self.k_train} latents "
                f"per token, more than sae.d_sae={self.d_sae}"
            )
        if self.aux_k is not None and not (isinstance(self.aux_k, int) and self.aux_k > 0):
            raise ValueError(f"sae.aux_k must be a positive int or None, got {self.aux_k!r}")
        coeffs = {"l1_coeff": self.l1_coeff, "aux_coeff": self.aux_coeff}
        non_negative("sae", **coeffs, pre_act_coeff=self.pre_act_coeff)
        if not isinstance(self.unit_decoder, bool):
            raise ValueError(f"sae.unit_decoder must be true or false, got {self.unit_decoder!r}")
        if not 0 <= self.threshold_beta < 1:  # 1 would never move θ
            raise ValueError(f"sae.threshold_beta must be in [0, 1), got {self.threshold_beta}")
        choice("sae", "matryoshka_topk", self.matryoshka_topk, ("token", "batch"))
        fr = self.matryoshka_fractions
        if not fr or fr[-1] != 1 or any(not 0 < a < b for a, b in itertools.pairwise(fr)):
            raise ValueError(
                f"sae.matryoshka_fractions must increase strictly in (0, 1] and end at 1, got {fr}"
            )
        if self.target_l0 is not None:
            if self.arch not in STEERED:
                raise ValueError(
                    f"sae.target_l0 needs arch relu or jumprelu, got target_l0={self.target_l0:g} "
                    f"with arch {self.arch}, which sets its L0 with sae.k"
                )
            t = self.target_l0
            if not (isinstance(t, int | float) and math.isfinite(t) and 0 < t <= self.d_sae):
                raise ValueError(f"sae.target_l0 must be in (0, d_sae] or None, got {t}")
