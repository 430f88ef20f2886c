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

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sae import metrics
from sae.base import SAE, SAEOutput

OnStep = Callable[[int, dict[str, float]], None]


@dataclass
class FitConfig:
    tokens: int
    """Training tokens; the run takes steps = ceil(tokens / batch_size) batches."""
    batch_size: int = 4096
    """Rows per batch the loader yields (sets the step count; the trainer takes what it gets)."""
    lr: float = 1e-3
    """Peak Adam learning rate (inputs are scaled to E‖x‖ = √d_in, so it transfers across d_in)."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity penalty ramps 0 → 1 (`sparsity_scale`; relu)."""
    lr_warmup_frac: float = 0.0
    """Fraction of steps over which lr ramps linearly 0 → lr."""
    lr_decay_frac: float = 0.2
    """Fraction of steps at the end over which lr decays linearly to 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    dtype: str = "auto"
    """auto | bf16 | fp32. bf16 = autocast with fp32 master weights; auto = bf16 on CUDA or on a
    CPU with native bf16 matmuls (AVX-512 BF16 / AMX), else fp32 (an AVX2 CPU emulates bf16
    matmuls ~40x slower than fp32)."""
    device: str = "auto"
    """auto | cpu | cuda. auto = cuda when available."""
    seed: int = 0
    """Seeds torch's RNG for the duration of fit (restored afterwards)."""
    log_every: int = 10
    """Call on_step every this many steps, and at the last step."""
    geometric_median_samples: int = 4096
    """Rows of the first batch used for the input scale and b_dec's geometric median."""
    threads: int = 0
    """torch CPU threads during fit (0 = leave torch's setting)."""
    dead_window: int = 200_000
    """Training tokens without firing after which a latent counts in the logged `dead_frac`."""
    target_l0: float | None = None
    """Steer the sparsity coefficient (`l1_coeff`: relu, jumprelu) so the run ends at this L0;
    the SAE's l1_coeff is the starting point. None = keep it fixed. topk/batchtopk: k sets L0."""

    def __post_init__(self) -> None:
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"FitConfig.{name} must be {valid}, got {getattr(self, name)!r}")

        for name in ("tokens", "batch_size", "lr", "log_every", "geometric_median_samples",
                     "dead_window"):  # fmt: skip
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "> 0")
        for name in ("l1_warmup_frac", "lr_warmup_frac", "lr_decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "in [0, 1]")
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise bad("lr_decay_frac", f"<= 1 - lr_warmup_frac = {1 - self.lr_warmup_frac}")
        for name in ("grad_clip", "threads"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise bad("dtype", "one of auto, bf16, fp32")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "one of auto, cpu, cuda")
        if self.target_l0 is not None and not (
            math.isfinite(self.target_l0) and self.target_l0 > 0
        ):
            raise bad("target_l0", "None or a finite number > 0")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.batch_size)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without CUDA -> RuntimeError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FitConfig.device='cuda' but CUDA is not available; use cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where bf16 matmuls are fast on `device`, else 'fp32'."""
    fast = cpu_has_fast_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported()
    if dtype == "auto":
        return "bf16" if fast else "fp32"
    if dtype == "bf16" and not fast:
        warnings.warn(
            f"dtype='bf16' on a {device.type} without native bf16 matmuls is much slower than "
            "fp32; use dtype='auto' or 'fp32'",
            stacklevel=3,
        )
    return dtype


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


def schedule(step: int, cfg: FitConfig) -> tuple[float, float]:
    """(lr, sparsity_scale) at 0-based `step` of cfg.steps: linear warm-ups and decay."""
    steps = cfg.steps
    lr = cfg.lr
    warmup = round(cfg.lr_warmup_frac * steps)
    if step < warmup:
        lr *= (step + 1) / warmup
    decay = round(cfg.lr_decay_frac * steps)
    if step >= steps - decay:
        lr *= (steps - step) / decay  # 1 at the first decay step, 1/decay at the last
    l1_warmup = round(cfg.l1_warmup_frac * steps)
    sparsity_scale = min(1.0, (step + 1) / l1_warmup) if l1_warmup > 0 else 1.0
    return lr, sparsity_scale


@torch.no_grad()
def init_from_sample(sae: SAE, x: Tensor, n: int) -> float:
    """Set b_dec to the geometric median of the scaled first `n` rows; return the scale s."""
    x = x[:n].float()  # (n, d_in)
    norm = x.norm(dim=-1).mean().item()
    if not (math.isfinite(norm) and norm > 0):
        raise FloatingPointError(
            f"step 0: the first batch has mean norm {norm} (NaN/inf or all zeros); cannot scale it"
        )
    s = math.sqrt(sae.d_in) / norm
    sae.b_dec.copy_(geometric_median(x * s).to(sae.b_dec.device))
    return s


def train_step(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x: Tensor,
    sparsity_scale: float,
    grad_clip: float,
    bf16: bool,
) -> SAEOutput:
    """One optimiser step on the scaled batch x (B, d_in); returns the forward's output."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = sae(x, sparsity_scale)  # x_hat (B, d_in), f (B, d_sae), scalars
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.before_step()  # topk: drop the gradient component along each decoder row
    if grad_clip > 0:  # no host sync: the clip factor stays a tensor
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip, foreach=True)
    opt.step()
    sae.after_step()  # topk: back onto the unit sphere
    return out


