"""The encoder on Ray Serve: the same server, clients and protocol, with the model work in a Serve deployment.

    dpslm-stream serve --backend ray [--ray-address auto] [--encoder-shards N]

Shape (docs/references.md §Serving): the WebSocket sessions and all their protocol state stay in the gateway (the same
asyncio ``Server`` as the in-process backend, so the same clients, page and protocol; with ``serve --backend ray`` it
runs as the ``Gateway`` deployment of one Serve application, see ``service_app``), and each
session's encoder state (resampler tail, window caches, DPDP survivors) lives in the ``Encoder`` deployment and its
resynthesis state (ELLA-V window and pass, vocoder window) in the ``Resynth`` deployment. Its
``step`` is a ``@serve.batch`` method: the calls that arrive together from every session go through one
``EncoderWorker.step`` (one batched forward), or one ``ResynthWorker.step`` (one batched ELLA-V decode step). A replica that goes away ends its sessions with
``internal_error`` (close 1011); clients reconnect and get a new session.

Sessions are stateful and a Serve handle routes each call to any replica of a deployment, so the encoder scales by
*shards*: N Serve applications of one replica each (GPU-sized); the gateway pins each session to the shard with the
fewest sessions when it opens and talks to that shard's handle for the rest of the session. More gateways (each with
its shards) scale past one gateway's event loop, behind a WebSocket-aware load balancer.
Ray is an optional extra (``pip install -e '.[ray]' in the dpslm-stream checkout``): this module imports it only when a
Ray backend is made, and the rest of the package imports this module only inside the functions that ask for Ray
(``serve --backend ray`` in server/cli.py, ``bench server --backend ray``), never at import time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dpslm_stream.errors import DPSLMError, InvalidInput, UnknownModel
from dpslm_stream.stream.events import EndEvent
from dpslm_stream.stream.resynth_options import ResynthOptions

from .backends import (EncoderBackend, EncoderProvider, EncoderSessionInfo, EncoderSlot, Progress, ResynthBackend,
                       ResynthProvider, ResynthSink, ResynthStream, SlotSink)
from .worker import AudioQueue

log = logging.getLogger("dpslm_stream.server")


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise DPSLMError(f"the Ray backend needs Ray Serve: pip install -e '.[ray]' in the dpslm-stream checkout ({e})") from None
    return ray, serve


class EncoderReplica:
    """The body of the ``Encoder`` deployment: an EncoderWorker and its sessions, keyed by the gateway's id.
    A plain class, so it can be tested without Ray; ``serve_deployment`` wraps it for Serve."""

    def __init__(self, models: str, device: str = "cpu", dtype: str = "float32", pairs=None, warmup: bool = True,
                 allow_tf32: bool = False):  # fmt: skip
        import torch

        from dpslm_stream import hub
        from dpslm_stream.device import replica_device
        from dpslm_stream.stream.worker import EncoderWorker

        device = str(replica_device(device))  # Ray renumbers the GPUs it grants (CUDA_VISIBLE_DEVICES)
        if models == "full":  # benchmarks: WavLM-Large dimensions with RANDOM weights (dpslm_stream.bench._models)
            from dpslm_stream.bench._models import full_size_encoder_worker

            self.worker = full_size_encoder_worker(device, allow_tf32=allow_tf32)
        else:
            self.worker = EncoderWorker(hub.ModelSet(models), device=device, dtype=getattr(torch, dtype),
                                        pairs=list(pairs) if pairs else None, allow_tf32=allow_tf32)  # fmt: skip
        self.sessions: dict[str, Any] = {}
        self.max_batch = 0  # most calls served by one step (the batching the tests check)
        self.lock = threading.Lock()  # one EncoderWorker.step at a time (batches may run in a thread pool)
        if warmup:
            from .worker import warm_up

            warm_up(self.worker, *self.default_pair())

    def describe(self) -> dict:
        models = self.worker.models
        return {"pairs": [list(p) for p in self.worker.available_pairs()], "models": models.source,
                "random_weights": models.is_random, "max_batch": self.max_batch, "sessions": len(self.sessions)}  # fmt: skip

    def default_pair(self) -> tuple[int, int]:
        from dpslm_stream import hub

        pairs = self.worker.available_pairs()
        default = (hub.DEFAULT_K, hub.DEFAULT_LMBDA)
        return default if default in pairs or not pairs else pairs[0]

    def open(self, session_id: str, sample_rate: int, settings: dict) -> EncoderSessionInfo | dict:
        """Open a session; a refusal comes back as {"error": kind, "message": ...} (exceptions do not travel well)."""
        try:
            with self.lock:
                s = self.worker.open_session(sample_rate, **settings)
        except UnknownModel as e:
            return {"error": "unknown_model", "message": str(e)}
        except (InvalidInput, TypeError) as e:
            return {"error": "invalid_input", "message": str(e)}
        self.sessions[session_id] = s
        return EncoderSessionInfo.of(s)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def step_many(self, items: list[tuple[str, np.ndarray | None, bool]]) -> list[tuple[list, dict, bool]]:
        """Each item: (session id, new samples or None, end). Pushes them, runs ONE batched step over all their
        sessions, and returns per item (events, progress fields, more work pending)."""
        with self.lock:
            self.max_batch = max(self.max_batch, len(items))
            sessions: list = []
            errors: dict[int, Any] = {}
            for i, (sid, chunk, end) in enumerate(items):
                s = self.sessions.get(sid)
                if s is None:
                    errors[i] = f"session {sid} is not open on this replica (it restarted?)"
                    continue
                try:
                    if chunk is not None:
                        s.push(chunk)
                    if end:
                        s.end()
                except InvalidInput as e:  # the chunk is refused; the session goes on
                    errors[i] = e
                sessions.append(s)
            self.worker.step(sessions)
            out: list[tuple[list, dict, bool]] = []
            for i, (sid, _, _) in enumerate(items):
                s = self.sessions.get(sid)
                if s is None:
                    out.append(([RuntimeError(errors[i])], {}, False))
                    continue
                events = s.poll()
                if i in errors:
                    events.insert(0, errors[i])
                st = s.stats
                progress = {"compute_seconds": st.compute_seconds, "encoded_seconds": st.encoded_seconds,
                            "state_nbytes": st.state_nbytes}  # fmt: skip
                done = any(isinstance(e, EndEvent) for e in events)
                if done:
                    self.sessions.pop(sid, None)
                out.append((events, progress, s.has_work and not done))
            return out


def serve_deployment(body: type, name: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
                     max_ongoing_requests: int = 256, max_batch_size: int = 64, batch_wait_timeout_s: float = 0.005):  # fmt: skip
    """A one-replica Serve deployment of ``body`` (EncoderReplica or ResynthReplica) with a ``@serve.batch`` ``step``:
    the calls that arrive together, from every session, go through one ``body.step_many``, i.e. one batched forward
    (or ELLA-V decode step). Built here so that importing this module needs no Ray."""
    ray, serve = import_ray()

    # max_ongoing_requests bounds the batch size (ray-project/ray#43288): one call in flight per session.
    @serve.deployment(name=name, num_replicas=1, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})  # fmt: skip
    class Deployment(body):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._steps_open = asyncio.Event()  # cleared by hold_steps: calls wait before they join a batch
            self._steps_open.set()
            self._steps_waiting = 0

        async def step(self, item):
            """One session's call; the calls that arrive together go through one batched ``step_many``."""
            if not self._steps_open.is_set():
                self._steps_waiting += 1
                try:
                    await self._steps_open.wait()
                finally:
                    self._steps_waiting -= 1
            return await self._step_batch(item)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _step_batch(self, items: list) -> list:
            return await asyncio.to_thread(self.step_many, items)

        # Hold and release (async: they run on the replica's event loop, as `step` does). While held, calls wait and
        # are counted; on release they all join the batch queue in one loop iteration, so they form one batch: the
        # tests prove batching with this, independently of how fast the machine delivers the calls.
        async def hold_steps(self) -> None:
            self._steps_open.clear()

        async def release_steps(self) -> None:
            self._steps_open.set()

        async def steps_waiting(self) -> int:
            return self._steps_waiting

    return Deployment


