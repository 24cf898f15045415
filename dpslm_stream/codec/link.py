"""The live link, sans-I/O: a sender-side `Transmitter` (a session's committed units -> packets on a wall clock) and
a receiver-side `Receiver` (frames -> channel impairments -> decoded units, segments and a report).

Neither touches a socket or a clock: every call carries `now` (seconds). The server's session core owns one
Transmitter per session that asked for `start.transmit`; `dpslm-stream receive` owns a Receiver.

Packet timing is wall-clock: packet j of a session holds the units committed in [t0 + j*P, t0 + (j+1)*P) and is
due at t0 + (j+1)*P (`next_deadline`), so a unit's bits leave within one packet interval of its commit when the
owner calls `tick` at the deadline: all of them with termination "packet"; with "segment" the bytes that became final
by then (the rest follow with the next packets or the segment's terminating packet, also a deadline).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from dpslm_stream.codec.channel import Channel
from dpslm_stream.codec.format import TERMINATIONS, BitstreamError, Header
from dpslm_stream.codec.models import UnitModel
from dpslm_stream.codec.packets import DecodedPacket, PacketDecoder, PacketEncoder
from dpslm_stream.errors import InvalidInput

TRANSMIT_CODERS = ("uniform", "table", "ulm")


@dataclass(frozen=True)
class TransmitOptions:
    """`start.transmit`: what bitstream the server emits for the session. Validated here (see json_types)."""

    coder: str = "uniform"
    packet_ms: int = 100
    resync_s: float = 5.0
    durations: bool = False
    termination: str = "packet"  # live default: every packet decodes on arrival ("segment": the efficiency bound)

    @classmethod
    def json_types(cls) -> dict:
        return {"coder": str, "packet_ms": int, "resync_s": (int, float), "durations": bool, "termination": str}

    @classmethod
    def from_json(cls, d: object) -> "TransmitOptions":
        if not isinstance(d, dict):
            raise InvalidInput("transmit must be an object, e.g. {\"coder\": \"ulm\", \"packet_ms\": 100}")
        types = cls.json_types()
        for key, value in d.items():
            if key not in types:
                raise InvalidInput(f"unknown transmit option {key!r}; known: {', '.join(types)}")
            want = types[key]
            if isinstance(value, bool) and want is not bool or not isinstance(value, want):
                raise InvalidInput(f"transmit.{key} has the wrong type ({type(value).__name__})")
        opts = cls(**d)
        if opts.coder not in TRANSMIT_CODERS:
            raise InvalidInput(f"transmit.coder must be one of {', '.join(TRANSMIT_CODERS)}, got {opts.coder!r}")
        if not 20 <= opts.packet_ms <= 200:
            raise InvalidInput(f"transmit.packet_ms must be 20..200, got {opts.packet_ms}")
        if not (math.isfinite(opts.resync_s) and 0 <= opts.resync_s <= 600):
            raise InvalidInput(f"transmit.resync_s must be 0..600, got {opts.resync_s}")
        if opts.termination not in TERMINATIONS:
            raise InvalidInput(f"transmit.termination must be one of {', '.join(TERMINATIONS)}, got {opts.termination!r}")
        return opts

    def to_json(self) -> dict:
        return {"coder": self.coder, "packet_ms": self.packet_ms, "resync_s": self.resync_s,
                "durations": self.durations, "termination": self.termination}  # fmt: skip

    def header(self, k: int, lmbda: int, model: UnitModel, table: bytes | None = None) -> Header:
        return Header(k=k, lmbda=lmbda, coder=self.coder, packet_ms=self.packet_ms,
                      resync_ms=int(round(self.resync_s * 1000)), model_hash=model.model_hash,
                      durations=self.durations, table=table, termination=self.termination)  # fmt: skip


class Transmitter:
    """One session's sender side. Bounded state: the open packet's units, the coder's segment context, a unit
    histogram (K counters) for the running authors' bitrate."""

    def __init__(self, header: Header, model: UnitModel, t0: float):
        self.encoder = PacketEncoder(header, model)
        self.t0 = t0
        self._counts: Counter[int] = Counter()
        self._last_now = t0

    def _ms(self, now: float) -> int:
        self._last_now = max(self._last_now, now)
        return int(round((self._last_now - self.t0) * 1e6)) // 1000  # via microseconds: a deadline maps to its ms

    def header_bytes(self) -> bytes:
        return self.encoder.header_bytes()

    def on_units(self, units: list[int], durations: list[int] | None, now: float) -> list[bytes]:
        self._counts.update(int(u) for u in units)
        return self.encoder.push(units, durations, self._ms(now))

    def tick(self, now: float) -> list[bytes]:
        return self.encoder.advance(self._ms(now))

    def next_deadline(self) -> float:
        """When the next packet is due (inf when none is): the open interval's, or the open segment's termination."""
        due = self.encoder.next_due_ms()
        return math.inf if due is None else self.t0 + due / 1000

    def finish(self, now: float) -> list[bytes]:
        return self.tick(now) + self.encoder.finish()

    def stats(self, now: float) -> dict:
        """Running figures: payload bit/s (with and without framing) next to the authors' unigram-entropy bitrate,
        all over the session's wall-clock time so far."""
        s = self.encoder.stats
        seconds = max(now - self.t0, 1e-9)
        n = sum(self._counts.values())
        entropy = -sum(c / n * math.log2(c / n) for c in self._counts.values()) if n else 0.0
        return {"packets": s.packets, "units": s.units, "payload_bps": s.payload_bits / seconds,
                "on_wire_bps": (s.payload_bits + s.duration_bits + s.overhead_bits) / seconds,
                "durations_bps": s.duration_bits / seconds, "ideal_bps": s.ideal_bits / seconds,
                "authors_bitrate": n * entropy / seconds, "resyncs": s.resyncs}  # fmt: skip


