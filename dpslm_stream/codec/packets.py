"""Packetizer and depacketizer: committed units -> self-terminating coded packets -> units, sans-I/O.

`PacketEncoder.push(units, durations, t_ms)` takes the units a stream committed at stream time t_ms; packet j
carries the units committed in [j*P, (j+1)*P) (P = packet interval) and leaves as soon as the clock (a later push,
`advance(t_ms)` or `finish()`) reaches (j+1)*P: a unit's bits leave within one packet interval of its commit when
the caller advances the clock at least that often. Intervals without units send nothing.

Resync: the first packet, and the first packet at or after every multiple of the resync interval, resets the coder
context (RESYNC flag): it decodes without any earlier packet. `PacketDecoder` decodes packets in order; after a
lost packet (a gap in the 16-bit sequence numbers), a damaged packet or a desync (both seen by the CRC over the
decoded units) it skips packets until the next RESYNC packet and counts what it lost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from dpslm_stream.codec.entropy import RangeReader, encode_packet, frequencies_from_weights
from dpslm_stream.codec.format import (
    MAX_UNITS_PER_PACKET, PKT_END, PKT_RESYNC, PKT_SKIPPED, BitstreamError, Header, Packet,
)  # fmt: skip
from dpslm_stream.codec.models import UnitModel
from dpslm_stream.errors import InvalidInput

# Durations (run lengths, 20 ms frames): d in 1..63 is symbol d-1 of a fixed geometric model (p ~ 0.8^d); longer
# runs are the escape symbol 63 then d - 64 as three uniform bytes (runs up to ~93 h).
_DURATION_ESCAPE = 63
_DURATION_FREQ = frequencies_from_weights(
    np.array([int(2**30 * 0.8**d) for d in range(1, 64)] + [1 << 12], dtype=np.int64)
)
_BYTE_FREQ = frequencies_from_weights(np.ones(256, dtype=np.int64))
_MAX_DURATION = 64 + (1 << 24) - 1
_SEQ_MOD = 1 << 16


def _duration_symbols(durations: Sequence[int]) -> tuple[list[np.ndarray], list[int]]:
    freqs, symbols = [], []
    for d in durations:
        d = int(d)
        if not 1 <= d <= _MAX_DURATION:
            raise InvalidInput(f"unit durations must be 1..{_MAX_DURATION} frames, got {d}")
        if d < 64:
            freqs.append(_DURATION_FREQ), symbols.append(d - 1)
        else:
            rest = d - 64
            freqs += [_DURATION_FREQ, _BYTE_FREQ, _BYTE_FREQ, _BYTE_FREQ]
            symbols += [_DURATION_ESCAPE, rest >> 16, (rest >> 8) & 255, rest & 255]
    return freqs, symbols


def _decode_durations(data: bytes, n: int) -> list[int]:
    reader, out = RangeReader(data), []
    for _ in range(n):
        s = reader.decode(_DURATION_FREQ)
        if s == _DURATION_ESCAPE:
            b = [reader.decode(_BYTE_FREQ) for _ in range(3)]
            out.append(64 + (b[0] << 16) + (b[1] << 8) + b[2])
        else:
            out.append(s + 1)
    return out


def check_model(header: Header, model: UnitModel) -> None:
    """The model must be the one the stream was coded with: same coder, K and hash."""
    if model.coder != header.coder:
        raise BitstreamError(f"the stream is coded with '{header.coder}', not '{model.coder}'")
    if model.k != header.k:
        raise BitstreamError(f"the stream has k={header.k} units but the {model.coder} model has k={model.k}: "
                             f"use the table/ULM for k={header.k}")  # fmt: skip
    if model.model_hash != header.model_hash:
        raise BitstreamError(f"wrong model: the stream was coded with {header.coder} model {header.model_hash.hex()}, "
                             f"this one is {model.model_hash.hex()} (use the same --models, --k, --lmbda or --table)")  # fmt: skip


@dataclass
class EncoderStats:
    packets: int = 0
    units: int = 0
    resyncs: int = 0  # packets that reset the coder context (the first one included)
    payload_bits: int = 0  # unit payload bytes * 8
    duration_bits: int = 0  # duration payload bytes * 8
    overhead_bits: int = 0  # packet framing: sequence number, flags, lengths, CRC
    header_bits: int = 0
    ideal_bits: float = 0.0  # -sum log2 p(unit) under the model's unquantized probabilities

    def to_json(self) -> dict:
        return asdict(self)


class PacketEncoder:
    """One stream's sender side. Bounded: it holds the open interval's units and the model's segment context."""

    def __init__(self, header: Header, model: UnitModel):
        check_model(header, model)
        self.header = header
        self.model = model
        self.stats = EncoderStats(header_bits=8 * len(header.to_bytes()))
        self._seq = 0
        self._interval: int | None = None  # index of the open interval
        self._units: list[int] = []
        self._durations: list[int] = []
        self._last_t = 0
        self._next_resync: int | None = None  # ms; None: the next packet resyncs
        self._pause_ms = 0  # DTX: silence not sent since the last packet
        self.finished = False

    def header_bytes(self) -> bytes:
        return self.header.to_bytes()

    def push(self, units: Sequence[int], durations: Sequence[int] | None, t_ms: int, pause_ms: int = 0) -> list[bytes]:
        """Units committed at stream time t_ms (ms, non-decreasing; earlier times count as the last one).
        `pause_ms` (DTX streams): silence the sender did not send just before these units."""
        if self.finished:
            raise InvalidInput("the stream is finished; start a new encoder")
        if self.header.durations and (durations is None or len(durations) != len(units)):
            raise InvalidInput("this stream codes durations: give one per unit")
        for u in units:
            if not 0 <= int(u) < self.header.k:
                raise InvalidInput(f"unit {u} outside 0..{self.header.k - 1}")
        out = self.advance(t_ms)
        if pause_ms and self.header.dtx:
            self._pause_ms += int(pause_ms)
        if units:
            self._interval = max(self._last_t, int(t_ms)) // self.header.packet_ms
            self._units += [int(u) for u in units]
            self._durations += [int(d) for d in durations] if self.header.durations else []
        return out

    def advance(self, t_ms: int) -> list[bytes]:
        """Move the clock to t_ms: the open packet leaves once its interval has ended."""
        self._last_t = max(self._last_t, int(t_ms))
        if self._units and self._last_t >= (self._interval + 1) * self.header.packet_ms:
            return self._emit(0)
        return []

    def finish(self) -> list[bytes]:
        """Close the stream: the open packet (or an empty one) leaves with the END flag."""
        if self.finished:
            return []
        self.finished = True
        if self._interval is None:
            self._interval = self._last_t // self.header.packet_ms
        return self._emit(PKT_END)

    def _emit(self, end_flag: int) -> list[bytes]:
        units, durations = self._units, self._durations
        self._units, self._durations = [], []
        start_ms = self._interval * self.header.packet_ms
        out = []
        for i in range(0, max(len(units), 1), MAX_UNITS_PER_PACKET):
            last = i + MAX_UNITS_PER_PACKET >= len(units)
            out.append(self._packet(units[i : i + MAX_UNITS_PER_PACKET], durations[i : i + MAX_UNITS_PER_PACKET],
                                    start_ms, end_flag if last else 0))  # fmt: skip
        return out

    def _packet(self, units: list[int], durations: list[int], start_ms: int, flags: int) -> bytes:
        resync_ms = self.header.resync_ms
        if self._next_resync is None or (resync_ms and start_ms >= self._next_resync):
            flags |= PKT_RESYNC
            self.model.reset()
            self._next_resync = (start_ms // resync_ms + 1) * resync_ms if resync_ms else 1 << 62
            self.stats.resyncs += 1
        freqs = []
        for u in units:
            freqs.append(self.model.frequencies())
            self.stats.ideal_bits += self.model.ideal_bits(u)
            self.model.advance(u)
        skipped = round(self._pause_ms / self.header.packet_ms)  # the pause, in packet intervals
        self._pause_ms = 0
        if skipped:
            flags |= PKT_SKIPPED
        packet = Packet(seq=self._seq, flags=flags, num_units=len(units), payload=encode_packet(freqs, units),
                        skipped=skipped)  # fmt: skip
        if self.header.durations:
            packet.duration_payload = encode_packet(*_duration_symbols(durations))
        data = packet.seal(units, self.header).to_bytes(self.header)
        self._seq = (self._seq + 1) % _SEQ_MOD
        s = self.stats
        s.packets += 1
        s.units += len(units)
        s.payload_bits += 8 * len(packet.payload)
        s.duration_bits += 8 * len(packet.duration_payload)
        s.overhead_bits += 8 * (len(data) - len(packet.payload) - len(packet.duration_payload))
        return data


@dataclass
class DecodedPacket:
    seq: int | None
    status: str  # "ok", "skipped" (context lost: waiting for a resync packet), "damaged" (CRC/framing/desync)
    units: list[int] = field(default_factory=list)
    durations: list[int] | None = None
    lost_before: int = 0  # packets missing (sequence gap) just before this one
    resync: bool = False
    end: bool = False
    skipped: int = 0  # DTX: packet intervals of silence the sender did not send just before this packet


@dataclass
class ReceiverReport:
    packets_received: int = 0
    packets_lost: int = 0  # sequence-number gaps
    packets_damaged: int = 0  # framing or CRC failure (corruption, or a decoder that drifted from the encoder)
    packets_skipped: int = 0  # intact but undecodable: the context was lost, waiting for the next resync
    resyncs: int = 0  # resync packets decoded (the first one included)
    recoveries: int = 0  # resync packets that ended a loss
    units_decoded: int = 0
    units_lost_known: int = 0  # units in damaged or skipped packets (the count of units in lost packets is unknown)
    ended: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.packets_received} packets received, {self.packets_lost} lost, {self.packets_damaged} "
                f"damaged, {self.packets_skipped} skipped until a resync; {self.resyncs} resyncs "
                f"({self.recoveries} after a loss); {self.units_decoded} units decoded, {self.units_lost_known} "
                f"known lost (+ those in lost packets)")  # fmt: skip