@dataclass(frozen=True)
class RemoteModels:
    source: str
    is_random: bool


class RayEncoder:
    """The gateway's view of the Encoder deployment, an EncoderProvider (server/backends.py): ``available_pairs``,
    ``models``, and ``make_backend``, the RayModelWorker whose per-session pumps talk to the deployment."""

    def __init__(self, handles: list, describe: dict, call_timeout_s: float = 60.0):
        self.handles = list(handles)  # one per shard
        self.call_timeout_s = call_timeout_s
        self._pairs = [tuple(p) for p in describe["pairs"]]
        self.models = RemoteModels(describe["models"], describe["random_weights"])

    def available_pairs(self) -> list[tuple[int, int]]:
        return list(self._pairs)

    def make_backend(self, loop, metrics=None, quantum_s: float = 0.5) -> "RayModelWorker":
        return RayModelWorker(self.handles, loop, metrics, quantum_s, self.call_timeout_s)


class RaySlot(AudioQueue):
    """One session of the gateway, served remotely (an EncoderSlot, server/backends.py): the in-process slot's audio
    queue, driven by a pump task on the event loop that sends the audio in order and hands the events back."""

    def __init__(self, worker: "RayModelWorker", shard: int, handle, session_id: str, info: EncoderSessionInfo,
                 sample_rate: int, sink: SlotSink):  # fmt: skip
        self._wake = asyncio.Event()
        super().__init__(session_id, sample_rate, sink)
        self.info = info
        self.worker = worker
        self.shard, self.handle = shard, handle  # the session's shard, for its whole life
        self._task = asyncio.ensure_future(self._pump())

    def add_audio(self, samples: np.ndarray) -> None:
        super().add_audio(samples)
        self._wake.set()

    def request_end(self) -> None:
        super().request_end()
        self._wake.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake.set()

    async def _pump(self) -> None:
        handle, end_sent, more = self.handle, False, False
        try:
            while not self.finished:
                if not (more or self.queued_samples or (self.wants_end() and not end_sent) or self.cancelled):
                    await self._wake.wait()
                self._wake.clear()
                if self.cancelled:
                    await self.worker.result(handle.close.remote(self.id))
                    return
                chunk = self.take(max(1, int(self.worker.quantum_s * self.sample_rate)))
                end = self.wants_end() and not end_sent
                started = time.perf_counter()
                # A call that does not come back (the replica is gone and Serve waits for a new one) fails the session
                events, progress, more = await self.worker.result(handle.step.remote((self.id, chunk, end)))
                self.worker.account(time.perf_counter() - started)
                end_sent = end_sent or end
                if chunk is not None:
                    self.processed_samples += len(chunk)
                    self.sink.on_consumed()
                failure = next((e for e in events if isinstance(e, RuntimeError)), None)
                if failure is not None:
                    raise failure
                self.finished = any(isinstance(e, EndEvent) for e in events)
                self.sink.on_events(events, Progress(self.processed_samples, progress.get("compute_seconds", 0.0),
                                                     progress.get("encoded_seconds", 0.0),
                                                     progress.get("state_nbytes", 0), self.finished))  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica went away or failed on this session: this session alone ends
            log.error("session %s: the encoder deployment failed: %s", self.id, e)
            self.finished = True
            self.sink.on_failure(e)


