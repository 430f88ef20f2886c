"""The training loop: schedules, init from data, recovery of known features, failure modes."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator

import pytest
import torch

from sae.models.registry import build_sae
from sae.training.fit import FitConfig, fit, geometric_median, schedule

D, N_FEAT = 64, 256  # synthetic activations: 256 unit features in 64 dimensions


def true_features(seed: int = 0) -> torch.Tensor:
    w = torch.randn(N_FEAT, D, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=-1, keepdim=True)  # (N_FEAT, D)


def sparse_batches(
    features: torch.Tensor, batch_size: int, seed: int = 1, dtype=torch.float32
) -> Iterator[torch.Tensor]:
    """x = Σ_j a_j·feature_j + offset, ~4 features active per sample, a_j ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        active = torch.rand(batch_size, N_FEAT, generator=g) < 4 / N_FEAT
        a = torch.rand(batch_size, N_FEAT, generator=g) * active  # (B, N_FEAT)
        yield ((a @ features) * 10 + 3).to(dtype)  # raw units far from E‖x‖ = √d_in


def mean_max_cos(features: torch.Tensor, W_dec: torch.Tensor) -> float:
    """For each true feature, the best cosine with a decoder row; averaged."""
    W = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return (features @ W.T).max(1).values.mean().item()


def run(arch: str, d_sae: int, steps: int, dtype: str = "fp32", **hp):
    features, logs = true_features(seed=1000), []  # not the SAE init seed: no head start
    sae = build_sae(arch, D, d_sae, seed=0, **hp)
    # the lr decay these bounds were set with (topk's default is 0.3 since 2026-12-07: 200
    # steps of this small problem end at FVU 0.349 against 0.346, half the first step's)
    cfg = FitConfig(tokens=steps * 512, batch_size=512, lr=3e-3, dtype=dtype, log_every=10,
                    lr_decay_frac=0.2)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16
        sae = fit(sae, sparse_batches(features, 512), cfg, lambda s, m: logs.append((s, m)))
    return sae, features, logs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_topk_recovers_true_features(dtype: str) -> None:
    # From a random start (MMCS ≈ 0.34); the ≥ 0.99 recoveries are in test_archs.py.
    sae, features, logs = run("topk", 256, 200, dtype, k=4, dead_tokens=10_000)
    assert mean_max_cos(features, sae.W_dec) >= 0.8
    assert logs[-1][1]["fvu"] < 0.5 * logs[0][1]["fvu"] or logs[-1][1]["fvu"] < 0.2
    assert 3 <= logs[-1][1]["l0"] <= 4


def test_relu_loss_falls_and_returns_raw_units_model() -> None:
    sae, features, logs = run("relu", 256, 60, l1_coeff=1.0)
    steps = [s for s, _ in logs]
    assert steps == [10, 20, 30, 40, 50, 60]  # every log_every steps, last step included
    first, last = logs[0][1], logs[-1][1]
    assert last["loss"] < first["loss"] and last["fvu"] < first["fvu"]
    assert last["tokens"] == 60 * 512 and last["lr"] < 3e-3 and first["sparsity_scale"] == 1.0
    expected = {"loss", "mse", "aux", "l0", "fvu", "dead_frac", "lr", "sparsity_scale"}
    assert expected | {"tokens", "tokens_per_s"} == set(last)
    assert all(type(v) is float for v in last.values())
    # The returned SAE takes raw activations (the input scale is folded in): CPU, fp32, eval.
    assert not sae.training and sae.W_enc.device.type == "cpu" and sae.W_enc.dtype == torch.float32
    x = next(sparse_batches(features, 2048, seed=5))
    x_hat = sae(x).x_hat
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu.item() == pytest.approx(last["fvu"], rel=0.15)  # as in training, in raw units
    assert ((x - x_hat) ** 2).mean().item() == pytest.approx(last["mse"], rel=0.3)


def test_geometric_median_ignores_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    centre = torch.full((8,), 2.0)
    inliers = centre + 0.1 * torch.randn(900, 8, generator=g)
    outliers = 1000 + torch.randn(100, 8, generator=g)
    x = torch.cat([inliers, outliers])
    assert (geometric_median(x) - centre).norm() < 0.1
    assert (x.mean(0) - centre).norm() > 100


