"""Device handling (dpslm_stream/device.py), the Ray GPU shares and the health of workers and deployments. These
run on CPU; tests/test_cuda.py runs the models on a GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dpslm_stream import device as D
from dpslm_stream.errors import InvalidInput
from dpslm_stream.server.ray_backend import gpu_fractions
from dpslm_stream.server.ray_gateway import DeploymentWatch


@pytest.mark.parametrize(
    "device, visible, expected",
    [
        ("cuda:1", "1", "cuda:0"),  # Ray granted GPU 1: it is the only visible one
        ("cuda:1", "0,1", "cuda:1"),
        ("cuda:3", "2,3", "cuda:1"),
        ("cuda:1", "0", "cuda:0"),  # Ray granted another GPU than the one named: the grant decides
        ("cuda", "1", "cuda"),
        ("cuda:1", "", "cuda:1"),  # no CUDA_VISIBLE_DEVICES: unchanged
        ("cpu", "1", "cpu"),
    ],
)
def test_replica_device_renumbers_to_the_visible_index(device, visible, expected):
    assert D.replica_device(device, visible) == torch.device(expected)


def test_replica_device_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert D.replica_device("cuda:5") == torch.device("cuda:0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert D.replica_device("cuda:5") == torch.device("cuda:5")


def test_cpu_helpers_are_no_ops():
    D.synchronize("cpu")
    with D.worker_stream("cpu", high_priority=True):
        pass
    with D.DeviceTimer("cpu") as t:
        sum(range(1000))
    assert t.seconds > 0
    assert D.device_error("cpu") is None


def test_setup_model_device_leaves_global_state_alone_on_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert D.setup_model_device("cpu", allow_tf32=True) == torch.device("cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_exact_kernels_turns_tf32_off_and_on():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        D.exact_kernels(allow_tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        D.exact_kernels()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_device_error_reports_a_failing_device(monkeypatch):
    def broken(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    assert D.device_error("cuda:0") == "CUDA error: an illegal memory access was encountered"


# --- Ray GPU shares ------------------------------------------------------------------------------------------------


def test_gpu_fractions_share_one_gpu_by_default():
    assert gpu_fractions("cuda", "cuda", 1, 1) == (0.5, 0.5)
    assert gpu_fractions("cuda:0", "cuda:0", 2, 2) == (0.25, 0.25)
    assert gpu_fractions("cuda", "cpu", 1, 1) == (1.0, 0.0)
    assert gpu_fractions("cpu", "cuda", 1, 1) == (0.0, 1.0)
    assert gpu_fractions("cuda", None, 1, 1) == (1.0, 0.0)  # resynthesis off
    assert gpu_fractions("cpu", "cpu", 1, 1) == (0.0, 0.0)


def test_gpu_fractions_flags_override():
    assert gpu_fractions("cuda", "cuda", 1, 1, encoder_gpus=0.25, resynth_gpus=0.75) == (0.25, 0.75)
    assert gpu_fractions("cuda", "cuda", 1, 1, resynth_gpus=1) == (0.5, 1.0)
    assert gpu_fractions("cpu", "cuda", 1, 1, encoder_gpus=0.5) == (0.0, 1.0)  # a CPU shard asks for no GPU
    for bad in (-0.5, 1.5):
        with pytest.raises(InvalidInput, match="encoder_gpus"):
            gpu_fractions("cuda", "cuda", 1, 1, encoder_gpus=bad)


# --- health --------------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_deployment_watch_reading_health_does_not_refresh_it():
    clock = _Clock()
    watch = DeploymentWatch(timeout_s=10.0, clock=clock)
    never = asyncio.Event()

    async def hung_call():
        await never.wait()

    async def scenario():
        task = asyncio.ensure_future(watch.result(hung_call()))
        await asyncio.sleep(0)
        assert watch.pending == 1 and watch.healthy
        clock.t = 11.0
        for _ in range(3):  # reading health (as /healthz does) must not make a hung deployment look alive
            assert not watch.healthy
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_deployment_watch_timeout_marks_unhealthy_until_a_reply():
    watch = DeploymentWatch(timeout_s=0.05)

    async def slow():
        await asyncio.sleep(5)

    async def quick():
        return 7

    async def scenario():
        with pytest.raises(TimeoutError):
            await watch.result(asyncio.ensure_future(slow()))
        assert not watch.healthy and watch.pending == 0
        assert await watch.result(asyncio.ensure_future(quick())) == 7
        assert watch.healthy

    asyncio.run(scenario())


def test_worker_thread_with_a_dead_device_is_not_alive(monkeypatch):
    from dpslm_stream.server.model_thread import ModelThread

    class Idle(ModelThread):
        def _round(self):
            return False

    loop = asyncio.new_event_loop()
    try:
        worker = Idle(loop, device="cpu")
        monkeypatch.setattr("dpslm_stream.server.model_thread.device_error", lambda device: "CUDA error: ECC")
        worker.start()
        for _ in range(40):  # the idle check runs once a second when nothing wakes the thread
            if not worker.alive:
                break
            worker._thread.join(0.1)
        assert worker.device_error == "CUDA error: ECC" and not worker.alive
        worker.stop()
    finally:
        loop.close()


def test_healthz_is_503_once_the_device_fails(monkeypatch):
    import json
    import time
    import urllib.error
    import urllib.request

    from dpslm_stream import protocol as P
    from dpslm_stream.server.app import ServerThread
    from dpslm_stream.server.config import ServerConfig

    failed = {"now": False}
    monkeypatch.setattr("dpslm_stream.server.model_thread.device_error",
                        lambda device: "CUDA error: unspecified launch failure" if failed["now"] else None)  # fmt: skip
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, resynth=False)) as srv:
        url = srv.http_url + P.HEALTH_PATH
        assert json.loads(urllib.request.urlopen(url).read())["status"] == "ok"
        failed["now"] = True  # a sticky CUDA error: every later call fails
        status = None
        for _ in range(50):  # the worker checks its device once a second
            try:
                urllib.request.urlopen(url)
            except urllib.error.HTTPError as e:
                status = (e.code, json.loads(e.read())["status"])
                break
            time.sleep(0.1)
        assert status == (503, "worker down")


def _os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_release_cpu_threads_frees_the_calling_threads_openmp_team():
    """A thread that ran a parallel CPU op keeps an OpenMP team (worker threads of its own) after it; the server
    frees the team of the thread that built its models (release_cpu_threads), since idle teams slow every other
    thread's ops (dpslm_stream/device.py). Checked on a thread of its own with two torch threads: its team's worker
    thread exists after a parallel op and is gone after the release; ops after it still work and agree."""
    import threading

    if not D.release_cpu_threads():
        pytest.skip("this torch's OpenMP runtime has no omp_pause_resource_all")
    x = torch.arange(1 << 22, dtype=torch.float64)
    seen: dict[str, object] = {}

    def run():
        torch.set_num_threads(2)
        before = _os_threads()
        seen["sum"] = float((x * 2).sum())  # parallel: starts this thread's team
        seen["with_team"] = _os_threads() - before
        seen["released"] = D.release_cpu_threads()
        seen["after_release"] = _os_threads() - before
        seen["sum_again"] = float((x * 2).sum())

    threads = torch.get_num_threads()
    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(threads)
    assert seen["with_team"] == 1 and seen["released"] and seen["after_release"] == 0, seen
    assert seen["sum"] == seen["sum_again"] == float((x * 2).sum())


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_the_codec_thread_frees_its_openmp_team_after_each_job():
    """The server's codec thread (start.transmit's ULM steps) starts an OpenMP team with each parallel op; an idle
    team left there made the encoder's steps 1.4-1.5x slower (server/transmit.py), so each job frees it."""
    from dpslm_stream.server.transmit import CodecService

    if not D.release_cpu_threads():
        pytest.skip("this torch's OpenMP runtime has no omp_pause_resource_all")
    service = CodecService("tiny")
    x = torch.arange(1 << 22, dtype=torch.float64)

    async def main():
        await service._run(lambda: torch.set_num_threads(2))  # the codec thread exists from here on
        before = _os_threads()
        total, during = await service._run(lambda: (float((x * 2).sum()), _os_threads() - before))
        return total, during, _os_threads() - before

    threads = torch.get_num_threads()
    try:
        total, during, after = asyncio.run(main())
    finally:
        service.stop()
        torch.set_num_threads(threads)
    assert during == 1 and after == 0 and total == float((x * 2).sum())


