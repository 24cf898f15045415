"""The encoder thread: the only place where the in-process server runs encoder model code.

One thread owns the EncoderWorker (WavLM shared by every (k, lambda); codebooks, ULMs and DPDP state per pair and
session) and every EncoderSession. The event loop never calls into them: it hands audio over through a ``Slot``
(a lock-protected queue of samples per session) and gets events back through ``loop.call_soon_threadsafe``.

Each round of the thread:
1. runs queued commands (opening a session; a pair's models load before, on a loading thread: ModelThread.load);
2. feeds every slot at most ``quantum_s`` seconds of its queued audio, so a client that sends a minute at once
   gets a fair share, not the whole worker (fairness between sessions, and a bound on one round's time);
3. calls ``EncoderWorker.step`` once for all slots that got input: their windows run as one batched forward; a
   full-mode session that ended gets ``full_slice_s`` of its whole-stream computation per round (bounded slices,
   see WavLM.forward_steps), so a client that sends a long file at once shares the worker with live sessions
   instead of holding it for the whole computation;
4. polls every stepped session and posts its final events to the event loop.
A step that raises is retried one session at a time, so a session whose data breaks the model fails alone.
On a CPU the resynthesis worker runs on this thread too, after each round, yielding between its decode steps to the
encoder's work (ModelThread.host, server/model_thread.py, says why).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from dpslm_stream import hub
from dpslm_stream.errors import InvalidInput
from dpslm_stream.stream.events import EndEvent

from .backends import EncoderBackend, EncoderProvider, EncoderSessionInfo, EncoderSlot, Progress, SlotSink
from .model_thread import ModelThread

log = logging.getLogger("dpslm_stream.server")


class AudioQueue:
    """One session's audio on its way from the event loop to a backend: a lock-protected queue of sample chunks and
    the end request. The event loop calls ``add_audio``, ``request_end`` and ``cancel``; the backend ``take`` and
    ``wants_end``."""

    def __init__(self, session_id: str, sample_rate: int, sink: SlotSink):
        self.id = session_id
        self.sample_rate = sample_rate
        self.sink = sink
        self._lock = threading.Lock()
        self._queued: deque[np.ndarray] = deque()
        self._queued_samples = 0
        self._end_requested = False
        self.cancelled = False
        # Backend state.
        self.end_called = False
        self.finished = False
        self.processed_samples = 0

    # --- event-loop side ---

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    def add_audio(self, samples: np.ndarray) -> None:
        with self._lock:
            self._queued.append(samples)
            self._queued_samples += len(samples)

    def request_end(self) -> None:
        with self._lock:
            self._end_requested = True

    def cancel(self) -> None:
        self.cancelled = True  # the backend drops it at its next round

    # --- backend side ---

    def take(self, max_samples: int) -> np.ndarray | None:
        """Up to ``max_samples`` of the queued audio (whole chunks, and at least one), or None when nothing is queued."""
        with self._lock:
            taken, n = [], 0
            while self._queued and (n == 0 or n + len(self._queued[0]) <= max_samples):
                chunk = self._queued.popleft()
                taken.append(chunk)
                n += len(chunk)
            self._queued_samples -= n
        if not taken:
            return None
        return taken[0] if len(taken) == 1 else np.concatenate(taken)

    def wants_end(self) -> bool:
        with self._lock:
            return self._end_requested and not self._queued


class Slot(AudioQueue):
    """One live session as the in-process worker sees it: its encoder session and the audio queued for it (an
    EncoderSlot, server/backends.py)."""

    def __init__(self, session_id: str, encoder_session: Any, sample_rate: int, sink: SlotSink):
        super().__init__(session_id, sample_rate, sink)
        self.session = encoder_session
        self.info = EncoderSessionInfo.of(encoder_session)


class ForwardCounts(Protocol):
    @property
    def forwards(self) -> int: ...  # encoder forwards run so far

    @property
    def forward_streams(self) -> int: ...  # the streams those forwards carried


class InProcessWorker(Protocol):
    """What the encoder thread uses of its EncoderWorker (stream/worker.py; tests wrap one and forward these)."""

    @property
    def models(self) -> Any: ...

    @property
    def runner(self) -> ForwardCounts: ...  # read after each step: the batch metric

    @property
    def open_session(self) -> Callable[..., Any]: ...  # (sample_rate, k, lmbda, **settings) -> an EncoderSession

    def available_pairs(self) -> Any: ...

    def load_pair(self, k: int, lmbda: int, score: bool = False) -> None: ...  # on the loading thread

    def unload_pair(self, k: int, lmbda: int) -> bool: ...

    def loaded_pairs(self) -> list[tuple[int, int]]: ...

    def step(self, sessions: Any, full_slice_s: float | None = None) -> int: ...


class InProcessEncoder:
    """An EncoderWorker served by a EncoderThread thread in this process (an EncoderProvider, server/backends.py)."""

    def __init__(self, encoder_worker: InProcessWorker):
        self.worker = encoder_worker
        self.models = encoder_worker.models

    def available_pairs(self) -> list[tuple[int, int]]:
        return list(self.worker.available_pairs())

    def make_backend(self, loop: asyncio.AbstractEventLoop, metrics: Any, quantum_s: float) -> "EncoderThread":
        return EncoderThread(self.worker, loop, metrics, quantum_s)


class EncoderThread(ModelThread):
    """The thread that runs every encoder model call of the server (see the module docstring); an EncoderBackend
    (server/backends.py), around an InProcessWorker."""

    name = "dpslm-model-worker"

    high_priority = True  # units never wait for audio: the encoder's kernels go first on a shared GPU

    def __init__(self, encoder_worker: InProcessWorker, loop: asyncio.AbstractEventLoop, metrics=None,
                 quantum_s: float = 0.5, full_slice_s: float = 0.05):  # fmt: skip
        super().__init__(loop, metrics, getattr(encoder_worker, "device", "cpu"))
        self.encoder = encoder_worker
        self.quantum_s = quantum_s
        self.full_slice_s = full_slice_s
        self._slots: list[Slot] = []  # worker thread only
        self._counted = (encoder_worker.runner.forwards, encoder_worker.runner.forward_streams)  # metrics: seen so far

    async def open_slot(self, session_id: str, sample_rate: int, settings: dict, sink: SlotSink) -> Slot:
        """Open an encoder session (``EncoderWorker.open_session(sample_rate, **settings)``) and start serving it;
        raises what ``open_session`` raises (InvalidInput, UnknownModel). The pair's models load first, on the
        loading thread (``load_pair``), so that the worker thread opens the session without holding the others."""
        k, lmbda = settings.get("k", hub.DEFAULT_K), settings.get("lmbda", hub.DEFAULT_LMBDA)
        await self.load(lambda: self.encoder.load_pair(k, lmbda, score=settings.get("score") is True))

        def _open() -> Slot:
            if settings.get("score") is True and (k, lmbda) not in self.encoder.loaded_pairs():
                raise RuntimeError(f"the unit LM of (k, lambda) = {(k, lmbda)} was unloaded before the session "
                                   "opened; start again")  # fmt: skip
            slot = Slot(session_id, self.encoder.open_session(sample_rate, **settings), sample_rate, sink)
            self._slots.append(slot)
            return slot

        return await self.call(_open)

    async def unload_pair(self, k: int, lmbda: int) -> None:
        """Drop the pair's unit LM (``EncoderWorker.unload_pair``, on the worker thread) once the loads queued before
        have landed; its sessions have ended."""
        await self.loads_done()
        await self.call(lambda: self.encoder.unload_pair(k, lmbda))

    async def warm_up(self, k: int, lmbda: int) -> None:
        """One short stream through the models before clients come (first calls allocate and pick kernels)."""
        await self.call(lambda: warm_up(self.encoder, k, lmbda))

    # --- worker thread -------------------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        """Commands, audio not yet fed, or hops ready: what a resynthesis worker on this thread yields to."""
        return super()._has_work() or any(
            s.queued_samples or s.session.has_work for s in self._slots if not (s.finished or s.cancelled))

    def _round(self) -> bool:
        self._slots = [s for s in self._slots if not (s.cancelled or s.finished)]
        fed = self._feed()
        # Sessions with ready work but no new input (hops beyond the encoder's per-step bound) go along too.
        work = fed + [s for s in self._slots if s not in fed and not s.finished and s.session.has_work]
        if work:
            self._step(work)
            self._collect(work)
        return self._has_work()

    def _feed(self) -> list[Slot]:
        """Push each slot's next quantum of audio (and end() once its queue is empty); return the slots to step."""
        fed = []
        for slot in self._slots:
            chunk = slot.take(max(1, int(self.quantum_s * slot.sample_rate)))
            try:
                if chunk is not None:
                    slot.session.push(chunk)
                    slot.processed_samples += len(chunk)
                if not slot.end_called and slot.wants_end():
                    slot.session.end()
                    slot.end_called = True
            except InvalidInput as e:  # the encoder refused this chunk; the session stays usable
                self._post(slot.sink.on_events, [e], self._progress(slot))
            except Exception as e:  # a bug or a model failure: this session alone is dropped
                self._fail(slot, e)
                continue
            if chunk is not None:
                self._post(slot.sink.on_consumed)
            if chunk is not None or slot.end_called:
                fed.append(slot)
        return fed

    def _step(self, slots: list[Slot]) -> None:
        started = time.perf_counter()
        try:
            self.encoder.step([s.session for s in slots], full_slice_s=self.full_slice_s)
            self._account(time.perf_counter() - started)
        except Exception:
            # Some session's state made the batched step fail: find it by stepping each alone (a failed step has
            # not completed the hops it planned, so the others simply run them now).
            log.warning("batched step of %d sessions failed; retrying one by one", len(slots), exc_info=True)
            for slot in slots:
                t0 = time.perf_counter()
                try:
                    self.encoder.step([slot.session], full_slice_s=self.full_slice_s)
                    self._account(time.perf_counter() - t0)
                except Exception as e:
                    self._fail(slot, e)

    def _account(self, seconds: float) -> None:
        """Busy time counts every step; the step-time and batch histograms only steps that ran the model (most rounds
        only take audio in while no hop is ready: counting them would make batches look smaller than they are)."""
        runner = self.encoder.runner
        forwards, streams = runner.forwards - self._counted[0], runner.forward_streams - self._counted[1]
        self._counted = (runner.forwards, runner.forward_streams)
        if self.metrics is None:
            return
        self.metrics.worker_busy_seconds.inc(seconds)
        if forwards:
            self.metrics.step_seconds.observe(seconds)
            self.metrics.batch_size.observe(streams / forwards)

    def _collect(self, slots: list[Slot]) -> None:
        for slot in slots:
            if slot.finished or slot.cancelled:
                continue
            try:
                events = slot.session.poll()
            except Exception as e:
                self._fail(slot, e)
                continue
            if any(isinstance(ev, EndEvent) for ev in events):
                slot.finished = True
            self._post(slot.sink.on_events, events, self._progress(slot))

    def _progress(self, slot: Slot) -> Progress:
        stats = slot.session.stats
        return Progress(slot.processed_samples, stats.compute_seconds, stats.encoded_seconds, stats.state_nbytes,
                        slot.finished)  # fmt: skip

    def _fail(self, slot: Slot, error: BaseException) -> None:
        log.error("session %s failed in the encoder thread", slot.id, exc_info=error)
        slot.finished = True
        self._post(slot.sink.on_failure, error)


def warm_up(encoder: Any, k: int, lmbda: int, seconds: float = 1.0) -> None:
    """One short stream through an EncoderWorker (first calls allocate and pick kernels); its output is discarded."""
    from dpslm_stream.signals import speech_like

    session = encoder.open_session(16000, k, lmbda)
    session.push(speech_like(seconds, 16000, seed=1))
    session.end()
    for _ in range(1000):
        encoder.step([session])
        if any(isinstance(ev, EndEvent) for ev in session.poll()):
            return


if TYPE_CHECKING:  # mypy checks that the in-process classes implement the declared interfaces

    from dpslm_stream.stream.worker import EncoderWorker

    def _implements(provider: InProcessEncoder, backend: EncoderThread, slot: Slot) -> tuple[EncoderProvider, EncoderBackend, EncoderSlot]:
        return provider, backend, slot

    def _worker(worker: EncoderWorker) -> InProcessWorker:
        return worker
