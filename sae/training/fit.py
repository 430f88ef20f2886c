"""Train an SAE on a stream of activation batches: `fit(sae, batches, cfg, on_step)`.

The recipe (Anthropic April 2024 / Gao et al. 2024):
  1. From the first batch: the input scale s = √d_in / mean‖x‖ (so E‖s·x‖ = √d_in, which makes
     l1_coeff and lr transfer across models), and b_dec = geometric median of s·x.
  2. Adam (β = 0.9, 0.999, no weight decay) on s·x for ceil(tokens / batch_size) steps: optional
     lr warm-up, linear lr decay to 0 over the last `lr_decay_frac` of the steps, the sparsity
     penalty ramped 0 → 1 over the first `l1_warmup_frac`, gradient-norm clipping, bf16 autocast.
  3. s folded into the weights, so the returned SAE (CPU, fp32, eval mode) takes raw activations.
With `target_l0`, the sparsity coefficient of relu / jumprelu is steered during training so that
the run ends at that L0 (`_L0Controller`); the final coefficient is the SAE's, hence saved.
The trainer knows nothing of files or trackers: metrics leave through `on_step(step, metrics)`.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.analysis import metrics
from sae.failpoint import failpoint
from sae.hardware import num_threads, resolve_device, resolve_dtype
from sae.models.base import SAE, SAEOutput, reusing_buffers
from sae.models.config import DEFAULT_LR, DEFAULT_LR_DECAY
from sae.training import checkpoint
from sae.training.checkpoint import CheckpointError, TrainState
from sae.training.checkpoint import steps as steps_in
from sae.training.config import FitConfig, check_lr_fracs

OnStep = Callable[[int, dict[str, float]], None]


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-7) -> Tensor:
    """argmin_m Σ_n ‖x_n − m‖ by Weiszfeld's iteration: (N, d) -> (d,), float32.

        m ← Σ_n w_n x_n / Σ_n w_n,   w_n = 1 / max(‖x_n − m‖, ε)

    from the mean, in float64, until m moves less than tol·(1 + ‖m‖). Unlike the mean, it
    ignores a minority of far outliers.
    """
    x = x.detach().double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-12)  # (N,)
        m_next = (w[:, None] * x).sum(0) / w.sum()
        done = (m_next - m).norm() <= tol * (1 + m.norm())
        m = m_next
        if done:
            break
    return m.float()


def peak_lr(cfg: FitConfig, arch: str) -> float:
    """cfg.lr, or the architecture's default (`DEFAULT_LR`) where that is None."""
    return cfg.lr if cfg.lr is not None else DEFAULT_LR[arch]


def lr_decay(cfg: FitConfig, arch: str) -> float:
    """cfg.lr_decay_frac, or the architecture's default (`DEFAULT_LR_DECAY`) where that is None."""
    return cfg.lr_decay_frac if cfg.lr_decay_frac is not None else DEFAULT_LR_DECAY[arch]


def schedule(step: int, cfg: FitConfig, arch: str = "relu") -> tuple[float, float]:
    """(lr, sparsity_scale) at 0-based `step` of cfg.steps: linear warm-ups and decay from the
    peak lr (`peak_lr`), the decay over the last `lr_decay` of the steps."""
    steps = cfg.steps
    lr = peak_lr(cfg, arch)
    warmup = round(cfg.lr_warmup_frac * steps)
    if step < warmup:
        lr *= (step + 1) / warmup
    decay = round(lr_decay(cfg, arch) * steps)
    if step >= steps - decay:
        lr *= (steps - step) / decay  # 1 at the first decay step, 1/decay at the last
    l1_warmup = round(cfg.l1_warmup_frac * steps)
    sparsity_scale = min(1.0, (step + 1) / l1_warmup) if l1_warmup > 0 else 1.0
    return lr, sparsity_scale


