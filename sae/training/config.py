"""The training config: everything `fit` and its batch loader read, one default and one check
each. No torch here: `conf/schema.py` extends this class by the orchestration-only fields to make
the `train` section of the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from sae.checks import choice, fraction, non_negative, positive
from sae.devices import TRAIN_DTYPES, check_device


@dataclass
class FitConfig:
    tokens: int = 2_457_600
    """Training tokens; the run takes steps = ceil(tokens / batch_size) batches (the loader
    cycles over a cache that holds fewer)."""
    batch_size: int = 4096
    """Rows per batch the loader yields (sets the step count; the trainer takes what it gets)."""
    lr: float | None = None
    """Peak Adam learning rate (inputs are scaled to E‖x − median‖ = √d_in, so it transfers
    across models); None = the architecture's measured default (`sae.models.config.DEFAULT_LR`)."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity penalty ramps 0 → 1 (`sparsity_scale`)."""
    lr_warmup_frac: float = 0.0
    """Fraction of steps over which lr ramps linearly 0 → lr."""
    lr_decay_frac: float | None = None
    """Fraction of steps at the end over which lr decays linearly to 0; None = the
    architecture's measured default (`sae.models.config.DEFAULT_LR_DECAY`: 0.3 for topk, 0.2
    for the others)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    dtype: str = "auto"
    """auto | bf16 | fp32: bf16 autocast with fp32 master weights; auto = bf16 on CUDA or on a
    CPU with native bf16 matmuls (AVX-512 BF16 / AMX), else fp32 (an AVX2 CPU emulates bf16
    matmuls ~40x slower than fp32)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (GPU N; `runner.devices` spreads a sweep's SAEs over GPUs)."""
    seed: int = 0
    """Seeds the SAE's initialisation, the loader's shuffle and torch's RNG during fit."""
    log_every: int = 10
    """Report train/* metrics every this many steps, and at the last step."""
    scale: str = "spread"
    """The input scale s the trainer applies (folded into the saved weights): `spread`, s =
    √d_in / E‖x − m‖ with m the data's geometric median, so λ and lr mean the same on data with
    and without a large constant offset (default since 2026-12-05), or `norm`, s = √d_in / E‖x‖
    (Anthropic's; an offset 4× the signal shrinks the signal 4× in those units). Measured on
    the default study: relu λ 3 EV 0.870 at L0 36.7 by norm, 0.874 at L0 37.7 by spread; topk
    0.9635 by norm, 0.9634 by spread."""
    geometric_median_samples: int = 4096
    """Rows of the first batch used for the input scale and b_dec's geometric median."""
    threads: int = 0
    """torch CPU threads during training (0 = torch's default)."""
    dead_window: int = 200_000
    """Training tokens without firing after which a latent counts in the logged `dead_frac`."""
    checkpoint_every: int = 100
    """Steps between trainer states (0 = none): a killed run resumes from the newest."""
    compile: bool = False
    """Run the SAE's forward through torch.compile."""
    shuffle_rows: int = 262_144
    """Rows in the loader's shuffle buffer: memory is bounded by this, not by the cache size."""
    l0_smooth: float = 0.1
    """`sae.target_l0`'s controller: weight of each step's log L0 in its running mean (~10
    steps). The four l0_* values were chosen on the default study and the synthetic data
    (default study target 38 → L0 37.5 on its training tokens; known-answer data target 16 →
    16.0; `sae.training.fit._L0Controller`)."""
    l0_slow: float = 2.0
    """`sae.target_l0`'s controller: the log-time averaging of the smoothed log L0 (2 = over the
    last ~half of the optimiser time so far, the lr summed over the steps), whose gap to the
    running mean is L0's trend."""
    l0_gain: float = 0.05
    """`sae.target_l0`'s controller: how much of the predicted final log-L0 error moves log λ
    per step."""
    l0_max_step: float = 0.02
    """`sae.target_l0`'s controller: the most log λ moves in one step (±2%; at ±5% L0 swung
    between 3 and 28 around a target of 8 in 300 steps of the small known-answer problem, at
    ±2% it settles from above)."""
    l0_stiffness: float = 20.0
    """`sae.target_l0` with jumprelu: from `l0_stiffness_from` of the steps on, each batch's
    price per unit of L0 is λ + κ·(L0/target − 1), κ this value, in λ's units (the loss gains
    κ·target/2·(L0/target − 1)²): a proportional term that acts on the batch's own L0, where λ
    (the controller) acts on its trend. JumpReLU's L0 answers λ only through thresholds that
    Adam moves ~lr a step, 50–100 steps late, so λ alone swung it (known-answer data, target
    16: 14.4 at the end, 17.0 on the hierarchical set). Measured 2026-12-07, target 16, final
    L0: known-answer flat data (held-out samples) 14.4 at κ 0 (λ alone, as before), 16.04 at 5,
    16.00 at 20; the default study (training tokens) 16.08 / 16.64 / 16.23 (EV 0.970 / 0.972 /
    0.971): there λ alone had landed already (all with the price from 60% of the steps, stop
    29)."""
    l0_stiffness_from: float = 0.3
    """`sae.target_l0` with jumprelu: the fraction of the steps after which `l0_stiffness`
    acts. From the start it pins L0 to the target while the encoder is still forming (known-
    answer hierarchical data: MMCS 0.82 against 0.94); L0 falls to it slowly first. 0.6 → 0.3
    on 2026-12-07 (stop 34; decoder rows free, target 16, one run each): L0 within ±30% of the
    target from 35% → 33% of the steps on flat known-answer data, 64% → 37% on the hierarchical
    data, 62% → 35% on the default study, F1 0.702 → 0.705 and 0.739 → 0.737, MMCS 0.992 →
    0.990 and 0.976 → 0.974, latents silent on 262k held-out samples 17% → 18% and 6% → 10%,
    default study EV 0.971 → 0.971 with 56.6% → 58.3% dead (from 0.2: hierarchical F1 0.732,
    MMCS 0.968); on the tests' small problem (d_in 64, 300 steps) MMCS 0.976 → 0.950. Runs at
    0.6 keep their run keys (`tasks.train.FORMER`)."""

    def __post_init__(self) -> None:
        positive("train", tokens=self.tokens, batch_size=self.batch_size)
        if self.lr is not None:
            positive("train", lr=self.lr)
        positive("train", log_every=self.log_every, shuffle_rows=self.shuffle_rows)
        positive("train", geometric_median_samples=self.geometric_median_samples)
        positive("train", dead_window=self.dead_window)
        positive("train", l0_slow=self.l0_slow, l0_gain=self.l0_gain)
        positive("train", l0_smooth=self.l0_smooth, l0_max_step=self.l0_max_step)
        fraction("train", l0_smooth=self.l0_smooth)
        non_negative("train", l0_stiffness=self.l0_stiffness)
        fraction("train", l0_stiffness_from=self.l0_stiffness_from)
        fraction("train", l1_warmup_frac=self.l1_warmup_frac)
        fraction("train", lr_warmup_frac=self.lr_warmup_frac)
        if self.lr_decay_frac is not None:  # None: checked where the architecture is known
            fraction("train", lr_decay_frac=self.lr_decay_frac)
            check_lr_fracs(self.lr_warmup_frac, self.lr_decay_frac)
        non_negative("train", grad_clip=self.grad_clip, threads=self.threads)
        non_negative("train", checkpoint_every=self.checkpoint_every)
        choice("train", "dtype", self.dtype, TRAIN_DTYPES)
        choice("train", "scale", self.scale, ("norm", "spread"))
        check_device("train.device", self.device)

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.batch_size)

    def fit_values(self) -> dict[str, Any]:
        """This config's own fields (a subclass's orchestration fields left out), as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(FitConfig)}


def check_lr_fracs(warmup: float, decay: float, set_decay: float | None = 0.0) -> None:
    """lr warm-up and decay fit in the run: warmup + decay <= 1 (`set_decay` None: the decay is
    the architecture's default, `sae.models.config.DEFAULT_LR_DECAY`)."""
    if warmup + decay > 1:
        why = f"{decay} (None: the architecture's default)" if set_decay is None else f"{decay}"
        raise ValueError(
            f"train.lr_decay_frac must be <= 1 - train.lr_warmup_frac = {1 - warmup}, got {why}"
        )
