"""Argument checks shared by the library, so every bad input gets the same kind of message:
the option, the value it got, and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_choice(option: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{option}={value!r} is not supported; expected one of {choices}")


def check_number(
    option: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in the given interval.

    ``low_open``/``high_open`` make the bound strict (``(low, ...`` instead of ``[low, ...``).
    """
    kind = "an integer" if integer else "a number"
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{option}={value!r} must be {kind} in {interval}")
    if not math.isfinite(value):
        raise ValueError(f"{option}={value!r} must be finite, in {interval}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{option}={value!r} is out of range; allowed: {interval}")
