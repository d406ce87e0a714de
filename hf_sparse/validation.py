"""Argument checks shared across hf_sparse: each raises a `ValueError` that names the argument and what it allows."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise a `ValueError` naming the argument and its allowed values."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_fraction(name: str, value: float, *, low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    """Raise a `ValueError` unless `value` lies in [0, 1] with the given open/closed ends."""
    ok = _is_number(value)
    if ok:
        ok = (value >= 0 if low_inclusive else value > 0) and (value <= 1 if high_inclusive else value < 1)
    if not ok:
        interval = f"{'[' if low_inclusive else '('}0, 1{']' if high_inclusive else ')'}"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = _is_number(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}.")
