"""A resynthesis stream's options as one frozen value: parsed and validated once, passed through unchanged.

`start.resynth` / `subscribe.resynth` (the wire protocol, dpslm_stream.protocol) become a ``ResynthOptions`` in the
server's session core; the resynthesis backend (server/resynth.py in-process, server/ray_backend.py on Ray) hands it
to ``ResynthWorker.open_session(k, lmbda, **options.kwargs())``, and the stream's ``settings()`` reports every field
back in ``ready.settings.resynth``. docs/protocol.md lists exactly these fields (a test checks it).

No torch here: the protocol module (imported by clients) takes the JSON types from ``ResynthOptions.json_types``.
The defaults are ``ResynthWorker.open_session``'s, both read from stream/resynth_defaults.py (a test checks it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from dpslm_stream.errors import InvalidInput
from dpslm_stream.validate import is_int, is_number
from dpslm_stream.stream.resynth_defaults import (
    DEFAULT_HOLDBACK, DEFAULT_LEFT_CONTEXT, DEFAULT_MAX_PASS_UNITS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P,
    DEFAULT_VOCODER_LEFT_CONTEXT, DEFAULT_VOCODER_LOOKAHEAD,
)

# Units of one ELLA-V pass after the committed ones (the server's fixed max_pass_units, see stream/ellav_stage.py):
# the hold-back must fit in a pass.
MAX_PASS_UNITS = DEFAULT_MAX_PASS_UNITS
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ResynthOptions:
    """Units are deduplicated units (left_context C, holdback L; None = unlimited, the exact setting); vocoder_* are
    25 ms codec frames. Construction validates every field (InvalidInput naming it); ``field`` says which."""

    left_context: int | None = DEFAULT_LEFT_CONTEXT  # C: committed units kept in each ELLA-V prompt; None = all
    holdback: int | None = DEFAULT_HOLDBACK  # L: units of lookahead before a unit's tokens are final; None = to end
    first_holdback: int | None = None  # the stream's first unit's hold-back (first audio sooner); None = holdback
    greedy: bool = True  # greedy decoding (DP-SLM's top_p = 0); False = nucleus sampling
    seed: int | None = None  # sampling seed (reproducible runs); None = random
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    trigger_units: int = 1  # start a pass once this many units can be committed
    trigger_s: float | None = None  # or once the committable units cover this many seconds of input
    vocoder_left_context: int | None = DEFAULT_VOCODER_LEFT_CONTEXT  # WavTokenizer window left context; None = all
    vocoder_lookahead: int = DEFAULT_VOCODER_LOOKAHEAD  # codec frames decoded past the committed ones

    NULLABLE: ClassVar[tuple[str, ...]] = ("left_context", "holdback", "first_holdback", "seed", "trigger_s",
                                           "vocoder_left_context")

    def __post_init__(self) -> None:
        _count(self, "left_context", 0)
        _count(self, "holdback", 0)
        _count(self, "first_holdback", 0)
        if not isinstance(self.greedy, bool):
            raise ResynthOptionError("greedy", f"greedy must be true or false, got {self.greedy!r}")
        _count(self, "seed", 0, MAX_SEED)
        _number(self, "temperature", 0.0)
        _number(self, "top_p", 0.0, 1.0)
        _count(self, "trigger_units", 1)
        _number(self, "trigger_s", 0.0)
        _count(self, "vocoder_left_context", 0)
        _count(self, "vocoder_lookahead", 0)
        if self.holdback is not None and self.holdback >= MAX_PASS_UNITS:
            raise ResynthOptionError("holdback", f"holdback must be below {MAX_PASS_UNITS} (the units one ELLA-V "
                                                 f"prompt holds after the committed ones), got {self.holdback}")  # fmt: skip

    @classmethod
    def json_types(cls) -> dict[str, type]:
        """Each option's JSON type (int, bool, float), for the protocol's type checks."""
        kinds = {"int | None": int, "int": int, "bool": bool, "float": float, "float | None": float}
        return {f.name: kinds[str(f.type)] for f in dataclasses.fields(cls)}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> "ResynthOptions":
        """The options of a (type-checked) JSON object; unknown names and bad values raise ResynthOptionError."""
        obj = obj or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ResynthOptionError(unknown[0], f"unknown resynth option(s) {unknown}; expected {sorted(names)}")
        return cls(**obj)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``ResynthWorker.open_session``."""
        return dataclasses.asdict(self)


class ResynthOptionError(InvalidInput):
    """A bad resynthesis option; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _count(opts: ResynthOptions, name: str, minimum: int, maximum: int = MAX_SEED) -> None:
    value = getattr(opts, name)
    if value is None and name in ResynthOptions.NULLABLE:
        return
    if not is_int(value) or not minimum <= int(value) <= maximum:
        also = " or null (unlimited)" if name in ResynthOptions.NULLABLE else ""
        raise ResynthOptionError(name, f"{name} must be an integer >= {minimum}{also}, got {value!r}")


def _number(opts: ResynthOptions, name: str, lo: float, hi: float = math.inf) -> None:
    value = getattr(opts, name)
    if value is None and name in ResynthOptions.NULLABLE:
        return
    ok = is_number(value)
    ok = ok and lo <= float(value) <= hi
    if not ok:
        upper = f" and <= {hi:g}" if hi < math.inf else ""
        raise ResynthOptionError(name, f"{name} must be a finite number >= {lo:g}{upper}, got {value!r}")
