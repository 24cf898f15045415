"""ModelThread: a thread that owns models and runs every call into them, for the in-process server's encoder
(server/encoder_thread.py) and resynthesis (server/resynth.py) workers.

The event loop never calls model code. It queues commands (``call``: open a session, warm up) and wakes the
thread; the thread runs the commands, then one ``_round`` of its subclass over its sessions, and posts results back
with ``loop.call_soon_threadsafe``.

**One thread for both workers on a CPU** (``host``). torch runs a thread's parallel CPU ops on an OpenMP team of
its own, and every thread that ever ran one keeps its team (dpslm_stream/device.py ``release_cpu_threads``). With
an encoder thread and a resynthesis thread, two teams of ``torch.get_num_threads()`` threads share the cores.
libgomp then sees more threads than CPUs and cuts the time its waiting threads spin to almost nothing, so every
barrier of either team pays a sleep and a wake-up. This happens even while the other team is idle, and when both
run, their threads also preempt each other. Measured on 2 cores with one full-size live resynthesis stream: an
ELLA-V decode step took 29-47 ms with two threads against 17-24 ms with one, and the encoder's compute per audio
second halved (README, live resynthesis). A host therefore runs its guests' commands and rounds on its own thread after its own round: one
team, and the host's work first. A guest's round is told (``_yield_to``) when the host has work waiting, so that it
can stop between steps (ResynthWorker.step ``yield_to``): the encoder waits for at most one ELLA-V decode step.
On a GPU the two workers keep their own threads, whose CUDA streams overlap.

**Loading off the model thread** (``load``). A session of a (k, lambda) pair not loaded yet needs its models first:
seconds for the released files (a 0.8 GB unit LM, an ELLA-V), and a download when they are not cached. Loaded on the
model thread, that would hold every other session's units and audio meanwhile. So a backend's ``open`` loads on a
loading thread of its own first (one load at a time; the workers' ``load_pair`` only adds models, so ``step`` runs
on meanwhile), then opens the session on the model thread, which finds everything loaded. The loading thread frees
its OpenMP team after each load, for the reason above.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable

import torch

from dpslm_stream.device import device_error, releasing_cpu_threads, synchronize, worker_stream


class ModelThread:
    """A thread that owns models and runs all their calls, driven by the event loop: commands (``call``) and wake-ups
    go in, results come back through ``loop.call_soon_threadsafe``. Subclasses implement ``_round``: one pass over
    their sessions; it returns True when more work is already waiting, and ``_has_work`` (what a guest yields to)."""

    name = "dpslm-worker"
    high_priority = False  # the CUDA stream priority of this thread's work (the encoder's is higher)

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics=None, device: str | torch.device = "cpu"):
        self.loop = loop
        self.metrics = metrics
        self.device = torch.device(device)
        self.device_error: str | None = None  # set once the device fails (a sticky CUDA error): the worker is down
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self.heartbeat = time.monotonic()  # last time the loop went round (health check)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._guests: list[ModelThread] = []  # run on this thread after this one's round (host)
        self._host: ModelThread | None = None  # the thread this one runs on, when hosted
        self._yield_to: Callable[[], bool] = lambda: False  # a hosted guest: True while its host has work waiting
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-loader")

    # --- set-up, before start ----------------------------------------------------------------------------------------

    def host(self, guest: "ModelThread") -> None:
        """Run ``guest`` on this thread from now on (the module docstring says why): its commands and rounds come
        after this thread's own, and its rounds may yield to this thread's work. Call before either starts; the
        guest's start and stop then start and stop nothing."""
        if guest is self or guest._host is not None or guest._guests or self._host is not None:
            raise ValueError("a model thread hosts other threads, or is hosted by one, not both")
        if self._thread.is_alive() or guest._thread.is_alive():
            raise RuntimeError("host() before start()")
        guest._host = self
        guest._wake = self._wake  # the guest's commands and wake-ups wake this thread
        guest._yield_to = self._has_work
        self._guests.append(guest)

    # --- called from the event loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._host is None:
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._wake.set()
        if self._host is None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        if self._host is not None:
            return self._host.alive and not self._stopping
        return self._thread.is_alive() and self.device_error is None

    def call(self, fn: Callable[[], Any]) -> "asyncio.Future":
        """Run ``fn()`` on the worker thread (e.g. open_session, which may load models); await the result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return asyncio.wrap_future(fut, loop=self.loop)

    def load(self, fn: Callable[[], Any]) -> "asyncio.Future":
        """Run ``fn()`` (a worker's ``load_pair``) on this thread's loading thread, not on the model thread (the module
        docstring says why); await the result. On a GPU the loaded weights are synchronized before they are handed
        over: the model thread reads them on its own CUDA stream."""

        def run():
            result = fn()
            synchronize(self.device)
            return result

        return asyncio.wrap_future(self._loader.submit(releasing_cpu_threads(run)), loop=self.loop)

    async def loads_done(self) -> None:
        """Return once every load queued before this call has finished (the loading thread runs them in order). An
        unload waits for it: a load still running for a session that is already gone would otherwise land after."""
        await self.load(lambda: None)

    def wake(self) -> None:
        self._wake.set()

    # --- worker thread -------------------------------------------------------------------------------------------

    def _post(self, fn: Callable, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone, nobody to tell
            pass

    def _run(self) -> None:
        checked = time.monotonic()
        with worker_stream(self.device, self.high_priority):  # this thread's own CUDA stream; no-op on CPU
            while not self._stopping:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                self.heartbeat = time.monotonic()
                if self.heartbeat - checked >= 1.0 and self.device_error is None:  # once a second: device works?
                    self.device_error, checked = device_error(self.device), self.heartbeat
                self._run_commands()
                more = self._round()
                for guest in self._guests:
                    guest.heartbeat, guest.device_error = self.heartbeat, self.device_error
                    guest._run_commands()
                    if not guest._stopping:
                        more = guest._round() or more
                if more:
                    self._wake.set()  # more than one round of work is waiting: go round again at once
            # Fail nobody silently: commands queued during shutdown still get an answer.
            for thread in (self, *self._guests):
                thread._run_commands()

    def _round(self) -> bool:
        raise NotImplementedError

    def _has_work(self) -> bool:
        """Work waiting for this thread's next round (commands included); what a hosted guest yields to."""
        return not self._commands.empty()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the awaiting coroutine, which turns it into an error message
                fut.set_exception(e)
