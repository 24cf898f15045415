"""The one number check: is a value an integer, or a finite real number, and within bounds?

``bool`` is an ``int`` subclass in Python, so ``isinstance(True, int)`` holds, and JSON's ``true`` or a flag's
``True`` would otherwise pass as 1 wherever a count or a size is expected. Every option check of the package asks
these predicates (and raises its own error, naming its option) or ``check_int``/``check_number`` (InvalidInput with
the usual wording).
"""

from __future__ import annotations

import math
import numbers

from dpslm_stream.errors import InvalidInput


def is_int(value: object, kind: type = numbers.Integral) -> bool:
    """An integer (``kind``: numbers.Integral, numpy's included, or ``int`` for Python ints only), never a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number (int, float, numpy scalar), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None,
              kind: type = numbers.Integral) -> int:  # fmt: skip
    """``value`` as an int, or InvalidInput "NAME must be an integer >= MINIMUM[ and <= MAXIMUM], got VALUE"."""
    if not is_int(value, kind) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):  # type: ignore[operator]
        bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                          f"<= {maximum}" if maximum is not None else "") if b)  # fmt: skip
        raise InvalidInput(f"{name} must be an integer{' ' + bounds if bounds else ''}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_number(name: str, value: object, minimum: float = -math.inf, maximum: float = math.inf,
                 above: bool = False, what: str = "number") -> float:  # fmt: skip
    """``value`` as a float, or InvalidInput "NAME must be a WHAT >= MINIMUM (> with ``above``)[ and <= MAXIMUM],
    got VALUE"; never infinite or NaN."""
    ok = is_number(value) and (value > minimum if above else value >= minimum) and value <= maximum  # type: ignore[operator]
    if not ok:
        bounds = " and ".join(b for b in (f"{'>' if above else '>='} {minimum:g}" if minimum > -math.inf else "",
                                          f"<= {maximum:g}" if maximum < math.inf else "") if b)  # fmt: skip
        raise InvalidInput(f"{name} must be a {what}{' ' + bounds if bounds else ''}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
