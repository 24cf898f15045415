"""Per-session measurements the server reports: commit lag, its percentiles, and the live bitrate. Each is bounded
in size however long the session runs."""

from __future__ import annotations

import math
from collections import deque


class ArrivalClock:
    """When did the audio up to time t arrive? Answers it for increasing t with bounded memory.

    Each received frame adds (cumulative audio seconds, wall time). Units commit in time order, so the entries before
    a committed unit's end are dropped as units commit. When nothing commits for a long while (the exact ``full``
    mode commits only at the end), the entries are thinned by merging neighbours into (later audio end, earlier
    arrival time): a merged entry claims its audio arrived sooner than it did, so a lag computed from it can only be
    over-reported (by at most the merged span), never flattered.
    """

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._entries: deque[tuple[float, float]] = deque()
        self._last: tuple[float, float] | None = None

    def add(self, audio_end_s: float, wall_time: float) -> None:
        self._entries.append((audio_end_s, wall_time))
        self._last = (audio_end_s, wall_time)
        if len(self._entries) > self.max_entries:
            items = list(self._entries)
            # Pairs (a, b) -> (end of b, time of a): audio up to b's end had not all arrived at a's time, so the lag
            # computed from it is an upper bound.
            merged = [(items[i + 1][0], items[i][1]) for i in range(0, len(items) - 1, 2)]
            if len(items) % 2:
                merged.append(items[-1])
            self._entries = deque(merged)

    def arrival_of(self, audio_s: float) -> float | None:
        """Wall time at which the audio up to ``audio_s`` had arrived (call with non-decreasing ``audio_s``)."""
        while self._entries and self._entries[0][0] < audio_s - 1e-9:
            self._entries.popleft()
        if self._entries:
            return self._entries[0][1]
        # Past everything received (the last unit's frame can reach just beyond the audio): the last arrival.
        return None if self._last is None else self._last[1]

    @property
    def nbytes(self) -> int:
        return len(self._entries) * 72  # two floats in a tuple in a deque slot, roughly


class LagHistogram:
    """Commit-lag distribution over a whole session in fixed 10 ms bins up to 60 s (plus overflow): O(1) memory."""

    BIN_S = 0.01
    N_BINS = 6000

    def __init__(self) -> None:
        self._counts = [0] * (self.N_BINS + 1)
        self.n = 0
        self.max = 0.0

    def add(self, lag_s: float) -> None:
        self._counts[min(self.N_BINS, max(0, int(lag_s / self.BIN_S)))] += 1
        self.n += 1
        self.max = max(self.max, lag_s)

    def quantile(self, q: float) -> float | None:
        """Upper edge of the bin holding the q-quantile (so the value is never under-reported by more than 0)."""
        if self.n == 0:
            return None
        rank = math.ceil(q * self.n)
        seen = 0
        for i, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                return min(self.max, (i + 1) * self.BIN_S)
        return self.max


class BitrateMeter:
    """N_units * H(unigram distribution of the session's units) / seconds, updated per unit in O(1).

    The same number as dpslm_stream.pipeline.bitrate (ZeroSyl's definition) over the units seen so far:
    N * H = N log2 N - sum_u c_u log2 c_u, and the sum is kept incrementally.
    """

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}  # at most k entries
        self.n = 0
        self._sum_clogc = 0.0

    def add(self, unit: int) -> None:
        c = self._counts.get(unit, 0)
        self._sum_clogc += (c + 1) * math.log2(c + 1) - (c * math.log2(c) if c else 0.0)
        self._counts[unit] = c + 1
        self.n += 1

    def bitrate(self, seconds: float) -> float:
        if self.n == 0 or seconds <= 0:
            return 0.0
        return max(0.0, self.n * math.log2(self.n) - self._sum_clogc) / seconds
