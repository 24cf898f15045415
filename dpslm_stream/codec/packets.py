"""Packetizer and depacketizer: committed units -> coded packets -> units, sans-I/O.

`PacketEncoder.push(units, durations, t_ms)` takes the units a stream committed at stream time t_ms; packet j
carries the units committed in [j*P, (j+1)*P) (P = packet interval) and leaves as soon as the clock (a later push,
`advance(t_ms)` or `finish()`) reaches (j+1)*P: a unit's bits leave within one packet interval of its commit when
the caller advances the clock at least that often. Intervals without units send nothing.

Resync: the first packet, and the first packet at or after every multiple of the resync interval, resets the coder
context (RESYNC flag): it decodes without any earlier packet. Termination (header): with "packet" every packet is
its own range code (TERMINATED) and decodes on arrival; with "segment" a resync segment is one range code, each
packet carries the bytes that settled since the previous one, and the segment's last packet terminates it (an empty
TERMINATED packet when the segment's last interval had no units). `PacketDecoder` decodes packets in order; after a
lost packet (a gap in the 16-bit sequence numbers), a damaged packet or a desync (both seen by the CRC over the
units the packet makes decodable) it skips packets until the next RESYNC packet and counts what it lost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from dpslm_stream.codec.format import (
    MAX_UNITS_PER_PACKET, PKT_END, PKT_RESYNC, PKT_SKIPPED, PKT_TERMINATED, VERSION, BitstreamError, Header, Packet,
)  # fmt: skip
from dpslm_stream.codec.models import UnitModel
from dpslm_stream.codec.segment import Decodable, SegmentReader, SegmentWriter, V1PacketReader
from dpslm_stream.errors import InvalidInput

_SEQ_MOD = 1 << 16


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
    terminations: int = 0  # range codes ended (every packet, or once per resync segment)
    payload_bits: int = 0  # unit payload bytes * 8
    duration_bits: int = 0  # duration payload bytes * 8
    overhead_bits: int = 0  # packet framing: sequence number, flags, lengths, CRC
    header_bits: int = 0
    ideal_bits: float = 0.0  # -sum log2 p(unit) under the model's unquantized probabilities
    quantized_bits: float = 0.0  # -sum log2 f(unit)/2^24: the code length of the integer frequencies actually coded
    # Decode lag at a receiver without loss or network delay: from a unit's commit to the packet that makes it
    # decodable leaving (packet due time), and how many units were committed after it by then.
    lag_ms_sum: int = 0
    lag_ms_max: int = 0
    lag_units_sum: int = 0
    lag_units_max: int = 0

    def to_json(self) -> dict:
        return asdict(self)


class PacketEncoder:
    """One stream's sender side. Bounded: the open interval's units, the model's segment context and the open range
    code's units not yet decodable at the receiver."""

    def __init__(self, header: Header, model: UnitModel):
        check_model(header, model)
        if header.version != VERSION:
            raise InvalidInput(f"only bitstream version {VERSION} is written")
        self.header = header
        self.model = model
        self.stats = EncoderStats(header_bits=8 * len(header.to_bytes()))
        self._code = SegmentWriter(header.durations)
        self._seq = 0
        self._interval: int | None = None  # index of the open interval
        self._units: list[int] = []
        self._durations: list[int] = []
        self._commits: list[int] = []  # commit time (ms) of each open unit
        self._coded = 0  # units coded so far
        self._last_t = 0
        self._next_resync: int | None = None  # ms (after the first packet); None: no resync point
        self._segment_end: int | None = None  # ms: the end of the open segment's last interval (termination due)
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
            self._interval = self._last_t // self.header.packet_ms
            self._units += [int(u) for u in units]
            self._durations += [int(d) for d in durations] if self.header.durations else []
            self._commits += [self._last_t] * len(units)
        return out

    def next_due_ms(self) -> int | None:
        """When the next packet is due: the open interval's end, or the open segment's termination."""
        if self.finished:
            return None
        if self._units:
            return (self._interval + 1) * self.header.packet_ms
        return self._segment_end if self._code.open else None

    def advance(self, t_ms: int) -> list[bytes]:
        """Move the clock to t_ms: the open packet leaves once its interval has ended, and an open segment's code is
        terminated (an empty packet) once the segment's last interval has ended."""
        self._last_t = max(self._last_t, int(t_ms))
        out = []
        if self._units and self._last_t >= (self._interval + 1) * self.header.packet_ms:
            out += self._emit(0)
        if not self._units and self._code.open and self._segment_end is not None and self._last_t >= self._segment_end:
            out.append(self._packet([], [], [], self._segment_end, PKT_TERMINATED))
        return out

    def finish(self) -> list[bytes]:
        """Close the stream: the open packet (or an empty one) leaves with the END flag."""
        if self.finished:
            return []
        self.finished = True
        if self._interval is None:
            self._interval = self._last_t // self.header.packet_ms
        if not self._units and self._code.open:  # only the open code to end: no resync before it
            return [self._packet([], [], [], self._last_t, PKT_END | PKT_TERMINATED)]
        return self._emit(PKT_END)

    def _emit(self, end_flag: int) -> list[bytes]:
        units, durations, commits = self._units, self._durations, self._commits
        self._units, self._durations, self._commits = [], [], []
        start_ms = self._interval * self.header.packet_ms
        due = start_ms + self.header.packet_ms if not end_flag else self._last_t
        out = []
        for i in range(0, max(len(units), 1), MAX_UNITS_PER_PACKET):
            last = i + MAX_UNITS_PER_PACKET >= len(units)
            part = slice(i, i + MAX_UNITS_PER_PACKET)
            flags = self._resync_flag(start_ms) if i == 0 else 0
            if last:  # the segment's last interval ends its code (segment termination)
                ends = self._segment_end is not None and start_ms + self.header.packet_ms >= self._segment_end
                flags |= end_flag | (PKT_TERMINATED if ends else 0)
            out.append(self._packet(units[part], durations[part], commits[part], due, flags))
        return out

    def _resync_flag(self, start_ms: int) -> int:
        """RESYNC for the first packet and the first one at or after each resync point: the context is reset."""
        resync_ms = self.header.resync_ms
        if self.stats.resyncs and not (self._next_resync is not None and start_ms >= self._next_resync):
            return 0
        self.model.reset()
        self._next_resync = (start_ms // resync_ms + 1) * resync_ms if resync_ms else None
        p = self.header.packet_ms
        self._segment_end = -(-self._next_resync // p) * p if self._next_resync is not None else None
        self.stats.resyncs += 1
        return PKT_RESYNC

    def _packet(self, units: list[int], durations: list[int], commits: list[int], due_ms: int, flags: int) -> bytes:
        s = self.stats
        for j, u in enumerate(units):
            freq = self.model.frequencies()
            s.ideal_bits += self.model.ideal_bits(u)
            s.quantized_bits += self._code.add(freq, Decodable(u, self._coded, commits[j]),
                                               durations[j] if self.header.durations else None)  # fmt: skip
            self.model.advance(u)
            self._coded += 1
        terminate = self.header.termination == "packet" or bool(flags & (PKT_END | PKT_TERMINATED))
        if terminate:
            flags |= PKT_TERMINATED
            s.terminations += 1
        payload, dpayload, ready = self._code.take(terminate)
        for d in ready:
            s.lag_ms_sum += due_ms - d.commit_ms
            s.lag_ms_max = max(s.lag_ms_max, due_ms - d.commit_ms)
            s.lag_units_sum += self._coded - 1 - d.index
            s.lag_units_max = max(s.lag_units_max, self._coded - 1 - d.index)
        skipped = round(self._pause_ms / self.header.packet_ms)  # the pause, in packet intervals
        self._pause_ms = 0
        if skipped:
            flags |= PKT_SKIPPED
        packet = Packet(seq=self._seq, flags=flags, num_units=len(units), payload=payload, duration_payload=dpayload,
                        skipped=skipped)  # fmt: skip
        data = packet.seal([d.unit for d in ready], self.header).to_bytes(self.header)
        self._seq = (self._seq + 1) % _SEQ_MOD
        s.packets += 1
        s.units += len(units)
        s.payload_bits += 8 * len(payload)
        s.duration_bits += 8 * len(dpayload)
        s.overhead_bits += 8 * (len(data) - len(payload) - len(dpayload))
        return data


@dataclass
class DecodedPacket:
    seq: int | None
    status: str  # "ok", "skipped" (context lost: waiting for a resync packet), "damaged" (CRC/framing/desync)
    units: list[int] = field(default_factory=list)  # the units this packet made decodable (with "segment"
    durations: list[int] | None = None  # termination, some may have been committed in earlier packets)
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
    # Units known lost: in damaged or skipped packets, and those of a broken segment's earlier packets that were not
    # decodable yet (segment termination); how many units the lost packets held is unknown.
    units_lost_known: int = 0
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
        self._code: SegmentReader | V1PacketReader | None = None  # the open range code

    def lose_sync(self) -> None:
        """The context is lost (a gap, damage): what the open code still owed is lost; wait for a RESYNC packet."""
        if self._code is not None and self._synced:
            self.report.units_lost_known += self._code.pending
        self._code = None
        self._synced = False
        self._lost_since_sync = True

    def push(self, data: bytes) -> DecodedPacket:
        """One packet's bytes (exactly one packet)."""
        try:
            packet, end = Packet.parse(data, 0, self.header)
            if end != len(data):
                raise BitstreamError("corrupted packet: bytes after its CRC")
        except BitstreamError:
            self.report.packets_received += 1
            self.report.packets_damaged += 1
            self.lose_sync()
            return DecodedPacket(seq=None, status="damaged")
        return self.push_packet(packet)

    def push_packet(self, packet: Packet) -> DecodedPacket:
        r = self.report
        r.packets_received += 1
        lost = 0 if self._expected is None else (packet.seq - self._expected) % _SEQ_MOD
        self._expected = (packet.seq + 1) % _SEQ_MOD
        if lost:
            r.packets_lost += lost
            self.lose_sync()
        out = DecodedPacket(seq=packet.seq, status="ok", lost_before=lost, resync=packet.resync, end=packet.end,
                            skipped=packet.skipped)  # fmt: skip
        r.ended = r.ended or packet.end
        if packet.resync:
            if self._code is not None:  # a code left open before a resync: its packets were lost
                self.lose_sync()
            self.model.reset()
            self._synced = True
        if not self._synced:
            r.packets_skipped += 1
            r.units_lost_known += packet.num_units
            out.status = "skipped"
            return out
        v1 = self.header.version == 1
        terminated = packet.terminated or v1
        if self._code is None:
            self._code = V1PacketReader(self.header.durations) if v1 else SegmentReader(self.header.durations)
        owed = self._code.pending  # units of earlier packets of this code not decoded yet
        try:
            units, durations = self._code.read(packet, self.model, terminated)
            if packet.checksum(units, self.header) != packet.crc:
                raise BitstreamError("CRC mismatch")
        except (BitstreamError, ValueError):
            r.packets_damaged += 1
            r.units_lost_known += owed + packet.num_units
            self._code = None
            self.lose_sync()
            out.status = "damaged"
            return out
        if terminated:
            self._code = None
        if packet.resync:
            r.resyncs += 1
            r.recoveries += int(self._lost_since_sync)
            self._lost_since_sync = False
        r.units_decoded += len(units)
        out.units, out.durations = units, durations
        return out


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
            dec.lose_sync()
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
        probe._expected = packet.seq
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
