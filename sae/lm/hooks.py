"""Hook points on Hugging Face causal LMs: read activations, stop early, splice.

A hook point is named `blocks.{L}.{site}`, whatever the model family calls its blocks:

    resid_pre   the input of block L (the residual stream before it)
    attn_out    the output of block L's attention module (first element if it returns a tuple)
    mlp_out     the output of block L's MLP module
    resid_post  the output of block L (= resid_pre of block L+1)

In a sequential block, resid_post = resid_pre + attn_out + mlp_out; a parallel-residual block
(GPT-NeoX/Pythia) computes both from resid_pre and the sum is the same. Some families (Gemma 2/3)
normalise the module outputs before adding them: attn_out/mlp_out are the raw module outputs.

Modules are found by structure, not by class: the block list at a known path, then the
attention/MLP submodule under a short list of attribute names. Reading raises `_StopForward`
once every hooked point has been computed, so caching pays only for the layers it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sae.devices import LM_DTYPES
from sae.lm.config import HOOK_RE, SITES

# Where each family keeps its list of transformer blocks (GPT-2, GPT-NeoX, Llama-style, OPT).
_BLOCK_PATHS = ("transformer.h", "gpt_neox.layers", "model.layers", "model.decoder.layers")
# Attribute names of a block's attention and MLP submodules, across families.
_SUBMODULES = {
    "attn_out": ("self_attn", "attn", "attention", "self_attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn"),
}
TORCH_DTYPES = dict(zip(LM_DTYPES, (torch.bfloat16, torch.float16, torch.float32), strict=True))


@dataclass(frozen=True)
class HookPoint:
    layer: int
    site: str  # resid_pre | attn_out | mlp_out | resid_post

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.site}"


def load_lm(
    path: str,
    revision: str | None = None,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`from_pretrained` a causal LM and its tokenizer (Hub id or local directory), eval mode,
    on `device` (cpu, cuda, cuda:N: resolve `auto` before calling)."""
    transformers.utils.logging.disable_progress_bar()  # keep the flow logs readable
    kwargs = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype], **kwargs)
    return model.to(device).eval(), tokenizer


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    parent, attr = _block_parent(model)
    return getattr(parent, attr)


