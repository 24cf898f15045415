"""The resynthesis worker thread: ELLA-V + WavTokenizer for every session that asked for audio back.

Units are never delayed by audio: the encoder commits units at its own pace, the event loop forwards them here, and
this worker turns them into audio (batched across sessions: one ELLA-V decode step serves every running pass, see
dpslm_stream.stream.resynth_worker). On a GPU it is a thread of its own, whose CUDA stream has the lower priority;
on a CPU the encoder's thread hosts it (server/model_thread.py says why) and each round yields between decode steps
when the encoder has work waiting.

The event loop calls only ``ResynthSession.push_units`` / ``end`` (deque appends, thread-safe by design) and
``open``/``close`` (commands run on this thread, after ``open`` loaded the pair's models on a loading thread); events come back through ``loop.call_soon_threadsafe`` to the
connection's ``on_resynth_events`` / ``on_resynth_failure``. A session whose own processing fails ends alone (its
ResynthEndEvent carries the error); a failure of the whole step is retried one session at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from dpslm_stream.stream.resynth_events import ResynthEndEvent
from dpslm_stream.stream.resynth_options import ResynthOptions

from .backends import ResynthBackend, ResynthProvider, ResynthSink
from .model_thread import ModelThread

log = logging.getLogger("dpslm_stream.server")


class InProcessResynthWorker(Protocol):
    """What the resynthesis thread uses of its ResynthWorker (stream/resynth_worker.py; tests subclass one)."""

    @property
    def device(self) -> Any: ...

    @property
    def open_session(self) -> Callable[..., Any]: ...  # (k, lmbda, **options) -> a ResynthSession

    def warm_up(self, k: int, lmbda: int) -> None: ...

    def load_pair(self, k: int, lmbda: int) -> None: ...  # on the loading thread

    def unload_pair(self, k: int, lmbda: int) -> bool: ...

    def loaded_pairs(self) -> list[tuple[int, int]]: ...

    def step(self, sessions: Iterable[Any], yield_to: Callable[[], bool] | None = None) -> int: ...


class InProcessResynth:
    """A ResynthWorker served by a ResynthThread in this process (a ResynthProvider, server/backends.py)."""

    def __init__(self, resynth_worker: InProcessResynthWorker):
        self.worker = resynth_worker

    def make_backend(self, loop: asyncio.AbstractEventLoop, metrics: Any) -> "ResynthThread":
        return ResynthThread(self.worker, loop, metrics)


class ResynthThread(ModelThread):
    """Owns a ResynthWorker and the ResynthSessions of all connections; steps them in one loop (a ResynthBackend,
    server/backends.py)."""

    name = "dpslm-resynth-worker"

    def __init__(self, resynth_worker: InProcessResynthWorker, loop: asyncio.AbstractEventLoop, metrics=None):
        super().__init__(loop, metrics, resynth_worker.device)
        self.worker = resynth_worker
        self._streams: dict[Any, ResynthSink] = {}  # session -> sink; this thread only

    # --- called from the event loop ---------------------------------------------------------------------------------

    async def open(self, k: int, lmbda: int, options: ResynthOptions, sink: ResynthSink) -> Any:
        """Open a ResynthSession (``ResynthWorker.open_session(k, lmbda, **options.kwargs())``) and serve it; raises
        what ``open_session`` raises (InvalidInput, UnknownModel). ELLA-V and WavTokenizer load first, on the loading
        thread (``load_pair``; server/model_thread.py says why)."""
        await self.load(lambda: self.worker.load_pair(k, lmbda))

        def _open():
            if (k, lmbda) not in self.worker.loaded_pairs():
                raise RuntimeError(f"ELLA-V (k, lambda) = {(k, lmbda)} was unloaded before the stream opened; start "
                                   "again")  # fmt: skip
            session = self.worker.open_session(k, lmbda, **options.kwargs())
            self._streams[session] = sink
            return session

        return await self.call(_open)

    async def warm_up(self, k: int, lmbda: int) -> None:
        """ResynthWorker.warm_up on this thread (models loaded, decode step compiled)."""
        await self.call(lambda: self.worker.warm_up(k, lmbda))

    async def unload_pair(self, k: int, lmbda: int) -> None:
        """Drop ELLA-V (k, lambda) (``ResynthWorker.unload_pair``, on this thread) once the loads queued before have
        landed; its streams have ended."""
        await self.loads_done()
        await self.call(lambda: self.worker.unload_pair(k, lmbda))

    def close(self, session: Any) -> None:
        """Stop serving a session (its connection is gone); it is dropped at the next round."""
        self._commands.put((lambda: self._drop(session), concurrent.futures.Future()))
        self._wake.set()

    # --- this thread ------------------------------------------------------------------------------------------------

    def _drop(self, session: Any) -> None:
        if self._streams.pop(session, None) is not None:
            session.close()  # frees its row in the batched decoder

    def _round(self) -> bool:
        work = [s for s in self._streams if s.has_work]
        if not work:
            return False
        self._step(work)
        for s in work:
            sink = self._streams.get(s)
            events = s.poll()
            if sink is not None and events:
                self._post(sink.on_resynth_events, events, s.stats)
            if any(isinstance(e, ResynthEndEvent) for e in events):
                self._streams.pop(s, None)
        return any(s.has_work for s in self._streams)

    def _step(self, sessions: list) -> None:
        started = time.perf_counter()
        try:
            self.worker.step(sessions, yield_to=self._yield_to)
        except Exception:
            log.warning("batched resynthesis step of %d sessions failed; retrying one by one", len(sessions),
                        exc_info=True)  # fmt: skip
            for s in sessions:
                try:
                    self.worker.step([s])
                except Exception as e:  # this session alone is dropped
                    log.error("resynthesis of one session failed", exc_info=e)
                    sink = self._streams.pop(s, None)
                    s.close()
                    if sink is not None:
                        self._post(sink.on_resynth_failure, e)
        if self.metrics is not None:
            self.metrics.resynth_step_seconds.observe(time.perf_counter() - started)
            self.metrics.resynth_batch_size.observe(len(sessions))


if TYPE_CHECKING:  # mypy checks that the in-process classes implement the declared interfaces

    from dpslm_stream.stream.resynth_worker import ResynthWorker

    def _implements(provider: InProcessResynth, backend: ResynthThread) -> tuple[ResynthProvider, ResynthBackend]:
        return provider, backend

    def _worker(worker: ResynthWorker) -> InProcessResynthWorker:
        return worker
