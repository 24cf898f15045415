"""The gateway's side of the Ray backend: the server's backends (server/backends.py) whose sessions live in Serve
deployments (server/ray_replicas.py) and are reached through their handles.

Each session is pinned to one shard (one Serve application of one replica) when it opens, and a pump task on the
event loop sends its input to that shard in order (one call in flight per session, so the replica batches the calls
of every session that arrive together) and hands the events back to the connection. A call that does not come back
in time (the replica went away and Serve waits for a new one) fails that session alone (``internal_error``).
No Ray import here: the handles are given, and everything else is asyncio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.stream.events import EndEvent
from dpslm_stream.stream.resynth_options import ResynthOptions

from .backends import (EncoderBackend, EncoderProvider, EncoderSessionInfo, EncoderSlot, Progress, ResynthBackend,
                       ResynthProvider, ResynthSink, ResynthStream, SlotSink)
from .encoder_thread import AudioQueue

log = logging.getLogger("dpslm_stream.server")

# How long a gateway waits for a deployment's answer before the session fails (a replica that went away makes Serve
# wait for a new one); `deploy` and the gateway's views of the shards take it as their default.
CALL_TIMEOUT_S = 60.0


async def call_result(response, timeout_s: float):
    """Await a deployment call for at most ``timeout_s``: a replica that went away makes Serve wait for a new one,
    and a session must not hang on that (TimeoutError, and the call is cancelled)."""

    async def awaited():
        return await response

    try:
        return await asyncio.wait_for(asyncio.ensure_future(awaited()), timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise TimeoutError(f"the Ray deployment did not answer within {timeout_s:g} s") from None


class DeploymentWatch:
    """Health of a deployment as the gateway sees it through its calls. ``heartbeat`` is the time of the last reply
    (or of the start of a call made while none was pending: idle time is not a failure); reading it changes
    nothing. The deployment is unhealthy while a call has waited past ``timeout_s`` with no reply since, and after a
    call timed out until the next reply: a hung replica reads as down, not as healthy."""

    def __init__(self, timeout_s: float, clock=time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.heartbeat = clock()
        self.pending = 0
        self.timed_out = False

    @property
    def healthy(self) -> bool:
        return not self.timed_out and not (self.pending and self.clock() - self.heartbeat > self.timeout_s)

    async def result(self, response):
        if not self.pending:
            self.heartbeat = self.clock()
        self.pending += 1
        try:
            out = await call_result(response, self.timeout_s)
        except TimeoutError:
            self.timed_out = True
            raise
        finally:
            self.pending -= 1
        self.heartbeat, self.timed_out = self.clock(), False
        return out


def refusal(answer: dict) -> Exception:
    """The exception of a replica's refused open ({"error": kind, "message": ...}: exceptions do not travel well)."""
    return (UnknownModel if answer["error"] == "unknown_model" else InvalidInput)(answer["message"])


class ShardedBackend:
    """What both Ray backends share: the shards' handles, their calls awaited through a DeploymentWatch (``alive``,
    what /healthz reads, is started and not stopped with the deployment answering in time), and the open pumps,
    each pinned to the shard that had the fewest sessions of this gateway when it opened (opens in flight included:
    sessions that open at once would otherwise all see the same counts and land on one shard)."""

    def __init__(self, handles: list, loop: asyncio.AbstractEventLoop, metrics: Any, call_timeout_s: float):
        self.handles = list(handles)  # one per shard
        self.loop, self.metrics, self.call_timeout_s = loop, metrics, call_timeout_s
        self.watch = DeploymentWatch(call_timeout_s)
        self.pumps: set[SessionPump] = set()
        self._opening = {i: 0 for i in range(len(self.handles))}  # opens awaiting their shard's answer
        self._alive = False

    def start(self) -> None:
        self._alive = True

    def stop(self, timeout: float = 10.0) -> None:
        self._alive = False
        for pump in self.pumps:
            pump.task.cancel()

    def wake(self) -> None:  # each session's pump wakes on its own
        pass

    @property
    def alive(self) -> bool:
        return self._alive and self.watch.healthy

    @property
    def heartbeat(self) -> float:
        return self.watch.heartbeat

    async def result(self, response):
        return await self.watch.result(response)

    def account(self, seconds: float) -> None:
        """One step call of ``seconds`` came back (metrics)."""

    async def unload_pair(self, k: int, lmbda: int) -> None:
        """Every shard drops the pair's large model, unless one of its sessions (another gateway's) still uses it."""
        await asyncio.gather(*(self.result(h.unload_pair.remote(k, lmbda)) for h in self.handles))

    async def open_on_shard(self, call) -> tuple[int, Any]:
        """(shard, answer of ``call(handle)``) on the least loaded shard."""
        load = dict(self._opening)
        for pump in self.pumps:
            load[pump.shard] += 1
        shard = min(load, key=lambda i: (load[i], i))
        self._opening[shard] += 1
        try:
            return shard, await self.result(call(self.handles[shard]))
        finally:
            self._opening[shard] -= 1

    def serve(self, pump: "SessionPump") -> None:
        self.pumps.add(pump)
        pump.task.add_done_callback(lambda _t: self.pumps.discard(pump))


