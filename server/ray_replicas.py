"""The replicas' side of the Ray backend: what runs inside the Encoder and Resynth deployments.

A replica body is a plain class (testable without Ray) that owns one model owner (an EncoderWorker or a
ResynthWorker, built from the ServerConfig by the same functions as the in-process server, so every serve option,
``--precision`` included, means the same on both backends) and the sessions of the gateways that use it, keyed by
the gateway's session id. ``serve_deployment`` wraps a body for Serve with a ``@serve.batch`` step: the calls that
arrive together from every session go through one ``step_many``, i.e. one batched forward (or ELLA-V decode step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from typing import Any

import numpy as np

from dpslm_stream import hub
from dpslm_stream.device import release_cpu_threads, releasing_cpu_threads
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.raycluster import import_ray
from dpslm_stream.stream.events import EndEvent
from dpslm_stream.stream.resynth_options import ResynthOptions

from .backends import EncoderSessionInfo
from .config import ServerConfig


def _on_replica_device(config: ServerConfig) -> ServerConfig:
    from dpslm_stream.device import replica_device

    # Ray renumbers the GPUs it grants (CUDA_VISIBLE_DEVICES)
    resynth_device = config.resynth_device or config.device
    return dataclasses.replace(config, device=str(replica_device(config.device)),
                               resynth_device=str(replica_device(resynth_device)))  # fmt: skip


class ShardReplica:
    """What both replica bodies share: their sessions, one step at a time, the largest batch served (what the tests
    check), and ``step``, the one call a session's pump makes (the deployment adds ``_step_batch``, which gathers the
    calls that arrive together into one ``step_many``).

    Batches run on one thread of the replica's own (``model_thread``), always the same: every thread that runs
    parallel CPU ops keeps an OpenMP team, and idle teams slow the working one (dpslm_stream/device.py
    ``release_cpu_threads``, which the bodies call once their models are built)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}
        self.max_batch = 0
        self.lock = threading.Lock()
        self.model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpslm-replica")
        # A pair's models load here, not on model_thread, whose batches go on meanwhile (server/model_thread.py).
        self.loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpslm-replica-loader")

    async def step(self, item):
        """One session's call; the calls that arrive together go through one batched ``step_many``."""
        return await self._step_batch(item)  # type: ignore[attr-defined]  # serve_deployment adds it

    def _open(self, session_id: str, load_pair, open_session) -> Any:
        """``load_pair()`` on the loading thread, then ``open_session()`` on the model thread under the lock, kept
        as ``session_id``; a refusal is {"error": kind, "message": ...} (exceptions do not travel well). A session's
        first tensors are large enough for parallel CPU ops: run on the caller's thread, they would give it a team of
        its own again (the loading thread frees its team after each load)."""

        def locked() -> Any:
            with self.lock:
                return open_session()

        try:
            self.loader.submit(releasing_cpu_threads(load_pair)).result()
            session = self.model_thread.submit(locked).result()
        except UnknownModel as e:
            return {"error": "unknown_model", "message": str(e)}
        except (InvalidInput, TypeError) as e:
            return {"error": "invalid_input", "message": str(e)}
        self.sessions[session_id] = session
        return session

    def unload_pair(self, k: int, lmbda: int) -> bool:
        """The worker's ``unload_pair`` on the model thread, unless a session of this replica still uses the pair;
        after the loads queued before have landed (one for a session already gone would land after)."""
        self.loader.submit(lambda: None).result()

        def locked() -> bool:
            with self.lock:
                if any((s.k, s.lmbda) == (k, lmbda) for s in self.sessions.values()):
                    return False
                return bool(self.worker.unload_pair(k, lmbda))  # type: ignore[attr-defined]  # the bodies set worker

        return self.model_thread.submit(locked).result()


