"""Hook points on Hugging Face causal LMs: read the residual stream, stop early, splice.

A hook point is named `blocks.{L}.resid_pre` (the input of block L) or `blocks.{L}.resid_post`
(its output), whatever the model family calls its blocks. Reading uses a forward hook that raises
`_StopForward` once the deepest hooked block has run, so caching pays for layers 0..L only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

HOOK_RE = re.compile(r"^blocks\.(\d+)\.(resid_pre|resid_post)$")
# Where each family keeps its list of transformer blocks.
_BLOCK_PATHS = ("transformer.h", "gpt_neox.layers", "model.layers", "model.decoder.layers")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class HookPoint:
    layer: int
    site: str  # resid_pre | resid_post

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.site}"


def load_lm(
    path: str, revision: str | None = None, dtype: str = "fp32"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`from_pretrained` a causal LM and its tokenizer (Hub id or local directory), eval mode."""
    transformers.utils.logging.disable_progress_bar()  # keep the flow logs readable
    kwargs = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype], **kwargs)
    return model.eval(), tokenizer


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    for path in _BLOCK_PATHS:
        obj: object = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}; "
        f"looked for {', '.join(_BLOCK_PATHS)}"
    )


def parse_hook(model: nn.Module, hook: str) -> HookPoint:
    """Check `hook` against the model; the error lists the valid hook points."""
    n = len(blocks(model))
    m = HOOK_RE.match(hook)
    if not m or int(m.group(1)) >= n:
        raise ValueError(
            f"hook {hook!r} does not exist on this {n}-block model; valid: "
            f"blocks.{{0..{n - 1}}}.resid_pre|resid_post (e.g. blocks.{n // 2}.resid_post)"
        )
    return HookPoint(int(m.group(1)), m.group(2))


class _StopForward(Exception):
    """Raised from a hook to skip every layer after the last one we need."""


def _attach(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `fn(acts) -> replacement | None` at the hook point; returns the handle."""
    block = blocks(model)[hp.layer]
    if hp.site == "resid_pre":

        def pre(_m, args, kwargs):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)

        return block.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m, _args, out):
        acts = out[0] if isinstance(out, tuple) else out
        new = fn(acts)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return block.register_forward_hook(post)


@torch.no_grad()
def activations_at(
    model: nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Residual activations (B, T, d_model) at each hook point, from one truncated forward pass."""
    out: dict[str, torch.Tensor] = {}
    last = max(hooks, key=lambda h: (h.layer, h.site == "resid_post"))

    def grab(hp: HookPoint):
        def fn(acts: torch.Tensor) -> None:
            out[hp.name] = acts.detach()
            if hp == last:
                raise _StopForward

        return fn

    handles = [_attach(model, hp, grab(hp)) for hp in hooks]
    try:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
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
    mask = torch.ones_like(input_ids)  # packed contexts: no padding
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    return nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
    )
