"""EncoderWorker: owns the encoder-side models and runs the compute of many sessions, batched.

One WavLM (and its WindowRunner) serves every session; codebooks are loaded per k and unit LMs per (k, lambda), on
first use or up front (`pairs`). `step(sessions)` does all the work that is ready: it moves queued audio through
each session's resampler and front-end, runs the ready hops of all sessions through the transformer with one
forward per window shape (the hops of sessions with equal window shapes, and several pending hops of a session
that fell behind, share a forward), feeds DPDP, scores the newly committed units of all scoring sessions in one
batched ULM forward, and queues the events. The server calls it from one worker thread; it holds no threads itself.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from typing import Callable, Iterable

import torch

from dpslm_stream import hub
from dpslm_stream.audio import check_sample_rate
from dpslm_stream.device import DeviceTimer, setup_model_device
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.models import wavlm as wavlm_module
from dpslm_stream.models.precision import check_precision
from dpslm_stream.models.ulm import ScoringPool, score_blocks
from dpslm_stream.models.wavlm import WavLM
from dpslm_stream.pipeline import default_num_neighbors
from dpslm_stream.stream.encoder import MODES, WindowRunner, window_config
from dpslm_stream.stream.frontend import FrontendKernels
from dpslm_stream.stream.session import DEFAULT_MAX_LAG_FRAMES, DEFAULT_SCORE_CONTEXT, SCORE_CHUNK, EncoderSession
from dpslm_stream.validate import is_int

_DEFAULT = object()  # "not given" for arguments whose default depends on the mode


class EncoderWorker:
    """The models of the encoder side and batched execution of sessions' work.

    `models` is a hub.ModelSet (or its source: "release", "tiny", a folder). `pairs` limits the worker to these
    (k, lambda) pairs and loads them up front; None allows every pair the set holds, loaded when first opened.
    `wavlm`, `codebooks` ({k: Tensor[K, D]}) and `ulms` ({(k, lambda): ULM}) supply already-built models instead
    of loading them from the set (benchmarks with random full-size weights, tests).
    `max_hops_per_step` bounds how many pending hops of one session a single step runs, so that a session far
    behind does not stall the others for long. `precision` ("exact" or "fast") is the streaming encoder's
    (WindowRunner; `runner.precision_plan` says what it picked); DPDP and the unit LM scores stay as they are.
    clock: the time source of compute times (seconds, monotonic).
    """

    def __init__(self, models: hub.ModelSet | str = "release", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pairs: Iterable[tuple[int, int]] | None = None, *,
                 max_hops_per_step: int = 8, wavlm: WavLM | None = None, codebooks: dict | None = None,
                 ulms: dict | None = None, allow_tf32: bool = False, precision: str = "exact",
                 clock: Callable[[], float] = time.perf_counter):  # fmt: skip
        self.models = hub.ModelSet(models) if isinstance(models, str) else models
        self.device = setup_model_device(device, allow_tf32)  # TF32 off on CUDA: the exact paths stay exact
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidInput(f"dtype must be a floating-point torch dtype (e.g. torch.float32), got {dtype!r}")
        self.dtype = dtype
        if not is_int(max_hops_per_step, int) or max_hops_per_step < 1:
            raise InvalidInput(f"max_hops_per_step must be a positive int, got {max_hops_per_step!r}")
        self.max_hops_per_step = max_hops_per_step
        self.clock = clock
        if wavlm is None:
            wavlm, _ = self.models.wavlm(self.device)
        self.wavlm: WavLM = wavlm.to(device=self.device, dtype=dtype).eval()
        self.extract_features = wavlm_module.extract_features  # the offline feature function
        self.extract_features_steps = wavlm_module.extract_features_steps  # the same in slices (full mode)
        self.runner = WindowRunner(self.wavlm, precision=check_precision(precision))
        self.frontend = FrontendKernels(self.wavlm)  # the packed conv stack every session's front-end runs
        self._codebooks: dict[int, torch.Tensor] = dict(codebooks or {})
        self._ulms: dict[tuple[int, int], object] = dict(ulms or {})
        self._pairs: list[tuple[int, int]] | None = None
        if pairs is not None:
            self._pairs = [hub.check_pair(k, lmbda) for k, lmbda in pairs]
            for k, lmbda in self._pairs:
                self._codebook(k)
                self._ulm(k, lmbda)
        self._scoring_pools: dict[tuple[tuple[int, int], int | None], ScoringPool] = {}
        self._ids = itertools.count()
        self.compute_seconds = 0.0  # total wall time of step(), for the worker's own real-time factor

    # -- models ----------------------------------------------------------------------------------------------------

    def available_pairs(self) -> list[tuple[int, int]]:
        """(k, lambda) pairs sessions may use."""
        if self._pairs is not None:
            return list(self._pairs)
        return sorted(set(self.models.pairs()) | set(self._ulms))

    def load_pair(self, k: int, lmbda: int, score: bool = False) -> None:
        """Load what sessions of (k, lambda) need ahead of `open_session`, which then loads nothing: the codebook, and
        the unit LM when they score. It only adds models, so a server runs it on a loading thread while this worker's
        `step` runs on its own (one load at a time). Raises UnknownModel for a pair this worker does not have."""
        key = self._check_available(k, lmbda)
        self._codebook(key[0])
        if score:
            self._ulm(*key)

    def unload_pair(self, k: int, lmbda: int) -> bool:
        """Drop (k, lambda)'s unit LM and its scoring caches; the next session that scores loads it again. Sessions
        still open keep what they hold until they end. Codebooks (a few MB) stay; so does a unit LM that was given to
        the constructor and cannot be loaded again. Returns whether a unit LM was dropped. Call it on the thread that
        runs `step`."""
        key = (k, lmbda)
        if key not in self._ulms or key not in self.models.pairs():
            return False
        del self._ulms[key]
        for pool in [p for p in self._scoring_pools if p[0] == key]:
            del self._scoring_pools[pool]
        return True

    def loaded_pairs(self) -> list[tuple[int, int]]:
        """Pairs whose unit LM is loaded."""
        return sorted(self._ulms)

    def _check_available(self, k: int, lmbda: int) -> tuple[int, int]:
        key = hub.check_pair(k, lmbda)
        if key not in self.available_pairs():
            pairs = ", ".join(f"({a}, {b})" for a, b in self.available_pairs())
            raise UnknownModel(f"(k, lambda) = {key} is not available in this worker (model set "
                               f"{self.models.source!r}); available pairs: {pairs}")  # fmt: skip
        return key

    def _codebook(self, k: int) -> torch.Tensor:
        if k not in self._codebooks:
            self._codebooks[k] = self.models.codebook(k, self.device)
        return self._codebooks[k].to(self.device)

    def _ulm(self, k: int, lmbda: int):
        if (k, lmbda) not in self._ulms:
            ulm, _ = self.models.ulm(k, lmbda, self.device)
            self._ulms[(k, lmbda)] = ulm.to(device=self.device).eval()
        return self._ulms[(k, lmbda)]

    # -- sessions --------------------------------------------------------------------------------------------------

    def open_session(self, sample_rate: int, k: int = hub.DEFAULT_K, lmbda: int = hub.DEFAULT_LMBDA,
                     mode: str = "cached", preset: str | None = None, left: int | None = None,
                     hop: int | None = None, lookahead: int | None = None, score: bool = False,
                     max_lag: int | None = None, *, num_neighbors: int | None = None,
                     score_context: object = _DEFAULT, keep_features: bool = False) -> EncoderSession:  # fmt: skip
        """A new stream. Validates everything; raises InvalidInput or UnknownModel with what is expected.

        mode: full (offline, exact, units at the end), sliding or cached; preset: low-latency (default), balanced,
        quality; left / hop / lookahead (frames of 20 ms) override the preset's sizes. score: per-unit ULM log-probs.
        max_lag: DPDP frames a decision may wait (None: 1500 in the windowed modes, unbounded in full mode).
        score_context: ULM tokens each unit may attend to (default 1023 in the windowed modes, None = unbounded
        in full mode, so that full-mode scores equal the offline loglikelihood). keep_features: keep every
        layer-11 frame for `session.features()` (analysis only: the state then grows with the stream).
        """
        sample_rate = check_sample_rate(sample_rate)
        key = self._check_available(k, lmbda)
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        config = window_config(mode, preset, left, hop, lookahead)
        if not isinstance(score, bool):
            raise InvalidInput(f"score must be True or False, got {score!r}")
        if max_lag is None:
            max_lag = None if mode == "full" else DEFAULT_MAX_LAG_FRAMES
        elif not is_int(max_lag) or max_lag < 1:
            raise InvalidInput(f"max_lag must be None or a positive number of frames, got {max_lag!r}")
        if score_context is _DEFAULT:
            score_context = None if mode == "full" else DEFAULT_SCORE_CONTEXT
        elif score_context is not None and (not is_int(score_context, int)
                                            or score_context < 1):
            raise InvalidInput(f"score_context must be None or a positive number of tokens, got {score_context!r}")
        codebook = self._codebook(key[0])
        if num_neighbors is None:
            num_neighbors = default_num_neighbors(key[0])
        return EncoderSession(
            wavlm=self.wavlm, runner=self.runner, extract_features_steps=self.extract_features_steps, owner=self,
            clock=self.clock,
            session_id=next(self._ids), sample_rate=sample_rate, k=key[0], lmbda=key[1], config=config,
            codebook=codebook, num_neighbors=num_neighbors, max_lag=max_lag,
            ulm=self._ulm(*key) if score else None, score_context=score_context, keep_features=bool(keep_features),
            scoring_pool=self._scoring_pool(key, score_context) if score else None, frontend=self.frontend,
        )  # fmt: skip

    def _scoring_pool(self, key: tuple[int, int], score_context: int | None) -> ScoringPool:
        """The ULM cache the sessions of one (k, lambda) and score context share (rows lent per session)."""
        if (key, score_context) not in self._scoring_pools:
            self._scoring_pools[(key, score_context)] = ScoringPool(self._ulm(*key), score_context, SCORE_CHUNK)
        return self._scoring_pools[(key, score_context)]

    # -- compute ---------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, sessions: Iterable[EncoderSession], full_slice_s: float | None = None) -> int:
        """Run all compute that is ready for these sessions, batched; return the number of hops (windows) done.

        A session that has ended is encoded to the end and closed (its EndEvent queued) within this call, except
        that with `full_slice_s` (seconds) a full-mode session's offline computation runs for about that long per
        call (at least one bounded slice; see WavLM.forward_steps) and the session closes in the call that completes
        it: a scheduler's bound on one step's time. Any other session gets at most `max_hops_per_step` hops, the rest
        in later steps. Results never depend on either bound.
        """
        started = self.clock()
        sessions = [s for s in dict.fromkeys(sessions) if not s.closed]
        for s in sessions:
            if s.owner is not self:
                raise InvalidInput(f"session {s.id} belongs to another worker")
            s._ingest()

        # Rounds of batched forwards: each round takes the next ready hops of every session that still has budget.
        # A session gets up to max_hops_per_step hops per step (several rounds during its warm-up, when its hops
        # cannot share a forward); an ended session is encoded to the end.
        hops = 0
        budget = {s.id: self.max_hops_per_step for s in sessions}
        active = sessions
        while active:
            # Plans of one shape share a forward, and a plan's shape includes its hop count: while several
            # sessions have hops ready (several clients, some behind), each round takes one hop of each, so that
            # they all go in one forward (and one window per stream takes the runner's cheaper attention path);
            # a session alone runs its pending hops in one forward.
            one_each = sum(s._ready_hops > 0 for s in active) > 1
            plans = [(s, p) for s in active
                     if (p := s._plan(1 if one_each else budget[s.id] if not s._input_done else 1 << 30))
                     is not None]  # fmt: skip
            if not plans:
                break
            self.runner.run([p for _, p in plans])
            for s, p in plans:
                s._complete(p)
                hops += p.hops
                budget[s.id] -= p.hops
            active = [s for s, _ in plans if s._input_done or budget[s.id] > 0]

        # Ended sessions finish once all their features exist; full mode computes them here, a slice per step.
        if full_slice_s is not None and not full_slice_s >= 0:
            raise InvalidInput(f"full_slice_s must be None or a number of seconds >= 0, got {full_slice_s!r}")
        budget_s = math.inf if full_slice_s is None else full_slice_s
        finishing = [s for s in sessions if s._input_done and s._encode_rest(budget_s)]
        for s in finishing:
            hops += s._finish()
        scores = self._score(sessions)
        for s in sessions:
            logprobs, score_s = scores.get(s.id, (None, 0.0))
            s._emit(logprobs, score_s)
        for s in finishing:
            s._close()
        self.compute_seconds += self.clock() - started
        return hops

    def _score(self, sessions: list[EncoderSession]) -> dict[int, tuple[torch.Tensor, float]]:
        """Per-unit log-probs of every session's new units: one batched forward per scoring pool (weights read
        once, on the pool's persistent cache rows)."""
        groups = defaultdict(list)
        for s in sessions:
            block = s._score_block()
            if block is not None:
                scorer, units = block
                groups[id(scorer.pool)].append((s, scorer, units))
        out = {}
        for group in groups.values():
            with DeviceTimer(self.device) as timer:  # synchronizes on CUDA
                logprobs = score_blocks([g[1] for g in group], [g[2] for g in group])
            share = timer.seconds / len(group)
            for (s, _, _), lp in zip(group, logprobs):
                out[s.id] = (lp, share)
        return out

    def run_until_idle(self, sessions: Iterable[EncoderSession]) -> int:
        """step() until no session has work left; returns the hops done."""
        sessions = list(sessions)
        hops = 0
        while any(s.has_work for s in sessions):
            hops += self.step(sessions)
        return hops
