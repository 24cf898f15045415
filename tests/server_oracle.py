"""The offline oracle the server tests compare live sessions with: what the server decodes from a PCM16 frame, and
the units offline encoding gives for it (tiny set, k=500, λ=4500). One Pipeline per test process."""

from __future__ import annotations

from functools import cache

import numpy as np

from dpslm_stream import protocol as P
from dpslm_stream.hub import ModelSet
from dpslm_stream.pipeline import Pipeline

SR = 16000


def pcm16(wav: np.ndarray) -> np.ndarray:
    """What the server decodes from the PCM16 frames of ``wav``."""
    return np.frombuffer(P.encode_audio(wav, "pcm16"), "<i2") / np.float32(32768)


@cache
def _pipeline() -> Pipeline:
    return Pipeline(ModelSet("tiny"), 500, 4500)


def offline_units(wav: np.ndarray, sample_rate: int = SR) -> list[int]:
    return _pipeline().encode(wav, sample_rate, score=False).units
