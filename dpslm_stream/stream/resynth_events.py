"""What a resynthesis session hands back: audio chunks, in order and final, then one end-of-stream summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from dpslm_stream.audio import float_to_pcm16

SAMPLE_RATE = 24000


@dataclass(frozen=True)
class AudioEvent:
    """A chunk of resynthesized audio: final (never revised), in order, contiguous with the previous chunk."""

    seq: int  # 0, 1, 2, ... within the stream
    pcm: np.ndarray  # float32 mono samples at `sample_rate`, not clipped (see pcm16())
    start_s: float  # time of the first sample in the stream's resynthesized audio
    units_done: int  # units whose audio is complete once this chunk is played (cumulative)
    lag_s: float  # the stream's resynthesis lag when the chunk was made (see ResynthSession.lag_s)
    sample_rate: int = SAMPLE_RATE

    @property
    def num_samples(self) -> int:
        return int(self.pcm.shape[0])

    @property
    def end_s(self) -> float:
        return self.start_s + self.num_samples / self.sample_rate

    def pcm16(self) -> bytes:
        """Little-endian 16-bit PCM of the chunk, clipped to [-1, 1) first (the decoder output is not bounded)."""
        return float_to_pcm16(np.clip(self.pcm, -1.0, 1.0))


@dataclass(frozen=True)
class ResynthEndEvent:
    """End of a resynthesis stream: every AudioEvent has been sent (or the stream failed: `error`)."""

    units: int  # deduplicated units received
    codec_frames: int  # codec ids generated (40 per second of audio)
    audio_seconds: float
    chunks: int  # AudioEvents sent
    passes: int  # ELLA-V re-prompting passes run
    first_audio_latency_s: float | None  # wall time from the first units to the first audio
    latency_mean_s: float | None  # wall time from a unit's arrival until its audio was complete, mean over units
    latency_max_s: float | None
    real_time_factor: float  # compute seconds / audio seconds (> 1: slower than real time)
    error: str | None = None  # why the stream stopped early; None for a normal end


ResynthEvent = Union[AudioEvent, ResynthEndEvent]