def _block_parent(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) holding the block list, found at one of the known paths."""
    for path in _BLOCK_PATHS:
        *up, attr = path.split(".")
        parent: object = model
        for name in up:
            parent = getattr(parent, name, None)
        if isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr  # type: ignore[return-value]
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}; "
        f"looked for {', '.join(_BLOCK_PATHS)}"
    )


def _submodule(block: nn.Module, site: str) -> nn.Module | None:
    """The block's attention (site attn_out) or MLP (mlp_out) module; None if it has none."""
    for attr in _SUBMODULES[site]:
        sub = getattr(block, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def _valid_sites(model: nn.Module) -> list[str]:
    """The sites this model has: the residual ones always, attn/mlp where the block has them."""
    block = blocks(model)[0]
    return [s for s in SITES if s not in _SUBMODULES or _submodule(block, s) is not None]


def parse_hook(model: nn.Module, hook: str) -> HookPoint:
    """Check `hook` against the model; the error lists the valid hook points."""
    n, sites = len(blocks(model)), _valid_sites(model)
    m = HOOK_RE.match(hook)
    if not m or int(m.group(1)) >= n or m.group(2) not in sites:
        why = ""
        if m and m.group(2) not in sites:
            names = ", ".join(_SUBMODULES[m.group(2)])
            why = f" (its blocks have no submodule named {names})"
        raise ValueError(
            f"hook {hook!r} does not exist on this {n}-block {type(model).__name__}{why}; valid: "
            f"blocks.{{0..{n - 1}}}.{'|'.join(sites)} (e.g. blocks.{n // 2}.resid_post)"
        )
    return HookPoint(int(m.group(1)), m.group(2))


class _StopForward(Exception):
    """Raised from a hook to skip everything after the last activation we need."""


def _module(model: nn.Module, hp: HookPoint) -> nn.Module:
    """The module whose input (resid_pre) or output (other sites) is the activation at `hp`."""
    parse_hook(model, hp.name)  # a hand-built HookPoint gets the same ValueError
    block = blocks(model)[hp.layer]
    if hp.site.startswith("resid"):
        return block
    sub = _submodule(block, hp.site)
    assert sub is not None  # parse_hook found it
    return sub


def _attach(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `fn(acts) -> replacement | None` at the hook point; returns the handle."""
    module = _module(model, hp)
    if hp.site == "resid_pre":
        return _attach_input(module, fn)

    def post(_m, _args, out):
        # Blocks and attention modules may return (tensor, extras...): keep the extras.
        acts = out[0] if isinstance(out, tuple) else out
        new = fn(acts)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(post)


def _attach_input(
    block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Register `fn(hidden_states) -> replacement | None` on a block's input."""

    def pre(_m, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])  # a family that passes it by keyword
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return block.register_forward_pre_hook(pre, with_kwargs=True)


@torch.no_grad()
def activations_at(
    model: nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Activations (B, T, d) at each hook point, from one forward pass that stops as soon as
    all of them are computed (inside block L for attn_out/mlp_out of layer L)."""
    if not hooks:
        raise ValueError("activations_at needs at least one hook point")
    out: dict[str, torch.Tensor] = {}
    wanted = {hp.name for hp in hooks}

    def grab(hp: HookPoint):
        def fn(acts: torch.Tensor) -> None:
            out[hp.name] = acts.detach()
            if out.keys() >= wanted:  # the deepest hooked point has just run
                raise _StopForward

        return fn

    handles = [_attach(model, hp, grab(hp)) for hp in set(hooks)]
    try:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if missing := wanted - out.keys():
        raise RuntimeError(f"hook points {sorted(missing)} never ran in the forward pass")
    return out


@contextmanager
def spliced(
    model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, the activation at `hp` is replaced by `fn(acts)` on every forward."""
    handle = _attach(model, hp, fn)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def next_token_ce(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (B, T-1) in nats of token t+1 given tokens ≤ t."""
    logits = _logits(model, input_ids)
    return nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
    )


def _first_after(model: nn.Module, hp: HookPoint) -> int | None:
    """Index of the first block that runs wholly after `hp`; None if the activation is inside a
    block (attn_out, mlp_out) or after the last block."""
    first = {"resid_pre": hp.layer, "resid_post": hp.layer + 1}.get(hp.site)
    return first if first is not None and first < len(blocks(model)) else None


def runs_from(model: nn.Module, hp: HookPoint) -> bool:
    """Whether `logits_from` skips the blocks before `hp` (residual sites before the last block)."""
    return _first_after(model, hp) is not None


@torch.no_grad()
def logits_from(model: nn.Module, hp: HookPoint, input_ids: torch.Tensor, acts: torch.Tensor):
    """(B, T, vocab) fp32 logits of `input_ids` with the activation at `hp` set to acts (B, T, d).

    Where `runs_from(model, hp)`, only the blocks after hp run: for the call, the model's block
    list is cut to those blocks and acts replace the first one's input (the embeddings still run,
    which costs a lookup). Positions, masks and rotary embeddings are computed by the model as in
    a full pass, so the logits equal a full forward with acts spliced at hp. Elsewhere (mid-block
    sites) it is that full forward.
    """
    first = _first_after(model, hp)
    if first is None:
        with spliced(model, hp, lambda a: acts.to(a.dtype)):
            return _logits(model, input_ids)
    parent, attr = _block_parent(model)
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[first:]))
    handle = _attach_input(full[first], lambda a: acts.to(a.dtype))
    try:
        return _logits(model, input_ids)
    finally:
        handle.remove()
        setattr(parent, attr, full)


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(input_ids)  # packed contexts: no padding
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
