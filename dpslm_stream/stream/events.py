"""What an encoder session hands back: committed units, one at a time, then one end-of-stream summary.

Events are final: a UnitEvent is never revised or withdrawn, and `seq` numbers them 0, 1, 2, ... per stream.
Frames are WavLM's 20 ms frames counted from the start of the stream; times are in seconds of stream audio.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Union

FRAME_SECONDS = 0.02  # one WavLM frame: 320 samples at 16 kHz


@dataclass(frozen=True)
class UnitEvent:
    """One deduplicated unit: a DPDP segment [start_frame, end_frame) whose unit and both ends are final."""

    seq: int  # 0, 1, 2, ... within the stream
    unit: int  # codebook index, 0..k-1
    start_frame: int
    end_frame: int  # exclusive; duration = end_frame - start_frame frames
    start_s: float  # start_frame * 0.02
    end_s: float  # end_frame * 0.02
    commit_audio_s: float  # seconds of audio the session had received when the unit was committed
    logprob: float | None = None  # ULM log p(unit | BOS, earlier units), natural log; None when scoring is off

    @property
    def duration(self) -> int:
        """Frames the unit lasts."""
        return self.end_frame - self.start_frame

    @property
    def commit_lag_s(self) -> float:
        """Audio received after the unit's last frame before it was committed (algorithmic + DPDP lag, no compute)."""
        return self.commit_audio_s - self.end_s


@dataclass(frozen=True)
class EndEvent:
    """End of stream: every unit has been sent; the totals of the stream."""

    units: int  # number of UnitEvents sent
    seconds: float  # duration of the input audio
    frames: int  # WavLM frames covered by the units (floor(16 kHz samples / 320))
    bitrate: float  # authors' definition: units * unigram entropy / seconds, in bit/s
    loglikelihood: float | None = None  # sum of the units' logprobs when scoring is on
    forced_commits: int = 0  # DPDP decisions forced by max_lag (0: the units are exactly offline DPDP's)


Event = Union[UnitEvent, EndEvent]


class EventQueue:
    """The output side every session shares: events that became final wait in ``_events`` (a deque: appended on the
    worker's thread, taken on the caller's, both thread-safe) until ``poll`` hands them over, in order."""

    _events: deque

    def poll(self) -> list:
        """Events that became final since the last poll, in order."""
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out
