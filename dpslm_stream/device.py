"""Device handling shared by every model worker: one place for what differs between CPU and CUDA.

- ``exact_kernels``: TF32 off (cuBLAS matmuls and cuDNN convolutions). cuDNN convolutions run in TF32 by default,
  which rounds inputs to 10 mantissa bits: offline == streaming, Ray == local and the parity tolerances hold in
  fp32 only without it. ``--allow-tf32`` turns it on for speed. torch keeps these switches process-wide (there is no
  per-thread or per-call setting), so each model worker sets them once at its setup, before its first model call.
- ``replica_device``: inside a Ray replica, Ray sets CUDA_VISIBLE_DEVICES to the GPUs it granted, so the ordinal the
  user gave (``cuda:1``) is renumbered to the visible index (``cuda:0``).
- ``worker_stream``: one CUDA stream per worker thread (the encoder at a higher priority than resynthesis), so the
  encoder's small per-hop kernels do not queue behind ELLA-V and vocoder kernels on the default stream.
- ``synchronize`` / ``DeviceTimer``: wall times of device work (CUDA kernels are asynchronous: a timer that does not
  synchronize measures the launch, not the work).
- ``device_error``: a sticky CUDA error (illegal address, ECC, a lost device) makes every later call fail; health
  checks use it to report the worker down.
- ``release_cpu_threads``: a thread that built models frees its OpenMP threads before other threads run the models
  (see its docstring: on CPU a leftover thread team slowed the server's encoder by ~1.4x).
On CPU every one of these but the last is a no-op or the plain value.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


def exact_kernels(allow_tf32: bool = False) -> None:
    """TF32 off (exact fp32 matmuls and convolutions on CUDA) unless `allow_tf32`. Process-wide (torch's switches);
    call it once where a model worker is set up."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def setup_model_device(device: str | torch.device, allow_tf32: bool = False) -> torch.device:
    """A model worker's setup: its device, with TF32 off on CUDA (``exact_kernels``) unless `allow_tf32`. On CPU
    nothing global is touched. The TF32 switches are process-wide: workers of one process share one setting."""
    device = torch.device(device)
    if device.type == "cuda":
        exact_kernels(allow_tf32)
    return device


def replica_device(device: str | torch.device, visible: str | None = None) -> torch.device:
    """The device a process whose visible GPUs are `visible` (CUDA_VISIBLE_DEVICES; default: this process's) must
    use for `device`: ``cuda:N`` becomes the index of GPU N among the visible ones, or ``cuda:0`` when N is not
    among them (Ray granted another GPU: the grant decides). CPU and unset CUDA_VISIBLE_DEVICES: unchanged."""
    device = torch.device(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if device.type != "cuda" or device.index is None or not visible:
        return device
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    index = ids.index(str(device.index)) if str(device.index) in ids else 0
    return torch.device("cuda", index)


def synchronize(device: torch.device | str) -> None:
    """Wait for every queued kernel on `device` (CUDA); nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def worker_stream(device: torch.device | str, high_priority: bool = False) -> Iterator[None]:
    """Run the block's CUDA work on a stream of its own (created here; `high_priority` for latency-critical work),
    after waiting for work queued by other threads (models loaded on another thread). A no-op on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)  # models may have been loaded and moved on another thread's stream
    low, high = torch.cuda.Stream.priority_range()  # (0, -k): lower numbers are higher priorities
    stream = torch.cuda.Stream(device, priority=high if high_priority else low)
    with torch.cuda.stream(stream):
        yield


class DeviceTimer:
    """Wall time of device work: ``with DeviceTimer(device) as t: ...; t.seconds``. Synchronizes the device before
    and after on CUDA, so the time is that of the kernels, not of their launch; on CPU a plain perf_counter."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> "DeviceTimer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def device_error(device: torch.device | str) -> str | None:
    """None while `device` works; the error's first line once it does not (a sticky CUDA error fails every later
    call, a synchronize included). Always None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as e:  # torch raises RuntimeError (torch.AcceleratorError in newer versions)
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


@functools.cache
def _omp_pause_resource_all():
    """The OpenMP runtime's omp_pause_resource_all (OpenMP 5.0), or None where the process has none."""
    try:
        fn = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError, TypeError):  # no such symbol; no dlopen(NULL) (Windows: CDLL(None) is a TypeError)
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def releasing_cpu_threads(job: Callable[[], T]) -> Callable[[], T]:
    """`job` as a call that frees its thread's OpenMP team when it returns (`release_cpu_threads`): for jobs on side
    threads (model loads, the codec thread's ULM steps) whose idle team would slow the model threads."""

    def run() -> T:
        try:
            return job()
        finally:
            release_cpu_threads()

    return run


def release_cpu_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (omp_pause_resource_all(omp_pause_hard)); the thread's next
    parallel CPU op starts new ones. Returns whether the runtime did it.

    Why: torch's CPU ops run on an OpenMP team of the thread that calls them, and every thread that ever ran a
    parallel op keeps its own team. libgomp (torch's OpenMP on Linux) counts the threads of all teams, and once they
    outnumber the CPUs it cuts how long a waiting thread spins before it sleeps to almost nothing, so the thread that
    does the work pays a sleep and a wake-up at every barrier of every op. A server that builds its models on one
    thread and runs them on another kept the building thread's idle team alive: on a 2-core machine its encoder ran
    ~1.4x slower, and moving the same loop to a thread of its own cost the same in `bench` (docs/bench). The server
    calls this on the thread that built the models once it hands them to the model threads (server/app.py).
    """
    fn = _omp_pause_resource_all()
    return fn is not None and fn(2) == 0  # 2: omp_pause_hard (free the threads, not only idle them)
