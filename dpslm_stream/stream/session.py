"""EncoderSession: one live audio stream's state, from samples to committed units. Sans-I/O: no threads, no sockets.

A session is the encoder's streaming stages composed, each with its own bounded state:

    samples at the client's rate
      -> StreamingResampler    exact polyphase FIR to 16 kHz             (dpslm_stream.audio)
      -> StreamingFrontend     conv stack + LN + projection, per frame    (exact)
      -> WindowedEncoder       11 transformer layers, sliding / cached    (approximate; see encoder.py)
      -> StreamingDPDP         partial traceback, run-length segments     (exact; dpslm_stream.dpdp)
      -> IncrementalScorer     ULM log-probs of committed units, in blocks (exact while the context fits)

`full` mode is the offline computation itself: the session keeps the input and, at the end, runs exactly the
function `Pipeline.features` runs (resample the whole input, pad, front-end, 11 layers), then the same DPDP and
scorer. So `full` gives the offline units bit for bit for every chunking (its state grows with the stream).

The caller pushes audio (`push`, cheap: validation and a queue append), an `EncoderWorker.step([...])` does the
compute (batched with other sessions), and `poll()` returns the events that became final. Segments are emitted by
StreamingDPDP only once their end is known, so they are already deduplicated units and are never revised.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from dpslm_stream.audio import StreamingResampler, check_finite
from dpslm_stream.dpdp import Segment, StreamingDPDP
from dpslm_stream.errors import InvalidInput
from dpslm_stream.stream.encoder import HopPlan, WindowConfig, WindowedEncoder, WindowRunner
from dpslm_stream.stream.events import FRAME_SECONDS, EndEvent, Event, EventQueue, UnitEvent
from dpslm_stream.stream.frontend import FrontendKernels, StreamingFrontend

if TYPE_CHECKING:
    from dpslm_stream.models.ulm import ScoringPool
    from dpslm_stream.models.wavlm import WavLM

SAMPLE_RATE = 16000
# DPDP decisions may wait at most this many frames (30 s) in the windowed modes: a hard bound on its state that real
# speech never reaches (typical commit lag is a few frames); `forced_commits` counts the times it did.
DEFAULT_MAX_LAG_FRAMES = 1500
# ULM context in the windowed modes: the training chunks held <= 1023 tokens. Exact while the stream has at most
# this many units; beyond, each unit sees only the most recent ones (Mistral sliding window, see IncrementalScorer).
DEFAULT_SCORE_CONTEXT = 1023
# Most ULM tokens per scoring forward: a step commits a few units; longer blocks (the end of a file) are split.
SCORE_CHUNK = 64
# Full mode feeds the whole stream's features to DPDP in blocks of this many frames (3 s), a bounded slice each.
_DPDP_BLOCK = 150


def bitrate_from_counts(counts: Counter, seconds: float) -> float:
    """The authors' bitrate (as dpslm_stream.pipeline.bitrate): units * unigram entropy (bits) / seconds."""
    n = sum(counts.values())
    if n == 0 or seconds <= 0:
        return 0.0
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    return n * entropy / seconds


def as_samples(samples: object) -> np.ndarray:
    """Validate one pushed chunk; return it as a 1-D float32 numpy array (a copy). Raises InvalidInput."""
    if isinstance(samples, Tensor):
        if not samples.is_floating_point():
            raise InvalidInput(f"samples must be float audio in [-1, 1], got torch {samples.dtype}; convert PCM with "
                               "dpslm_stream.audio.pcm16_to_float")  # fmt: skip
        samples = samples.detach().cpu().numpy()
    if not isinstance(samples, np.ndarray):
        raise InvalidInput(f"samples must be a 1-D float32 numpy array, got {type(samples).__name__}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise InvalidInput(f"samples must be float audio in [-1, 1], got numpy {samples.dtype}; convert PCM with "
                           "dpslm_stream.audio.pcm16_to_float")  # fmt: skip
    if samples.ndim != 1:
        raise InvalidInput(f"samples must be 1-D (mono), got shape {samples.shape}; mix channels down first")
    check_finite(samples, "samples")
    return np.array(samples, dtype=np.float32)  # a copy: the caller may reuse its buffer