def test_fit_sets_b_dec_to_geometric_median_of_first_batch() -> None:
    x = torch.randn(256, 8) + 4.0
    sae = build_sae("relu", 8, 16, seed=0)
    sae = fit(sae, iter([x]), FitConfig(tokens=256, batch_size=256, lr=1e-9))
    torch.testing.assert_close(sae.b_dec, geometric_median(x), rtol=1e-3, atol=1e-3)


def test_schedule() -> None:
    cfg = FitConfig(tokens=100, batch_size=1, lr=1.0, lr_warmup_frac=0.1, lr_decay_frac=0.2)
    lrs, scales = zip(*(schedule(step, cfg) for step in range(100)), strict=True)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0
    assert lrs[80] == 1.0 and lrs[99] == pytest.approx(1 / 20)  # linear decay towards 0
    assert all(a >= b for a, b in itertools.pairwise(lrs[80:]))
    assert scales[0] == pytest.approx(1 / 5) and scales[4] == 1.0 and scales[99] == 1.0


def test_nan_raises_naming_the_step() -> None:
    def batches() -> Iterator[torch.Tensor]:
        for step in range(1, 30):
            x = torch.randn(64, 8)
            if step == 4:
                x[3, 2] = float("nan")
            yield x

    sae = build_sae("topk", 8, 16, k=2)
    with pytest.raises(FloatingPointError, match="step 4"):
        fit(sae, batches(), FitConfig(tokens=64 * 20, batch_size=64, log_every=10))


def test_short_iterator_warns_and_logs_last_step() -> None:
    logs = []
    sae = build_sae("relu", 8, 16)
    with pytest.warns(UserWarning, match="ran out after 320 of 6400 tokens"):
        fit(sae, iter([torch.randn(64, 8)] * 5), FitConfig(tokens=6400, batch_size=64),
            lambda s, m: logs.append(s))  # fmt: skip
    assert logs == [5]


def test_schedule_decays_over_the_archs_default_fraction() -> None:
    """lr_decay_frac None: topk's lr decays over the last 30% of the steps, relu's over 20%
    (`DEFAULT_LR_DECAY`); a set value holds for every arch."""
    cfg = FitConfig(tokens=100, batch_size=1, lr=1.0)
    for arch, first in (("relu", 80), ("topk", 70), ("jumprelu", 80)):
        lrs = [schedule(step, cfg, arch)[0] for step in range(100)]
        assert lrs[first] == 1.0 > lrs[first + 1], arch  # 1 at the first decay step
    set_cfg = FitConfig(tokens=100, batch_size=1, lr=1.0, lr_decay_frac=0.5)
    assert schedule(50, set_cfg, "topk")[0] == 1.0 > schedule(51, set_cfg, "topk")[0]


def test_bad_inputs() -> None:
    sae = build_sae("relu", 8, 16)
    with pytest.raises(ValueError, match=r"d_in=8.*\(4, 5\)"):
        fit(sae, iter([torch.randn(4, 5)]), FitConfig(tokens=4))
    with pytest.raises(ValueError, match="empty"):
        fit(sae, iter([]), FitConfig(tokens=4))
    with pytest.raises(ValueError, match=r"train.tokens must be > 0, got 0"):
        FitConfig(tokens=0)
    with pytest.raises(ValueError, match=r"train.lr_decay_frac"):
        FitConfig(tokens=1, lr_decay_frac=1.5)
    with pytest.raises(ValueError, match=r"train.l0_stiffness must be >= 0, got -1"):
        FitConfig(tokens=1, l0_stiffness=-1.0)
    with pytest.raises(ValueError, match=r"train.l0_stiffness_from"):
        FitConfig(tokens=1, l0_stiffness_from=1.5)
    FitConfig(tokens=1, lr_warmup_frac=0.75)  # decay None: checked once the arch is known
    x = torch.randn(8, 8)
    fit(build_sae("relu", 8, 16), iter([x]), FitConfig(tokens=8, lr_warmup_frac=0.75))  # 0.2
    with pytest.raises(ValueError, match=r"got 0.3 \(None: the architecture's default\)"):
        fit(build_sae("topk", 8, 16, k=2), iter([x]), FitConfig(tokens=8, lr_warmup_frac=0.75))
    with pytest.raises(ValueError, match=r"train.dtype='fp8' is not one of auto, bf16, fp32"):
        FitConfig(tokens=1, dtype="fp8")
    with pytest.raises(ValueError, match=r"train.device='tpu'"):
        FitConfig(tokens=1, device="tpu")


