"""The language model side of the config: the builtin model's recipe and hook-point names.

No torch here: `conf/schema.py` extends `LMSpec` into the `model` section, and checks hook names
with `check_hook` before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from sae.checks import non_negative, positive

ENDOFTEXT = "<|endoftext|>"
"""The builtin model's BOS, EOS and pad token."""
SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")
"""Hook sites of a block, in the order it computes them (`sae.lm.hooks`)."""
HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(SITES) + r")$")
"""A hook point's name: `blocks.{L}.{site}`."""


def check_hook(key: str, hook: str, n_layer: int | None = None, model: str = "") -> int:
    """`hook` is `blocks.<L>.<site>` with L < n_layer (when the depth is known); returns L."""
    m = HOOK_RE.match(hook)
    if not m:
        raise ValueError(
            f"{key}={hook!r} is not a hook point; valid: blocks.<layer>.{'|'.join(SITES)}"
        )
    layer = int(m.group(1))
    if n_layer is not None and layer >= n_layer:
        raise ValueError(
            f"{key}={hook!r} does not exist: model {model} has {n_layer} blocks "
            f"(0..{n_layer - 1}); valid: blocks.<0..{n_layer - 1}>.{'|'.join(SITES)}"
        )
    return layer


@dataclass
class LMSpec:
    """The builtin offline model's recipe (`sae.lm.builtin`): everything that fixes the model
    it builds, and so its directory's contents."""

    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Residual stream width (d_model)."""
    n_head: int = 4
    """Attention heads; must divide n_embd."""
    n_ctx: int = 256
    """Context length, in tokens, for training and n_positions."""
    vocab_size: int = 4096
    """BPE vocabulary, <|endoftext|> included."""
    train_tokens: int = 1_600_000
    """Tokens seen in training: steps = train_tokens // (batch_size·n_ctx)."""
    batch_size: int = 8
    """Contexts per optimiser step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to a tenth)."""
    seed: int = 0
    """Seeds the initialisation and the order of training contexts."""
    corpus_bytes: int = 0
    """Cap on each split's text in bytes (0 = the whole stdlib); tests build on a slice."""
    bf16: bool = True
    """bf16 autocast for training, where the CPU has native bf16 (else fp32)."""
    threads: int = 0
    """torch intra-op threads for the build (0 = torch's default)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_ctx", "vocab_size", "train_tokens",
                     "batch_size"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}"
            )
        if self.n_ctx < 2:
            raise ValueError(f"model.n_ctx must be >= 2 (BOS + one token), got {self.n_ctx}")
        if self.vocab_size < 257:
            raise ValueError(
                f"model.vocab_size must be >= 257 (256 bytes + {ENDOFTEXT}), got {self.vocab_size}"
            )
        if self.train_tokens < self.batch_size * self.n_ctx:
            raise ValueError(
                f"model.train_tokens={self.train_tokens} is less than one step "
                f"(batch_size*n_ctx = {self.batch_size * self.n_ctx})"
            )
        positive("model", lr=self.lr)
        if not self.lr < 1:
            raise ValueError(f"model.lr must be in (0, 1), got {self.lr!r}")
        for name in ("seed", "corpus_bytes", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int):
                raise ValueError(f"model.{name} must be an int >= 0, got {value!r}")
            non_negative("model", **{name: value})

    def recipe(self) -> dict[str, Any]:
        """This recipe's own fields as a dict (a subclass's other fields left out): what the
        build records and what names its directory."""
        return {f.name: getattr(self, f.name) for f in fields(LMSpec)}