class SessionPump:
    """The pump loop of one remote session: waits for input (or an end, or a cancel), sends it to the session's
    shard as one ``step`` call, hands the reply on, and repeats while the replica says more work is pending. A
    RuntimeError among the events (the replica does not know the session: it restarted) or a failed call ends this
    session alone. Subclasses say what input is pending, what one call sends and what a reply means."""

    what = "session"

    def __init__(self, backend: ShardedBackend, shard: int, session_id: str):
        self.backend, self.shard, self.handle, self.id = backend, shard, backend.handles[shard], session_id
        self._wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._pump())

    def _input_pending(self) -> bool:
        raise NotImplementedError

    def _cancel_requested(self) -> bool:
        raise NotImplementedError

    def _done(self) -> bool:
        raise NotImplementedError

    def _take(self) -> tuple:
        """The next call's item (the session id first); marks its input as sent."""
        raise NotImplementedError

    def _deliver(self, item: tuple, events: list, progress: Any) -> None:
        raise NotImplementedError

    def _fail(self, error: BaseException) -> None:
        raise NotImplementedError

    async def _pump(self) -> None:
        more = False
        try:
            while not self._done():
                if not (more or self._input_pending() or self._cancel_requested()):
                    await self._wake.wait()
                self._wake.clear()
                if self._cancel_requested():
                    await self.backend.result(self.handle.close.remote(self.id))
                    return
                item = self._take()
                started = time.perf_counter()
                # A call that does not come back (the replica is gone and Serve waits for a new one) fails the session
                events, progress, more = await self.backend.result(self.handle.step.remote(item))
                self.backend.account(time.perf_counter() - started)
                failure = next((e for e in events if isinstance(e, RuntimeError)), None)
                if failure is not None:
                    raise failure
                self._deliver(item, events, progress)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica went away or failed on this session: this session alone ends
            log.error("%s %s failed on Ray: %s", self.what, self.id, e)
            self._fail(e)


# --- the encoder ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteModels:
    source: str
    is_random: bool


class RayEncoder:
    """The gateway's view of the Encoder shards, an EncoderProvider (server/backends.py): ``available_pairs``,
    ``models``, and ``make_backend``, the RayEncoderBackend whose per-session pumps talk to the shards."""

    def __init__(self, handles: list, describe: dict, call_timeout_s: float = CALL_TIMEOUT_S):
        self.handles = list(handles)  # one per shard
        self.call_timeout_s = call_timeout_s
        self._pairs = [tuple(p) for p in describe["pairs"]]
        self.models = RemoteModels(describe["models"], describe["random_weights"])

    def available_pairs(self) -> list[tuple[int, int]]:
        return list(self._pairs)

    def make_backend(self, loop: asyncio.AbstractEventLoop, metrics: Any, quantum_s: float) -> "RayEncoderBackend":
        return RayEncoderBackend(self.handles, loop, metrics, quantum_s, self.call_timeout_s)


class RaySlot(AudioQueue, SessionPump):
    """One session of the gateway, served remotely (an EncoderSlot, server/backends.py): the in-process slot's audio
    queue, sent in quanta by its pump."""

    what = "encoder session"

    def __init__(self, backend: "RayEncoderBackend", shard: int, session_id: str, info: EncoderSessionInfo,
                 sample_rate: int, sink: SlotSink):  # fmt: skip
        AudioQueue.__init__(self, session_id, sample_rate, sink)
        self.info = info
        self.quantum_s = backend.quantum_s
        self._end_sent = False
        SessionPump.__init__(self, backend, shard, session_id)

    def add_audio(self, samples: np.ndarray) -> None:
        super().add_audio(samples)
        self._wake.set()

    def request_end(self) -> None:
        super().request_end()
        self._wake.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake.set()

    def _input_pending(self) -> bool:
        return bool(self.queued_samples) or (self.wants_end() and not self._end_sent)

    def _cancel_requested(self) -> bool:
        return self.cancelled

    def _done(self) -> bool:
        return self.finished

    def _take(self) -> tuple:
        chunk = self.take(max(1, int(self.quantum_s * self.sample_rate)))
        end = self.wants_end() and not self._end_sent
        self._end_sent = self._end_sent or end
        return self.id, chunk, end

    def _deliver(self, item: tuple, events: list, progress: Any) -> None:
        chunk = item[1]
        if chunk is not None:
            self.processed_samples += len(chunk)
            self.sink.on_consumed()
        self.finished = any(isinstance(e, EndEvent) for e in events)
        self.sink.on_events(events, Progress(self.processed_samples, progress.get("compute_seconds", 0.0),
                                             progress.get("encoded_seconds", 0.0), progress.get("state_nbytes", 0),
                                             self.finished))  # fmt: skip

    def _fail(self, error: BaseException) -> None:
        self.finished = True
        self.sink.on_failure(error)


