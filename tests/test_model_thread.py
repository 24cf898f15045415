"""Model threads (server/model_thread.py): a host runs its guest's commands and rounds on its own thread, after its
own round; the guest yields to the host's waiting work; the server shares one thread between the encoder and the
resynthesis worker on a CPU (--model-threads auto) and runs every resynthesis model call there."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from dpslm_stream import protocol as P
from dpslm_stream.client import UnitsClient, chunked
from dpslm_stream.errors import InvalidInput
from dpslm_stream.hub import ModelSet
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.server.encoder_thread import EncoderThread
from dpslm_stream.server.model_thread import ModelThread
from dpslm_stream.stream.resynth_worker import ResynthWorker
from dpslm_stream.tiny import speech_like


class Recorder(ModelThread):
    """Records each round (its label, the OS thread it ran on); `rounds_left` rounds report more work waiting."""

    def __init__(self, loop, label: str, log: list, rounds_left: int = 0):
        super().__init__(loop, device="cpu")
        self.label, self.log, self.rounds_left = label, log, rounds_left

    def _round(self) -> bool:
        self.log.append((self.label, threading.current_thread().name))
        self.rounds_left = max(0, self.rounds_left - 1)
        return self.rounds_left > 0


def with_loop(scenario):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(scenario(loop), 30))
    finally:
        loop.close()


def test_a_guest_runs_its_commands_and_rounds_on_the_hosts_thread_after_the_host():
    log: list = []

    async def scenario(loop):
        host, guest = Recorder(loop, "host", log), Recorder(loop, "guest", log, rounds_left=3)
        host.host(guest)
        host.start()
        guest.start()  # starts nothing: the host's thread runs it
        try:
            ran_on = await guest.call(lambda: threading.current_thread())
            assert ran_on is host._thread and not guest._thread.is_alive()
            assert guest.alive and host.alive
            for _ in range(100):
                if sum(1 for label, _ in log if label == "guest") >= 3:
                    break
                await asyncio.sleep(0.01)
            assert guest.heartbeat == host.heartbeat
        finally:
            guest.stop()
            assert not guest.alive and host.alive  # a stopped guest is down; its host goes on
            host.stop()
        assert not host.alive
        return ran_on

    ran_on = with_loop(scenario)
    assert {name for _, name in log} == {ran_on.name}
    # every guest round follows a host round of the same pass; the guest's "more work" made the host go round again
    labels = [label for label, _ in log]
    assert labels[:2] == ["host", "guest"] and labels.count("guest") >= 3
    assert all(labels[i - 1] == "host" for i, label in enumerate(labels) if label == "guest")


def test_a_guest_yields_while_its_host_has_work_waiting():
    async def scenario(loop):
        host, guest = Recorder(loop, "host", []), Recorder(loop, "guest", [])
        host.host(guest)
        assert guest._yield_to() is False
        host.call(lambda: None)  # a command waits for the (not started) host thread
        assert guest._yield_to() is True
        host._run_commands()
        assert guest._yield_to() is False

    with_loop(scenario)


def test_the_encoder_thread_has_work_while_audio_or_hops_wait():
    runner = SimpleNamespace(forwards=0, forward_streams=0)

    async def scenario(loop):
        thread = EncoderThread(SimpleNamespace(runner=runner, device="cpu"), loop)
        slot = SimpleNamespace(queued_samples=0, session=SimpleNamespace(has_work=False), finished=False, cancelled=False)
        thread._slots.append(slot)
        assert not thread._has_work()
        slot.queued_samples = 320
        assert thread._has_work()
        slot.queued_samples, slot.session.has_work = 0, True
        assert thread._has_work()
        slot.finished = True  # a finished session's leftovers do not count
        assert not thread._has_work()

    with_loop(scenario)


def test_hosting_is_refused_once_started_and_does_not_nest():
    async def scenario(loop):
        a, b, c = (Recorder(loop, x, []) for x in "abc")
        a.host(b)
        with pytest.raises(ValueError):
            b.host(c)  # a guest hosts nothing
        with pytest.raises(ValueError):
            c.host(a)  # a host is nobody's guest
        with pytest.raises(ValueError):
            a.host(b)  # already hosted
        with pytest.raises(ValueError):
            a.host(a)
        c.start()
        try:
            with pytest.raises(RuntimeError):
                c.host(Recorder(loop, "d", []))
        finally:
            c.stop()
        a.start()
        a.stop()

    with_loop(scenario)


class ThreadRecordingWorker(ResynthWorker):
    """A resynthesis worker that records the OS thread and the yield hint of every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: set[str] = set()
        self.yield_hints: list = []

    def step(self, sessions, yield_to=None):
        self.threads.add(threading.current_thread().name)
        self.yield_hints.append(yield_to)
        return super().step(sessions, yield_to)


@pytest.mark.parametrize("model_threads,expect_shared", [("auto", True), ("shared", True), ("separate", False)])
def test_the_server_runs_resynthesis_on_the_encoders_thread_on_a_cpu(model_threads, expect_shared):
    worker = ThreadRecordingWorker(ModelSet("tiny"))
    cfg = ServerConfig(port=0, models="tiny", warmup=False, model_threads=model_threads)
    wav = speech_like(1.5, 16000, seed=3)

    async def main(url):
        async with UnitsClient(url, sample_rate=16000, resynth={"seed": 1}) as c:
            return [m async for m in c.stream(chunked(wav, 16000, 100))]

    with ServerThread(cfg, resynth=worker) as srv:
        msgs = asyncio.run(asyncio.wait_for(main(srv.url), 120))
        server = srv.server
        assert server.resynth_shares_thread is expect_shared
        encoder_thread = server.encoder_backend._thread.name
    chunks = [m for m in msgs if isinstance(m, P.AudioChunk)]
    assert isinstance(msgs[-1], P.EndMessage) and msgs[-1].resynth["error"] is None and chunks
    assert np.abs(np.concatenate([c.samples for c in chunks])).max() > 0
    assert worker.threads == ({encoder_thread} if expect_shared else {"dpslm-resynth-worker"})
    # shared: every step may yield to the encoder's work; separate: the hint never asks (nothing to yield to)
    assert all(hint is not None for hint in worker.yield_hints)
    assert any(getattr(hint, "__self__", None) is server.encoder_backend for hint in worker.yield_hints) is expect_shared


@pytest.mark.parametrize("model_threads,warmed", [("auto", 1), ("separate", 0)])
def test_a_shared_thread_loads_the_resynthesis_models_in_the_warm_up(model_threads, warmed):
    """Sharing the encoder's thread, a resynthesis model load at the first session would hold every session's units:
    the start-up warm-up loads them (its own thread loads them at first use, as before)."""
    calls = []

    class Worker(ResynthWorker):
        def warm_up(self, k, lmbda):
            calls.append((k, lmbda, threading.current_thread().name))
            super().warm_up(k, lmbda)

    cfg = ServerConfig(port=0, models="tiny", model_threads=model_threads)  # warmup on (the default)
    with ServerThread(cfg, resynth=Worker(ModelSet("tiny"))) as srv:
        encoder_thread = srv.server.encoder_backend._thread.name
    assert calls == [(500, 4500, encoder_thread)] * warmed


def test_model_threads_must_be_a_known_arrangement():
    with pytest.raises(InvalidInput, match="--model-threads"):
        ServerConfig(model_threads="one")