def test_threads_are_restored() -> None:
    before = torch.get_num_threads()
    fit(build_sae("relu", 8, 16), iter([torch.randn(64, 8)]), FitConfig(tokens=64, threads=1))
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requested_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        fit(
            build_sae("relu", 8, 16),
            iter([torch.randn(64, 8)]),
            FitConfig(tokens=64, device="cuda"),
        )


def test_a_gpu_past_the_machines_is_named() -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(RuntimeError, match=rf"'cuda:{n}': this machine has {n} CUDA device"):
        fit(build_sae("relu", 8, 16), iter([torch.randn(64, 8)]),
            FitConfig(tokens=64, device=f"cuda:{n}"))  # fmt: skip
    with pytest.raises(ValueError, match=r"device.*one of auto, cpu, cuda, cuda:N"):
        FitConfig(tokens=64, device="cuda1")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fit_on_the_second_gpu() -> None:
    """cuda:1: the SAE trains there, and the RNG of GPU 1 (not GPU 0) is forked and restored."""
    before = [torch.cuda.get_rng_state(i) for i in (0, 1)]
    cfg = FitConfig(tokens=8 * 512, batch_size=512, device="cuda:1", log_every=4)
    fit(build_sae("relu", D, 64, seed=0), sparse_batches(true_features(), 512), cfg)
    after = [torch.cuda.get_rng_state(i) for i in (0, 1)]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_fit_on_cuda(arch: str) -> None:
    features = true_features()
    sae = build_sae(arch, D, 256, seed=0, **({"k": 4} if arch == "topk" else {}))
    cfg = FitConfig(tokens=40 * 512, batch_size=512, device="cuda", dtype="bf16", log_every=10)
    logs = []
    sae = fit(sae, sparse_batches(features, 512), cfg, lambda s, m: logs.append(m))
    assert sae.W_enc.device.type == "cpu" and logs[-1]["fvu"] < logs[0]["fvu"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_compile_trains_like_eager(arch: str) -> None:
    """train.compile: the same losses up to float reassociation (measured ≤ 4e-7 in fp32; bf16
    autocast, `auto` on CPUs with AVX-512 BF16, differs by 2e-4), and no
    recompilation per step (topk's Python counters are kept out of the graph). ~15 s each."""
    hp = {"k": 4, "dead_tokens": 2048} if arch == "topk" else {}
    runs = []
    for compile in (True, False):
        logs: list[float] = []
        cfg = FitConfig(
            tokens=512 * 30, batch_size=512, compile=compile, log_every=10, dtype="fp32"
        )
        sae = build_sae(arch, D, 256, seed=0, **hp)
        fit(
            sae,
            sparse_batches(true_features(), 512),
            cfg,
            lambda s, m, logs=logs: logs.append(m["loss"]),
        )
        runs.append((logs, sae))
    (a, sae_a), (b, sae_b) = runs
    assert a == pytest.approx(b, rel=1e-4)
    # jumprelu: a θ a rounding apart flips which tokens a latent fires on (up to 1.3e-4 measured)
    atol = 1e-3 if arch == "jumprelu" else 1e-5
    torch.testing.assert_close(sae_a.W_dec, sae_b.W_dec, rtol=1e-4, atol=atol)


def drive_l0_controller(target: float, steps: int = 300, lag: float = 15.0) -> list[float]:
    """The L0 controller on a model of an SAE's L0, in optimiser time τ (the lr summed over the
    steps, in peak-lr steps): a power-law fall at a fixed λ (L0 ∝ τ^-0.7 (λ/3)^-1, 600 at τ = 5,
    as on the default study at λ 3), answering λ through a first-order lag of `lag` steps at the
    peak lr (slower as the lr decays: the SAE moves with the lr). Returns the L0 after each step."""
    from types import SimpleNamespace

    from sae.training.fit import _L0Controller, schedule

    cfg = FitConfig(tokens=steps * 4096)
    sae = SimpleNamespace(l1_coeff=3.0, target_l0=target, arch="relu")
    control = _L0Controller(sae, cfg)  # type: ignore[arg-type]
    peak = schedule(0, cfg)[0]
    felt, tau, seen = 3.0, 0.0, []
    for t in range(1, steps + 1):
        rate = schedule(t - 1, cfg)[0] / peak
        tau += rate
        felt += (sae.l1_coeff - felt) * rate / lag
        l0 = 600 * (max(tau, 5) / 5) ** -0.7 * (felt / 3.0) ** -1
        control.update(t, SimpleNamespace(l0=torch.tensor(l0), f=None))
        seen.append(l0)
    return seen


@pytest.mark.parametrize(("target", "within"), [(20.0, 0.05), (38.0, 0.05), (60.0, 0.05)])
def test_l0_controller_settles_on_the_target_without_swinging(target: float, within: float):
    """It acts on the L0 the run is heading for, so it comes down on the target from above and,
    after the first 20% of the run, never swings 30% below it. Measured here: final L0 19.9, 37.7,
    59.3, falling onto the target (upticks of at most 3.7% while λ eases).
    (On the default study: target 38 -> 37.5, target 20 -> 19.8 on its training tokens; on
    the known-answer data 16 -> 16.0. The integral controller on the present L0 that came
    first drove λ 3 -> 13 and ended at 31 with 10% of latents dead.)"""
    l0 = drive_l0_controller(target)
    assert l0[-1] == pytest.approx(target, rel=within)
    low = list(itertools.accumulate(l0[60:], min))  # after 20% of the run: falling
    assert all(x <= 1.05 * m for x, m in zip(l0[60:], low, strict=True))  # upticks < 4%
    assert min(l0[60:]) >= 0.7 * target


def test_controller_sets_the_stiffness_after_its_fraction_of_the_steps() -> None:
    """κ (`l0_stiffness`) reaches an SAE with a differentiable L0 once l0_stiffness_from of the
    steps are done, as a function of the step alone (a resumed run gets the same); one without
    (relu) is left alone; the trained SAE has κ 0 again."""
    from types import SimpleNamespace

    from sae.training.fit import _L0Controller

    cfg = FitConfig(tokens=100 * 8, batch_size=8, l0_stiffness=4.0, l0_stiffness_from=0.6)
    sae = SimpleNamespace(l1_coeff=1.0, target_l0=8.0, arch="jumprelu", l0_stiffness=0.0)
    control = _L0Controller(sae, cfg)  # type: ignore[arg-type]
    seen = []
    for step in (1, 60, 61, 100, 60):
        control.prepare(step)
        seen.append(sae.l0_stiffness)
    assert seen == [0.0, 0.0, 4.0, 4.0, 0.0]
    relu = SimpleNamespace(l1_coeff=1.0, target_l0=8.0, arch="relu")
    _L0Controller(relu, cfg).prepare(100)  # type: ignore[arg-type]
    assert not hasattr(relu, "l0_stiffness")
    x = torch.randn(64, 8)
    jump = build_sae("jumprelu", 8, 16, seed=0, target_l0=4.0)
    felt: list[float] = []  # κ during each of the 8 steps, as the SAE's loss saw it
    cfg = FitConfig(
        tokens=64 * 8, batch_size=64, l0_stiffness=4.0, l0_stiffness_from=0.3, log_every=1
    )
    jump = fit(jump, iter([x] * 8), cfg, lambda s, m: felt.append(jump.l0_stiffness))
    assert felt == [0.0] * 2 + [4.0] * 6  # on after round(0.3·8) = 2 steps
    assert jump.l0_stiffness == 0.0


@pytest.mark.parametrize("norm", [0.5, 3.0, math.nan])
def test_clip_scales_the_gradients_as_clip_grad_norm_does(norm: float) -> None:
    """The CPU path skips the scaling where the norm is below the limit: the same gradients
    as torch's clip_grad_norm_ either way (b_dec left without a gradient: skipped by both; a
    NaN norm: NaN gradients from both)."""
    from sae.training.fit import _clip

    sae, ref = (build_sae("topk", D, 128, seed=0, k=4) for _ in range(2))
    g = torch.Generator().manual_seed(3)
    for a, b in zip(sae.parameters(), ref.parameters(), strict=True):
        if a is not sae.b_dec:
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
    total = torch.nn.utils.get_total_norm([p.grad for p in sae.parameters() if p.grad is not None])
    for p in (*sae.parameters(), *ref.parameters()):
        if p.grad is not None:
            p.grad.mul_(norm / total)
    _clip(sae, 1.0)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
    for a, b in zip(sae.parameters(), ref.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    if math.isnan(norm):
        assert sae.W_enc.grad.isnan().all()
        return
    clipped = torch.nn.utils.get_total_norm(
        [p.grad for p in sae.parameters() if p.grad is not None]
    )
    assert clipped.item() == pytest.approx(min(norm, 1.0), rel=1e-4)