class RayEncoderBackend(ShardedBackend):
    """An EncoderBackend (server/backends.py) backed by the Encoder shards (no thread: every call is async)."""

    def __init__(self, handles: list, loop: asyncio.AbstractEventLoop, metrics: Any, quantum_s: float,
                 call_timeout_s: float):  # fmt: skip
        super().__init__(handles, loop, metrics, call_timeout_s)
        self.quantum_s = quantum_s

    def account(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.step_seconds.observe(seconds)
            self.metrics.batch_size.observe(1)  # per gateway call; the replica batches calls across sessions

    async def warm_up(self, k: int, lmbda: int) -> None:  # the replicas warm up in their constructor
        return None

    async def open_slot(self, session_id: str, sample_rate: int, settings: dict, sink: SlotSink) -> RaySlot:
        shard, info = await self.open_on_shard(lambda handle: handle.open.remote(session_id, sample_rate, settings))
        if isinstance(info, dict):
            raise refusal(info)
        slot = RaySlot(self, shard, session_id, info, sample_rate, sink)
        self.serve(slot)
        return slot


# --- resynthesis ------------------------------------------------------------------------------------------------


class RayResynthStream(SessionPump):
    """A ResynthStream (server/backends.py) that lives on Ray: ``push_units``/``end`` queue here, its pump sends them
    to the session's shard in order and hands the events to the connection."""

    what = "resynthesis session"

    def __init__(self, backend: "RayResynthBackend", shard: int, session_id: str, settings: dict, sink: ResynthSink):
        self._settings = settings
        self.sink = sink
        self._units: list[int] = []
        self._ends: list[float | None] = []
        self._ended = self._end_sent = self._cancelled = self.closed = False
        self._lag = 0.0
        super().__init__(backend, shard, session_id)

    def settings(self) -> dict:
        return dict(self._settings)

    def push_units(self, units, end_s=None) -> None:
        self._units.extend(int(u) for u in units)
        self._ends.extend(end_s if end_s is not None else [None] * len(units))
        self._wake.set()

    def end(self) -> None:
        self._ended = True
        self._wake.set()

    @property
    def lag_s(self) -> float:
        return self._lag  # as the replica reported it with the last events

    def cancel(self) -> None:
        self._cancelled = True
        self._wake.set()

    def _input_pending(self) -> bool:
        return bool(self._units) or (self._ended and not self._end_sent)

    def _cancel_requested(self) -> bool:
        return self._cancelled

    def _done(self) -> bool:
        return self.closed

    def _take(self) -> tuple:
        units, ends, self._units, self._ends = self._units, self._ends, [], []
        end = self._ended and not self._end_sent
        self._end_sent = self._end_sent or end
        return self.id, units, ends if units and ends[0] is not None else None, end

    def _deliver(self, item: tuple, events: list, stats: Any) -> None:
        from dpslm_stream.stream.resynth_events import ResynthEndEvent

        if stats is not None:
            self._lag = stats.lag_s
        self.closed = any(isinstance(e, ResynthEndEvent) for e in events)
        if events:
            self.sink.on_resynth_events(events, stats)

    def _fail(self, error: BaseException) -> None:  # the units go on
        self.closed = True
        self.sink.on_resynth_failure(error)


class RayResynthBackend(ShardedBackend):
    """A ResynthBackend (server/backends.py) backed by the Resynth shards."""

    def __init__(self, handles: list, loop: asyncio.AbstractEventLoop, metrics: Any, call_timeout_s: float):
        super().__init__(handles, loop, metrics, call_timeout_s)
        self._ids = itertools.count()

    async def open(self, k: int, lmbda: int, options: ResynthOptions, sink: ResynthSink) -> RayResynthStream:
        sid = f"{os.getpid()}-{next(self._ids)}"
        shard, answer = await self.open_on_shard(lambda handle: handle.open.remote(sid, k, lmbda, options))
        if "error" in answer:
            raise refusal(answer)
        stream = RayResynthStream(self, shard, sid, answer["settings"], sink)
        self.serve(stream)
        return stream

    def close(self, session: RayResynthStream) -> None:
        session.cancel()

    async def warm_up(self, k: int, lmbda: int) -> None:  # the replicas warm up in their constructor
        return None


class RayResynth:
    """The gateway's view of the Resynth shards, a ResynthProvider (server/backends.py)."""

    def __init__(self, handles: list, call_timeout_s: float = CALL_TIMEOUT_S):
        self.handles, self.call_timeout_s = list(handles), call_timeout_s

    def make_backend(self, loop: asyncio.AbstractEventLoop, metrics: Any) -> RayResynthBackend:
        return RayResynthBackend(self.handles, loop, metrics, self.call_timeout_s)


if TYPE_CHECKING:  # mypy checks that the Ray classes implement the declared interfaces

    def _implements(encoder: RayEncoder, backend: RayEncoderBackend, slot: RaySlot, resynth: RayResynth,
                    rbackend: RayResynthBackend, stream: RayResynthStream,
                    ) -> tuple[EncoderProvider, EncoderBackend, EncoderSlot, ResynthProvider, ResynthBackend, ResynthStream]:  # fmt: skip
        return encoder, backend, slot, resynth, rbackend, stream