class PacketDecoder:
    """One stream's receiver side: packets in sending order (some may be missing) -> units."""

    def __init__(self, header: Header, model: UnitModel):
        check_model(header, model)
        self.header = header
        self.model = model
        self.report = ReceiverReport()
        self._expected: int | None = None
        self._synced = False
        self._lost_since_sync = False

    def push(self, data: bytes) -> DecodedPacket:
        """One packet's bytes (exactly one packet)."""
        try:
            packet, end = Packet.parse(data, 0, self.header)
            if end != len(data):
                raise BitstreamError("corrupted packet: bytes after its CRC")
        except BitstreamError:
            self.report.packets_received += 1
            self.report.packets_damaged += 1
            self._synced = False
            self._lost_since_sync = True
            return DecodedPacket(seq=None, status="damaged")
        return self.push_packet(packet)

    def push_packet(self, packet: Packet) -> DecodedPacket:
        r = self.report
        r.packets_received += 1
        lost = 0 if self._expected is None else (packet.seq - self._expected) % _SEQ_MOD
        self._expected = (packet.seq + 1) % _SEQ_MOD
        if lost:
            r.packets_lost += lost
            self._synced = False
            self._lost_since_sync = True
        out = DecodedPacket(seq=packet.seq, status="ok", lost_before=lost, resync=packet.resync, end=packet.end,
                            skipped=packet.skipped)  # fmt: skip
        r.ended = r.ended or packet.end
        if packet.resync:
            self.model.reset()
            self._synced = True
        if not self._synced:
            r.packets_skipped += 1
            r.units_lost_known += packet.num_units
            out.status = "skipped"
            return out
        try:
            units = self._decode_units(packet)
            durations = _decode_durations(packet.duration_payload, packet.num_units) if self.header.durations else None
            if packet.checksum(units, self.header) != packet.crc:
                raise BitstreamError("CRC mismatch")
        except (BitstreamError, ValueError):
            r.packets_damaged += 1
            r.units_lost_known += packet.num_units
            self._synced = False
            self._lost_since_sync = True
            out.status = "damaged"
            return out
        if packet.resync:
            r.resyncs += 1
            r.recoveries += int(self._lost_since_sync)
            self._lost_since_sync = False
        r.units_decoded += len(units)
        out.units, out.durations = units, durations
        return out

    def _decode_units(self, packet: Packet) -> list[int]:
        reader, units = RangeReader(packet.payload), []
        for _ in range(packet.num_units):
            u = reader.decode(self.model.frequencies())
            units.append(u)
            self.model.advance(u)
        return units


