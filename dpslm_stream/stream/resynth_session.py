"""ResynthSession: one live resynthesis stream's state, from committed units to audio events. Sans-I/O.

Like the encoder's EncoderSession (stream/session.py): `push_units`/`end` queue input, the ResynthWorker's
`step([...])` (stream/resynth_worker.py) computes, batched with other streams, and `poll()` returns AudioEvents and
one ResynthEndEvent.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.stream.ellav_batch import BatchDecoder, PassPlan
from dpslm_stream.stream.ellav_stage import IncrementalELLAV
from dpslm_stream.stream.events import EventQueue
from dpslm_stream.stream.resynth_events import SAMPLE_RATE, AudioEvent, ResynthEndEvent, ResynthEvent
from dpslm_stream.stream.vocoder import IncrementalVocoder, VocoderWindow


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

    def __init__(self, *, ellav: IncrementalELLAV, vocoder: IncrementalVocoder, decoder: BatchDecoder,
                 session_id: int = 0, k: int | None = None, lmbda: int | None = None,
                 clock: Callable[[], float] = time.perf_counter, precision: str = "exact",
                 owner: object = None):  # fmt: skip
        """Built with what it needs, so it can be made and tested without a ResynthWorker: its two stages, the
        BatchDecoder that runs its passes (shared with the other streams of the same ELLA-V model; the worker's
        `step` drives it), the clock of its latencies (seconds, monotonic) and the precision it reports. `owner`
        only marks which worker may step it; k, lmbda and session_id are labels."""
        if decoder.model is not ellav.model:
            raise InvalidInput("the decoder must run the stream's own ELLA-V model")
        self.owner = owner
        self.id = session_id
        self.k, self.lmbda = k, lmbda
        self.ellav = ellav
        self.vocoder = vocoder
        self.decoder = decoder
        self.clock = clock
        self.precision = precision
        self.closed = False
        self.reset()

    # -- the caller's side -------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """A fresh stream with the same settings (pending units and unpolled events are dropped; a pass in flight
        leaves the batch)."""
        self.decoder.remove(self)
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
            self._pending.append((units, ends, self.clock()))

    def end(self) -> None:
        """End of stream: the worker commits and vocodes everything left, then sends the ResynthEndEvent."""
        self._ended = True

    def close(self) -> None:
        """Stop the stream now, without an end event (its client is gone): a pass in flight leaves the batch, so its
        row is free for other streams at once, and pending units are dropped. Idempotent; reset() reopens it."""
        self.decoder.remove(self)
        self._pending.clear()
        self._codes = []
        self.closed = True

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
        return self.clock() - oldest

    @property
    def audio_seconds(self) -> float:
        return self._samples_out / SAMPLE_RATE

    @property
    def state_nbytes(self) -> int:
        """Bytes of stream state: queued units, ELLA-V window and pass, codes waiting for the vocoder, the vocoder's
        window and iSTFT carry, latency bookkeeping. (The pass's KV row lives in the decoder: `cache_nbytes`.)"""
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
        return {"left_context": e.left_context, "holdback": e.holdback, "first_holdback": e.first_holdback,
                "greedy": e.greedy, "seed": e.seed,
                "temperature": e.temperature, "top_p": e.top_p, "trigger_units": e.trigger_units,
                "trigger_s": e.trigger_s, "max_pass_units": e.max_pass_units,
                "max_codec_tokens_per_phone": e.max_codec_tokens_per_phone, "vocoder_left_context": v.left_context,
                "vocoder_lookahead": v.lookahead, "vocoder_min_step": v.min_step,
                "vocoder_first_step": v.first_step, "sample_rate": SAMPLE_RATE,
                "precision": self.precision}  # fmt: skip

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

    def _start_pass(self) -> PassPlan | None:
        """The plan of this stream's next pass (the worker admits it into `decoder` with this session as owner)."""
        plan = self.ellav.next_pass()
        if plan is not None:
            self._due_since = None
        return plan

    def _extend_pass(self) -> None:
        """After end(): let the pass in flight run on to the last unit (IncrementalELLAV.extend_stop)."""
        stop = self.ellav.extend_stop()
        if stop is not None:
            self.decoder.set_stop(self, stop)

    def _take(self, token: int, over: bool, compute_s: float) -> None:
        """One generated token of this stream's pass."""
        committed = self.ellav.committed
        code = self.ellav.take(token, over)
        if code is not None:
            self._codes.append(code)
        if self.ellav.committed > committed:
            self._unit_frames.append(self.ellav.codes_out)
        self._compute_s += compute_s

    def _first_window_due(self) -> bool:
        """No audio yet, and the codes decoded so far already make the vocoder's first window."""
        return self.vocoder.first_window_ready(pending=len(self._codes))

    def _vocoder_window(self) -> VocoderWindow | None:
        """New codes -> the vocoder; the backbone window due now, if any (the worker runs the windows of all streams
        in batches: VocoderRunner)."""
        if self._codes:
            self.vocoder.add(torch.tensor(self._codes, dtype=torch.long))
            self._codes = []
        return self.vocoder.plan()

    def _vocode(self, window: VocoderWindow | None, compute_s: float = 0.0) -> None:
        """The window's audio (its spectra computed) -> AudioEvent; at the very end flush the vocoder (its last
        window, run here alone) and close the stream."""
        started = self.clock()
        finishing = self.ellav.done and not self._pending
        audio = torch.zeros(0) if window is None else self.vocoder.complete(window)
        if finishing:
            audio = torch.cat([audio.cpu(), self.vocoder.flush().cpu()])
        now = self.clock()
        self._compute_s += compute_s + now - started
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
        """Stop this stream after an error in its own processing; the other streams carry on (its pass in flight
        leaves the batch)."""
        self.decoder.remove(self)
        self.error = f"{type(exc).__name__}: {exc}"
        self._events.append(self._end_event(self.error))
        self.closed = True