@dataclass
class ReceivedStream:
    units: list[int] = field(default_factory=list)
    segments: list[list[int]] = field(default_factory=list)  # runs of units decoded without a gap
    gaps_before: list[int] = field(default_factory=list)  # per segment: packets lost or undecodable before it


class Receiver:
    """Receiving side of the link: frames (header first) -> optional channel -> PacketDecoder."""

    def __init__(self, model_for: Callable[[Header], UnitModel], channel: Channel | None = None):
        self.model_for = model_for
        self.channel = channel
        self.header: Header | None = None
        self.decoder: PacketDecoder | None = None
        self.stream = ReceivedStream()
        self._queue: list[tuple[float, int, bytes]] = []  # (delivery time, order, packet) in flight
        self._order = 0
        self._gap = 0
        self._open = False  # the last decoded packet continues a segment

    def on_header(self, data: bytes) -> Header:
        if self.header is not None:
            raise BitstreamError("a second stream header on one link")
        self.header, _ = Header.parse(data)
        self.decoder = PacketDecoder(self.header, self.model_for(self.header))
        return self.header

    def on_packet(self, data: bytes, now: float) -> list[DecodedPacket]:
        """A packet as the sender emitted it: through the channel, then decoded when it is delivered."""
        if self.decoder is None:
            raise BitstreamError("a packet before the stream header")
        deliveries = [(now, data)] if self.channel is None else [(t / 1000, p) for t, p in self.channel.send(data, now * 1000)]
        for t, p in deliveries:
            heapq.heappush(self._queue, (t, self._order, p))
            self._order += 1
        return self.due(now)

    def next_delivery(self) -> float:
        return self._queue[0][0] if self._queue else math.inf

    def due(self, now: float) -> list[DecodedPacket]:
        out = []
        while self._queue and self._queue[0][0] <= now:
            out.append(self._decode(heapq.heappop(self._queue)[2]))
        return out

    def drain(self) -> list[DecodedPacket]:
        return self.due(math.inf)

    def _decode(self, data: bytes) -> DecodedPacket:
        got = self.decoder.push(data)
        s = self.stream
        self._gap += got.lost_before
        if got.lost_before:  # (a packet after a gap may decode no unit yet: the next one must still start anew)
            self._open = False
        if got.status != "ok":
            self._gap += 1
            self._open = False
            return got
        if got.units:
            if not self._open:
                s.segments.append([])
                s.gaps_before.append(self._gap)
                self._gap = 0
            s.segments[-1] += got.units
            s.units += got.units
            self._open = True
        return got

    def report(self) -> dict:
        out = {"receiver": self.decoder.report.to_json() if self.decoder else None}
        if self.channel is not None:
            out["channel"] = self.channel.report.to_json()
        return out
