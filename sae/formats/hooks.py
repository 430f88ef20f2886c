"""Hook names: saeflow's `blocks.L.<site>` and TransformerLens's `blocks.L.hook_<site>`."""

from __future__ import annotations

import re

from sae.lm.config import HOOK_RE, SITES

TL_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(SITES) + r")$")
"""TransformerLens's names for saeflow's hook sites (SAELens's `metadata.hook_name`)."""


def to_transformer_lens(hook: str) -> str:
    """`blocks.3.resid_post` -> `blocks.3.hook_resid_post`."""
    m = HOOK_RE.match(hook)
    if not m:
        raise ValueError(f"{hook!r} is not a saeflow hook point (blocks.<layer>.<site>)")
    return f"blocks.{m.group(1)}.hook_{m.group(2)}"


def from_transformer_lens(name: str) -> str:
    """`blocks.3.hook_resid_post` (or saeflow's own spelling) -> `blocks.3.resid_post`."""
    if HOOK_RE.match(name):
        return name
    m = TL_HOOK_RE.match(name)
    if not m:
        sites = "|".join(f"hook_{s}" for s in SITES)
        raise ValueError(
            f"hook {name!r} has no saeflow equivalent; supported: blocks.<layer>.{sites}"
        )
    return f"blocks.{m.group(1)}.{m.group(2)}"