def test_a_ray_replica_runs_every_model_call_on_its_one_model_thread():
    """A replica body (no Ray needed) opens sessions and runs batches on its one model thread, whoever calls it: a
    caller thread that ran them would keep an OpenMP team of its own (release_cpu_threads says why that is slow)."""
    import threading

    from dpslm_stream.server.app import ServerConfig
    from dpslm_stream.server.ray_replicas import EncoderReplica
    from dpslm_stream.tiny import speech_like

    replica = EncoderReplica(ServerConfig(port=0, models="tiny", warmup=False))
    seen: set[int] = set()
    real_open, real_step = replica.worker.open_session, replica.worker.step

    def open_session(*args, **kwargs):
        seen.add(threading.get_ident())
        return real_open(*args, **kwargs)

    def step(*args, **kwargs):
        seen.add(threading.get_ident())
        return real_step(*args, **kwargs)

    replica.worker.open_session, replica.worker.step = open_session, step
    try:
        info = replica.open("s1", 16000, {"k": 500, "lmbda": 4500})
        assert not isinstance(info, dict), info
        wav = speech_like(1.0, 16000, seed=2)
        out = replica.model_thread.submit(replica.step_many, [("s1", wav, True)]).result()  # as _step_batch runs it
        assert out and len(seen) == 1 and threading.get_ident() not in seen
        refused = replica.open("s2", 16000, {"k": 123, "lmbda": 1})  # a refusal still comes back as a value
        assert isinstance(refused, dict) and refused["error"] == "unknown_model" and refused["message"]
    finally:
        replica.model_thread.shutdown()