@torch.no_grad()
def init_from_sample(sae: SAE, x: Tensor, n: int, by: str = "norm") -> float:
    """From the first `n` rows x: their geometric median m and the scale

        s = √d_in / mean_N ‖x‖          by="norm" (Anthropic: E‖s·x‖ = √d_in)
        s = √d_in / mean_N ‖x − m‖      by="spread" (E‖s·(x − m)‖ = √d_in)

    b_dec ← s·m, and the SAE may centre its encoder there (`centre_on`: relu and jumprelu with
    `sae.centre`). By the spread, λ and lr mean the same on data with or without a large
    constant offset (real residual streams carry one). Returns s."""
    x = x[:n].float()  # (n, d_in)
    m = geometric_median(x)  # (d_in,)
    spread = (x - m if by == "spread" else x).norm(dim=-1).mean().item()
    if not (math.isfinite(spread) and spread > 0):
        raise FloatingPointError(
            f"step 0: the first batch has mean norm {spread} (by {by}: NaN/inf, all zeros or "
            "every row the same); cannot scale it"
        )
    s = math.sqrt(sae.d_in) / spread
    sae.b_dec.copy_((m * s).to(sae.b_dec.device))
    sae.centre_on(sae.b_dec.detach().clone())
    return s


def train_step(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x: Tensor,
    sparsity_scale: float,
    grad_clip: float,
    bf16: bool,
    forward: Callable[[Tensor, float], SAEOutput] | None = None,
    world: int = 1,
) -> SAEOutput:
    """One optimiser step on the scaled batch x (B, d_in); returns the forward's output.
    `forward` replaces sae.__call__ (a torch.compile'd SAE). With `world` > 1 (torchrun) x is
    this rank's slice of the global batch and the gradients are averaged over the ranks."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = (sae if forward is None else forward)(x, sparsity_scale)  # x_hat (B, d_in), f, …
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if world > 1:
        _average_gradients(sae, world)
    sae.before_step()  # unit_decoder: drop the gradient component along each decoder row
    if grad_clip > 0:
        _clip(sae, grad_clip)
    opt.step()
    sae.after_step()  # unit_decoder: back onto the unit sphere
    return out


def _clip(sae: SAE, max_norm: float) -> None:
    """Scale the gradients to total norm <= max_norm, as `clip_grad_norm_`. On CPU (a host sync
    is free) only where they exceed it: a topk step's norm stays far below 1 (known-answer data:
    median 0.015), and scaling every gradient by 1.0 was ~1 ms of a ~60 ms step. Elsewhere no
    host sync: the factor stays a tensor."""
    params = [p for p in sae.parameters() if p.grad is not None]
    utils = torch.nn.utils
    if sae.W_dec.device.type != "cpu" or not hasattr(utils, "clip_grads_with_norm_"):  # torch < 2.6
        utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    norm = utils.get_total_norm([p.grad for p in params], foreach=True)
    n = float(norm)
    if not math.isfinite(n) or max_norm / (n + 1e-6) < 1:  # clip_grad_norm_'s factor below 1
        utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)  # (NaN: as it, NaN)


def world() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (torchrun), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _average_gradients(sae: SAE, world: int) -> None:
    """g ← Σ_ranks g / world: with equal slices, the mean-loss gradient of the whole batch.
    TopK's sparse gradients are made dense first (all-reduce takes dense tensors)."""
    for p in sae.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.distributed.all_reduce(g)
        p.grad = g.div_(world)