class WatchedCalls:
    """The gateway side of a deployment's calls: ``result`` awaits one through a DeploymentWatch; ``alive`` (what
    /healthz reads) is started and not stopped, with the deployment answering in time."""

    watch: DeploymentWatch
    _alive: bool

    def start(self) -> None:
        self._alive = True

    @property
    def alive(self) -> bool:
        return self._alive and self.watch.healthy

    @property
    def heartbeat(self) -> float:
        return self.watch.heartbeat

    async def result(self, response):
        return await self.watch.result(response)


class RayModelWorker(WatchedCalls):
    """An EncoderBackend (server/backends.py) backed by the Encoder deployment (no thread: every call is async)."""

    def __init__(self, handles: list, loop: asyncio.AbstractEventLoop, metrics=None, quantum_s: float = 0.5,
                 call_timeout_s: float = 60.0):  # fmt: skip
        self.handles = list(handles)
        self.call_timeout_s = call_timeout_s
        self.loop = loop
        self.metrics = metrics
        self.quantum_s = quantum_s
        self.watch = DeploymentWatch(call_timeout_s)
        self._slots: set[RaySlot] = set()
        self._opening = {i: 0 for i in range(len(self.handles))}  # opens awaiting their shard's answer
        self._alive = False

    def stop(self, timeout: float = 10.0) -> None:
        self._alive = False
        for slot in self._slots:
            slot._task.cancel()

    def wake(self) -> None:  # each slot's pump wakes on its own events
        pass

    def account(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.step_seconds.observe(seconds)
            self.metrics.batch_size.observe(1)  # per gateway call; the replica batches calls across sessions

    async def warm_up(self, k: int, lmbda: int) -> None:  # the replicas warm up in their constructor
        return None

    async def open_slot(self, session_id: str, sample_rate: int, settings: dict, sink: SlotSink) -> RaySlot:
        # Pin the session to the shard with the fewest sessions of this gateway, opens in flight included (sessions
        # that open at once would otherwise all see the same counts and land on one shard).
        load = dict(self._opening)
        for slot in self._slots:
            load[slot.shard] += 1
        shard = min(load, key=lambda i: (load[i], i))
        handle = self.handles[shard]
        self._opening[shard] += 1
        try:
            info = await self.result(handle.open.remote(session_id, sample_rate, settings))
        finally:
            self._opening[shard] -= 1
        if isinstance(info, dict):
            raise (UnknownModel if info["error"] == "unknown_model" else InvalidInput)(info["message"])
        slot = RaySlot(self, shard, handle, session_id, info, sample_rate, sink)
        self._slots.add(slot)
        slot._task.add_done_callback(lambda _t: self._slots.discard(slot))
        return slot


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


def gpu_fractions(encoder_device: str, resynth_device: str | None, encoder_shards: int, resynth_shards: int,
                  encoder_gpus: float | None = None, resynth_gpus: float | None = None) -> tuple[float, float]:
    """The GPU share each encoder and each resynthesis shard asks Ray for (num_gpus). Shards off CUDA ask for none;
    by default every CUDA shard shares one GPU (1 / the number of CUDA shards: 0.5 each for one encoder and one
    resynthesis shard), so the service schedules on a one-GPU host; ``encoder_gpus`` / ``resynth_gpus`` override."""
    on_cuda = lambda device: device is not None and str(device).startswith("cuda")  # noqa: E731
    n = encoder_shards * on_cuda(encoder_device) + resynth_shards * on_cuda(resynth_device)
    share = 1.0 / n if n else 0.0
    for name, value in (("encoder_gpus", encoder_gpus), ("resynth_gpus", resynth_gpus)):
        if value is not None and not 0.0 <= value <= 1.0 and not (value > 1 and float(value).is_integer()):
            raise InvalidInput(f"{name} must be a fraction in 0..1 or a whole number of GPUs, got {value!r}")
    enc = (share if encoder_gpus is None else encoder_gpus) if on_cuda(encoder_device) else 0.0
    res = (share if resynth_gpus is None else resynth_gpus) if on_cuda(resynth_device) else 0.0
    return enc, res


_app_ids = itertools.count()


def start_ray_encoder(config, *, address: str | None = None, num_cpus: float | None = None, shards: int = 1,
                      replica_cpus: float = 1.0, call_timeout_s: float = 60.0,
                      gpus: float | None = None) -> RayEncoder:  # fmt: skip
    """Start (or join, with ``address``) Ray, deploy ``shards`` Encoder applications for ``config`` (a ServerConfig)
    and return the gateway's RayEncoder. Tests pass ``num_cpus`` for a local Ray on loopback."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InvalidInput(f"shards must be a positive integer, got {shards!r}")
    ray, serve = import_ray()
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False,
                                                       "_node_ip_address": "127.0.0.1"}  # fmt: skip
        ray.init(log_to_driver=False, **kwargs)
    serve.start(proxy_location="Disabled")  # the gateway is the WebSocket front; Serve needs no HTTP proxy here
    gpus, _ = gpu_fractions(config.device, None, shards, 0, encoder_gpus=gpus)
    Encoder = serve_deployment(EncoderReplica, "Encoder", num_cpus=replica_cpus, num_gpus=gpus,
                               max_ongoing_requests=2 * config.max_sessions + 8)  # fmt: skip
    app = Encoder.bind(config.models, config.device, config.dtype, config.pairs, config.warmup, config.allow_tf32)
    gateway = next(_app_ids)
    handles = [serve.run(app, name=f"dpslm-encoder-{os.getpid()}-{gateway}-{i}", route_prefix=None)
               for i in range(shards)]  # fmt: skip
    describe = handles[0].describe.remote().result()
    return RayEncoder(handles, describe, call_timeout_s)


# --------------------------------------------------------------------------------------------------------------------
# Resynthesis on Ray: the same shape. A session's ELLA-V window, pass and vocoder state live in one shard's replica;
# the gateway forwards its committed units and receives its audio chunks.


class ResynthReplica:
    """The body of the ``Resynth`` deployment: a ResynthWorker and its sessions (plain class: testable without Ray)."""

    def __init__(self, models: str, device: str = "cpu", dtype: str = "float32", worker_options: dict | None = None,
                 allow_tf32: bool = False):  # fmt: skip
        import torch

        from dpslm_stream import hub
        from dpslm_stream.device import replica_device
        from dpslm_stream.stream.resynth_worker import ResynthWorker

        device = str(replica_device(device))  # Ray renumbers the GPUs it grants (CUDA_VISIBLE_DEVICES)
        self.worker = ResynthWorker(hub.ModelSet(models), device=device, dtype=getattr(torch, dtype),
                                    allow_tf32=allow_tf32, **(worker_options or {}))  # fmt: skip
        self.sessions: dict[str, Any] = {}
        self.max_batch = 0
        self.lock = threading.Lock()

    def describe(self) -> dict:
        return {"max_batch": self.max_batch, "sessions": len(self.sessions)}

    def open(self, session_id: str, k: int, lmbda: int, options: ResynthOptions) -> dict:
        """The stream's resolved settings, or {"error": kind, "message": ...}."""
        try:
            with self.lock:
                s = self.worker.open_session(k, lmbda, **options.kwargs())
        except UnknownModel as e:
            return {"error": "unknown_model", "message": str(e)}
        except (InvalidInput, TypeError) as e:
            return {"error": "invalid_input", "message": str(e)}
        self.sessions[session_id] = s
        return {"settings": s.settings()}

    def close(self, session_id: str) -> None:
        with self.lock:
            s = self.sessions.pop(session_id, None)
            if s is not None and not s.closed:
                self.worker._forget(s)

    def step_many(self, items: list[tuple[str, list, list, bool]]) -> list[tuple[list, Any, bool]]:
        """Each item: (session id, new units, their end times, end). One batched ResynthWorker.step for all of them;
        per item (events, stats, more work pending)."""
        from dpslm_stream.stream.resynth_events import ResynthEndEvent

        with self.lock:
            self.max_batch = max(self.max_batch, len(items))
            sessions, out = [], []
            for sid, units, ends, end in items:
                s = self.sessions.get(sid)
                if s is not None:
                    if units:
                        s.push_units(units, ends)
                    if end and not s.ended:
                        s.end()
                    sessions.append(s)
            self.worker.step(sessions)
            for sid, _, _, _ in items:
                s = self.sessions.get(sid)
                if s is None:
                    out.append(([RuntimeError(f"resynthesis session {sid} is not open on this replica")], None, False))
                    continue
                events = s.poll()
                done = any(isinstance(e, ResynthEndEvent) for e in events)
                if done:
                    self.sessions.pop(sid, None)
                out.append((events, s.stats, s.has_work and not done))
            return out


class RemoteResynthSession:
    """A ResynthStream (server/backends.py) that lives on Ray: ``push_units``/``end`` queue here, a pump task sends
    them to the session's shard in order and hands the events to the connection."""

    def __init__(self, thread: "RayResynthThread", shard: int, handle, session_id: str, settings: dict,
                 sink: ResynthSink):  # fmt: skip
        self.thread, self.shard, self.handle, self.id = thread, shard, handle, session_id
        self._settings = settings
        self.sink = sink
        self._units: list[int] = []
        self._ends: list[float | None] = []
        self._ended = self._end_sent = self._cancelled = self.closed = False
        self._lag = 0.0
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._pump())

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

    async def _pump(self) -> None:
        from dpslm_stream.stream.resynth_events import ResynthEndEvent

        more = False
        try:
            while not self.closed:
                if not (more or self._units or (self._ended and not self._end_sent) or self._cancelled):
                    await self._wake.wait()
                self._wake.clear()
                if self._cancelled:
                    await self.thread.result(self.handle.close.remote(self.id))
                    return
                units, ends, self._units, self._ends = self._units, self._ends, [], []
                end = self._ended and not self._end_sent
                events, stats, more = await self.thread.result(
                    self.handle.step.remote((self.id, units, ends if units and ends[0] is not None else None, end)))
                self._end_sent = self._end_sent or end
                failure = next((e for e in events if isinstance(e, RuntimeError)), None)
                if failure is not None:
                    raise failure
                if stats is not None:
                    self._lag = stats.lag_s
                self.closed = any(isinstance(e, ResynthEndEvent) for e in events)
                if events:
                    self.sink.on_resynth_events(events, stats)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica went away or failed on this stream: the units go on
            log.error("resynthesis session %s failed on Ray: %s", self.id, e)
            self.closed = True
            self.sink.on_resynth_failure(e)


