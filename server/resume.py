"""Resume after a dropped connection, as pure state of the session core (server/session.py): no socket, no clock.

A sender's connection can drop with units and audio in flight (in the socket buffers, or still queued): the client
cannot know which of them arrived until it reconnects. So a resumable session keeps

* a ``ReplayLog`` of what it sent that a reconnecting client may have lost: every unit message (by seq) and every
  resynthesized audio chunk (by 24 kHz sample), oldest first, at most ``resume_outbox_bytes`` (older entries fall
  off: a client that missed more than that cannot resume);
* while parked (the transport lost without ``end``), a ``Parked`` record: when the grace period ends, and the
  outbox of what the session produced meanwhile that is not in the log (errors, ``end``, the close), bounded by
  the same number of bytes (beyond it the parked session ends, and a later resume gets ``resume_failed``).

On ``resume`` the core answers ``resumed``, then ``ReplayLog.replay`` (units from the client's next_seq, audio from
its audio_samples, in their original order), then the parked outbox, and streaming goes on.
"""

from __future__ import annotations

import collections
import dataclasses

from dpslm_stream import protocol as P

from . import actions as A

ACK_INTERVAL_S = 0.25  # ack messages at most this often (and before end)


@dataclasses.dataclass(frozen=True)
class _Entry:
    kind: str  # "unit" or "audio"
    first: int  # unit seq, or the chunk's first 24 kHz sample
    end: int  # seq + 1, or one past the chunk's last sample
    data: str | bytes
    nbytes: int


class ReplayLog:
    """The units and audio chunks a session sent, the newest ``max_bytes`` of them (see the module docstring)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.deque[_Entry] = collections.deque()
        self.nbytes = 0
        self.units_from = 0  # units below this seq fell off the log
        self.audio_from = 0  # audio below this sample fell off the log
        self.units_sent = 0  # the next unit seq
        self.audio_sent = 0  # 24 kHz samples sent
        self.holding = False  # parked: nothing falls off (the parked outbox bounds the growth)
        self.final: list[A.Send | A.Close] = []  # the session's end message and close, once sent

    def unit(self, seq: int, text: str, nbytes: int) -> None:
        self._add(_Entry("unit", seq, seq + 1, text, nbytes))
        self.units_sent = seq + 1

    def audio(self, start_sample: int, num_samples: int, frame: bytes) -> None:
        self._add(_Entry("audio", start_sample, start_sample + num_samples, frame, len(frame)))
        self.audio_sent = start_sample + num_samples

    def _add(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self.nbytes += entry.nbytes
        while not self.holding and self.nbytes > self.max_bytes and len(self._entries) > 1:
            old = self._entries.popleft()
            self.nbytes -= old.nbytes
            if old.kind == "unit":
                self.units_from = old.end
            else:
                self.audio_from = old.end

    def refusal(self, next_seq: int, audio_samples: int) -> str | None:
        """Why the log cannot replay from these offsets (None: it can)."""
        if not self.units_from <= next_seq <= self.units_sent:
            return (f"next_seq {next_seq} is outside the units this server can replay ({self.units_from}.."
                    f"{self.units_sent}); the client missed more than serve --resume-outbox-bytes")  # fmt: skip
        if not self.audio_from <= audio_samples <= self.audio_sent:
            return (f"audio_samples {audio_samples} is outside the audio this server can replay ({self.audio_from}.."
                    f"{self.audio_sent})")  # fmt: skip
        return None

    def replay(self, next_seq: int, audio_samples: int) -> list[tuple[str | bytes, int]]:
        """The frames (and their byte counts) a client that has units below ``next_seq`` and ``audio_samples`` of
        audio lacks, in their original order. An audio chunk the client has part of is cut at its sample."""
        frames: list[tuple[str | bytes, int]] = []
        for e in self._entries:
            if e.kind == "unit" and e.first >= next_seq:
                frames.append((e.data, e.nbytes))
            elif e.kind == "audio" and e.end > audio_samples:
                if e.first >= audio_samples:
                    frames.append((e.data, e.nbytes))
                else:
                    assert isinstance(e.data, bytes)
                    kind, seq, _ = P.AUDIO_HEADER.unpack_from(e.data)
                    cut = P.AUDIO_HEADER.size + 2 * (audio_samples - e.first)
                    frame = P.AUDIO_HEADER.pack(kind, seq, audio_samples) + e.data[cut:]
                    frames.append((frame, len(frame)))
        return frames


@dataclasses.dataclass
class Parked:
    """A session whose transport dropped without ``end``: kept until ``deadline`` for a ``resume``."""

    since: float
    deadline: float
    max_bytes: int
    outbox: list[A.Send | A.Close] = dataclasses.field(default_factory=list)  # besides the log's units and audio
    nbytes: int = 0  # produced since parking: units and audio (in the log) and the outbox

    def produced(self, nbytes: int) -> bool:
        """Count ``nbytes`` produced while parked; False once more than ``max_bytes`` were."""
        self.nbytes += nbytes
        return self.nbytes <= self.max_bytes