@dataclass(frozen=True)
class SessionStats:
    """Running figures of one session."""

    audio_seconds: float  # audio received
    encoded_seconds: float  # audio turned into layer-11 features
    compute_seconds: float  # worker time spent on this session (its share of batched forwards)
    real_time_factor: float  # compute_seconds / encoded_seconds (< 1: faster than real time)
    backlog_seconds: float  # audio received but not yet encoded (grows if the worker falls behind)
    units: int
    units_per_second: float  # units per second of audio covered by committed units
    bitrate: float  # authors' definition over the committed units, bit/s
    commit_lag_last_s: float  # audio received after a unit's end before it was committed (no compute time)
    commit_lag_mean_s: float
    commit_lag_max_s: float
    hops: int
    forced_commits: int  # DPDP decisions forced by max_lag
    state_nbytes: int


class EncoderSession(EventQueue):
    """One stream. Create with `EncoderWorker.open_session`; push audio, call the worker's `step`, poll events.

    Calls on one session must not overlap with `step` running on it, except `push` and `poll`, which only touch
    thread-safe queues (deque append / popleft), so an event loop may push and poll while a worker thread steps.
    """

    def __init__(self, *, wavlm: WavLM, runner: WindowRunner, extract_features_steps: Callable, session_id: int,
                 sample_rate: int, k: int, lmbda: int, config: WindowConfig, codebook: Tensor, num_neighbors: int,
                 max_lag: int | None, ulm=None, score_context: int | None = None, keep_features: bool = False,
                 owner: object = None, clock: Callable[[], float] = time.perf_counter,
                 scoring_pool: ScoringPool | None = None, frontend: FrontendKernels | None = None):  # fmt: skip
        """Built with what it needs: the WavLM, the `WindowRunner` that runs its windows (shared, batched, by the
        worker's `step`), the slice-wise feature function of full mode (`models.wavlm.extract_features_steps`) and
        the clock of its compute times and full mode's slice budget (seconds, monotonic), so a session can be made
        and tested without an `EncoderWorker`. `owner` only marks which worker may step it. `scoring_pool`: the
        ULM cache shared with the worker's other sessions of the same ULM and context (default: one of its own).
        `frontend`: the worker's packed conv stack for `wavlm` (default: one of its own)."""
        from dpslm_stream.models.ulm import IncrementalScorer

        self.owner = owner
        self.clock = clock
        self._wavlm = wavlm
        self._extract_features_steps = extract_features_steps
        self.id = session_id
        self.sample_rate = sample_rate
        self.k, self.lmbda = k, lmbda
        self.config = config
        self.mode = config.mode
        self.score = ulm is not None
        self.max_lag = max_lag
        self.score_context = score_context
        # Analysis only (`encode --stream --compare`): keep every layer-11 frame, so state grows with the stream.
        self.keep_features = keep_features
        model = wavlm
        self._resampler = StreamingResampler(sample_rate, SAMPLE_RATE, dtype=torch.float32)
        self._frontend = StreamingFrontend(model if frontend is None else frontend)
        self._encoder = None if self.mode == "full" else WindowedEncoder(runner, config)
        # What the session's windows run in (reported in ready/stats): mode full is the offline float32 computation
        # whatever the worker's precision.
        self.precision = "exact" if self._encoder is None else runner.precision_plan.precision
        self._dpdp = StreamingDPDP(codebook, lmbda, num_neighbors, max_lag)
        self._scorer = None if ulm is None else IncrementalScorer(
            ulm, max_context=score_context, chunk=SCORE_CHUNK, pool=scoring_pool)
        self.reset()

    # -- the caller's side -----------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to a fresh stream with the same settings (pending audio and unpolled events are dropped)."""
        self._pending: deque[np.ndarray] = deque()
        self._events: deque[Event] = deque()
        self._resampler.reset()
        self._frontend.reset()
        if self._encoder is not None:
            self._encoder.reset()
        self._dpdp.reset()
        if self._scorer is not None:
            self._scorer.reset()
        self._raw: list[np.ndarray] = []  # full mode: the whole input, kept for the offline computation at the end
        self._offline = None  # full mode after the end: the offline computation, a generator of bounded slices
        self._offline_result: Tensor | None = None  # its features not yet in DPDP
        self._offline_done = False
        self._offline_passes = 0
        self._ended = False  # end() called: no more audio
        self._input_done = False  # every pushed sample has gone through the resampler and front-end
        self.closed = False  # the EndEvent has been produced
        self._samples_pushed = 0
        self._samples_ingested = 0
        self._new_segments: list[Segment] = []
        self._kept_features: list[Tensor] = []
        self._seq = 0
        self._counts: Counter = Counter()
        self._last_end_frame = 0
        self._loglik = 0.0
        self._compute_s = 0.0
        self._lag_last = self._lag_sum = self._lag_max = 0.0

    def push(self, samples: np.ndarray) -> None:
        """Queue float audio [n] at the session's rate. Raises InvalidInput (and changes nothing) for non-float,
        non-1-D or non-finite samples, or after end(). An empty chunk is a no-op."""
        if self._ended:
            raise InvalidInput("this stream has ended (end() was called); call reset() to start a new stream")
        chunk = as_samples(samples)
        if chunk.size:
            self._pending.append(chunk)
            self._samples_pushed += chunk.size

    def end(self) -> None:
        """End of stream: the next step() encodes everything left and produces the EndEvent. Idempotent."""
        self._ended = True

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio pushed so far."""
        return self._samples_pushed / self.sample_rate

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def has_work(self) -> bool:
        """True when a step() would do something for this session (queued audio, ready hops or a pending end)."""
        if self.closed:
            return False
        if self._pending or self._ended:
            return True
        return self._encoder is not None and self._encoder.ready_hops > 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of streaming state: queued audio, resampler tail, front-end samples, window frames and key/value
        cache, DPDP survivors and ULM cache. Bounded in the windowed modes; `full` keeps the whole input."""
        n = sum(a.nbytes for a in self._pending) + sum(a.nbytes for a in self._raw)
        n += self._resampler.state_nbytes + self._frontend.state_nbytes + self._dpdp.state_nbytes
        if self._encoder is not None:
            n += self._encoder.state_nbytes
        if self._scorer is not None:
            n += self._scorer.state_nbytes
        return n

    @property
    def stats(self) -> SessionStats:
        encoded = (self._encoder.num_emitted if self._encoder is not None else
                   (self._last_end_frame if self.closed else 0)) * FRAME_SECONDS  # fmt: skip
        covered = self._last_end_frame * FRAME_SECONDS
        n = self._seq
        return SessionStats(
            audio_seconds=self.audio_seconds,
            encoded_seconds=encoded,
            compute_seconds=self._compute_s,
            real_time_factor=self._compute_s / encoded if encoded else 0.0,
            backlog_seconds=max(0.0, self.audio_seconds - encoded),
            units=n,
            units_per_second=n / covered if covered else 0.0,
            bitrate=bitrate_from_counts(self._counts, covered),
            commit_lag_last_s=self._lag_last,
            commit_lag_mean_s=self._lag_sum / n if n else 0.0,
            commit_lag_max_s=self._lag_max,
            hops=self._encoder.hops_done if self._encoder is not None else int(self.closed),
            forced_commits=self._dpdp.forced_commits,
            state_nbytes=self.state_nbytes,
        )

    def features(self) -> Tensor:
        """Layer-11 features [T, D] computed so far (only with keep_features=True; for offline comparisons)."""
        if not self.keep_features:
            raise InvalidInput("this session was opened without keep_features=True")
        return torch.cat(self._kept_features) if self._kept_features else torch.zeros(0, self._wavlm.cfg.encoder_embed_dim)

    def __repr__(self) -> str:
        return (f"EncoderSession(id={self.id}, {self.config.describe()}, {self.sample_rate} Hz, k={self.k}, "
                f"lmbda={self.lmbda}, score={self.score}, audio={self.audio_seconds:.2f} s, closed={self.closed})")  # fmt: skip

    # -- the worker's side (called from EncoderWorker.step) --------------------------------------------------------

    def _ingest(self) -> None:
        """Move queued audio through the resampler and front-end into the window state (full mode: keep it)."""
        started = self.clock()
        while self._pending:
            chunk = self._pending.popleft()
            self._samples_ingested += chunk.size
            if self._encoder is None:
                self._raw.append(chunk)
            else:
                self._frontend.add(self._resampler.push(chunk))
        if self._encoder is not None:
            if self._ended and not self._input_done:
                self._frontend.add(self._resampler.flush())
                self._encoder.add(self._frontend.flush())
            elif self._encoder.hops_ready_after(self._frontend.ready_frames) > 0:
                # The conv stack runs once a hop needs its frames, over all of them at once: one pass per hop
                # instead of one per 20 ms chunk (measured ~3x less front-end time per audio second).
                self._encoder.add(self._frontend.compute())
        self._input_done = self._input_done or self._ended
        self._compute_s += self.clock() - started

    @property
    def _ready_hops(self) -> int:
        return 0 if self._encoder is None else self._encoder.ready_hops

    def _plan(self, max_hops: int) -> HopPlan | None:
        if self._encoder is None:
            return None
        return self._encoder.plan(final=self._input_done, max_hops=max_hops)

    def _take_features(self, features: Tensor, compute_s: float = 0.0) -> None:
        """Features of the next frames -> DPDP; the segments it commits wait for scoring and emission."""
        started = self.clock()
        if features.shape[0]:
            self._new_segments.extend(self._dpdp.push(features))
            if self.keep_features:
                self._kept_features.append(features.detach().float().cpu())
        self._compute_s += compute_s + self.clock() - started

    def _complete(self, plan: HopPlan) -> None:
        self._take_features(self._encoder.complete(plan), plan.compute_s)

    def _encode_rest(self, budget_s: float) -> bool:
        """After the end of the input: True once every feature is computed and in DPDP. Full mode runs the offline
        computation here in slices (`extract_features_steps`), then feeds its features to DPDP in blocks of
        `_DPDP_BLOCK` frames (exact for any chunking), at least one slice per call and more while less than
        `budget_s` has passed, so that one long stream does not hold the worker; the windowed modes have nothing
        left (`_plan` did it)."""
        if self._encoder is not None or self._offline_done:
            return True
        started = self.clock()
        first = True
        while first or self.clock() - started < budget_s:
            first = False
            if self._offline_result is not None:  # features computed: the next block into DPDP
                block, self._offline_result = self._offline_result[:_DPDP_BLOCK], self._offline_result[_DPDP_BLOCK:]
                self._take_features(block)
                if not self._offline_result.shape[0]:
                    self._offline_result, self._offline_done = None, True
                    return True
                continue
            t0 = self.clock()
            if self._offline is None:
                self._offline = self._offline_steps(np.concatenate(self._raw) if self._raw else None)
                self._raw = []  # the computation holds its own copy
            try:
                next(self._offline)
            except StopIteration as done:
                self._offline, self._offline_result = None, done.value
                self._offline_passes = int(done.value is not None)
                if done.value is None or not done.value.shape[0]:
                    self._offline_result, self._offline_done = None, True
                    return True
            finally:
                self._compute_s += self.clock() - t0
        return False

    def _finish(self) -> int:
        """After the last window (and, in full mode, the offline computation): DPDP commits the rest. Returns the
        number of encoder passes run for it (1 for full mode with audio, else 0)."""
        self._new_segments.extend(self._dpdp.flush())
        return self._offline_passes

    def _offline_steps(self, raw: np.ndarray | None):
        """Full mode: exactly `Pipeline.features` on the whole input `raw`, as a generator of slices whose value is
        the features (None for no input or less than one 20 ms frame)."""
        if raw is None:
            return None
        wav = torch.from_numpy(raw)
        n16 = -(-wav.numel() * SAMPLE_RATE // self.sample_rate)  # resampled length, ceil(T * 16000 / sr)
        if n16 < self._wavlm.samples_per_frame:
            return None  # upstream raises here; a stream this short simply has no units
        model = self._wavlm
        # CPU audio in: resampled on the CPU, then moved to the model (as Pipeline.features)
        return (yield from self._extract_features_steps(model, wav[None], self.sample_rate, layer=11))

    def _score_block(self) -> tuple[object, list[int]] | None:
        """(scorer, units) for the worker's batched scoring, or None."""
        if self._scorer is None or not self._new_segments:
            return None
        return self._scorer, [s.unit for s in self._new_segments]

    def _emit(self, logprobs: Tensor | None, score_s: float = 0.0) -> None:
        """Turn the newly committed segments into events (and the EndEvent once the stream is done)."""
        self._compute_s += score_s
        commit_s = self._samples_ingested / self.sample_rate
        for i, seg in enumerate(self._new_segments):
            lp = None if logprobs is None else float(logprobs[i])
            event = UnitEvent(self._seq, seg.unit, seg.start, seg.end, seg.start * FRAME_SECONDS,
                              seg.end * FRAME_SECONDS, commit_s, lp)  # fmt: skip
            self._events.append(event)
            self._seq += 1
            self._counts[seg.unit] += 1
            self._last_end_frame = seg.end
            if lp is not None:
                self._loglik += lp
            lag = event.commit_lag_s
            self._lag_last, self._lag_sum, self._lag_max = lag, self._lag_sum + lag, max(self._lag_max, lag)
        self._new_segments = []

    def _close(self) -> None:
        seconds = self._samples_pushed / self.sample_rate
        self._events.append(EndEvent(
            units=self._seq, seconds=seconds, frames=self._last_end_frame,
            bitrate=bitrate_from_counts(self._counts, seconds),
            loglikelihood=self._loglik if self.score else None, forced_commits=self._dpdp.forced_commits,
        ))  # fmt: skip
        self.closed = True
        if self._scorer is not None:
            self._scorer.close()  # its cache row goes back to the pool (reset() takes one again)