class RayResynthThread(WatchedCalls):
    """A ResynthBackend (server/backends.py) backed by Resynth shards."""

    def __init__(self, handles: list, loop, metrics=None, call_timeout_s: float = 60.0):
        self.handles = list(handles)
        self.loop, self.metrics, self.call_timeout_s = loop, metrics, call_timeout_s
        self.watch = DeploymentWatch(call_timeout_s)
        self._sessions: set[RemoteResynthSession] = set()
        self._ids = itertools.count()
        self._alive = False

    def stop(self, timeout: float = 10.0) -> None:
        self._alive = False
        for s in self._sessions:
            s._task.cancel()

    def wake(self) -> None:  # each session's pump wakes on its own
        pass

    async def open(self, k: int, lmbda: int, options: ResynthOptions, sink: ResynthSink) -> RemoteResynthSession:
        load = {h: 0 for h in range(len(self.handles))}
        for s in self._sessions:
            load[s.shard] += 1
        shard = min(load, key=lambda i: (load[i], i))
        sid = f"{os.getpid()}-{next(self._ids)}"
        answer = await self.result(self.handles[shard].open.remote(sid, k, lmbda, options))
        if "error" in answer:
            raise (UnknownModel if answer["error"] == "unknown_model" else InvalidInput)(answer["message"])
        session = RemoteResynthSession(self, shard, self.handles[shard], sid, answer["settings"], sink)
        self._sessions.add(session)
        session._task.add_done_callback(lambda _t: self._sessions.discard(session))
        return session

    def close(self, session: RemoteResynthSession) -> None:
        session.cancel()


