"""Argument checks shared across hf_sparse: each raises a `ValueError` that names the argument and what it allows.

The model folder (`models/sparse_vit/`) keeps its own few checks: it is shipped as Hub remote code and may import
nothing from this package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` if it is one of `allowed`, else a `ValueError` naming the argument and its allowed values."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
    return value


def is_number(value: Any) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    hint: str = "",
) -> float:
    """`float(value)` if it lies in the interval, else a `ValueError` naming it (`hint` is appended)."""
    ok = is_number(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (value <= high if high_inclusive else value < high)
    if not ok:
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"`{name}` must be a number in {interval}{hint}, got {value!r}.")
    return float(value)


def check_fraction(name: str, value: Any, *, low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    """`float(value)` if it lies in [0, 1] with the given open/closed ends, else a `ValueError`."""
    return check_interval(name, value, 0.0, 1.0, low_inclusive=low_inclusive, high_inclusive=high_inclusive)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = is_number(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}.")
    return float(value)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """`int(value)` for an integer (numpy integers included, bools not) >= `minimum`, else a `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"`{name}` must be an integer{bound}, got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")
    return value
