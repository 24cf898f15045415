"""What a client needs to resume a session after its connection drops (docs/protocol.md, ``resume``): the audio it
sent that the server has not acknowledged yet (bounded), and the backoff between reconnection attempts.

Pure state, no socket: UnitsClient (client/api.py) drives it.
"""

from __future__ import annotations

import collections
import random
from typing import Iterator

import numpy as np


class RetainedAudio:
    """The input samples sent but not yet acknowledged (``ack``), to resend from the server's offset after a resume.
    At most ``max_samples`` are kept: beyond that the oldest are dropped, and a resume from before them fails."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self._chunks: collections.deque[tuple[int, np.ndarray]] = collections.deque()  # (first sample, samples)
        self.start = 0  # the first sample still kept
        self.end = 0  # one past the last sample sent

    @property
    def num_samples(self) -> int:
        return self.end - self.start

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self._chunks.append((self.end, samples))
            self.end += len(samples)
        while self.num_samples > self.max_samples and self._chunks:
            self._drop_until(min(self.end - self.max_samples, self._chunks[0][0] + len(self._chunks[0][1])))

    def ack(self, samples: int) -> None:
        """The server accepted everything below ``samples``."""
        self._drop_until(min(samples, self.end))

    def _drop_until(self, sample: int) -> None:
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= sample:
            self._chunks.popleft()
        if self._chunks and self._chunks[0][0] < sample:
            first, samples = self._chunks[0]
            self._chunks[0] = (sample, samples[sample - first :])
        self.start = max(self.start, sample)

    def since(self, sample: int) -> np.ndarray | None:
        """The samples from ``sample`` on, or None when they are no longer kept."""
        if sample < self.start or sample > self.end:
            return None
        parts = [s[max(0, sample - first) :] for first, s in self._chunks if first + len(s) > sample]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def backoff_delays(attempts: int, first_s: float = 0.1, max_s: float = 5.0, rng: random.Random | None = None
                   ) -> Iterator[float]:  # fmt: skip
    """Seconds to wait before each of ``attempts`` reconnections: exponential from ``first_s``, capped at ``max_s``,
    with jitter (each delay drawn from its upper half) so that clients cut together do not return together."""
    rng = rng or random.Random()
    delay = first_s
    for _ in range(attempts):
        yield delay * rng.uniform(0.5, 1.0)
        delay = min(delay * 2, max_s)
