"""Synthetic test signals: deterministic speech-LIKE audio (not speech) for the tiny set's codebooks, warm-ups,
benchmarks and tests.

Kept apart from `dpslm_stream.tiny` so that what only needs a signal (the server's warm-up, the benchmarks) does not
import the tiny-set builder; `dpslm_stream.tiny` re-exports `speech_like` for existing callers.
"""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Deterministic speech-LIKE audio (not speech): a sequence of 40-160 ms 'phones', each either voiced (harmonics
    of a gliding f0 under a random spectral envelope) or fricative (shaped noise), with onsets, offsets and pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n, dtype=np.float64)
    t0 = 0
    f0 = 120.0
    while t0 < n:
        dur = int(rng.uniform(0.04, 0.16) * sr)
        seg = np.arange(min(dur, n - t0))
        kind = rng.choice(["voiced", "voiced", "voiced", "fricative", "pause"])
        if kind == "voiced":
            f0 = float(np.clip(f0 * np.exp(rng.normal(0, 0.08)), 80, 260))
            f0_end = float(np.clip(f0 * np.exp(rng.normal(0, 0.05)), 80, 260))
            freq = np.linspace(f0, f0_end, len(seg))
            phase = 2 * np.pi * np.cumsum(freq) / sr
            formants = rng.uniform([250, 800, 2000], [900, 2300, 3200])
            x = np.zeros(len(seg))
            for h in range(1, int(4000 / max(f0, f0_end))):
                fh = h * (f0 + f0_end) / 2
                gain = sum(np.exp(-((fh - f) ** 2) / (2 * 120.0**2)) for f in formants) + 0.02
                x += gain * np.sin(h * phase) / h**0.5
            x *= 0.1
        elif kind == "fricative":
            noise = rng.normal(0, 1, len(seg) + 64)
            taps = np.hanning(rng.integers(3, 16))  # hanning(n<3) is all zeros
            taps = taps * np.cos(np.pi * rng.uniform(0.3, 1.0) * np.arange(len(taps)))
            x = np.convolve(noise, taps / np.abs(taps).sum(), mode="same")[: len(seg)] * 0.05
        else:
            x = rng.normal(0, 1e-3, len(seg))
        env = np.minimum(1.0, np.minimum(seg + 1, len(seg) - seg) / (0.01 * sr))
        out[t0 : t0 + len(seg)] = x * env
        t0 += len(seg)
    return out.astype(np.float32)