class EncoderReplica(ShardReplica):
    """The body of an ``Encoder`` deployment: an EncoderWorker and its sessions."""

    def __init__(self, config: ServerConfig):
        from .app import build_encoder

        super().__init__()
        config = _on_replica_device(config)
        if config.models == "full":  # benchmarks: WavLM-Large dimensions with RANDOM weights (dpslm_stream.bench._models)
            from dpslm_stream.bench._models import full_size_encoder_worker

            self.worker = full_size_encoder_worker(config.device, allow_tf32=config.allow_tf32,
                                                   precision=config.encoder_precision)  # fmt: skip
        else:
            self.worker = build_encoder(config)
        if config.warmup:
            from .encoder_thread import warm_up

            warm_up(self.worker, *self.default_pair())
        release_cpu_threads()  # batches run on model_thread

    def describe(self) -> dict:
        models = self.worker.models
        return {"pairs": [list(p) for p in self.worker.available_pairs()], "models": models.source,
                "random_weights": models.is_random, "max_batch": self.max_batch, "sessions": len(self.sessions)}  # fmt: skip

    def default_pair(self) -> tuple[int, int]:
        pairs = self.worker.available_pairs()
        default = (hub.DEFAULT_K, hub.DEFAULT_LMBDA)
        return default if default in pairs or not pairs else pairs[0]

    def open(self, session_id: str, sample_rate: int, settings: dict) -> EncoderSessionInfo | dict:
        """Open a session; a refusal comes back as {"error": kind, "message": ...}."""
        k, lmbda = settings.get("k", hub.DEFAULT_K), settings.get("lmbda", hub.DEFAULT_LMBDA)
        session = self._open(session_id, lambda: self.worker.load_pair(k, lmbda, score=settings.get("score") is True),
                             lambda: self.worker.open_session(sample_rate, **settings))  # fmt: skip
        return session if isinstance(session, dict) else EncoderSessionInfo.of(session)

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


class ResynthReplica(ShardReplica):
    """The body of a ``Resynth`` deployment: a ResynthWorker and its sessions. ``worker_options``: extra
    ResynthWorker arguments (the tests' ``max_batch``)."""

    def __init__(self, config: ServerConfig, worker_options: dict | None = None):
        from .app import build_resynth

        super().__init__()
        self.worker = build_resynth(dataclasses.replace(_on_replica_device(config), resynth=True),
                                    **(worker_options or {}))  # fmt: skip
        if config.compile_decode and config.warmup:  # compile before the first stream waits for it
            self.worker.warm_up()
        release_cpu_threads()  # batches run on model_thread

    def describe(self) -> dict:
        return {"max_batch": self.max_batch, "sessions": len(self.sessions)}

    def open(self, session_id: str, k: int, lmbda: int, options: ResynthOptions) -> dict:
        """The stream's resolved settings, or {"error": kind, "message": ...}."""
        session = self._open(session_id, lambda: self.worker.load_pair(k, lmbda),
                             lambda: self.worker.open_session(k, lmbda, **options.kwargs()))  # fmt: skip
        return session if isinstance(session, dict) else {"settings": session.settings()}

    def close(self, session_id: str) -> None:
        with self.lock:
            s = self.sessions.pop(session_id, None)
            if s is not None:
                s.close()

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


def serve_deployment(body: type, name: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
                     max_ongoing_requests: int = 256, max_batch_size: int = 64, batch_wait_timeout_s: float = 0.005):  # fmt: skip
    """A one-replica Serve deployment of ``body`` (a ShardReplica) whose ``_step_batch`` is a ``@serve.batch``
    method: the calls that arrive together, from every session, go through one ``body.step_many``. Built here so
    that importing this module needs no Ray."""
    _, serve = import_ray()

    # max_ongoing_requests bounds the batch size (ray-project/ray#43288): one call in flight per session.
    @serve.deployment(name=name, num_replicas=1, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})  # fmt: skip
    class Deployment(body):
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _step_batch(self, items: list) -> list:
            return await asyncio.get_running_loop().run_in_executor(self.model_thread, self.step_many, items)

    return Deployment
