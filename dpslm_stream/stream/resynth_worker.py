"""ResynthWorker: the resynthesis models (ELLA-V per (k, lambda), WavTokenizer) and batched execution of many
streams: committed units -> ELLA-V codec ids (stream/ellav_stage.py) -> WavTokenizer audio (stream/vocoder.py).

`ResynthWorker` owns the models and runs the decode steps of every active pass in lockstep over one KV cache
per ELLA-V model (continuous batching, stream/ellav_batch.py: passes join with a batched prefill and leave
when their last unit's EOP is out, between decode steps), then the vocoder windows of all streams, those of equal
length in one backbone forward (stream/vocoder.py VocoderRunner). Sessions (stream/resynth_session.py) are sans-I/O
like the encoder's: `push_units`/`end` queue input, `worker.step(sessions)` computes, `poll()` returns AudioEvents
and one ResynthEndEvent.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from dpslm_stream import hub
from dpslm_stream.device import setup_model_device, synchronize
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.models.ellav import ELLAV
from dpslm_stream.models.precision import Plan, check_precision, plan_for, transformer_precision
from dpslm_stream.models.wavtokenizer import WavTokenizer, convert_mlps
from dpslm_stream.stream.ellav_batch import BatchDecoder, PassPlan
from dpslm_stream.stream.ellav_stage import IncrementalELLAV
from dpslm_stream.stream.resynth_defaults import (
    DEFAULT_HOLDBACK, DEFAULT_LEFT_CONTEXT, DEFAULT_MAX_CODEC_TOKENS_PER_PHONE, DEFAULT_MAX_PASS_UNITS,
    DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_VOCODER_FIRST_STEP, DEFAULT_VOCODER_LEFT_CONTEXT,
    DEFAULT_VOCODER_LOOKAHEAD, DEFAULT_VOCODER_MIN_STEP,
)
from dpslm_stream.stream.resynth_session import ResynthSession
from dpslm_stream.stream.vocoder import IncrementalVocoder, VocoderRunner, VocoderWindow
from dpslm_stream.validate import check_int

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
    `precision_plans` says what was picked. max_batch: passes decoded together per ELLA-V model (rows of its
    KV cache); further due passes wait, oldest first. max_decode_steps: batched decode steps per step() call, so one
    call stays short and a stream with a long pass never holds the others: they join and leave between steps.
    max_codec_tokens_per_phone: upstream's M, the per-unit cap (M+1 codec tokens per unit). clock: the time source
    for latencies (seconds, monotonic). eager_first_window: a step() stops its decode steps as soon as a stream
    without audio yet has decoded its first vocoder window, so that its first audio is not made to wait for the
    other steps (False: always `max_decode_steps`, as before; `bench resynth` compares the two). The early end moves
    the other streams' vocoder windows too, so with bounded vocoder context a stream's audio then depends on when its
    neighbours start (as it depends on the step timing anyway); the exact setting commits nothing before the end.
    compile_decode (precision "fast" only): ELLA-V's decode steps run through torch.compile (models/precision.py
    plan_for); each new shape compiles on its first step (batch 1 and batch >= 2 are two graphs), 10-45 s with
    torch's on-disk compile cache warm, minutes without: warm_up() does it before streams wait for it.
    """

    def __init__(self, models: hub.ModelSet | str = "release", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pairs: Iterable[tuple[int, int]] | None = None, *,
                 vocoder_dtype: torch.dtype = torch.float32, precision: str = "exact", max_batch: int = 16,
                 max_decode_steps: int = 16,
                 max_codec_tokens_per_phone: int = DEFAULT_MAX_CODEC_TOKENS_PER_PHONE,
                 ellavs: dict[tuple[int, int], ELLAV] | None = None, wavtokenizer: WavTokenizer | None = None,
                 clock: Callable[[], float] = time.perf_counter, allow_tf32: bool = False,
                 eager_first_window: bool = True, compile_decode: bool = False):  # fmt: skip
        self.models = hub.ModelSet(models) if isinstance(models, str) else models
        self.device = setup_model_device(device, allow_tf32)  # TF32 off on CUDA: the exact paths stay exact
        for name, value in (("dtype", dtype), ("vocoder_dtype", vocoder_dtype)):
            if value not in _DTYPES_OK:
                raise InvalidInput(f"{name} must be one of torch.float32, float64, bfloat16, float16; got {value!r}")
        self.precision = check_precision(precision)
        if precision == "fast" and (dtype, vocoder_dtype) != (torch.float32, torch.float32):
            raise InvalidInput("precision 'fast' picks the dtypes itself: leave dtype and vocoder_dtype at float32")
        if compile_decode and precision == "exact":
            raise InvalidInput("compile_decode compiles the fast decode step: it needs precision 'fast'")
        self.compile_decode = bool(compile_decode)
        self.ellav_plan: Plan = plan_for("ellav", precision, self.device, self.compile_decode)
        self.vocoder_plan: Plan = plan_for("wavtokenizer", precision, self.device)
        if self.vocoder_plan.bulk == "bf16":
            vocoder_dtype = torch.bfloat16
        self.dtype, self.vocoder_dtype = dtype, vocoder_dtype
        self.max_batch = check_int("max_batch", max_batch, 1)
        self.max_decode_steps = check_int("max_decode_steps", max_decode_steps, 1)
        self.max_codec_tokens_per_phone = check_int("max_codec_tokens_per_phone", max_codec_tokens_per_phone, 0)
        self.clock = clock
        self.eager_first_window = bool(eager_first_window)
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
        self._vocoder_runner: VocoderRunner | None = None
        self._next_id = 0
        self._steps_since_vocoder = 0  # decode steps since the vocoders last ran (step() yields keep counting)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.compute_seconds = 0.0  # total wall time of step()
        self.prefill_seconds = 0.0  # of which ELLA-V prompt prefills
        self.decode_seconds = 0.0  # ELLA-V decode steps
        self.vocoder_seconds = 0.0  # WavTokenizer windows and iSTFT
        self.decode_steps = 0  # batched decode steps run
        self.tokens_decoded = 0  # rows x steps
        if self._vocoder_runner is not None:
            self._vocoder_runner.forwards = self._vocoder_runner.windows = 0

    # -- models ------------------------------------------------------------------------------------------------------

    def available_pairs(self) -> list[tuple[int, int]]:
        """(k, lambda) pairs sessions may use."""
        if self._pairs is not None:
            return list(self._pairs)
        return sorted(set(self.models.pairs()) | set(self._ellavs))

    def load_pair(self, k: int, lmbda: int) -> None:
        """Load what streams of ELLA-V (k, lambda) need ahead of `open_session`, which then loads nothing: the ELLA-V,
        its decode cache and the vocoder. It only adds models, so a server runs it on a loading thread while this
        worker's `step` runs on its own (one load at a time). Raises UnknownModel for a pair this worker does not
        have. (With compile_decode, a model's decode step still compiles at its first step: see warm_up.)"""
        key = self._check_available(k, lmbda)
        self._decoder(key)
        _ = self.wavtokenizer  # loads it

    def unload_pair(self, k: int, lmbda: int) -> bool:
        """Drop ELLA-V (k, lambda) and its decode cache, unless a stream still holds a row of it, or it was given to
        the constructor and cannot be loaded again; returns whether it was dropped. Call it on the thread that runs
        `step`."""
        key = (k, lmbda)
        decoder = self._decoders.get(key)
        if key not in self._ellavs or key not in self.models.pairs() or (decoder is not None and decoder.rows):
            return False
        del self._ellavs[key]
        self._decoders.pop(key, None)
        return True

    def loaded_pairs(self) -> list[tuple[int, int]]:
        """Pairs whose ELLA-V is loaded."""
        return sorted(self._ellavs)

    def _check_available(self, k: int, lmbda: int) -> tuple[int, int]:
        key = hub.check_pair(k, lmbda, hub.ELLAV)
        if key not in self.available_pairs():
            pairs = ", ".join(f"({a}, {b})" for a, b in self.available_pairs())
            raise UnknownModel(f"(k, lambda) = {key} is not available in this worker (model set "
                               f"{self.models.source!r}); available pairs: {pairs}")  # fmt: skip
        return key

    def _ellav(self, key: tuple[int, int]) -> ELLAV:
        if key not in self._ellavs:
            self._ellavs[key] = self._prepare_ellav(self.models.ellav(*key, map_location=self.device))
        return self._ellavs[key]

    def _prepare_ellav(self, model: ELLAV) -> ELLAV:
        """On this worker's device and dtype, converted for its precision (in place)."""
        model = model.to(device=self.device, dtype=self.dtype).eval()
        transformer_precision(model, self.precision, "ellav", compile_decode=self.compile_decode)
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
        convert_mlps(model, self.vocoder_plan)  # int8 MLPs where the plan says so (bf16 is the dtype above)
        return model

    @property
    def vocoder_runner(self) -> VocoderRunner:
        """Runs the vocoder windows of all streams, equal lengths batched (its counters: forwards, windows)."""
        if self._vocoder_runner is None:
            self._vocoder_runner = VocoderRunner(self.wavtokenizer, self.max_batch)
        return self._vocoder_runner

    @property
    def wavtokenizer(self) -> WavTokenizer:
        if self._wavtokenizer is None:
            model, _, _ = self.models.wavtokenizer(map_location=self.device)
            self._wavtokenizer = self._prepare_vocoder(model)
        return self._wavtokenizer

    def _decoder(self, key: tuple[int, int]) -> BatchDecoder:
        if key not in self._decoders:
            self._decoders[key] = BatchDecoder(self._ellav(key), self.max_batch, self.max_codec_tokens_per_phone,
                                               merge_forced=self.precision == "fast",
                                               preallocate_rows=self.compile_decode)  # fmt: skip
        return self._decoders[key]

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the ELLA-V decode caches (all models; rows are allocated as passes need them)."""
        return sum(d.cache_nbytes for d in list(self._decoders.values()))  # list(): load_pair may add one meanwhile

    # -- sessions ----------------------------------------------------------------------------------------------------

    def open_session(self, k: int = hub.DEFAULT_K, lmbda: int = hub.DEFAULT_LMBDA, *,
                     left_context: int | None = DEFAULT_LEFT_CONTEXT, holdback: int | None = DEFAULT_HOLDBACK,
                     first_holdback: int | None = None,
                     greedy: bool = True, seed: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
                     top_p: float = DEFAULT_TOP_P,
                     trigger_units: int = 1, trigger_s: float | None = None,
                     max_pass_units: int | None = DEFAULT_MAX_PASS_UNITS,
                     vocoder_left_context: int | None = DEFAULT_VOCODER_LEFT_CONTEXT,
                     vocoder_lookahead: int = DEFAULT_VOCODER_LOOKAHEAD,
                     vocoder_min_step: int = DEFAULT_VOCODER_MIN_STEP,
                     vocoder_first_step: int = DEFAULT_VOCODER_FIRST_STEP) -> ResynthSession:  # fmt: skip
        """A new stream for ELLA-V (k, lambda). Validates everything; raises InvalidInput or UnknownModel.

        left_context C, holdback L (units; None: unlimited, the exact setting), first_holdback (the first unit's;
        None: L), greedy or sampling (temperature,
        top_p, seed), trigger_units / trigger_s (when a pass starts), max_pass_units: see IncrementalELLAV.
        vocoder_left_context / vocoder_lookahead / vocoder_min_step / vocoder_first_step (codec frames of 25 ms):
        see IncrementalVocoder;
        vocoder_left_context=None with a lookahead longer than the stream gives the whole-sequence decode.
        """
        key = self._check_available(k, lmbda)
        ellav = IncrementalELLAV(
            self._ellav(key), left_context, holdback, first_holdback=first_holdback, max_pass_units=max_pass_units,
            trigger_units=trigger_units,
            trigger_s=trigger_s, max_codec_tokens_per_phone=self.max_codec_tokens_per_phone, greedy=greedy,
            temperature=temperature, top_p=top_p, seed=seed,
        )  # fmt: skip
        vocoder = IncrementalVocoder(self.wavtokenizer, left_context=vocoder_left_context,
                                     lookahead=vocoder_lookahead, min_step=vocoder_min_step,
                                     first_step=vocoder_first_step)  # fmt: skip
        session = ResynthSession(ellav=ellav, vocoder=vocoder, decoder=self._decoder(key), session_id=self._next_id,
                                 k=key[0], lmbda=key[1], clock=self.clock, precision=self.precision,
                                 owner=self)  # fmt: skip
        self._next_id += 1
        return session

    def _guard(self, session: ResynthSession, fn: Callable[[], object]) -> None:
        """Run one stream's own work; an error ends that stream (its end event says why), not the others."""
        if session.closed:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - isolate streams; the message goes to that stream's client
            session._fail(e)  # its pass leaves the batch

    # -- compute -----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, sessions: Iterable[ResynthSession], yield_to: Callable[[], bool] | None = None) -> int:
        """Run up to `max_decode_steps` batched ELLA-V decode steps, then the vocoders of these streams; returns the
        number of tokens decoded (rows x steps). Streams that ended and are fully resynthesized are closed (their
        ResynthEndEvent queued) within this call.

        Passes already in flight advance whether or not their session is listed (a batch moves together); only
        the listed sessions take in units, start passes and run their vocoders. The decode steps stop early once a
        listed stream without audio yet has decoded its first vocoder window (first audio as soon as it can be).

        yield_to: asked after each decode step; True ends the call there, before the vocoders, so that more urgent
        work sharing this thread (the server's encoder) runs between decode steps. The vocoders still run once
        every `max_decode_steps` decode steps, counted across calls: a vocoder window costs about the same however
        few frames it commits, so vocoding at every yield would cost several times more. Without yields the
        windows, and so the audio, are exactly those of calls that never yield.
        """
        started = self.clock()
        try:
            tokens = self._step(sessions, yield_to)
        finally:
            self.compute_seconds += self.clock() - started
        self.tokens_decoded += tokens
        return tokens

    def _step(self, sessions: Iterable[ResynthSession], yield_to: Callable[[], bool] | None) -> int:
        sessions = [s for s in dict.fromkeys(sessions) if not s.closed]
        for s in sessions:
            if s.owner is not self:
                raise InvalidInput(f"session {s.id} belongs to another worker")
            self._guard(s, s._ingest)
        tokens = 0
        while self._steps_since_vocoder < self.max_decode_steps:
            self._admit([s for s in sessions if not s.closed])
            busy = [d for d in list(self._decoders.values()) if d.rows]  # list(): load_pair may add one meanwhile
            if not busy:
                break
            for decoder in busy:
                t0 = self.clock()
                out = decoder.step()
                elapsed = self.clock() - t0
                self.decode_seconds += elapsed
                share = elapsed / len(out)
                for s, token, over in out:  # the decoder's rows are owned by their sessions
                    self._guard(s, lambda: s._take(token, over, share))
                tokens += len(out)
                self.decode_steps += 1
            self._steps_since_vocoder += 1
            if self.eager_first_window and any(s._first_window_due() for s in sessions if not s.closed):
                break  # a stream's first audio is ready to make: the vocoders run now, not after the other steps
            if self._steps_since_vocoder < self.max_decode_steps and yield_to is not None and yield_to():
                return tokens  # the vocoders wait for their turn (see step)
        t0 = self.clock()
        self._vocode(sessions)
        self._steps_since_vocoder = 0
        self.vocoder_seconds += self.clock() - t0
        return tokens

    def _admit(self, sessions: list[ResynthSession]) -> None:
        """Start the due passes of these streams in free rows, oldest-due first, one batched prefill per model;
        let a pass in flight run on to the last unit once its stream has ended (IncrementalELLAV.extend_stop)."""
        now = self.clock()
        due = []
        for s in sessions:
            if s.ellav.running:
                self._guard(s, s._extend_pass)
            elif s.ellav.pass_due():
                if s._due_since is None:
                    s._due_since = now
                due.append(s)
        due.sort(key=lambda s: s._due_since)
        jobs: dict[BatchDecoder, list[tuple[ResynthSession, PassPlan]]] = {}
        for s in due:
            if len(jobs.get(s.decoder, ())) >= s.decoder.free:
                continue  # waits for a free row, keeping its place in line
            plans: list[PassPlan | None] = []
            self._guard(s, lambda: plans.append(s._start_pass()))
            if plans and plans[0] is not None:
                jobs.setdefault(s.decoder, []).append((s, plans[0]))
        for decoder, items in jobs.items():
            t0 = self.clock()
            try:
                decoder.admit(items)  # each session owns its row
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for a huge prompt: fail these streams only
                for s, _ in items:
                    s._fail(e)
                continue
            synchronize(self.device)  # CUDA: the prefill's kernels, not their launch (decode steps sync on their ids)
            elapsed = self.clock() - t0
            self.prefill_seconds += elapsed
            share = elapsed / len(items)
            for s, _ in items:
                s._compute_s += share

    def _vocode(self, sessions: list[ResynthSession]) -> None:
        """The vocoders of these streams: every due window planned, equal-length windows of all streams run in one
        backbone forward (VocoderRunner), then each stream commits its frames and emits its audio."""
        planned: dict[ResynthSession, VocoderWindow | None] = {}
        for s in sessions:
            self._guard(s, lambda: planned.__setitem__(s, s._vocoder_window()))
        due = [(s, w) for s, w in planned.items() if w is not None and not s.closed]
        t0 = self.clock()
        try:
            self.vocoder_runner.run([w for _, w in due])
        except Exception:  # noqa: BLE001 - find the stream whose window fails: run each alone
            for s, w in due:
                self._guard(s, lambda: self.vocoder_runner.run([w]))
        share = (self.clock() - t0) / len(due) if due else 0.0
        for s, w in planned.items():
            self._guard(s, lambda: s._vocode(w, 0.0 if w is None else share))

    def warm_up(self, k: int = hub.DEFAULT_K, lmbda: int = hub.DEFAULT_LMBDA) -> None:
        """Run two short streams of ELLA-V (k, lambda) through the worker, first alone, then together: with
        compile_decode this compiles the decode-step graphs (batch 1 and batch 2+) before real streams wait for them;
        otherwise it loads the models. The worker's counters are reset afterwards. A pair this worker does not have
        is replaced by its first one (no pair: nothing to do)."""
        pairs = self.available_pairs()
        if not pairs:
            return
        k, lmbda = (k, lmbda) if (k, lmbda) in pairs else pairs[0]
        units = [1, 2, 3, 4, 5, 6]
        for count in (1, 2):
            sessions = [self.open_session(k, lmbda, left_context=4, holdback=1) for _ in range(count)]
            for s in sessions:
                s.push_units(units)
                s.end()
            self.run_until_idle(sessions)
            for s in sessions:
                s.poll()
                s.close()
        self._reset_counters()

    def run_until_idle(self, sessions: Iterable[ResynthSession]) -> int:
        """step() until no stream has work left; returns the tokens decoded."""
        sessions = list(sessions)
        tokens = 0
        while any(s.has_work for s in sessions):
            tokens += self.step(sessions)
        return tokens