# target_l0: per step, log λ moves by L0_GAIN·log(l0 / target), at most ±L0_MAX_STEP; frozen
# for the last L0_FREEZE_FRAC of the steps.
L0_GAIN = 0.07
L0_MAX_STEP = 0.05
L0_FREEZE_FRAC = 0.05


class _L0Controller:
    """Steers the SAE's sparsity coefficient λ (`l1_coeff`) so the run ends at cfg.target_l0.

        λ ← λ·exp(clamp(L0_GAIN·log(l0 / target_l0), ±L0_MAX_STEP))      once per step

    with l0 the previous batch's L0: a multiplicative integral controller, so λ keeps its sign
    and moves by factors, whatever its scale. Off during the λ warm-up (the L0 there says nothing
    about λ) and over the last L0_FREEZE_FRAC of the steps, so the SAE settles under the λ it
    reports and saves.
    """

    def __init__(self, sae: SAE, cfg: FitConfig):
        if not hasattr(sae, "l1_coeff"):
            raise ValueError(
                f"FitConfig.target_l0={cfg.target_l0} needs an SAE with a sparsity coefficient "
                f"(relu, jumprelu); {sae.arch} sets its L0 with k: use target_l0=None"
            )
        if not sae.l1_coeff > 0:
            raise ValueError(f"target_l0 scales l1_coeff, which must be > 0, got {sae.l1_coeff}")
        self.sae, self.target = sae, float(cfg.target_l0 or 0)
        self.start = round(cfg.l1_warmup_frac * cfg.steps)
        self.stop = cfg.steps - round(L0_FREEZE_FRAC * cfg.steps)
        self.last_l0: Tensor | None = None

    def update(self, step: int, f: Tensor) -> None:
        """After step `step` (from 1) with latents f (B, d_sae): adjust λ, remember this L0."""
        # The previous step's L0 is read: on a GPU it is ready, so the host does not wait.
        if self.last_l0 is not None and self.start < step <= self.stop:
            err = L0_GAIN * math.log(max(self.last_l0.item(), 1e-3) / self.target)
            self.sae.l1_coeff *= math.exp(min(max(err, -L0_MAX_STEP), L0_MAX_STEP))
        self.last_l0 = (f.detach() != 0).sum(-1).float().mean()