class _L0Controller:
    """Steers the SAE's sparsity coefficient λ (`l1_coeff`) so the run ends at the SAE's
    `target_l0` (`SAEConfig.target_l0`). Time is the optimiser's: τ_t = Σ_{s <= t} lr_s, the lr
    summed over the steps so far (τ_T at the last step). Once per step t, from the previous
    batch's L0:

        y ← y + l0_smooth·(ln L0 − y)                 log L0, smoothed over ~10 steps
        z ← z + l0_slow·(Δτ / τ)·(y − z)              y averaged over the last ~half of τ
        v  = l0_slow·(y − z)                          d y / d ln τ: how fast L0 is still falling
        e  = y + v·ln(τ_T / τ) − ln target_l0         the final log L0 if λ stayed, minus the goal
        λ ← λ·exp(clamp(l0_gain·e, ±l0_max_step))

    with the `train.l0_*` values of `FitConfig`.

    An SAE's L0 keeps falling for the whole run at a fixed λ, roughly as a power of τ, and
    answers a change of λ only after tens of steps; a controller on the present L0 raises λ
    through that fall, overshoots and kills latents (measured on the default study: λ 3 → 13,
    10% dead). This one acts on the L0 the run is heading for (a power law extrapolated to the
    end), a multiplicative integral so λ keeps its sign and moves by factors at any scale. It is
    off during the λ warm-up and on to the last step: in optimiser time the lr decay is just the
    last, shorter stretch of τ, so the prediction holds through it and the error it leaves is
    corrected while the lr still moves the SAE. Measured (2026-12-06): counting steps instead of
    τ and freezing λ at the decay, as before, ended at L0 20.8 for a target of 16 on the
    known-answer data (λ still rising when frozen); with τ and no freeze, 16.0; on the default
    study targets 38 and 20 end at 37.5 and 19.8 on the training tokens.

    JumpReLU's L0 answers λ only through thresholds Adam moves ~lr a step, 50–100 steps late,
    so λ alone swung it past the target (known-answer data, target 16: 14.4 at the end from a
    fall λ had set off; 17.0 on the hierarchical set). For an SAE with a differentiable L0 the
    controller also sets, after `l0_stiffness_from` of the steps, a proportional price on each
    batch's own L0 (`prepare`; the SAE's loss gains κ·T/2·(L0/T − 1)², `FitConfig.l0_stiffness`):
    no lag, and it lowers θ when L0 is below the target, which λ > 0 never does.
    """

    def __init__(self, sae: SAE, cfg: FitConfig):
        if not sae.l1_coeff > 0:  # SAEConfig lets target_l0 only where λ sets the L0
            raise ValueError(f"target_l0 scales l1_coeff, which must be > 0, got {sae.l1_coeff}")
        self.sae, self.goal = sae, math.log(float(sae.target_l0 or 1))
        self.steps, self.cfg = cfg.steps, cfg
        self.start = round(cfg.l1_warmup_frac * cfg.steps)
        # τ after each step t (time[0] = 0): the lr summed so far (the unit cancels in ratios)
        lrs = (schedule(s, cfg, sae.arch)[0] for s in range(cfg.steps))
        self.time = list(itertools.accumulate(lrs, initial=0.0))
        self.stiff_from = round(cfg.l0_stiffness_from * cfg.steps)
        self.last_l0: Tensor | None = None
        self.fast: float | None = None  # y
        self.slow = 0.0  # z

    @property
    def last(self) -> dict[str, float | None]:
        """What the controller carries between steps, as saved in a trainer state."""
        last = None if self.last_l0 is None else self.last_l0.item()
        return {"l0": last, "fast": self.fast, "slow": self.slow}

    @last.setter
    def last(self, value: dict[str, float | None] | float | None) -> None:
        if not isinstance(value, dict):  # a state from before 2026-12-05 kept the L0 alone
            value = {"l0": value, "fast": None, "slow": 0.0}
        l0 = value["l0"]
        self.last_l0 = None if l0 is None else torch.tensor(l0, dtype=torch.float32)
        self.fast, self.slow = value["fast"], float(value["slow"] or 0.0)

    def prepare(self, step: int) -> None:
        """Before step `step` (from 1): an SAE with a differentiable L0 (jumprelu) gets the
        stiffness κ (`FitConfig.l0_stiffness`) once `l0_stiffness_from` of the steps are done.
        A function of the step alone, so a resumed run sets it as the run it resumes did."""
        if hasattr(self.sae, "l0_stiffness"):
            on = step > self.stiff_from
            self.sae.l0_stiffness = self.cfg.l0_stiffness if on else 0.0

    def update(self, step: int, out: SAEOutput) -> None:
        """After step `step` (from 1) with output `out`: adjust λ, remember this L0."""
        # The previous step's L0 is read: on a GPU it is ready, so the host does not wait.
        if self.last_l0 is not None:
            y = math.log(max(self.last_l0.item(), 1e-3))
            if self.fast is None:
                self.fast = self.slow = y
            c = self.cfg
            t = min(step, self.steps)
            now, dt = self.time[t], self.time[t] - self.time[t - 1]
            self.fast += c.l0_smooth * (y - self.fast)
            self.slow += min(c.l0_slow * dt / now, 1.0) * (self.fast - self.slow)
            if self.start < step < self.steps:  # λ after the last step would train nothing
                trend = c.l0_slow * (self.fast - self.slow)  # v
                err = c.l0_gain * (self.fast + trend * math.log(self.time[-1] / now) - self.goal)
                self.sae.l1_coeff *= math.exp(min(max(err, -c.l0_max_step), c.l0_max_step))
        self.last_l0 = (
            (out.f.detach() != 0).sum(-1).float().mean() if out.l0 is None else out.l0.detach()
        )


