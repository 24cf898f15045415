"""One range code's worth of a stream, at both ends: the units (and durations) a packetizer has coded since the code
began, the bytes each packet carries, and which units those bytes make decodable.

A code spans one packet (termination "packet") or one resync segment (termination "segment"). The sender
(`SegmentWriter`) hands out, per packet, the bytes that settled since the previous packet, or everything that is left
when the packet terminates the code; it also runs the receiver's determinacy test on those bytes (the range coder's
mirror), so it knows which units the receiver can decode once the packet arrives: those are what the packet's CRC
covers. The receiver (`SegmentReader`) decodes each unit as soon as the bytes it holds determine it.
Version-1 streams (every packet its own constriction range code) are read by `V1PacketReader`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dpslm_stream.codec.entropy import TOTAL, RangeReader, frequencies_from_weights
from dpslm_stream.codec.format import BitstreamError, Packet
from dpslm_stream.codec.models import UnitModel
from dpslm_stream.codec.rangecoder import RangeDecoder, RangeEncoder, interval
from dpslm_stream.errors import InvalidInput

# Durations (run lengths, 20 ms frames): d in 1..63 is symbol d-1 of a fixed geometric model (p ~ 0.8^d); longer
# runs are the escape symbol 63 then d - 64 as three uniform bytes (runs up to ~93 h).
_DURATION_ESCAPE = 63
_DURATION_FREQ = frequencies_from_weights(
    np.array([int(2**30 * 0.8**d) for d in range(1, 64)] + [1 << 12], dtype=np.int64)
)
_BYTE_FREQ = frequencies_from_weights(np.ones(256, dtype=np.int64))
MAX_DURATION = 64 + (1 << 24) - 1


def duration_symbols(durations: Sequence[int]) -> tuple[list[np.ndarray], list[int]]:
    freqs, symbols = [], []
    for d in durations:
        d = int(d)
        if not 1 <= d <= MAX_DURATION:
            raise InvalidInput(f"unit durations must be 1..{MAX_DURATION} frames, got {d}")
        if d < 64:
            freqs.append(_DURATION_FREQ), symbols.append(d - 1)
        else:
            rest = d - 64
            freqs += [_DURATION_FREQ, _BYTE_FREQ, _BYTE_FREQ, _BYTE_FREQ]
            symbols += [_DURATION_ESCAPE, rest >> 16, (rest >> 8) & 255, rest & 255]
    return freqs, symbols


@dataclass(frozen=True)
class Decodable:
    """A unit the receiver can decode once the packet that made it decodable arrives."""

    unit: int
    index: int  # position in the stream (units coded before it)
    commit_ms: int


class SegmentWriter:
    """The sender's open code(s): units, and durations in a second code when the stream carries them. Bounded: the
    units coded but not yet decodable at the receiver (a few, typically; see docs/bitstream.md)."""

    def __init__(self, durations: bool):
        self._units = RangeEncoder()
        self._durations = RangeEncoder() if durations else None
        self._mirror = RangeDecoder()
        self._pending: deque[tuple[int, int, Decodable]] = deque()  # (cum, freq, unit) not yet decodable
        self.coded = 0  # units coded since the code began

    @property
    def open(self) -> bool:
        """Units were coded since the last termination."""
        return self.coded > 0

    def add(self, freq: np.ndarray, unit: Decodable, duration: int | None) -> float:
        """Code one unit (and its duration); its information under the quantized frequencies, in bits."""
        cum, f = interval(freq, unit.unit)
        self._units.encode(cum, f)
        self._pending.append((cum, f, unit))
        if self._durations is not None:
            for dfreq, symbol in zip(*duration_symbols([duration])):
                self._durations.encode(*interval(dfreq, symbol))
        self.coded += 1
        return -math.log2(f / TOTAL)

    def take(self, terminate: bool) -> tuple[bytes, bytes, list[Decodable]]:
        """(unit bytes, duration bytes, units the receiver can decode with them) for the next packet."""
        durations = self._durations
        if terminate:
            payload = self._units.finish()
            dpayload = durations.finish() if durations is not None else b""
            ready = [u for _, _, u in self._pending]
            self._pending.clear()
            self._mirror = RangeDecoder()
            self.coded = 0
            return payload, dpayload, ready
        payload = self._units.take_settled()
        dpayload = durations.take_settled() if durations is not None else b""
        self._mirror.feed(payload)
        ready = []
        while self._pending and self._mirror.decode_known(*self._pending[0][:2]):
            ready.append(self._pending.popleft()[2])
        return payload, dpayload, ready


class SegmentReader:
    """The receiver's open code: packets' bytes in -> units (and durations) as soon as they are determined."""

    def __init__(self, durations: bool):
        self._units = RangeDecoder()
        self._durations = RangeDecoder() if durations else None
        self._escape: list[int] = []  # a long duration's symbols decoded so far (escape, then three bytes)
        self.announced = 0  # units the packets of this code said they carry
        self.decoded = 0
        self.durations_decoded = 0

    @property
    def pending(self) -> int:
        return self.announced - self.decoded

    def read(self, packet: Packet, model: UnitModel, terminated: bool) -> tuple[list[int], list[int] | None]:
        """The units (and durations) this packet makes decodable, in order."""
        self._units.feed(packet.payload)
        self.announced += packet.num_units
        if terminated:
            self._units.end()
        units = []
        while self.decoded < self.announced:
            unit = self._units.decode(model.frequencies())
            if unit is None:
                break
            if not 0 <= unit < model.k:
                raise BitstreamError("corrupted payload: a unit id past K")
            model.advance(unit)
            units.append(unit)
            self.decoded += 1
        durations = self._read_durations(packet.duration_payload, terminated) if self._durations is not None else None
        if terminated and (self.pending or (durations is not None and self.durations_decoded < self.announced)):
            raise BitstreamError("corrupted payload: a terminated code does not hold the units its packets announced")
        return units, durations

    def _read_durations(self, data: bytes, terminated: bool) -> list[int]:
        dec = self._durations
        dec.feed(data)
        if terminated:
            dec.end()
        out = []
        while self.durations_decoded < self.announced:
            symbol = dec.decode(_BYTE_FREQ if self._escape else _DURATION_FREQ)
            if symbol is None:
                break
            if self._escape or symbol == _DURATION_ESCAPE:
                self._escape.append(symbol)
                if len(self._escape) < 4:
                    continue
                _, a, b, c = self._escape
                self._escape = []
                out.append(64 + (a << 16) + (b << 8) + c)
            else:
                out.append(symbol + 1)
            self.durations_decoded += 1
        return out


class V1PacketReader:
    """Version 1: every packet is its own constriction range code, padded with zero words."""

    pending = 0

    def __init__(self, durations: bool):
        self._durations = durations

    def read(self, packet: Packet, model: UnitModel, terminated: bool) -> tuple[list[int], list[int] | None]:
        reader, units = RangeReader(packet.payload), []
        for _ in range(packet.num_units):
            u = reader.decode(model.frequencies())
            units.append(u)
            model.advance(u)
        if not self._durations:
            return units, None
        reader, durations = RangeReader(packet.duration_payload), []
        for _ in range(packet.num_units):
            s = reader.decode(_DURATION_FREQ)
            if s == _DURATION_ESCAPE:
                b = [reader.decode(_BYTE_FREQ) for _ in range(3)]
                durations.append(64 + (b[0] << 16) + (b[1] << 8) + b[2])
            else:
                durations.append(s + 1)
        return units, durations
