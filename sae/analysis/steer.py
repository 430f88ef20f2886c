"""Steer a language model with an SAE feature (the seed papers' check that a feature *does*
what its examples suggest).

At the hook, on every position of the prompt and of the generated tokens:

    add     x ← x + scale·d_i                      d_i = W_dec,i / ‖W_dec,i‖
    clamp   x ← x + (value − f_i(x))·W_dec,i       f_i(x) the SAE's activation of feature i

`clamp` sets the feature to `value` (0 ablates it) and leaves the SAE's error term untouched, as
in "Scaling Monosemanticity". Generation is greedy, so the steered and the unsteered text
differ only by the intervention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sae.lm.hooks import HookPoint, spliced
from sae.models.base import SAE


def intervention(sae: SAE, feature: int, mode: str, value: float) -> Callable[[Tensor], Tensor]:
    """acts (..., d_in) -> steered acts, for `spliced`."""
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} is not in 0..{sae.d_sae - 1} (d_sae={sae.d_sae})")
    w = sae.W_dec[feature].detach()  # (d_in,)
    if mode == "add":
        direction = w / w.norm().clamp_min(1e-12)
        return lambda acts: acts + (value * direction).to(acts.dtype)
    if mode == "clamp":

        def clamp(acts: Tensor) -> Tensor:
            x = acts.reshape(-1, sae.d_in).to(w.dtype)
            f = torch.cat([f[:, feature] for _, f in sae.encode_blocks(x)])  # (N,)
            delta = (value - f).unsqueeze(-1) * w  # (N, d_in)
            return acts + delta.view_as(acts).to(acts.dtype)

        return clamp
    raise ValueError(f"steering mode {mode!r} is not one of add, clamp")


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    hp: HookPoint | None = None,
    steer: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Greedy continuation (B, max_new_tokens) of input_ids (B, T), steered at hp if given.

    No KV cache: every step reruns the whole sequence, so the hook sees (and steers) every
    position, prompt included, exactly as in a single forward pass.
    """
    ids = input_ids
    for _ in range(max_new_tokens):
        if steer is None or hp is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            with spliced(model, hp, steer):
                logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1] :]


@torch.no_grad()
def next_token_probs(
    model: nn.Module,
    input_ids: Tensor,
    hp: HookPoint | None = None,
    steer: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(B, vocab) next-token probabilities after input_ids, steered at hp if given."""
    if steer is None or hp is None:
        logits = model(input_ids=input_ids, use_cache=False).logits
    else:
        with spliced(model, hp, steer):
            logits = model(input_ids=input_ids, use_cache=False).logits
    return logits[:, -1].float().softmax(-1)