# --- whole streams (files) --------------------------------------------------------------------------------------------


def encode_stream(header: Header, model: UnitModel, commits: Iterable[tuple]) -> tuple[bytes, EncoderStats]:
    """A whole `.dpsu` stream from (units, durations, commit_ms[, pause_ms]) events."""
    enc = PacketEncoder(header, model)
    parts = [enc.header_bytes()]
    for commit in commits:
        parts += enc.push(*commit)
    parts += enc.finish()
    return b"".join(parts), enc.stats


@dataclass
class DecodedStream:
    header: Header
    units: list[int]
    durations: list[int] | None
    report: ReceiverReport
    segments: list[list[int]] = field(default_factory=list)  # units of each run of packets decoded without a gap
    problems: list[str] = field(default_factory=list)
    silences: list[tuple[int, int]] = field(default_factory=list)  # DTX: (units before it, milliseconds) per pause


def read_header(data: bytes) -> Header:
    return Header.parse(data)[0]


def decode_stream(data: bytes, model_for: Callable[[Header], UnitModel], strict: bool = True) -> DecodedStream:
    """Decode a `.dpsu` stream. strict: any damage is a BitstreamError naming it. Otherwise (lossy) every
    undamaged resync segment is decoded and the report says what was lost; after a framing error the reader scans
    forward for the next RESYNC packet whose CRC checks."""
    header, pos = Header.parse(data)
    dec = PacketDecoder(header, model_for(header))
    out = DecodedStream(header, [], [] if header.durations else None, dec.report)
    segment: list[int] = []
    index = 0
    while pos < len(data):
        try:
            packet, nxt = Packet.parse(data, pos, header)
        except BitstreamError as e:
            if strict:
                raise BitstreamError(f"{e} (packet {index}, byte {pos})") from None
            out.problems.append(f"packet {index} at byte {pos}: {e}")
            dec.report.packets_damaged += 1
            pos = _scan_for_resync(data, pos + 1, header, model_for)
            dec._synced = False
            dec._lost_since_sync = True
            continue
        got = dec.push_packet(packet)
        if header.dtx and got.skipped:
            out.silences.append((len(out.units), got.skipped * header.packet_ms))
        if got.status != "ok" or got.lost_before:
            if strict:
                what = {"damaged": "is corrupted (CRC mismatch: damaged bytes, or a decoder out of step with the "
                                   "encoder)", "skipped": "follows a lost packet"}.get(got.status, "follows a gap")  # fmt: skip
                raise BitstreamError(f"packet {index} (seq {packet.seq}) {what}; decode with --lossy to keep the "
                                     f"undamaged segments")  # fmt: skip
            if got.lost_before:
                out.problems.append(f"{got.lost_before} packet(s) missing before seq {packet.seq}")
            if got.status != "ok":
                out.problems.append(f"packet {index} (seq {packet.seq}) {got.status}")
        if got.resync or got.status != "ok" or got.lost_before:
            if segment:
                out.segments.append(segment)
            segment = []
        if got.status == "ok":
            segment += got.units
            out.units += got.units
            if out.durations is not None:
                out.durations += got.durations
        pos = nxt
        index += 1
        if packet.end:
            break
    if segment:
        out.segments.append(segment)
    if not dec.report.ended:
        if strict:
            raise BitstreamError(f"truncated stream: it ends after {index} packet(s) without the END packet")
        out.problems.append("truncated: no END packet")
    elif pos < len(data) and strict:
        raise BitstreamError(f"corrupted stream: {len(data) - pos} byte(s) after the END packet")
    return out