class RayResynth:
    """The gateway's view of the Resynth shards, a ResynthProvider (server/backends.py)."""

    def __init__(self, handles: list, call_timeout_s: float = 60.0):
        self.handles, self.call_timeout_s = list(handles), call_timeout_s

    def make_backend(self, loop, metrics=None) -> RayResynthThread:
        return RayResynthThread(self.handles, loop, metrics, self.call_timeout_s)


def start_ray_resynth(config, *, shards: int = 1, replica_cpus: float = 1.0, call_timeout_s: float = 60.0,
                      worker_options: dict | None = None, gpus: float | None = None) -> RayResynth:  # fmt: skip
    """Deploy ``shards`` Resynth applications for ``config`` on the Ray that start_ray_encoder started or joined."""
    ray, serve = import_ray()
    if not ray.is_initialized():
        raise InvalidInput("start_ray_resynth needs Ray to be running: call start_ray_encoder first")
    device = config.resynth_device or config.device
    _, gpus = gpu_fractions("cpu", device, 0, shards, resynth_gpus=gpus)
    Resynth = serve_deployment(ResynthReplica, "Resynth", num_cpus=replica_cpus, num_gpus=gpus,
                               max_ongoing_requests=2 * config.max_sessions + 8)  # fmt: skip
    app = Resynth.bind(config.models, device, config.resynth_dtype, worker_options, config.allow_tf32)
    gateway = next(_app_ids)
    handles = [serve.run(app, name=f"dpslm-resynth-{os.getpid()}-{gateway}-{i}", route_prefix=None)
               for i in range(shards)]  # fmt: skip
    return RayResynth(handles, call_timeout_s)


