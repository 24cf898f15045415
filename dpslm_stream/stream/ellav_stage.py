"""IncrementalELLAV: one stream's committed units -> committed ELLA-V codec ids, by teacher-forced re-prompting.

    units (deduplicated, as the encoder commits them)
      -> IncrementalELLAV     teacher-forced re-prompting over a sliding window    (exact with C = L = None)
      -> IncrementalVocoder   windowed backbone + exact iSTFT stitching            (dpslm_stream.stream.vocoder)
      -> AudioEvent           24 kHz float32 chunks, sequence-numbered and timestamped

Why re-prompting (docs/references.md §ELLA-V): ELLA-V's prompt starts with the whole unit list, so a new unit changes
tokens *before* every cached key and a running cache cannot be extended. Each *pass* therefore builds a fresh prompt

    [u_s .. u_{e-1}]  BOS  (u_i run_i EOP) for s <= i < c  u_c

where units < c are committed (their generated tokens `run_i` are teacher-forced), s = c - C is the left edge of the
window (C units of left context: they carry the voice), and e is the number of known units (with a finite C at most
`max_pass_units` after c; with C = None every known unit, as offline's prompt holds the whole unit list). The
pass decodes with upstream's control loop until the EOP of unit e-1-L (hold-back L: the last committed unit still
sees L units of the future) and commits those tokens; codec tokens are final the moment they are generated. Every
pass starts at position 0, so memory is flat however long the stream; each codec token is decoded exactly once,
only prefill is repeated.

Reductions (tests/test_stream_resynth.py): with C = L = None a stream commits everything at end() in one pass
whose prompt is offline `ELLAV.generate`'s, so the codec ids equal offline greedy generation; whenever a pass sees
the whole unit list (C = None), re-prompting from the exact generated tokens (`token_prefix`) continues it exactly.

Standalone, `push`/`flush` run the passes here (a BatchDecoder of one row, stream/ellav_batch.py); inside a
ResynthSession the ResynthWorker (stream/resynth_worker.py) batches the passes of many streams.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models.ellav import ELLAV
from dpslm_stream.validate import check_int, check_number
from dpslm_stream.stream.ellav_batch import BatchDecoder, PassPlan, Sampling
from dpslm_stream.stream.resynth_defaults import (
    DEFAULT_HOLDBACK, DEFAULT_LEFT_CONTEXT, DEFAULT_MAX_CODEC_TOKENS_PER_PHONE, DEFAULT_MAX_PASS_UNITS,
    DEFAULT_TEMPERATURE, DEFAULT_TOP_P,
)



class IncrementalELLAV:
    """Committed units in, committed codec ids out, for one stream (see the module docstring for the scheme).

    left_context C: committed units kept in the prompt (None: all, exact but memory grows with the stream).
    holdback L: a pass commits up to the unit L places before the newest known one (None: nothing before end()).
    first_holdback: the units the stream's first unit waits for before a pass commits it (None: L, like every
    unit). 0 starts the first pass at the first unit, whatever the trigger, so the first audio does not wait for L
    more units to arrive (≈ L / U s: 0.25 s at L = 3, U = 12/s); the first unit's tokens then see fewer later units.
    It applies only with a bounded hold-back: with L = None nothing is committed before end() whatever it says, so
    the exact setting stays exact.
    max_pass_units: with a finite left_context, at most this many units after the committed ones enter a prompt
    (None: all known); it only binds when units pile up faster than they are resynthesized. With left_context=None
    it does not apply: the prompt then holds the whole unit list as offline's does (a bound would cut the global
    section, and every token would differ from offline generation from the first on), and memory grows with the
    stream anyway.
    trigger_units / trigger_s: a pass starts once it can commit at least `trigger_units` units, or, when
    `trigger_s` is given, units covering at least `trigger_s` seconds of input (needs the units' end times).
    Sampling: greedy (argmax, DP-SLM's top_p = 0) or nucleus sampling with `temperature`/`top_p` drawn from this
    stream's own generator, seeded with `seed` (None: a random seed), so a stream's output does not depend on
    other streams sharing a batch.

    Standalone use: `push(units)` / `flush()` run the passes here (batch of one). Inside a ResynthSession the
    worker drives the same state through `add`, `next_pass`, `take` and `extend_stop`, batched with other streams.
    """

    def __init__(self, model: ELLAV, left_context: int | None = DEFAULT_LEFT_CONTEXT,
                 holdback: int | None = DEFAULT_HOLDBACK, *, first_holdback: int | None = None,
                 max_pass_units: int | None = DEFAULT_MAX_PASS_UNITS,
                 trigger_units: int = 1, trigger_s: float | None = None,
                 max_codec_tokens_per_phone: int = DEFAULT_MAX_CODEC_TOKENS_PER_PHONE, greedy: bool = True,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 seed: int | None = None):  # fmt: skip
        if not isinstance(model, ELLAV):
            raise InvalidInput(f"model must be an ELLAV model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.left_context = None if left_context is None else check_int("left_context", left_context, 0)
        self.holdback = None if holdback is None else check_int("holdback", holdback, 0)
        self.first_holdback = None if first_holdback is None else check_int("first_holdback", first_holdback, 0)
        self.max_pass_units = None if max_pass_units is None else check_int("max_pass_units", max_pass_units, 1)
        if None not in (self.max_pass_units, self.holdback) and self.max_pass_units <= self.holdback:
            raise InvalidInput(f"max_pass_units ({max_pass_units}) must be larger than holdback ({holdback}): a "
                               "prompt must hold the committed units plus the hold-back")  # fmt: skip
        self.trigger_units = check_int("trigger_units", trigger_units, 1)
        self.trigger_s = None if trigger_s is None else check_number("trigger_s", trigger_s, 0.0)
        self.max_codec_tokens_per_phone = check_int("max_codec_tokens_per_phone", max_codec_tokens_per_phone, 0)
        if not isinstance(greedy, bool):
            raise InvalidInput(f"greedy must be True or False, got {greedy!r}")
        self.temperature = check_number("temperature", temperature, 0.0)
        self.top_p = check_number("top_p", top_p, 0.0, 1.0)
        # Upstream's sample(): argmax when the temperature or top_p is 0
        self.greedy = greedy or self.temperature == 0 or self.top_p == 0
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.generator = torch.Generator(device="cpu")
        self._decoder: BatchDecoder | None = None  # standalone push/flush only
        self.reset()

    def reset(self) -> None:
        """Back to a fresh stream with the same settings (the generator is re-seeded when a seed was given)."""
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)
        self._units: list[int] = []  # deduplicated units from absolute index self._base on
        self._ends: list[float | None] = []  # their end times in the input (seconds), when given
        self._runs: list[list[int]] = []  # generated tokens of the committed units from self._base on
        self._base = 0  # absolute index of self._units[0]; = max(0, committed - C) between passes
        self._last_unit: int | None = None  # the last unit received (deduplication across pushes)
        self._commit_end_s = 0.0  # input end time of the last committed unit (trigger_s)
        self.committed = 0  # units whose tokens are final
        self.codes_out = 0  # codec ids committed
        self.passes = 0
        self.ended = False
        # The pass in flight
        self._plan: PassPlan | None = None
        self._pass_end = 0  # absolute number of units its prompt holds
        self._run: list[int] = []  # tokens of the unit being generated
        self._expect_unit = False  # after an EOP the next token is the forced next unit
        if self._decoder is not None:
            self._decoder.clear()

    # -- input -----------------------------------------------------------------------------------------------------

    @property
    def received(self) -> int:
        """Deduplicated units received so far."""
        return self._base + len(self._units)

    def check_units(self, units: object, end_s: object = None) -> tuple[list[int], list[float | None]]:
        """Validate units (integers 0..K-1) and optional end times; return them as lists. Changes nothing."""
        if isinstance(units, Tensor):
            if units.dim() != 1 or units.is_floating_point() or units.is_complex() or units.dtype == torch.bool:
                raise InvalidInput(
                    f"units must be a 1-D integer sequence, got tensor {tuple(units.shape)} {units.dtype}")
            units = units.tolist()
        elif isinstance(units, np.ndarray):
            if units.ndim != 1 or not np.issubdtype(units.dtype, np.integer):
                raise InvalidInput(f"units must be a 1-D integer sequence, got array {units.shape} {units.dtype}")
            units = units.tolist()
        if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
            raise InvalidInput(f"units must be a sequence of integer unit ids, got {type(units).__name__}")
        units = list(units)
        self.tokenizer.unit_token_ids(units)  # InvalidInput for anything that is not a unit of this model
        if end_s is None:
            if self.trigger_s is not None and units:
                raise InvalidInput("trigger_s needs the units' end times: pass end_s=[...] (seconds), or use "
                                   "trigger_units instead")  # fmt: skip
            return units, [None] * len(units)
        if isinstance(end_s, (str, bytes)) or not isinstance(end_s, Iterable):
            raise InvalidInput(f"end_s must be a sequence of times in seconds, got {type(end_s).__name__}")
        ends = list(end_s)
        if len(ends) != len(units):
            raise InvalidInput(f"end_s has {len(ends)} times for {len(units)} units; give one end time per unit")
        for t in ends:
            check_number("end_s entries", t, 0.0)
        return units, [float(t) for t in ends]

    def add(self, units: Sequence[int], end_s: Sequence[float] | None = None) -> int:
        """Append committed units (cheap: no model call). A unit equal to the previous one continues it, as the
        offline path deduplicates. Returns the number of new deduplicated units."""
        if self.ended:
            raise InvalidInput("this stream has ended (end() was called); call reset() to start a new stream")
        units, ends = self.check_units(units, end_s)
        added = 0
        for u, t in zip(units, ends):
            if u == self._last_unit:
                if t is not None and self._units:  # the run goes on: it ends later
                    self._ends[-1] = t
                continue
            self._units.append(u)
            self._ends.append(t)
            self._last_unit = u
            added += 1
        return added

    def end(self) -> None:
        """No more units: the remaining ones are committed by the next passes (hold-back no longer applies)."""
        self.ended = True

    @property
    def done(self) -> bool:
        """Ended and every unit committed."""
        return self.ended and self._plan is None and self.committed >= self.received

    @property
    def running(self) -> bool:
        """A pass is in flight."""
        return self._plan is not None

    @property
    def state_nbytes(self) -> int:
        """Approximate bytes of stream state (8 per stored id or time): window units, their times, committed runs and
        the pass in flight's prompt. Bounded when left_context and max_pass_units are finite."""
        ids = len(self._units) + len(self._ends) + sum(len(r) for r in self._runs) + len(self._run)
        if self._plan is not None:
            ids += len(self._plan.prompt) + len(self._plan.unit_tokens)
        return 8 * ids

    # -- passes ----------------------------------------------------------------------------------------------------

    def _pass_bounds(self) -> tuple[int, int] | None:
        """(e, stop) in absolute units for a pass that could start now, or None."""
        n, c = self.received, self.committed
        if c >= n:
            return None
        # max_pass_units bounds the prompt of a bounded window only: with C = None the global section must be every
        # known unit, or the pass's prompt is not offline's and the exact setting (C = L = None) is not exact.
        bounded = self.max_pass_units is not None and self.left_context is not None
        e = min(n, c + self.max_pass_units) if bounded else n
        if self.ended and (e == n or self.holdback is None):
            stop = e - 1  # end of stream: nothing more will come, commit everything the prompt holds
        elif self.holdback is None:
            return None
        else:
            stop = e - 1 - self.holdback
            if self._first_unit_early(e):
                stop = max(stop, 0)  # the first unit need not wait for L more
        return (e, stop) if stop >= c else None

    def _first_unit_early(self, e: int) -> bool:
        """The stream's first unit may be committed by a pass whose prompt holds e units (first_holdback)."""
        return self.committed == 0 and self.first_holdback is not None and e - 1 >= self.first_holdback

    def pass_due(self) -> bool:
        """A pass can and should start now (no pass in flight, enough committable units or the stream ended)."""
        if self._plan is not None:
            return False
        bounds = self._pass_bounds()
        if bounds is None:
            return False
        if self.ended:
            return True
        e, stop = bounds
        if self._first_unit_early(e):
            return True  # the first audio waits for no trigger either
        if self.trigger_s is not None:
            return self._ends[stop - self._base] - self._commit_end_s >= self.trigger_s
        return stop - self.committed + 1 >= self.trigger_units

    def next_pass(self) -> PassPlan | None:
        """The plan of the pass to run now (marking it in flight), or None when no pass is due."""
        if not self.pass_due():
            return None
        e, stop = self._pass_bounds()
        c, s = self.committed, self._base
        window_units = self._units[: e - s]
        prompt = self.tokenizer.encode_prompt(window_units, token_prefix=self._runs[: c - s])
        self._plan = PassPlan(prompt=prompt, unit_tokens=prompt[: len(window_units)], start=c - s, stop=stop - s,
                              counter=int(c > 0),
                              sampling=Sampling(self.greedy, self.temperature, self.top_p, self.generator))  # fmt: skip
        self._pass_end = e
        self._run, self._expect_unit = [], False
        self.passes += 1
        return self._plan

    def extend_stop(self) -> int | None:
        """After end(): let the pass in flight run on to its prompt's last unit when that is the last unit of the
        stream (saves a re-prompt). Returns the new window-relative stop, or None when nothing changed."""
        p = self._plan
        if p is None or not self.ended or self._pass_end != self.received:
            return None
        last = self._pass_end - 1 - self._base
        if p.stop >= last:
            return None
        p.stop = last
        return last

    def take(self, token: int, done: bool) -> int | None:
        """Consume one generated token of the pass in flight; return its codec id if it is a codec token.

        `done` marks the pass's last token, the EOP of its stop unit (generation_step's `finished`)."""
        if self._plan is None:
            raise InvalidInput("no pass in flight: take() follows next_pass()")
        tok = self.tokenizer
        if self._expect_unit:  # the forced next unit opens its run; the prompt of a later pass re-adds it
            self._expect_unit = False
            return None
        if token == tok.EOP_id:
            self._commit_end_s = self._ends[self.committed - self._base] or 0.0
            self._runs.append(self._run)
            self._run = []
            self.committed += 1
            self._expect_unit = True
            if done:
                self._plan = None
                self._trim()
            return None
        self._run.append(token)
        if token >= tok.first_codec_id:
            self.codes_out += 1
            return token - tok.first_codec_id
        return None

    def _trim(self) -> None:
        """Forget units and runs left of the next window (keeps the state bounded)."""
        if self.left_context is None:
            return
        drop = max(0, self.committed - self.left_context) - self._base
        if drop > 0:
            del self._units[:drop], self._ends[:drop], self._runs[:drop]
            self._base += drop

    # -- standalone use --------------------------------------------------------------------------------------------

    def push(self, units: Sequence[int], end_s: Sequence[float] | None = None) -> list[int]:
        """Add units and run every pass that is due; return the codec ids that became final."""
        self.add(units, end_s)
        return self._run_passes()

    def flush(self) -> list[int]:
        """End of stream: commit every remaining unit, return the rest of the codec ids, and reset."""
        self.end()
        out = self._run_passes()
        self.reset()
        return out

    @torch.inference_mode()
    def _run_passes(self) -> list[int]:
        if self._decoder is None:
            plan = self.model.precision_plan
            self._decoder = BatchDecoder(self.model, max_batch=1,
                                         max_codec_tokens_per_phone=self.max_codec_tokens_per_phone,
                                         merge_forced=plan is not None and plan.precision == "fast")  # fmt: skip
        out: list[int] = []
        while True:
            if not self._decoder.rows:
                plan = self.next_pass()
                if plan is None:
                    return out
                self._decoder.admit([(self, plan)])
            stop = self.extend_stop()
            if stop is not None:
                self._decoder.set_stop(self, stop)
            for _, token, done in self._decoder.step():
                code = self.take(token, done)
                if code is not None:
                    out.append(code)
