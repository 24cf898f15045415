"""Option checks of the resynthesis stages: InvalidInput naming the option and what it accepts."""

from __future__ import annotations

import math
import numbers

from dpslm_stream.errors import InvalidInput


def check_count(value: object, name: str, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        also = " or None (unlimited)" if allow_none else ""
        raise InvalidInput(f"{name} must be an integer >= {minimum}{also}, got {value!r}")
    return int(value)


def check_number(value: object, name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidInput(f"{name} must be a finite number {bound}" + (f" and <= {hi}" if hi < math.inf else "")
                           + f", got {value!r}")  # fmt: skip
    return float(value)