# --------------------------------------------------------------------------------------------------------------------
# The whole service as one Serve application: a Gateway deployment (the live server, holding the WebSockets) bound to
# the Encoder and Resynth shards. `dpslm-stream serve --backend ray` runs this.


class GatewayReplica:
    """The body of the ``Gateway`` deployment: the live server (server/app.py, the same code as the in-process
    backend) on its own thread and event loop in this replica, talking to the shards it was bound to."""

    async def __init__(self, config, encoder_handles: list, resynth_handles: list,  # type: ignore[misc]
                       call_timeout_s: float = 60.0):  # Serve awaits an async constructor
        from .app import ServerThread

        describe = await encoder_handles[0].describe.remote()  # a replica's constructor runs on its event loop
        encoder = RayEncoder(encoder_handles, describe, call_timeout_s)
        resynth = RayResynth(resynth_handles, call_timeout_s) if resynth_handles else None
        self.server = await asyncio.to_thread(ServerThread(config, encoder=encoder, resynth=resynth).start)

    def address(self) -> dict:
        """Where clients connect (the replica's node; the config's host and port, port 0 = the one it got)."""
        return {"url": self.server.url, "http_url": self.server.http_url, "port": self.server.port}

    def __del__(self):  # Serve's graceful shutdown of the replica: drain the sessions (SIGTERM semantics)
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def service_app(config, *, encoder_shards: int = 1, resynth_shards: int = 1, shard_cpus: float = 1.0,
                gateway_cpus: float = 0.5, gateway_resource: str | None = None, call_timeout_s: float = 60.0,
                encoder_gpus: float | None = None, resynth_gpus: float | None = None):  # fmt: skip
    """The Serve application: Gateway(config) bound to ``encoder_shards`` Encoder and ``resynth_shards`` Resynth
    deployments (one replica each; none of the latter when config.resynth is off; GPU shares: ``gpu_fractions``,
    by default all CUDA shards share one GPU). The gateway listens on the
    config's host and port on its node; ``gateway_resource`` (a Ray custom resource that only the node(s) behind
    the load balancer have) decides which node that is."""
    ray, serve = import_ray()
    for name, value in (("encoder_shards", encoder_shards), ("resynth_shards", resynth_shards)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    device = config.resynth_device or config.device
    enc_gpus, res_gpus = gpu_fractions(config.device, device if config.resynth else None, encoder_shards,
                                       resynth_shards, encoder_gpus, resynth_gpus)  # fmt: skip
    limit = 2 * config.max_sessions + 8
    encoders = [serve_deployment(EncoderReplica, f"Encoder{i}", num_cpus=shard_cpus, num_gpus=enc_gpus,
                                 max_ongoing_requests=limit).bind(config.models, config.device, config.dtype,
                                                                  config.pairs, config.warmup, config.allow_tf32)
                for i in range(encoder_shards)]  # fmt: skip
    resynths = [serve_deployment(ResynthReplica, f"Resynth{i}", num_cpus=shard_cpus, num_gpus=res_gpus,
                                 max_ongoing_requests=limit).bind(config.models, device, config.resynth_dtype,
                                                                  None, config.allow_tf32)
                for i in range(resynth_shards if config.resynth else 0)]  # fmt: skip
    gateway = serve.deployment(name="Gateway", num_replicas=1, max_ongoing_requests=8,
                               graceful_shutdown_timeout_s=config.drain_timeout_s + 5,
                               ray_actor_options={"num_cpus": gateway_cpus, "resources":
                                                  {gateway_resource: 1} if gateway_resource else {}})(GatewayReplica)  # fmt: skip
    return gateway.bind(config, encoders, resynths, call_timeout_s)


def run_service(config, *, address: str | None = None, num_cpus: float | None = None, name: str = "dpslm-stream",
                **app_options):  # fmt: skip
    """Start (or join) Ray, run the service application, and return (its Gateway handle, the gateway's address)."""
    ray, serve = import_ray()
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False,
                                                       "_node_ip_address": "127.0.0.1"}  # fmt: skip
        ray.init(log_to_driver=False, **kwargs)
    serve.start(proxy_location="Disabled")  # clients speak WebSocket to the Gateway itself, not to Serve's proxy
    if app_options.get("shard_cpus") is None:  # fit a small machine: share what Ray has, at most 1 CPU per shard
        shards = app_options.get("encoder_shards", 1) + (app_options.get("resynth_shards", 1) if config.resynth else 0)
        free = ray.available_resources().get("CPU", 1.0) - app_options.get("gateway_cpus", 0.5)
        app_options["shard_cpus"] = max(0.1, min(1.0, free / shards))
    handle = serve.run(service_app(config, **app_options), name=name, route_prefix=None)
    return handle, handle.address.remote().result()


if TYPE_CHECKING:  # mypy checks that the Ray classes implement the declared interfaces

    def _implements(encoder: RayEncoder, backend: RayModelWorker, slot: RaySlot, resynth: RayResynth,
                    rbackend: RayResynthThread, stream: RemoteResynthSession,
                    ) -> tuple[EncoderProvider, EncoderBackend, EncoderSlot, ResynthProvider, ResynthBackend, ResynthStream]:  # fmt: skip
        return encoder, backend, slot, resynth, rbackend, stream
