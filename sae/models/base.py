"""What every SAE architecture shares: parameters, output tuple, save format, hooks.

An SAE maps an activation x (d_in,) to latents f (d_sae,) and back:

    f  = encode(x)                  (N, d_in) -> (N, d_sae), architecture-specific
    x̂  = f @ W_dec + b_dec          (N, d_sae) -> (N, d_in)

Parameters (all fp32): W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,).
Row i of W_dec is latent i's decoder direction. On disk (`save`): `sae.safetensors` (these four
tensors, fp32; the header's metadata names the arch and the tensors' sha256) and `cfg.json`
(`config()`, plus caller metadata under "meta"); `sae.models.registry.load_sae` reads them back and
checks the sha256. Never pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sae.files import atomic_write, write_text
from sae.models.config import SAEConfig
from sae.training.checkpoint import digest

WEIGHTS = "sae.safetensors"
HEADER = "saeflow"
"""The weights' metadata key: JSON of the arch and the tensors' sha256 (older files: `arch`)."""
CONFIG = "cfg.json"
BLOCK_ELEMENTS = 1 << 24
"""How many latent values (rows × d_sae) analysis code holds at once: 64 MB in float32, so a
dictionary of millions of latents is encoded a few rows at a time (`SAE.encode_blocks`)."""


def row_blocks(n_rows: int, width: int, elements: int | None = None) -> list[slice]:
    """Slices covering n_rows rows in blocks of at most max(1, elements // width) rows
    (elements: default `BLOCK_ELEMENTS`)."""
    step = max(1, (elements or BLOCK_ELEMENTS) // max(width, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def unit_rows(w: Tensor) -> Tensor:
    """Rows of w scaled to norm 1; zero rows stay zero."""
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns. Scalars are 0-dim tensors in the units of the input x."""

    x_hat: Tensor
    """(N, d_in) reconstruction."""
    f: Tensor
    """(N, d_sae) latent activations; a sparse COO tensor (no gradient) from topk and batchtopk
    in training mode, and from relu's and jumprelu's sparse steps (`.to_dense()` for the matrix).
    relu's dense f in training is its pre-activations' reused storage (`reusing_buffers`): valid
    until the next forward."""
    loss: Tensor
    """() the objective the trainer minimises (see each architecture's docstring)."""
    mse: Tensor
    """() mean over tokens of ‖x − x̂‖² / d_in (DESIGN §6)."""
    aux: Tensor
    """() relu: mean_N Σ_i f_i·‖W_dec,i‖; jumprelu: mean_N L0 (both before λ);
    topk, batchtopk: the AuxK loss."""
    l0: Tensor | None = None
    """() mean non-zero latents per token, where the SAE computes it anyway or cheaply: topk,
    batchtopk and relu in training, jumprelu always (its L0 penalty's value)."""


class SAE(nn.Module):
    """Base class: subclasses set `arch`, implement `encode`, `forward` and `hparams`.

    `forward` in training mode also updates `tokens_since_fired` (d_sae,), the number of
    training tokens since each latent was last non-zero (never saved; reset on load). The trainer
    reads it for `dead_frac`, TopK for AuxK.
    """

    arch: ClassVar[str]
    hparams: ClassVar[tuple[str, ...]] = ()
    """The `SAEConfig` fields this architecture reads; saved in `cfg.json` (`config()`)."""
    saved_before: ClassVar[dict[str, Any]] = {}
    """Hyper-parameters added since some `cfg.json` files were saved: the value those files'
    SAEs had (`load_sae` fills it in where the file lacks it)."""
    optional_tensors: ClassVar[tuple[str, ...]] = ()
    """Buffers added since some weights files were saved, 0 where a file or state dict lacks them
    (`load_sae`, SAELens and dictionary_learning imports): what the SAEs without them computed."""
    train_attrs: ClassVar[tuple[str, ...]] = ()
    """Python attributes that training changes (saved in the trainer state, not the weights)."""

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__()
        if not isinstance(d_in, int) or d_in <= 0:
            raise ValueError(f"d_in must be a positive int, got {d_in!r}")
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} is arch {self.arch!r}, not {cfg.arch!r}")
        self.cfg = cfg  # as built; training may move l1_coeff (target_l0)
        d_sae = cfg.d_sae
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer(
            "tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64), persistent=False
        )

    # --- the model ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """(N, d_in) -> f (N, d_sae)."""
        raise NotImplementedError

    @property
    def encodes_as(self) -> str:
        """The architecture whose f `encode` computes (matryoshka: topk or batchtopk's)."""
        return self.arch

    def decode(self, f: Tensor) -> Tensor:
        """x̂ = f @ W_dec + b_dec: (N, d_sae) -> (N, d_in)."""
        return torch.addmm(self.b_dec, f, self.W_dec)

    def encode_blocks(self, x: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """(rows, f) for blocks of x (N, d_in): never more than `BLOCK_ELEMENTS` latent values
        at once, whatever d_sae (a dense (N, d_sae) f is 64 GB at 16k tokens and 1M latents)."""
        for rows in row_blocks(x.shape[0], self.d_sae):
            yield rows, self.encode(x[rows])

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> SAEOutput:
        """x (N, d_in) -> SAEOutput; `sparsity_scale` multiplies the sparsity penalty (warm-up)."""
        raise NotImplementedError

    @property
    def target_l0(self) -> float | None:
        """The L0 training steers the sparsity coefficient to (`SAEConfig.target_l0`)."""
        return self.cfg.target_l0

    def config(self) -> dict[str, Any]:
        """Everything `build_sae` needs to rebuild this SAE: arch, d_in, d_sae and the
        architecture's `hparams` (as resolved: `aux_k` None becomes d_in // 2)."""
        values = {name: getattr(self, name) for name in self.hparams}
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae, **values}

    # --- training hooks ----------------------------------------------------------------------
    def centre_on(self, c: Tensor) -> None:
        """Called by the trainer with b_dec's initial value, the data's geometric median (scaled
        units): relu centres its encoder there. Others ignore it (topk subtracts b_dec)."""

    def fold_centre(self) -> None:
        """Called by the trainer once training is over, before `fold_scale`: fold the encoder's
        centre into b_enc, so the saved SAE needs none."""

    def before_step(self) -> None:
        """Called by the trainer after backward, before the optimiser step."""

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step."""

    @torch.no_grad()
    def _record_firing(self, f: Tensor) -> None:
        """Training forward only: reset the counter of latents non-zero on some token of f."""
        self._record_fired(f.detach().amax(0) > 0, f.shape[0])  # f >= 0 for every arch here

    @torch.no_grad()
    def _record_pairs(
        self, vals: Tensor, rows: Tensor, cols: Tensor, n: int
    ) -> tuple[Tensor, Tensor]:
        """Training forward of a sparse step, its (token, latent) pairs with values vals: reset
        the counters of the latents with a value > 0; return (f as a sparse COO (n, d_sae)
        tensor without gradient, mean L0). Building the dense f would write n·d_sae zeros."""
        on = vals > 0
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=vals.device)
        self._record_fired(fired.index_fill_(0, cols[on], True), n)
        f = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals.detach(), (n, self.d_sae), check_invariants=False
        )
        return f, torch.count_nonzero(on).float() / n

    @torch.no_grad()
    def _record_fired(self, fired: Tensor, n: int) -> None:
        """Add n tokens to every counter; reset those of the latents in the mask fired (d_sae,)."""
        self.tokens_since_fired.add_(n).masked_fill_(fired, 0)

    def training_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What training changes beyond `state_dict()`: tensors, and JSON-able values."""
        return {"tokens_since_fired": self.tokens_since_fired}, {
            name: getattr(self, name) for name in self.train_attrs
        }

    @torch.no_grad()
    def load_training_state(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        """Inverse of `training_state`."""
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        for name in self.train_attrs:
            setattr(self, name, values[name])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in self.optional_tensors:  # `optional_tensors` missing: their initial value
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args)

    # --- units and disk ----------------------------------------------------------------------
    @torch.no_grad()
    def fold_scale(self, s: float) -> None:
        """Fold an input scaling into the weights, in place: trained on x' = s·x, it now takes x.

        The encoder's input is x' = s·x (relu) or x' − b_dec = s·(x − b_dec/s) (topk); both equal
        x·(s·W_enc) [− (b_dec/s)·(s·W_enc)], so W_enc ← s·W_enc and b_dec ← b_dec/s give the same
        pre-activations, hence the same f, and b_enc is unchanged. The reconstruction in raw units
        is x̂'/s = f @ (W_dec/s) + b_dec/s, so W_dec ← W_dec/s. Decoder rows then have norm 1/s
        (with `unit_decoder`): fold only when training is over.
        """
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale must be a finite positive number, got {s}")
        self.W_enc.mul_(s)
        self.b_dec.div_(s)
        self.W_dec.div_(s)

    def save(self, dir: Path, meta: dict[str, Any] | None = None) -> None:
        """Write `dir/sae.safetensors` (fp32 weights) and `dir/cfg.json` (config + "meta")."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        cfg = self.config() | ({"meta": meta} if meta is not None else {})
        # Config first, weights last, each renamed into place: a kill leaves no half file, and
        # weights beside a config always belong to it.
        write_text(dir / CONFIG, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # The arch in the weights' own header: relu and topk tensors have the same names and
        # shapes, so only this tells load_sae that a cfg.json does not belong to them. The
        # tensors' sha256 too: safetensors checks its header, not the data. One key holding
        # both: safetensors writes its metadata map in an order that changes from process to
        # process, so two keys made identical runs write different bytes.
        header = {"arch": self.arch, "sha256": digest(tensors)}
        meta = {HEADER: json.dumps(header, sort_keys=True)}
        atomic_write(dir / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                     point="sae.save")  # fmt: skip


class Centred(nn.Module):
    """An encoder that reads x − c for a fixed c: the data's geometric median in the trainer's
    scaled units (`centre_on`, where `sae.centre` asks for it), folded exactly into b_enc when
    training ends (`fold_centre`:
    (x − c) @ W_enc + b_enc = x @ W_enc + (b_enc − c @ W_enc)), so the saved SAE needs none.

    Why fixed, not b_dec: a learned bias under the encoder lets Adam's per-coordinate steps on
    W_enc move every latent's effective bias by ~lr·‖c‖₁ per step; with a large offset, as real
    residual streams have, every latent ended dead (L0 0, measured). For relu and jumprelu."""

    def __init__(self, d_in: int, *args: Any) -> None:
        super().__init__(d_in, *args)
        self.centre = self.cfg.centre  # whether to; the buffer c holds the point itself
        self.register_buffer("c", torch.zeros(d_in), persistent=False)  # 0 once folded

    @torch.no_grad()
    def centre_on(self, c: Tensor) -> None:
        if self.centre:
            self.c.copy_(c)

    @torch.no_grad()
    def fold_centre(self) -> None:
        self.b_enc.sub_(self.c @ self.W_enc)  # (x − c) @ W + b = x @ W + (b − c @ W)
        self.c.zero_()

    def training_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, values = super().training_state()
        return tensors | {"centre": self.c}, values

    @torch.no_grad()
    def load_training_state(self, tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
        super().load_training_state(tensors, values)
        if "centre" in tensors:  # states saved before the centre existed: 0, as then
            self.c.copy_(tensors["centre"])


class _Reuse(threading.local):
    """This thread's storage for `reused`: (slot, dtype) -> a flat tensor; None outside
    `reusing_buffers`."""

    def __init__(self) -> None:
        self.stores: dict[tuple[str, torch.dtype], Tensor] | None = None


_REUSE = _Reuse()


@contextlib.contextmanager
def reusing_buffers() -> Iterator[None]:
    """Within the block, on this thread, `reused` hands out storage kept from call to call (freed
    when the outermost block ends). The trainer's loop runs in one: a fresh (N, d_sae) block of
    over 32 MiB comes from mmap and is page-faulted in on every step (glibc; PyTorch's CPU
    allocator caches nothing): measured 2026-12-06 on a 2-core AMD EPYC VM, writing the
    encoder's (4096, 2048) pre-activations cost 7.3 ms a step into fresh memory, 1.3 ms into
    reused (of a ~65 ms topk step)."""
    outer = _REUSE.stores
    _REUSE.stores = {} if outer is None else outer
    try:
        yield
    finally:
        _REUSE.stores = outer


def reused(shape: tuple[int, ...], dtype: torch.dtype, slot: str = "z") -> Tensor:
    """An uninitialised CPU tensor of `shape`: inside `reusing_buffers`, on this thread's kept
    storage for (`slot`, `dtype`) (grown to the largest size asked; what an earlier call got from
    it is overwritten), else fresh. Slots: "z" the encoder's pre-activations, "grad" their
    gradient (`Dense`)."""
    stores = _REUSE.stores
    if stores is None:
        return torch.empty(shape, dtype=dtype)
    n = math.prod(shape)
    store = stores.get((slot, dtype))
    if store is None or store.numel() < n:
        store = stores[slot, dtype] = torch.empty(n, dtype=dtype)
    return store[:n].view(shape)


def random_directions(n: int, d: int, norm: float) -> Tensor:
    """(n, d) rows drawn uniformly on the sphere of radius `norm` (uses torch's global RNG)."""
    w = torch.randn(n, d)
    return w * (norm / w.norm(dim=-1, keepdim=True))


def sq_err(x: Tensor, x_hat: Tensor) -> Tensor:
    """(N,) ‖x − x̂‖² per token, in fp32 or wider whatever the autocast dtype of x̂."""
    return SquaredError.apply(x_hat, x)


def spread(x: Tensor) -> Tensor:
    """() Σ_N ‖x − x̄‖², the denominator of a batch FVU, in fp32 or wider."""
    if x.requires_grad:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return (x - x.mean(0)).pow(2).sum()
    with torch.no_grad():
        d = x - x.mean(0)
        return torch.linalg.vector_norm(
            d, dtype=torch.promote_types(d.dtype, torch.float32)
        ).square()


class SquaredError(torch.autograd.Function):
    """(x̂, x) -> (N,) ‖x̂ − x‖² per token, with one (N, d) temporary each way: d = x̂ − x
    (saved) forward, 2·d·g backward. Autograd's (x̂ − x).pow(2).sum(-1) writes two forward
    and three backward; each (N, d) pass costs ~1 ms at N 4096, d 256 on this project's 2-core
    CPUs, where a topk step is ~60 ms."""

    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, x: Tensor) -> Tensor:
        d = x_hat.to(torch.promote_types(x_hat.dtype, torch.float32)) - x
        ctx.save_for_backward(d)
        ctx.inputs = (x_hat.dtype, x_hat.shape), (x.dtype, x.shape)
        return torch.linalg.vector_norm(d, dim=-1).square()

    @staticmethod
    @torch.autograd.function.once_differentiable  # d carries no graph: no double backward
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        (d,) = ctx.saved_tensors
        g = d * (2 * grad).unsqueeze(-1)
        (x_hat_dtype, x_hat_shape), (x_dtype, x_shape) = ctx.inputs
        grad_x_hat = grad_x = None
        if ctx.needs_input_grad[0]:  # summed to x̂'s shape where it broadcast (one row: (d,))
            grad_x_hat = g.sum_to_size(x_hat_shape).to(x_hat_dtype)
        if ctx.needs_input_grad[1]:
            grad_x = -g.sum_to_size(x_shape).to(x_dtype)
        return grad_x_hat, grad_x