class _Monitor:
    """Counts tokens, remembers the first non-finite loss, and reports metrics to on_step."""

    def __init__(self, sae: SAE, cfg: FitConfig, scale: float, on_step: OnStep | None):
        self.sae, self.cfg, self.scale, self.on_step = sae, cfg, scale, on_step
        self.tokens = 0
        self.logged_step = 0
        self.first_bad = torch.tensor(-1, device=sae.b_dec.device)  # a tensor: no sync per step
        self.last_tokens, self.last_time = 0, time.perf_counter()

    def update(
        self, step: int, x: Tensor, out: SAEOutput, lr: float, sparsity_scale: float
    ) -> None:
        self.tokens += x.shape[0]
        bad = ~torch.isfinite(out.loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.log(step, x, out, lr, sparsity_scale)

    def log(self, step: int, x: Tensor, out: SAEOutput, lr: float, sparsity_scale: float) -> None:
        """Raise on a non-finite loss so far; else call on_step with Python floats."""
        self.logged_step = step
        if (bad := int(self.first_bad)) >= 0:
            raise FloatingPointError(
                f"loss became NaN/inf at step {bad} (lr={lr:.3g}); check the input batches"
            )
        if self.on_step is None:
            return
        window = min(self.cfg.dead_window, self.tokens)
        m = {
            "loss": out.loss.item(),
            "mse": out.mse.item() / self.scale**2,  # in raw activation units, as at evaluation
            "aux": out.aux.item(),
            "l0": metrics.l0(out.f),
            "fvu": metrics.fvu(x, out.x_hat.detach()),
            "dead_frac": (self.sae.tokens_since_fired >= window).double().mean().item(),
            "lr": lr,
            "sparsity_scale": sparsity_scale,
            "tokens": float(self.tokens),
        }
        if self.cfg.target_l0 is not None:
            m["l1_coeff"] = float(self.sae.l1_coeff)
        now = time.perf_counter()
        m["tokens_per_s"] = (self.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_tokens, self.last_time = self.tokens, now
        self.on_step(step, m)


def fit(
    sae: SAE,
    batches: Iterable[Tensor],
    cfg: FitConfig,
    on_step: OnStep | None = None,
) -> SAE:
    """Train `sae` on raw activation batches (B, d_in) of any float dtype; see the module doc.

    on_step(step, metrics) runs every `log_every` steps and at the last one (steps count from 1)
    with floats: loss, mse (raw units), aux, l0, fvu (this batch), dead_frac (latents silent for
    the last `dead_window` training tokens, or all tokens so far if fewer), lr, sparsity_scale,
    tokens, tokens_per_s (since the previous call), and with cfg.target_l0 the current l1_coeff.
    If the batches run out before cfg.tokens, training stops there with a warning. A NaN/inf loss
    raises FloatingPointError naming the step (checked when logging). Returns the same SAE object:
    CPU, fp32, eval mode, raw-input units. cfg.target_l0 on an SAE without `l1_coeff` (topk,
    batchtopk) raises ValueError before any training.
    """
    device = resolve_device(cfg.device)
    bf16 = resolve_dtype(cfg.dtype, device) == "bf16"
    rng_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with _num_threads(cfg.threads), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        scale = _train(sae, iter(batches), cfg, on_step, device, bf16)
    sae.fold_scale(scale)
    return sae.cpu().float().eval()


def _train(
    sae: SAE,
    batches: Iterator[Tensor],
    cfg: FitConfig,
    on_step: OnStep | None,
    device: torch.device,
    bf16: bool,
) -> float:
    """The loop; returns the input scale s it trained with."""
    control = None if cfg.target_l0 is None else _L0Controller(sae, cfg)
    first = next(batches, None)
    if first is None:
        raise ValueError("batches is empty: nothing to train on")
    _check_batch(first, sae.d_in)
    sae.to(device).float().train()
    s = init_from_sample(sae, first, cfg.geometric_median_samples)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    monitor = _Monitor(sae, cfg, s, on_step)
    step, stream = 0, itertools.chain([first], batches)
    for step, batch in zip(range(1, cfg.steps + 1), stream, strict=False):  # the shorter one
        lr, sparsity_scale = schedule(step - 1, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        _check_batch(batch, sae.d_in)
        x = batch.to(device, non_blocking=True).float() * s  # (B, d_in), E‖x‖ ≈ √d_in
        out = train_step(sae, opt, x, sparsity_scale, cfg.grad_clip, bf16)
        if control is not None:
            control.update(step, out.f)
        monitor.update(step, x, out, lr, sparsity_scale)
    if step < cfg.steps:
        warnings.warn(
            f"batches ran out after {monitor.tokens} of {cfg.tokens} tokens "
            f"(step {step} of {cfg.steps}); stopping there",
            stacklevel=3,
        )
        if monitor.logged_step != step:
            monitor.log(step, x, out, lr, sparsity_scale)
    return s


def _check_batch(batch: Tensor, d_in: int) -> None:
    if batch.ndim != 2 or batch.shape[1] != d_in or not batch.is_floating_point():
        raise ValueError(
            f"a batch must be a float tensor of shape (B, d_in={d_in}), "
            f"got {batch.dtype} {tuple(batch.shape)}"
        )


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Set torch's CPU thread count for the block (n = 0: leave it)."""
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
