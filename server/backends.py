"""The interfaces between the server's I/O layer and its model backends, declared (mypy checks them, see
pyproject's [tool.mypy]) and implemented twice: in-process threads (server/encoder_thread.py EncoderThread and Slot,
server/resynth.py ResynthThread) and Ray Serve deployments (server/ray_gateway.py RayEncoderBackend/RaySlot,
RayResynthBackend/RayResynthStream).

Every method here is called on the event loop; results come back through the sinks, also on the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dpslm_stream.stream.resynth_options import ResynthOptions


@dataclass(frozen=True)
class EncoderSessionInfo:
    """An encoder session's resolved settings (the preset's values with the client's overrides), as ready reports
    them."""

    k: int
    lmbda: int
    mode: str
    left: int
    hop: int
    lookahead: int
    max_lag: int | None
    precision: str = "exact"  # what the session's windows run in: the worker's --encoder-precision, exact in mode full

    @classmethod
    def of(cls, session: Any) -> "EncoderSessionInfo":
        """The info of an EncoderSession (dpslm_stream.stream.session)."""
        c = session.config
        return cls(int(session.k), int(session.lmbda), c.mode, c.left, c.hop, c.lookahead, session.max_lag,
                   str(session.precision))  # fmt: skip


class Progress:
    """A snapshot of one session's counters, taken by the backend after a round (immutable once posted)."""

    __slots__ = ("processed_samples", "compute_seconds", "encoded_seconds", "state_nbytes", "finished")

    def __init__(self, processed_samples: int = 0, compute_seconds: float = 0.0, encoded_seconds: float = 0.0,
                 state_nbytes: int = 0, finished: bool = False):  # fmt: skip
        self.processed_samples = processed_samples  # samples handed to the encoder session
        self.compute_seconds = compute_seconds  # the session's share of the worker's compute
        self.encoded_seconds = encoded_seconds  # audio turned into features
        self.state_nbytes = state_nbytes  # the encoder session's streaming state
        self.finished = finished


class SlotSink(Protocol):
    """What an encoder slot reports to (always called on the event loop thread)."""

    def on_events(self, events: list, progress: Progress) -> None: ...

    def on_consumed(self) -> None: ...  # queued audio was handed to the encoder: there is room again

    def on_failure(self, error: BaseException) -> None: ...  # the session failed and was dropped


class EncoderSlot(Protocol):
    """One live encoder session as the event loop sees it: a queue of audio in, events out through its sink."""

    @property
    def info(self) -> EncoderSessionInfo: ...

    @property
    def queued_samples(self) -> int: ...  # received, not yet taken by the encoder

    def add_audio(self, samples: np.ndarray) -> None: ...

    def request_end(self) -> None: ...

    def cancel(self) -> None: ...  # stop serving it (the connection is gone or gave up)


class EncoderBackend(Protocol):
    """Runs every encoder session of the server (EncoderThread: a thread; RayEncoderBackend: Serve deployments)."""

    @property
    def heartbeat(self) -> float: ...  # monotonic time of the backend's last round (health)

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def wake(self) -> None: ...

    async def warm_up(self, k: int, lmbda: int) -> None: ...

    async def open_slot(self, session_id: str, sample_rate: int, settings: dict, sink: SlotSink) -> EncoderSlot: ...

    async def unload_pair(self, k: int, lmbda: int) -> None: ...  # drop its unit LM: no session of it is open


class ModelsInfo(Protocol):
    @property
    def source(self) -> str: ...

    @property
    def is_random(self) -> bool: ...


@runtime_checkable
class EncoderProvider(Protocol):
    """What ``Server`` is given as its encoder: the served pairs, the model set, and the backend to make on the
    server's loop. (A bare EncoderWorker is wrapped in server.encoder_thread.InProcessEncoder.)"""

    @property
    def models(self) -> Any: ...

    def available_pairs(self) -> list[tuple[int, int]]: ...

    def make_backend(self, loop: asyncio.AbstractEventLoop, metrics: Any, quantum_s: float) -> EncoderBackend: ...


class ResynthSink(Protocol):
    """What a resynthesis stream reports to (always called on the event loop thread)."""

    def on_resynth_events(self, events: list, stats: Any) -> None: ...

    def on_resynth_failure(self, error: BaseException) -> None: ...


class ResynthStream(Protocol):
    """One connection's resynthesis stream: units in, audio events out through its sink."""

    @property
    def lag_s(self) -> float: ...  # how long the oldest unit without audio has waited

    def settings(self) -> dict: ...  # every option as resolved (ready.settings.resynth)

    def push_units(self, units: Any, end_s: Any = None) -> None: ...

    def end(self) -> None: ...


class ResynthBackend(Protocol):
    """Runs every resynthesis stream (ResynthThread: a thread; RayResynthBackend: Serve deployments)."""

    @property
    def heartbeat(self) -> float: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def wake(self) -> None: ...

    async def open(self, k: int, lmbda: int, options: ResynthOptions, sink: ResynthSink) -> ResynthStream: ...

    def close(self, stream: Any) -> None: ...

    async def unload_pair(self, k: int, lmbda: int) -> None: ...  # drop its ELLA-V: no stream of it is open

    async def warm_up(self, k: int, lmbda: int) -> None:
        """Load ELLA-V (k, lambda) and the vocoder, and compile the decode step with --compile-decode, before clients
        come (called with --compile-decode, and when the resynthesis shares the encoder's thread)."""
        ...


@runtime_checkable
class ResynthProvider(Protocol):
    """What ``Server`` is given as its resynthesis: the backend to make on the server's loop. (A bare ResynthWorker
    is wrapped in server.resynth.InProcessResynth.)"""

    def make_backend(self, loop: asyncio.AbstractEventLoop, metrics: Any) -> ResynthBackend: ...
