"""Live resynthesis: committed units -> ELLA-V codec ids -> WavTokenizer audio, for many streams on one worker.

    units (deduplicated, as the encoder commits them)
      -> IncrementalELLAV     teacher-forced re-prompting over a sliding window    (exact with C = L = None)
      -> IncrementalVocoder   windowed backbone + exact iSTFT stitching            (dpslm_stream.models.wavtokenizer)
      -> AudioEvent           24 kHz float32 chunks, sequence-numbered and timestamped

Why re-prompting (docs/references.md §ELLA-V): ELLA-V's prompt starts with the whole unit list, so a new unit changes
tokens *before* every cached key and a running cache cannot be extended. Each *pass* therefore builds a fresh prompt

    [u_s .. u_{e-1}]  BOS  (u_i run_i EOP) for s <= i < c  u_c

where units < c are committed (their generated tokens `run_i` are teacher-forced), s = c - C is the left edge of the
window (C units of left context: they carry the voice), and e is the number of known units (with a finite C at most
P after c; with C = None every known unit, as offline's prompt holds the whole unit list). The
pass decodes with upstream's control loop until the EOP of unit e-1-L (hold-back L: the last committed unit still
sees L units of the future) and commits those tokens; codec tokens are final the moment they are generated. Every
pass starts at position 0, so memory is flat however long the stream; each codec token is decoded exactly once,
only prefill is repeated.

Reductions (tests/test_stream_resynth.py): with C = L = None a stream commits everything at end() in one pass
whose prompt is offline `ELLAV.generate`'s, so the codec ids equal offline greedy generation; whenever a pass sees
the whole unit list (C = None), re-prompting from the exact generated tokens (`token_prefix`) continues it exactly.

`ResynthWorker` owns the models and runs the decode steps of every active pass in lockstep over one preallocated
KV cache per ELLA-V model (continuous batching: passes join with a batched prefill and leave when their last unit's
EOP is out, between decode steps). Sessions are sans-I/O like the encoder's: `push_units`/`end` queue input,
`worker.step(sessions)` computes, `poll()` returns AudioEvents and one ResynthEndEvent.
"""

from __future__ import annotations

import math
import numbers
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from dpslm_stream import hub
from dpslm_stream.audio import float_to_pcm16
from dpslm_stream.device import setup_model_device, synchronize
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.models.ellav import ELLAV, GenerationState, generation_step, sample_rows
from dpslm_stream.models.precision import Plan, check_precision, plan_for, transformer_precision
from dpslm_stream.models.transformer import KVCache
from dpslm_stream.models.wavtokenizer import IncrementalVocoder, WavTokenizer
from dpslm_stream.stream.events import EventQueue

SAMPLE_RATE = 24000
# Defaults, in deduplicated units (DP-SLM k=500, lambda=4500 gives ~10-25 units/s) and codec frames (25 ms).
DEFAULT_LEFT_CONTEXT = 32  # C: committed units kept in the prompt (about 1.5-3 s of speech: the voice)
DEFAULT_HOLDBACK = 3  # L: units of lookahead the last committed unit sees (spec §5 expects 2-4 to be close)
DEFAULT_MAX_PASS_UNITS = 32  # P: units after the committed ones that one prompt holds (bounds a backlog's prompt)
DEFAULT_MAX_CODEC_TOKENS_PER_PHONE = 10  # M, as dp-slm's example
DEFAULT_VOCODER_LEFT_CONTEXT = 48  # codec frames of left context per vocoder window (1.2 s)
DEFAULT_VOCODER_LOOKAHEAD = 4  # codec frames decoded past the committed ones (100 ms)
DEFAULT_VOCODER_MIN_STEP = 4  # run the vocoder once this many new frames can be committed


# ----------------------------------------------------------------------------------------------------------------------
# Option checks (InvalidInput naming the option and what it accepts)


