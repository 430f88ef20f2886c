"""The checks every config dataclass runs in `__post_init__` (no torch: `conf/` imports them).

Each raises ValueError naming the value as a user writes it (`sae.k`, `train.lr`) and what
would be valid. NaN fails every comparison, so a check written as "bad if x <= 0" lets NaN
through; these are written as "good if ..." and reject NaN and ±inf wherever they stand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(owner: str, **values: float) -> None:
    """Each value finite and > 0."""
    for name, value in values.items():
        if not (_finite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def finite(owner: str, **values: float) -> None:
    """Each value a finite number (not NaN, not ±inf)."""
    for name, value in values.items():
        if not _finite(value):
            raise ValueError(f"{owner}.{name} must be a finite number, got {value}")


def non_negative(owner: str, **values: float) -> None:
    """Each value finite and >= 0."""
    for name, value in values.items():
        if not (_finite(value) and value >= 0):
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


def fraction(owner: str, **values: float) -> None:
    """Each value in [0, 1]."""
    for name, value in values.items():
        if not (_finite(value) and 0 <= value <= 1):
            raise ValueError(f"{owner}.{name} must be in [0, 1], got {value}")


def choice(owner: str, name: str, value: str, valid: Iterable[str]) -> None:
    """`value` one of `valid`."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {', '.join(valid)}")