def _scan_for_resync(data: bytes, pos: int, header: Header, model_for: Callable[[Header], UnitModel]) -> int:
    """The next offset holding a RESYNC packet that decodes with a fresh context and checks (or the end)."""
    probe = PacketDecoder(header, model_for(header))
    for start in range(pos, len(data)):
        try:
            packet, nxt = Packet.parse(data, start, header)
            if not packet.resync:
                continue
            if nxt < len(data):
                Packet.parse(data, nxt, header)  # the next packet must frame too
        except BitstreamError:
            continue
        probe._expected, probe._synced = packet.seq, False
        if probe.push_packet(packet).status == "ok":
            return start
    return len(data)


FRAME_MS = 20  # one DPDP frame


def commits_offline(units, durations) -> list[tuple[list[int], list[int], int]]:
    """Offline, a unit is taken as committed when its last frame ends."""
    out, end = [], 0
    for u, d in zip(units, durations):
        end += int(d)
        out.append(([int(u)], [int(d)], end * FRAME_MS))
    return out


def commits_streamed(res) -> list[tuple[list[int], list[int], int]]:
    """The streaming encoder's own commit times (audio received when each unit was committed)."""
    lags = res.commit_lags_s
    out, end = [], 0
    for u, d, lag in zip(res.units, res.durations, lags):
        end += int(d)
        out.append(([int(u)], [int(d)], int(round((end * FRAME_MS / 1000 + lag) * 1000))))
    return out