def _check_count(value: object, name: str, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        also = " or None (unlimited)" if allow_none else ""
        raise InvalidInput(f"{name} must be an integer >= {minimum}{also}, got {value!r}")
    return int(value)


def _check_number(value: object, name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidInput(f"{name} must be a finite number {bound}" + (f" and <= {hi}" if hi < math.inf else "")
                           + f", got {value!r}")  # fmt: skip
    return float(value)


# ----------------------------------------------------------------------------------------------------------------------
# IncrementalELLAV: one stream's re-prompting state


@dataclass
class PassPlan:
    """One re-prompting pass: the prompt to prefill and where the pass stops. Indices are window-relative."""

    prompt: list[int]  # token ids: window units, BOS, committed (unit, run, EOP)s, first unit to generate
    unit_tokens: list[int]  # the prompt's global section (token ids of the window units)
    start: int  # window index of the first unit this pass generates (= number of teacher-forced units)
    stop: int  # window index of the last unit it commits: the pass ends with that unit's EOP
    counter: int  # upstream's tokens-since-EOP counter at the start: 0 at the stream's first unit, else 1

    def max_new_tokens(self, max_codec_tokens_per_phone: int) -> int:
        """Tokens the pass can feed back at most: per unit its forced token, M+1 codec tokens and the EOP (the first
        unit of the stream M+2 codec tokens and no forced token)."""
        return (self.stop - self.start + 1) * (max_codec_tokens_per_phone + 3)


class IncrementalELLAV:
    """Committed units in, committed codec ids out, for one stream (see the module docstring for the scheme).

    left_context C: committed units kept in the prompt (None: all, exact but memory grows with the stream).
    holdback L: a pass commits up to the unit L places before the newest known one (None: nothing before end()).
    max_pass_units P: with a finite left_context, at most P units after the committed ones enter a prompt (None: all
    known); it only binds when units pile up faster than they are resynthesized. With left_context=None it does not
    apply: the prompt then holds the whole unit list as offline's does (P there would cut the global section, and
    every token would differ from offline generation from the first on), and memory grows with the stream anyway.
    trigger_units / trigger_s: a pass starts once it can commit at least `trigger_units` units, or, when
    `trigger_s` is given, units covering at least `trigger_s` seconds of input (needs the units' end times).
    Sampling: greedy (argmax, DP-SLM's top_p = 0) or nucleus sampling with `temperature`/`top_p` drawn from this
    stream's own generator, seeded with `seed` (None: a random seed), so a stream's output does not depend on
    other streams sharing a batch.

    Standalone use: `push(units)` / `flush()` run the passes here (batch of one). Inside a ResynthSession the
    worker drives the same state through `add`, `next_pass`, `take` and `extend_stop`, batched with other streams.
    """

    def __init__(self, model: ELLAV, left_context: int | None = DEFAULT_LEFT_CONTEXT,
                 holdback: int | None = DEFAULT_HOLDBACK, *, max_pass_units: int | None = DEFAULT_MAX_PASS_UNITS,
                 trigger_units: int = 1, trigger_s: float | None = None,
                 max_codec_tokens_per_phone: int = DEFAULT_MAX_CODEC_TOKENS_PER_PHONE, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 0.8, seed: int | None = None):  # fmt: skip
        if not isinstance(model, ELLAV):
            raise InvalidInput(f"model must be an ELLAV model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.left_context = _check_count(left_context, "left_context", 0, allow_none=True)
        self.holdback = _check_count(holdback, "holdback", 0, allow_none=True)
        self.max_pass_units = _check_count(max_pass_units, "max_pass_units", 1, allow_none=True)
        if None not in (self.max_pass_units, self.holdback) and self.max_pass_units <= self.holdback:
            raise InvalidInput(f"max_pass_units ({max_pass_units}) must be larger than holdback ({holdback}): a "
                               "prompt must hold the committed units plus the hold-back")  # fmt: skip
        self.trigger_units = _check_count(trigger_units, "trigger_units", 1)
        self.trigger_s = None if trigger_s is None else _check_number(trigger_s, "trigger_s", 0.0)
        self.max_codec_tokens_per_phone = _check_count(max_codec_tokens_per_phone, "max_codec_tokens_per_phone", 0)
        if not isinstance(greedy, bool):
            raise InvalidInput(f"greedy must be True or False, got {greedy!r}")
        self.temperature = _check_number(temperature, "temperature", 0.0)
        self.top_p = _check_number(top_p, "top_p", 0.0, 1.0)
        # Upstream's sample(): argmax when the temperature or top_p is 0
        self.greedy = greedy or self.temperature == 0 or self.top_p == 0
        self.seed = None if seed is None else _check_count(seed, "seed", 0)
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
            _check_number(t, "end_s entries", 0.0)
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
        # P bounds the prompt of a bounded window only: with C = None the global section must be every known unit,
        # or the pass's prompt is not offline's and the exact setting (C = L = None) is not exact.
        bounded = self.max_pass_units is not None and self.left_context is not None
        e = min(n, c + self.max_pass_units) if bounded else n
        if self.ended and (e == n or self.holdback is None):
            stop = e - 1  # end of stream: nothing more will come, commit everything the prompt holds
        elif self.holdback is None:
            return None
        else:
            stop = e - 1 - self.holdback
        return (e, stop) if stop >= c else None

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
                              counter=int(c > 0))  # fmt: skip
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


# ----------------------------------------------------------------------------------------------------------------------
# BatchDecoder: the decode steps of many passes in lockstep over one preallocated KV cache


_STATE_FIELDS = ("unit_tokens", "num_units", "unit_idx", "since_eop", "forced", "finished")


def _select_state(state: GenerationState, index: Tensor) -> GenerationState:
    return GenerationState(**{f: getattr(state, f)[index] for f in _STATE_FIELDS})


def _cat_states(a: GenerationState, b: GenerationState) -> GenerationState:
    width = max(a.unit_tokens.shape[1], b.unit_tokens.shape[1])
    padded = [torch.nn.functional.pad(s.unit_tokens, (0, width - s.unit_tokens.shape[1])) for s in (a, b)]
    fields = {f: torch.cat([getattr(a, f), getattr(b, f)]) for f in _STATE_FIELDS[1:]}
    return GenerationState(unit_tokens=torch.cat(padded), **fields)


class BatchDecoder:
    """Continuous batching for one ELLA-V model: passes of many streams decode in lockstep, one token per row per
    step, over a KV cache of `max_batch` preallocated rows.

    Active passes occupy rows 0..A-1. `admit` prefills new passes into the next free rows in one padded forward;
    `step` picks every row's next token with upstream's control loop (`generation_step`), lets rows whose pass is
    over leave (the last row moves into the hole, copying only its filled slots) and forwards the rest in one
    batched 1-token forward (2 tokens for rows whose EOP is followed by a forced unit, with `merge_forced`). Each
    row's positions start at 0 with its prompt. The cache grows (never shrinks) to the largest pass admitted:
    bounded by the streams' C, P and M, not by stream length.

    Device hygiene: a step reads the device once (tokens, pass-over flags and next forced tokens in one `tolist`);
    sampling rows draw on the device from per-stream uniform numbers sent in one transfer; cache lengths live on the
    host (KVCache.lengths).
    """

    def __init__(self, model: ELLAV, max_batch: int, max_codec_tokens_per_phone: int, capacity: int = 256,
                 merge_forced: bool = False):
        self.model = model
        # Feed the unit token forced after an EOP in the same forward as the EOP (a 2-token append for that row):
        # U fewer forwards per second of audio. Not bit-identical to one token per forward (the matmuls see other
        # shapes), so only for precision "fast".
        self.merge_forced = merge_forced
        self.max_batch = _check_count(max_batch, "max_batch", 1)
        self.max_codec_tokens_per_phone = max_codec_tokens_per_phone
        self._initial_capacity = capacity
        self.cache: KVCache | None = None
        self.clear()

    def clear(self) -> None:
        """Drop every pass (the cache stays allocated)."""
        self.rows: list[IncrementalELLAV] = []  # owner of each active row
        self._need: list[int] = []  # cache slots each row may fill
        self.state: GenerationState | None = None
        self.logits: Tensor | None = None  # [A, V] next-token logits of the active rows

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    @property
    def cache_nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    def _reserve(self, slots: int) -> None:
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_batch, max(self._initial_capacity, slots))
        elif slots > self.cache.capacity:
            self.cache.grow(-(-slots // 64) * 64)

    @torch.inference_mode()
    def admit(self, jobs: list[tuple[IncrementalELLAV, PassPlan]]) -> None:
        """Prefill new passes into free rows (one padded forward); their first tokens come from the next step()."""
        if not jobs:
            return
        if len(jobs) > self.free:
            raise InvalidInput(f"{len(jobs)} passes do not fit: {self.free} of {self.max_batch} rows are free")
        M = self.max_codec_tokens_per_phone
        plans = [plan for _, plan in jobs]
        need = [len(p.prompt) + p.max_new_tokens(M) for p in plans]
        self._reserve(max(need) + 1)  # + 1: a merged step pads the other rows by one slot
        device = self.model.device
        a, b = len(self.rows), len(self.rows) + len(jobs)
        view = self.cache.rows(a, b)
        view.clear_rows()  # a new pass: empty row, positions from 0
        lengths = [len(p.prompt) for p in plans]
        tokens = torch.zeros((len(plans), max(lengths)), dtype=torch.long)
        for i, p in enumerate(plans):
            tokens[i, : len(p.prompt)] = torch.tensor(p.prompt)
        logits = self.model(tokens.to(device), view, lengths)
        last = torch.tensor(lengths, device=device) - 1
        logits = logits[torch.arange(len(plans), device=device), last]
        state = GenerationState.start([p.unit_tokens for p in plans], [p.start for p in plans], device=device)
        # The counter restarts as offline generation has it at this unit (see PassPlan.counter), and the pass is
        # "finished" at its stop unit's EOP.
        state.since_eop = torch.tensor([p.counter for p in plans], device=device)
        state.num_units = torch.tensor([p.stop + 1 for p in plans], device=device)
        state.finished = state.unit_idx >= state.num_units
        self.state = state if self.state is None else _cat_states(self.state, state)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.rows += [owner for owner, _ in jobs]
        self._need += need

    @torch.inference_mode()
    def set_stop(self, owner: IncrementalELLAV, stop: int) -> None:
        """Move the stop unit of `owner`'s pass (window-relative); the prompt already holds the units up to it."""
        i = self.rows.index(owner)
        added = (stop + 1 - int(self.state.num_units[i])) * (self.max_codec_tokens_per_phone + 3)
        self._need[i] += max(0, added)
        self._reserve(self._need[i])
        self.state.num_units[i] = stop + 1

    @torch.inference_mode()
    def remove(self, owner: IncrementalELLAV) -> None:
        """Drop `owner`'s pass (a stream that failed or was reset)."""
        if owner in self.rows:
            self._compact([i for i, r in enumerate(self.rows) if r is not owner])

    @torch.inference_mode()
    def step(self) -> list[tuple[IncrementalELLAV, int, bool]]:
        """One token for every active pass: [(owner, token, pass_over)]. Rows whose pass is over leave."""
        if not self.rows:
            return []
        sampled = None
        if not all(r.greedy for r in self.rows):
            sampled = self._sample()
        tok = self.model.tokenizer
        token = generation_step(self.logits, self.state, max_codec_tokens_per_phone=self.max_codec_tokens_per_phone,
                                temperature=0.0, top_p=0.0, eop_id=tok.EOP_id, eos_id=tok.EOS_id,
                                sampled=sampled)  # fmt: skip
        # The step's one device -> host transfer: every row's token, whether its pass is over, its next forced token.
        tokens, over, forced = torch.stack([token, self.state.finished.long(), self.state.forced]).tolist()
        merge = [self.merge_forced and t == tok.EOP_id and not o and f >= 0 for t, o, f in zip(tokens, over, forced)]
        out = []
        for r, t, o, f, m in zip(self.rows, tokens, over, forced, merge):
            out.append((r, t, bool(o)))
            if m:  # the forced next unit, fed in this step's forward together with the EOP
                out.append((r, f, False))
        keep = [i for i, o in enumerate(over) if not o]
        if len(keep) < len(over):
            order = self._compact(keep)
            token, merge = token[order], [merge[i] for i in order]
        if not self.rows:
            return out
        view = self.cache.rows(0, len(self.rows))
        if not any(merge):
            self.logits = self.model(token[:, None], view)[:, 0]
            return out
        merged = torch.tensor(merge, device=token.device)
        pairs = torch.stack([token, torch.where(merged, self.state.forced, 0)], dim=1)
        valid = [1 + m for m in merge]
        logits = self.model(pairs, view, valid)
        self.logits = logits[torch.arange(len(valid), device=token.device), merged.long()]
        # generation_step's update for the forced unit token: it counts towards the cap, and nothing is forced next.
        self.state.since_eop = torch.where(merged, self.state.since_eop + 1, self.state.since_eop)
        self.state.forced = torch.where(merged, -1, self.state.forced)
        return out

    def _sample(self) -> Tensor:
        """Every row's drawn token, on the device (`sample_rows`): each sampling stream draws one uniform number
        from its own generator per step (on the host, whether or not the row's token is then forced), so its
        output does not depend on its batch neighbours; one host -> device transfer carries them."""
        rows = self.rows
        uniform = torch.stack([torch.zeros(()) if r.greedy else torch.rand((), generator=r.generator) for r in rows])
        settings = torch.tensor([(float(r.greedy), r.temperature if r.temperature > 0 else 1.0, r.top_p)
                                 for r in rows], dtype=torch.float32)  # fmt: skip
        settings = torch.cat([settings, uniform[:, None]], dim=1).to(self.logits.device)
        greedy, temperature, top_p, uniform = settings.unbind(1)
        return sample_rows(self.logits, greedy.bool(), temperature, top_p, uniform)

    def _compact(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (old indices) in rows 0..len(keep)-1: rows already there stay, the others fill the holes.
        Returns the old index of each new row."""
        n = len(keep)
        stay = {i for i in keep if i < n}
        movers = iter(i for i in keep if i >= n)
        order = [i if i in stay else next(movers) for i in range(n)]
        for new, old in enumerate(order):
            if new != old:
                self.cache.move_row(old, new)
        self.rows = [self.rows[i] for i in order]
        self._need = [self._need[i] for i in order]
        if n:
            index = torch.tensor(order, device=self.logits.device)
            self.state = _select_state(self.state, index)
            self.logits = self.logits[index]
        else:
            self.state, self.logits = None, None
        return order


# ----------------------------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class AudioEvent:
    """A chunk of resynthesized audio: final (never revised), in order, contiguous with the previous chunk."""

    seq: int  # 0, 1, 2, ... within the stream
    pcm: np.ndarray  # float32 mono samples at `sample_rate`, not clipped (see pcm16())
    start_s: float  # time of the first sample in the stream's resynthesized audio
    units_done: int  # units whose audio is complete once this chunk is played (cumulative)
    lag_s: float  # the stream's resynthesis lag when the chunk was made (see ResynthSession.lag_s)
    sample_rate: int = SAMPLE_RATE

    @property
    def num_samples(self) -> int:
        return int(self.pcm.shape[0])

    @property
    def end_s(self) -> float:
        return self.start_s + self.num_samples / self.sample_rate

    def pcm16(self) -> bytes:
        """Little-endian 16-bit PCM of the chunk, clipped to [-1, 1) first (the decoder output is not bounded)."""
        return float_to_pcm16(np.clip(self.pcm, -1.0, 1.0))


@dataclass(frozen=True)
class ResynthEndEvent:
    """End of a resynthesis stream: every AudioEvent has been sent (or the stream failed: `error`)."""

    units: int  # deduplicated units received
    codec_frames: int  # codec ids generated (40 per second of audio)
    audio_seconds: float
    chunks: int  # AudioEvents sent
    passes: int  # ELLA-V re-prompting passes run
    first_audio_latency_s: float | None  # wall time from the first units to the first audio
    latency_mean_s: float | None  # wall time from a unit's arrival until its audio was complete, mean over units
    latency_max_s: float | None
    real_time_factor: float  # compute seconds / audio seconds (> 1: slower than real time)
    error: str | None = None  # why the stream stopped early; None for a normal end


ResynthEvent = Union[AudioEvent, ResynthEndEvent]


@dataclass(frozen=True)
class ResynthStats:
    """Running figures of one resynthesis stream."""

    units: int  # deduplicated units received
    units_committed: int  # units whose codec ids are final
    units_done: int  # units whose audio has been emitted completely
    codec_frames: int
    audio_seconds: float  # audio emitted
    compute_seconds: float  # worker time spent on this stream (its share of batched steps)
    real_time_factor: float  # compute_seconds / audio_seconds
    lag_s: float  # resynthesis lag now
    latency_last_s: float | None  # unit arrival -> its audio complete, last unit done
    latency_mean_s: float | None
    latency_max_s: float | None
    first_audio_latency_s: float | None
    passes: int
    state_nbytes: int


# ----------------------------------------------------------------------------------------------------------------------
# ResynthSession


class ResynthSession(EventQueue):
    """One live resynthesis stream. Create with `ResynthWorker.open_session`; push units, call the worker's `step`,
    poll events.

    `push_units`, `end` and `poll` only validate and touch deques, so an event loop may call them while a worker
    thread steps; everything else belongs to the worker's thread.

    Latency bookkeeping: every unit's arrival time (worker clock) is kept until its audio has been emitted
    completely (its last codec frame is past the vocoder's lookahead and the iSTFT's 900-sample tail), which gives
    the per-unit latency, and `lag_s`: how long the oldest unit still without audio has waited. In steady state
    lag_s stays near the algorithmic latency (L units of hold-back + vocoder lookahead + compute); it grows without
    bound when the worker cannot keep up, which is what a client is told instead of silently falling behind.
    """

    def __init__(self, worker: ResynthWorker, session_id: int, k: int, lmbda: int, ellav: IncrementalELLAV,
                 vocoder: IncrementalVocoder):  # fmt: skip
        self.worker = worker
        self.id = session_id
        self.k, self.lmbda = k, lmbda
        self.ellav = ellav
        self.vocoder = vocoder
        self.reset()

    # -- the caller's side -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """A fresh stream with the same settings (pending units and unpolled events are dropped)."""
        self.worker._forget(self)
        self.ellav.reset()
        self.vocoder.reset()
        self._pending: deque[tuple[list[int], list[float | None], float]] = deque()
        self._events: deque[ResynthEvent] = deque()
        self._ended = False
        self.closed = False
        self.error: str | None = None
        self._codes: list[int] = []  # codec ids not yet given to the vocoder
        self._seq = 0
        self._samples_out = 0
        self._arrivals: deque[float] = deque()  # arrival time of each unit not yet done, from unit self._done on
        self._unit_frames: deque[int] = deque()  # codec frames up to the end of each committed, not done unit
        self._done = 0
        self._first_push: float | None = None
        self._first_audio: float | None = None
        self._lat_last = None
        self._lat_sum, self._lat_max = 0.0, None
        self._compute_s = 0.0
        self._due_since: float | None = None  # when the stream's current pass became due (fair admission)

    def push_units(self, units: Sequence[int], end_s: Sequence[float] | None = None) -> None:
        """Queue committed deduplicated units (integers 0..k-1), with their end times in the input (seconds) if
        known (needed by trigger_s). Raises InvalidInput (changing nothing) for bad units or after end()."""
        if self._ended:
            raise InvalidInput("this stream has ended (end() was called); call reset() to start a new stream")
        units, ends = self.ellav.check_units(units, end_s)
        if units:
            self._pending.append((units, ends, self.worker.clock()))

    def end(self) -> None:
        """End of stream: the worker commits and vocodes everything left, then sends the ResynthEndEvent."""
        self._ended = True

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def has_work(self) -> bool:
        """True when a step() would do something for this stream."""
        if self.closed:
            return False
        return bool(self._pending or self._ended or self.ellav.running or self.ellav.pass_due() or self._codes)

    @property
    def lag_s(self) -> float:
        """Resynthesis lag: seconds the oldest unit whose audio is not complete has waited (0 when none waits)."""
        try:
            oldest = self._arrivals[0]
        except IndexError:  # none waits (or the worker thread just emptied the queue)
            return 0.0
        return self.worker.clock() - oldest

    @property
    def audio_seconds(self) -> float:
        return self._samples_out / SAMPLE_RATE

    @property
    def state_nbytes(self) -> int:
        """Bytes of stream state: queued units, ELLA-V window and pass, codes waiting for the vocoder, the vocoder's
        window and iSTFT carry, latency bookkeeping. (The pass's KV row lives in the worker: `cache_nbytes`.)"""
        n = 16 * sum(len(u) for u, _, _ in self._pending) + 8 * len(self._codes)
        n += 8 * (len(self._arrivals) + len(self._unit_frames))
        return n + self.ellav.state_nbytes + self.vocoder.state_nbytes

    @property
    def stats(self) -> ResynthStats:
        done = self._done
        return ResynthStats(
            units=self.ellav.received, units_committed=self.ellav.committed, units_done=done,
            codec_frames=self.ellav.codes_out, audio_seconds=self.audio_seconds, compute_seconds=self._compute_s,
            real_time_factor=self._compute_s / self.audio_seconds if self._samples_out else 0.0, lag_s=self.lag_s,
            latency_last_s=self._lat_last, latency_mean_s=self._lat_sum / done if done else None,
            latency_max_s=self._lat_max, first_audio_latency_s=self._first_audio_latency(),
            passes=self.ellav.passes, state_nbytes=self.state_nbytes,
        )  # fmt: skip

    def settings(self) -> dict:
        """The options this stream actually uses, every default filled in (every `open_session` option, plus the
        worker's `max_codec_tokens_per_phone`, `precision` and the output `sample_rate`; what the server reports in
        ready)."""
        e, v = self.ellav, self.vocoder
        return {"left_context": e.left_context, "holdback": e.holdback, "greedy": e.greedy, "seed": e.seed,
                "temperature": e.temperature, "top_p": e.top_p, "trigger_units": e.trigger_units,
                "trigger_s": e.trigger_s, "max_pass_units": e.max_pass_units,
                "max_codec_tokens_per_phone": e.max_codec_tokens_per_phone, "vocoder_left_context": v.left_context,
                "vocoder_lookahead": v.lookahead, "vocoder_min_step": v.min_step, "sample_rate": SAMPLE_RATE,
                "precision": self.worker.precision}  # fmt: skip

    def __repr__(self) -> str:
        e = self.ellav
        return (f"ResynthSession(id={self.id}, k={self.k}, lmbda={self.lmbda}, C={e.left_context}, "
                f"L={e.holdback}, greedy={e.greedy}, units={e.received}, audio={self.audio_seconds:.2f} s, "
                f"closed={self.closed})")  # fmt: skip

    # -- the worker's side -------------------------------------------------------------------------------------------

    def _first_audio_latency(self) -> float | None:
        if self._first_audio is None or self._first_push is None:
            return None
        return self._first_audio - self._first_push

    def _ingest(self) -> None:
        """Queued units -> the ELLA-V stage; remember each new unit's arrival time."""
        # Read the end flag first: end() follows the caller's last push_units, so every unit it pushed is queued.
        ended = self._ended
        while self._pending:
            units, ends, arrived = self._pending.popleft()
            added = self.ellav.add(units, None if ends[0] is None else ends)
            self._arrivals.extend([arrived] * added)
            if self._first_push is None and added:
                self._first_push = arrived
        if ended and not self.ellav.ended:
            self.ellav.end()

    def _take(self, token: int, over: bool, compute_s: float) -> None:
        """One generated token of this stream's pass."""
        committed = self.ellav.committed
        code = self.ellav.take(token, over)
        if code is not None:
            self._codes.append(code)
        if self.ellav.committed > committed:
            self._unit_frames.append(self.ellav.codes_out)
        self._compute_s += compute_s

    def _vocode(self) -> None:
        """New codes -> vocoder -> AudioEvent; at the very end flush the vocoder and close the stream."""
        started = self.worker.clock()
        finishing = self.ellav.done and not self._pending
        if self._codes:
            audio = self.vocoder.push(torch.tensor(self._codes, dtype=torch.long))
            self._codes = []
        else:
            audio = torch.zeros(0)
        if finishing:
            audio = torch.cat([audio.cpu(), self.vocoder.flush().cpu()])
        now = self.worker.clock()
        self._compute_s += now - started
        self._emit(audio, now)
        if finishing:
            self._close()

    def _emit(self, audio: Tensor, now: float) -> None:
        start = self._samples_out
        self._samples_out += int(audio.numel())
        hop = self.vocoder.model.config.hop_length
        # Units whose last codec frame is now fully audible (samples of frames < F are out once 600 F are).
        while self._unit_frames and self._unit_frames[0] * hop <= self._samples_out:
            self._unit_frames.popleft()
            latency = now - self._arrivals.popleft()
            self._done += 1
            self._lat_last, self._lat_sum = latency, self._lat_sum + latency
            self._lat_max = latency if self._lat_max is None else max(self._lat_max, latency)
        if audio.numel():
            if self._first_audio is None:
                self._first_audio = now
            pcm = audio.detach().to("cpu", torch.float32).numpy().copy()
            self._events.append(AudioEvent(self._seq, pcm, start / SAMPLE_RATE, self._done, self.lag_s))
            self._seq += 1

    def _end_event(self, error: str | None) -> ResynthEndEvent:
        return ResynthEndEvent(
            units=self.ellav.received, codec_frames=self.ellav.codes_out, audio_seconds=self.audio_seconds,
            chunks=self._seq, passes=self.ellav.passes, first_audio_latency_s=self._first_audio_latency(),
            latency_mean_s=self._lat_sum / self._done if self._done else None, latency_max_s=self._lat_max,
            real_time_factor=self._compute_s / self.audio_seconds if self._samples_out else 0.0, error=error,
        )  # fmt: skip

    def _close(self) -> None:
        self._events.append(self._end_event(None))
        self.closed = True

    def _fail(self, exc: BaseException) -> None:
        """Stop this stream after an error in its own processing; the other streams carry on."""
        self.error = f"{type(exc).__name__}: {exc}"
        self._events.append(self._end_event(self.error))
        self.closed = True


# ----------------------------------------------------------------------------------------------------------------------
# ResynthWorker

_DTYPES_OK = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class ResynthWorker:
    """The resynthesis models and batched execution of many streams' ELLA-V decode steps and vocoder windows.

    `models` is a hub.ModelSet (or its source: "release", "tiny", a folder). `pairs` limits the worker to these
    (k, lambda) pairs and loads their ELLA-V up front; None allows every pair the set holds, loaded on first use.
    `ellavs` ({(k, lambda): ELLAV}) and `wavtokenizer` supply already-built models (random full-size weights for
    benchmarks, tests); they are moved to `device`/`dtype` in place.
    dtype: ELLA-V weights and activations (bf16/fp16 are meant for a GPU); vocoder_dtype: the WavTokenizer backbone
    (its FFTs always run in float32). precision: "exact" (default: the float32 path, or the dtypes given) or "fast":
    the plan models/precision.py picks for this device (then dtype and vocoder_dtype must stay float32; ELLA-V's
    block matmuls become int8 weight-only or bf16, the vocoder bf16 where the hardware has bf16 units);
    `precision_plans` says what was picked. max_batch: passes decoded together per ELLA-V model (rows of the preallocated
    KV cache); further due passes wait, oldest first. max_decode_steps: batched decode steps per step() call, so one
    call stays short and a stream with a long pass never holds the others: they join and leave between steps.
    max_codec_tokens_per_phone: upstream's M, the per-unit cap (M+1 codec tokens per unit). clock: the time source
    for latencies (seconds, monotonic).
    """

    def __init__(self, models: hub.ModelSet | str = "release", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pairs: Iterable[tuple[int, int]] | None = None, *,
                 vocoder_dtype: torch.dtype = torch.float32, precision: str = "exact", max_batch: int = 16,
                 max_decode_steps: int = 16,
                 max_codec_tokens_per_phone: int = DEFAULT_MAX_CODEC_TOKENS_PER_PHONE,
                 ellavs: dict[tuple[int, int], ELLAV] | None = None, wavtokenizer: WavTokenizer | None = None,
                 clock: Callable[[], float] = time.perf_counter, allow_tf32: bool = False):  # fmt: skip
        self.models = hub.ModelSet(models) if isinstance(models, str) else models
        self.device = setup_model_device(device, allow_tf32)  # TF32 off on CUDA: the exact paths stay exact
        for name, value in (("dtype", dtype), ("vocoder_dtype", vocoder_dtype)):
            if value not in _DTYPES_OK:
                raise InvalidInput(f"{name} must be one of torch.float32, float64, bfloat16, float16; got {value!r}")
        self.precision = check_precision(precision)
        if precision == "fast" and (dtype, vocoder_dtype) != (torch.float32, torch.float32):
            raise InvalidInput("precision 'fast' picks the dtypes itself: leave dtype and vocoder_dtype at float32")
        self.ellav_plan: Plan = plan_for("ellav", precision, self.device)
        self.vocoder_plan: Plan = plan_for("wavtokenizer", precision, self.device)
        if self.vocoder_plan.bulk == "bf16":
            vocoder_dtype = torch.bfloat16
        self.dtype, self.vocoder_dtype = dtype, vocoder_dtype
        self.max_batch = _check_count(max_batch, "max_batch", 1)
        self.max_decode_steps = _check_count(max_decode_steps, "max_decode_steps", 1)
        self.max_codec_tokens_per_phone = _check_count(max_codec_tokens_per_phone, "max_codec_tokens_per_phone", 0)
        self.clock = clock
        self._ellavs: dict[tuple[int, int], ELLAV] = {}
        for key, model in (ellavs or {}).items():
            self._ellavs[key] = self._prepare_ellav(model)
        self._wavtokenizer = None if wavtokenizer is None else self._prepare_vocoder(wavtokenizer)
        self._pairs: list[tuple[int, int]] | None = None
        if pairs is not None:
            self._pairs = [hub.check_pair(k, lmbda, hub.ELLAV) for k, lmbda in pairs]
            for key in self._pairs:
                self._ellav(key)
        self._decoders: dict[tuple[int, int], BatchDecoder] = {}
        self._running: dict[int, ResynthSession] = {}  # id(session.ellav) -> session, for passes in flight
        self._next_id = 0
        self.compute_seconds = 0.0  # total wall time of step()
        self.prefill_seconds = 0.0  # of which ELLA-V prompt prefills
        self.decode_seconds = 0.0  # ELLA-V decode steps
        self.vocoder_seconds = 0.0  # WavTokenizer windows and iSTFT
        self.decode_steps = 0  # batched decode steps run
        self.tokens_decoded = 0  # rows x steps

    # -- models ------------------------------------------------------------------------------------------------------

    def available_pairs(self) -> list[tuple[int, int]]:
        """(k, lambda) pairs sessions may use."""
        if self._pairs is not None:
            return list(self._pairs)
        return sorted(set(self.models.pairs()) | set(self._ellavs))

    def _ellav(self, key: tuple[int, int]) -> ELLAV:
        if key not in self._ellavs:
            self._ellavs[key] = self._prepare_ellav(self.models.ellav(*key, map_location=self.device))
        return self._ellavs[key]

    def _prepare_ellav(self, model: ELLAV) -> ELLAV:
        """On this worker's device and dtype, converted for its precision (in place)."""
        model = model.to(device=self.device, dtype=self.dtype).eval()
        transformer_precision(model, self.precision, "ellav")
        return model

    @property
    def precision_plans(self) -> dict:
        """What this worker's precision runs each model in (reported in the server's ready/stats)."""
        return {"precision": self.precision, "ellav": self.ellav_plan.describe(),
                "wavtokenizer": self.vocoder_plan.describe()}  # fmt: skip

    def _prepare_vocoder(self, model: WavTokenizer) -> WavTokenizer:
        window = model.head.istft.window.detach().float().clone()
        model = model.to(device=self.device, dtype=self.vocoder_dtype).eval()
        model.head.istft.window = window.to(self.device)  # the iSTFT runs in float32: keep the window unrounded
        return model

    @property
    def wavtokenizer(self) -> WavTokenizer:
        if self._wavtokenizer is None:
            model, _, _ = self.models.wavtokenizer(map_location=self.device)
            self._wavtokenizer = self._prepare_vocoder(model)
        return self._wavtokenizer

    def _decoder(self, key: tuple[int, int]) -> BatchDecoder:
        if key not in self._decoders:
            self._decoders[key] = BatchDecoder(self._ellav(key), self.max_batch, self.max_codec_tokens_per_phone,
                                               merge_forced=self.precision == "fast")  # fmt: skip
        return self._decoders[key]

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the preallocated ELLA-V KV caches (all models)."""
        return sum(d.cache_nbytes for d in self._decoders.values())

    # -- sessions ----------------------------------------------------------------------------------------------------

    def open_session(self, k: int = hub.DEFAULT_K, lmbda: int = hub.DEFAULT_LMBDA, *,
                     left_context: int | None = DEFAULT_LEFT_CONTEXT, holdback: int | None = DEFAULT_HOLDBACK,
                     greedy: bool = True, seed: int | None = None, temperature: float = 1.0, top_p: float = 0.8,
                     trigger_units: int = 1, trigger_s: float | None = None,
                     max_pass_units: int | None = DEFAULT_MAX_PASS_UNITS,
                     vocoder_left_context: int | None = DEFAULT_VOCODER_LEFT_CONTEXT,
                     vocoder_lookahead: int = DEFAULT_VOCODER_LOOKAHEAD,
                     vocoder_min_step: int = DEFAULT_VOCODER_MIN_STEP) -> ResynthSession:  # fmt: skip
        """A new stream for ELLA-V (k, lambda). Validates everything; raises InvalidInput or UnknownModel.

        left_context C, holdback L (units; None: unlimited, the exact setting), greedy or sampling (temperature,
        top_p, seed), trigger_units / trigger_s (when a pass starts), max_pass_units P: see IncrementalELLAV.
        vocoder_left_context / vocoder_lookahead / vocoder_min_step (codec frames of 25 ms): see IncrementalVocoder;
        vocoder_left_context=None with a lookahead longer than the stream gives the whole-sequence decode.
        """
        key = hub.check_pair(k, lmbda, hub.ELLAV)
        if key not in self.available_pairs():
            pairs = ", ".join(f"({a}, {b})" for a, b in self.available_pairs())
            raise UnknownModel(f"(k, lambda) = {key} is not available in this worker (model set "
                               f"{self.models.source!r}); available pairs: {pairs}")  # fmt: skip
        ellav = IncrementalELLAV(
            self._ellav(key), left_context, holdback, max_pass_units=max_pass_units, trigger_units=trigger_units,
            trigger_s=trigger_s, max_codec_tokens_per_phone=self.max_codec_tokens_per_phone, greedy=greedy,
            temperature=temperature, top_p=top_p, seed=seed,
        )  # fmt: skip
        vocoder = IncrementalVocoder(self.wavtokenizer, left_context=vocoder_left_context,
                                     lookahead=vocoder_lookahead, min_step=vocoder_min_step)  # fmt: skip
        session = ResynthSession(self, self._next_id, key[0], key[1], ellav, vocoder)
        self._next_id += 1
        return session

    def _forget(self, session: ResynthSession) -> None:
        """Drop a session's pass from its decoder (reset or failure)."""
        if id(session.ellav) in self._running:
            del self._running[id(session.ellav)]
            self._decoders[(session.k, session.lmbda)].remove(session.ellav)

    def _guard(self, session: ResynthSession, fn: Callable[[], object]) -> None:
        """Run one stream's own work; an error ends that stream (its end event says why), not the others."""
        if session.closed:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - isolate streams; the message goes to that stream's client
            self._forget(session)
            session._fail(e)

    # -- compute -----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, sessions: Iterable[ResynthSession]) -> int:
        """Run up to `max_decode_steps` batched ELLA-V decode steps, then the vocoders of these streams; returns the
        number of tokens decoded (rows x steps). Streams that ended and are fully resynthesized are closed (their
        ResynthEndEvent queued) within this call.

        Passes already in flight advance whether or not their session is listed (a batch moves together); only
        the listed sessions take in units, start passes and run their vocoders.
        """
        started = self.clock()
        sessions = [s for s in dict.fromkeys(sessions) if not s.closed]
        for s in sessions:
            if s.worker is not self:
                raise InvalidInput(f"session {s.id} belongs to another worker")
            self._guard(s, s._ingest)
        tokens = 0
        for _ in range(self.max_decode_steps):
            self._admit([s for s in sessions if not s.closed])
            busy = [d for d in self._decoders.values() if d.rows]
            if not busy:
                break
            for decoder in busy:
                t0 = self.clock()
                out = decoder.step()
                elapsed = self.clock() - t0
                self.decode_seconds += elapsed
                share = elapsed / len(out)
                for stage, token, over in out:
                    s = self._running[id(stage)]
                    if over:
                        del self._running[id(stage)]
                    self._guard(s, lambda: s._take(token, over, share))
                tokens += len(out)
                self.decode_steps += 1
        t0 = self.clock()
        for s in sessions:
            self._guard(s, s._vocode)
        self.vocoder_seconds += self.clock() - t0
        self.tokens_decoded += tokens
        self.compute_seconds += self.clock() - started
        return tokens

    def _admit(self, sessions: list[ResynthSession]) -> None:
        """Start the due passes of these streams in free rows, oldest-due first, one batched prefill per model;
        let a pass in flight run on to the last unit once its stream has ended (IncrementalELLAV.extend_stop)."""
        now = self.clock()
        due = []
        for s in sessions:
            if s.ellav.running:
                self._guard(s, lambda: self._extend(s))
            elif s.ellav.pass_due():
                if s._due_since is None:
                    s._due_since = now
                due.append(s)
        due.sort(key=lambda s: s._due_since)
        jobs: dict[tuple[int, int], list[tuple[ResynthSession, PassPlan]]] = {}
        for s in due:
            key = (s.k, s.lmbda)
            if len(jobs.get(key, ())) >= self._decoder(key).free:
                continue  # waits for a free row, keeping its place in line
            plans: list[PassPlan] = []
            self._guard(s, lambda: plans.append(s.ellav.next_pass()))
            if plans:
                s._due_since = None
                jobs.setdefault(key, []).append((s, plans[0]))
        for key, items in jobs.items():
            t0 = self.clock()
            try:
                self._decoder(key).admit([(s.ellav, plan) for s, plan in items])
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for a huge prompt: fail these streams only
                for s, _ in items:
                    s._fail(e)
                continue
            synchronize(self.device)  # CUDA: the prefill's kernels, not their launch (decode steps sync on their ids)
            elapsed = self.clock() - t0
            self.prefill_seconds += elapsed
            share = elapsed / len(items)
            for s, _ in items:
                self._running[id(s.ellav)] = s
                s._compute_s += share

    def _extend(self, session: ResynthSession) -> None:
        stop = session.ellav.extend_stop()
        if stop is not None:
            self._decoders[(session.k, session.lmbda)].set_stop(session.ellav, stop)

    def run_until_idle(self, sessions: Iterable[ResynthSession]) -> int:
        """step() until no stream has work left; returns the tokens decoded."""
        sessions = list(sessions)
        tokens = 0
        while any(s.has_work for s in sessions):
            tokens += self.step(sessions)
        return tokens