class _Monitor:
    """Counts tokens, remembers the first non-finite loss, and reports metrics to on_step."""

    def __init__(self, sae: SAE, cfg: FitConfig, on_step: OnStep | None, checkpoint: Path | None):
        self.sae, self.cfg, self.on_step, self.checkpoint = sae, cfg, on_step, checkpoint
        self.scale = 1.0
        self.tokens = 0
        self.logged_step = 0
        self.first_bad = torch.tensor(-1, device=sae.b_dec.device)  # a tensor: no sync per step
        self.last_tokens, self.last_time = 0, time.perf_counter()
        self.world = world()[1]

    def update(
        self, step: int, x: Tensor, out: SAEOutput, lr: float, sparsity_scale: float
    ) -> None:
        self.tokens += x.shape[0] * self.world  # data-parallel: x is this rank's slice
        bad = ~torch.isfinite(out.loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        every = self.cfg.checkpoint_every  # a state's step is logged: lost logs resume with it
        saved = every > 0 and step % every == 0
        if step % self.cfg.log_every == 0 or step == self.cfg.steps or saved:
            self.log(step, x, out, lr, sparsity_scale)

    def kept(self) -> str:
        """Where the last good trainer state is, for error messages ('' if none)."""
        found = steps_in(self.checkpoint) if self.checkpoint else []
        return f"; the last good state (step {found[-1]}) is in {self.checkpoint}" if found else ""

    def check(self, lr: float) -> None:
        """Raise FloatingPointError if some loss so far was NaN/inf."""
        if (bad := int(self.first_bad)) >= 0:
            raise FloatingPointError(
                f"loss became NaN/inf at step {bad} (lr={lr:.3g}); check the input batches"
                + self.kept()
            )

    def log(self, step: int, x: Tensor, out: SAEOutput, lr: float, sparsity_scale: float) -> None:
        """Raise on a non-finite loss so far; else call on_step with Python floats."""
        self.logged_step = step
        self.check(lr)
        if self.on_step is None:
            return
        window = min(self.cfg.dead_window, self.tokens)
        m = {
            "loss": out.loss.item(),
            "mse": out.mse.item() / self.scale**2,  # in raw activation units, as at evaluation
            "aux": out.aux.item(),
            "l0": metrics.l0(out.f) if out.l0 is None else out.l0.item(),
            "fvu": metrics.fvu(x, out.x_hat.detach()),
            "dead_frac": (self.sae.tokens_since_fired >= window).double().mean().item(),
            "lr": lr,
            "sparsity_scale": sparsity_scale,
            "tokens": float(self.tokens),
        }
        if self.sae.target_l0 is not None:
            m["l1_coeff"] = float(self.sae.l1_coeff)
        now = time.perf_counter()
        m["tokens_per_s"] = (self.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_tokens, self.last_time = self.tokens, now
        self.on_step(step, m)


class _Trainer:
    """One SAE's training: its optimiser, input scale, L0 controller and monitor; saveable."""

    def __init__(
        self,
        sae: SAE,
        cfg: FitConfig,
        on_step: OnStep | None,
        checkpoint: Path | None,
        device: torch.device,
    ):
        self.control = None if sae.target_l0 is None else _L0Controller(sae, cfg)
        self.rank, self.world = world()
        if self.world > 1:  # data-parallel: rank 0 alone logs and writes trainer states
            if cfg.batch_size % self.world:
                raise ValueError(
                    f"batch_size {cfg.batch_size} must divide by the {self.world} ranks: equal "
                    "slices make the averaged gradient the whole batch's"
                )
            on_step, checkpoint = (on_step, checkpoint) if self.rank == 0 else (None, None)
        self.sae, self.cfg, self.checkpoint = sae.to(device).float().train(), cfg, checkpoint
        self.config = sae.config()  # as built: target_l0 changes l1_coeff as it goes
        self.bf16 = resolve_dtype(cfg.dtype, device) == "bf16"
        self.forward = torch.compile(sae) if cfg.compile else sae
        self.opt = torch.optim.Adam(sae.parameters(), lr=1.0, betas=(0.9, 0.999), fused=True)
        self.monitor = _Monitor(sae, cfg, on_step, checkpoint)
        self.scale = 1.0
        self.lr = 0.0  # set by the schedule at each step
        self.peak_lr = peak_lr(cfg, sae.arch)
        check_lr_fracs(cfg.lr_warmup_frac, lr_decay(cfg, sae.arch), cfg.lr_decay_frac)
        self.last: tuple[Tensor, SAEOutput, float] | None = None  # (x, out, sparsity_scale)

    def start(self, first: Tensor) -> None:
        """Scale and b_dec from the first batch (before any step)."""
        self.scale = self.monitor.scale = init_from_sample(
            self.sae, first, self.cfg.geometric_median_samples, self.cfg.scale
        )

    def step(self, step: int, batch: Tensor) -> None:
        """Optimiser step number `step` (from 1) on the raw batch (B, d_in)."""
        failpoint("train.step")
        self.lr, sparsity_scale = schedule(step - 1, self.cfg, self.sae.arch)
        if self.control is not None:
            self.control.prepare(step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        if self.world > 1:  # every rank reads the global batch and trains on its slice
            batch = batch[self.rank :: self.world]
        x = batch.to(self.sae.b_dec.device, non_blocking=True).float() * self.scale
        out = train_step(
            self.sae,
            self.opt,
            x,
            sparsity_scale,
            self.cfg.grad_clip,
            self.bf16,
            self.forward,
            self.world,
        )
        if self.control is not None:
            self.control.update(step, out)
        self.monitor.update(step, x, out, self.lr, sparsity_scale)
        self.last = (x, out, sparsity_scale)

    def finish(self, step: int) -> SAE:
        """Log the last step if the batches ran out before it; fold the encoder's centre and
        the scale into the weights; CPU, fp32, eval."""
        if self.last is not None and self.monitor.logged_step != step:
            x, out, sparsity_scale = self.last
            self.monitor.log(step, x, out, self.lr, sparsity_scale)
        if self.control is not None:
            self.control.prepare(0)  # a trained SAE's loss is its own again (κ 0)
        self.sae.fold_centre()
        self.sae.fold_scale(self.scale)
        return self.sae.cpu().float().eval()

    # --- state ------------------------------------------------------------------------------
    def save(self, step: int, shared: dict[str, Any], rng: dict[str, Tensor]) -> None:
        """Write the state after `step` to self.checkpoint, unless something is non-finite:
        then raise FloatingPointError and leave the last good state in place."""
        self.monitor.check(self.lr)
        bad = [n for n, p in self.sae.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(
                f"parameters {bad} became NaN/inf by step {step}" + self.monitor.kept()
            )
        if self.checkpoint is not None:  # None on ranks other than 0
            checkpoint.save(self.checkpoint, self.state(step, shared, rng))

    def state(self, step: int, shared: dict[str, Any], rng: dict[str, Tensor]) -> TrainState:
        names = {p: n for n, p in self.sae.named_parameters()}
        buffers, attrs = self.sae.training_state()
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors |= {f"sae_train.{k}": v for k, v in buffers.items()} | rng
        for p, s in self.opt.state.items():
            tensors |= {f"adam.{names[p]}.{k}": v for k, v in s.items()}
        values = {
            "sae": self.config,
            "sae_train": attrs,
            "scale": self.scale,
            "tokens": self.monitor.tokens,
            "fit": self.fit_values(),
            "peak_lr": self.peak_lr,
            "target_l0": self.sae.target_l0,
            "last_l0": None if self.control is None else self.control.last,
            **shared,
        }
        return TrainState(step, tensors, values)

    def fit_values(self) -> dict[str, Any]:
        """The FitConfig values, lr_decay_frac resolved (`lr_decay`), as a trainer state records
        them: a state resumes only under the decay it trained with, and states from before the
        None default (0.2 then) still match."""
        return self.cfg.fit_values() | {"lr_decay_frac": lr_decay(self.cfg, self.sae.arch)}

    @torch.no_grad()
    def restore(self, state: TrainState) -> None:
        """Become the trainer that saved `state` (same SAE config and FitConfig)."""
        want = {"sae": self.config, "fit": _comparable(self.fit_values(), self.sae)}
        want["target_l0"] = self.sae.target_l0
        if "peak_lr" in state.values:  # lr None: the arch's default then and now (states of
            want["peak_lr"] = self.peak_lr  # 2026-12-06 on; older ones did not record it)
        for key, value in want.items():
            saved = state.values.get(key)
            if key == "fit":
                saved = _comparable(state.values[key], self.sae)
            if key == "sae":  # a state from before a hyper-parameter: the value it trained with,
                saved = type(self.sae).saved_before | saved  # as load_sae fills in a cfg.json
            if json.loads(json.dumps(value)) != saved:
                raise CheckpointError(
                    f"the trainer state of step {state.step} was saved with {key}="
                    f"{state.values[key]} but this run has {value}; it resumes only the same "
                    "run (train afresh with train.resume=false)"
                )
        t = state.tensors
        device = self.sae.b_dec.device
        self.sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
        self.sae.load_training_state(
            {k[10:]: v.to(device) for k, v in t.items() if k.startswith("sae_train.")},
            state.values["sae_train"],
        )
        for n, p in self.sae.named_parameters():
            prefix = f"adam.{n}."
            self.opt.state[p] = {
                k[len(prefix) :]: v.to(device) for k, v in t.items() if k.startswith(prefix)
            }
        self.scale = self.monitor.scale = float(state.values["scale"])
        self.monitor.tokens = self.monitor.last_tokens = int(state.values["tokens"])
        self.monitor.logged_step = state.step
        if self.control is not None:
            self.control.last = state.values["last_l0"]


FREE_ON_RESUME = ("log_every", "threads", "checkpoint_every", "compile")
"""FitConfig fields a resumed run may change: they do not change what it computes."""


STIFFNESS = ("l0_stiffness", "l0_stiffness_from")
"""FitConfig's fields of the price on each batch's L0: they change a run only where
`stiffness_acts`."""


def stiffness_acts(arch: type[SAE], target_l0: float | None, stiffness: float) -> bool:
    """Whether `FitConfig.l0_stiffness` changes a run: κ > 0, a target_l0, and an architecture
    with an L0 in its loss (jumprelu). Elsewhere run keys and resumes leave `STIFFNESS` out."""
    return stiffness > 0 and target_l0 is not None and hasattr(arch, "l0_stiffness")


def _comparable(fit_cfg: dict[str, Any], sae: SAE) -> dict[str, Any]:
    """The FitConfig values a resumed run must share with its state: not `FREE_ON_RESUME`, nor
    `STIFFNESS` where it does not act (a state from before the fields trained at κ 0), so older
    states resume where they did."""
    values = {k: v for k, v in fit_cfg.items() if k not in FREE_ON_RESUME}
    if stiffness_acts(type(sae), sae.target_l0, values.get("l0_stiffness", 0.0)):
        return values
    return {k: v for k, v in values.items() if k not in STIFFNESS}


def fit(
    sae: SAE,
    batches: Iterable[Tensor],
    cfg: FitConfig,
    on_step: OnStep | None = None,
    *,
    checkpoint: Path | None = None,
    resume: TrainState | None = None,
) -> SAE:
    """Train `sae` on raw activation batches (B, d_in) of any float dtype; see the module doc.

    on_step(step, metrics) runs every `log_every` steps, at each checkpoint and at the last step
    (steps count from 1)
    with floats: loss, mse (raw units), aux, l0, fvu (this batch), dead_frac (latents silent for
    the last `dead_window` training tokens, or all tokens so far if fewer), lr, sparsity_scale,
    tokens, tokens_per_s (since the previous call), and with the SAE's target_l0 the current
    l1_coeff. If the batches run out before cfg.tokens, training stops there with a warning. A
    NaN/inf loss raises FloatingPointError naming the step (checked when logging and before each
    checkpoint). Returns the same SAE object: CPU, fp32, eval mode, raw-input units. A target_l0
    (the SAE's config) on an SAE whose l1_coeff is 0 raises ValueError before any training.

    checkpoint: a directory for the trainer state (`sae.training.checkpoint`), written every
    cfg.checkpoint_every steps (None: no states), with the loader position if `batches` has a
    `state()` method (`sae.activations.loader.ActivationLoader`). resume: a state read back from
    there (`checkpoint.load`): the SAE, optimiser, schedules and RNG continue from it, and
    `batches` must yield what followed that step (an ActivationLoader built with
    `state=resume.loader`). The losses are then those of a run that never stopped (bit-identical on
    CPU with the same thread count).
    """
    return fit_many([sae], batches, [cfg], [on_step], checkpoints=[checkpoint], resume=[resume])[0]


SHARED_FIELDS = ("tokens", "batch_size", "device", "seed", "threads", "checkpoint_every")
"""FitConfig fields that SAEs trained on one stream of batches must agree on."""


def fit_many(
    saes: list[SAE],
    batches: Iterable[Tensor],
    cfgs: list[FitConfig],
    on_steps: list[OnStep | None] | None = None,
    *,
    checkpoints: list[Path | None] | None = None,
    resume: list[TrainState | None] | None = None,
) -> list[SAE]:
    """`fit` for several SAEs on one stream: each batch is read once and fed to every SAE in turn.

    Each SAE takes exactly the steps it would take alone with the same batches (so the results
    are the same as N separate `fit`s, at the cost of one read of the data). The configs must
    agree on SHARED_FIELDS; the lists are parallel to `saes`. Resuming takes a state for every
    SAE, all of the same step.
    """
    n = len(saes)
    on_steps = on_steps or [None] * n
    checkpoints = checkpoints or [None] * n
    resume = resume or [None] * n
    if not n or not len(cfgs) == len(on_steps) == len(checkpoints) == len(resume) == n:
        raise ValueError(f"fit_many needs one cfg, on_step, checkpoint, resume per SAE ({n})")
    cfg = cfgs[0]
    for name in SHARED_FIELDS:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise ValueError(f"fit_many: every FitConfig must have the same {name}")
    resumed = {s.step if s else None for s in resume}
    if len(resumed) > 1:
        raise ValueError(f"fit_many resumes all SAEs from one step, got {sorted(resumed, key=str)}")
    device = resolve_device(cfg.device)
    rng_devices = []  # fork_rng restores the CUDA RNG of the GPU we train on, not GPU 0's
    if device.type == "cuda":
        rng_devices = [torch.cuda.current_device() if device.index is None else device.index]
    with num_threads(cfg.threads), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        trainers = [
            _Trainer(*args, device) for args in zip(saes, cfgs, on_steps, checkpoints, strict=True)
        ]
        with reusing_buffers():  # (B, d_sae) pre-activations (and relu's gradient), step to step
            last = _train(trainers, batches, resume, device)
    return [t.finish(last) for t in trainers]


def _train(
    trainers: list[_Trainer],
    batches: Iterable[Tensor],
    resume: list[TrainState | None],
    device: torch.device,
) -> int:
    """The loop; returns the last step taken."""
    cfg, d_in = trainers[0].cfg, trainers[0].sae.d_in
    loader_state = getattr(batches, "state", None)  # an ActivationLoader's position
    stream = iter(batches)
    start = step = 0
    if resume[0] is not None:
        for t, s in zip(trainers, resume, strict=True):
            t.restore(s)
        start = step = resume[0].step
        _set_rng(resume[0].tensors, device)
    else:
        first = next(stream, None)
        if first is None:
            raise ValueError("batches is empty: nothing to train on")
        _check_batch(first, d_in)
        for t in trainers:
            t.start(first)
        stream = itertools.chain([first], stream)
    for step, batch in zip(range(start + 1, cfg.steps + 1), stream, strict=False):  # shorter one
        _check_batch(batch, d_in)
        for t in trainers:
            t.step(step, batch)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            shared = {"loader": loader_state() if loader_state else None}
            rng = _get_rng(device)
            for t in trainers:
                t.save(step, shared, rng)
    if step < cfg.steps:
        tokens = trainers[0].monitor.tokens
        warnings.warn(
            f"batches ran out after {tokens} of {cfg.tokens} tokens "
            f"(step {step} of {cfg.steps}); stopping there",
            stacklevel=4,
        )
    return step


def _get_rng(device: torch.device) -> dict[str, Tensor]:
    rng = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng(tensors: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def _check_batch(batch: Tensor, d_in: int) -> None:
    if batch.ndim != 2 or batch.shape[1] != d_in or not batch.is_floating_point():
        raise ValueError(
            f"a batch must be a float tensor of shape (B, d_in={d_in}), "
            f"got {batch.dtype} {tuple(batch.shape)}"
        )
