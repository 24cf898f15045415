"""The `.dpsu` bitstream format, version 2 (version 1 is still read): a stream header, then packets. Pure bytes <->
dataclasses, no coding.

Byte layout (all integers big-endian; `varint` = unsigned LEB128, 1 byte below 128) is documented in
docs/bitstream.md; this module is its one implementation. Checks: the header carries a CRC-32 (zlib) of its bytes;
every packet carries a CRC-16 (CCITT, `binascii.crc_hqx`) over its own header bytes, its payloads AND the unit ids
it decodes to, so the receiver detects both a damaged packet and a decoder that drifted from the encoder (a
desync: the same bytes decoded with different probabilities give other units, and the CRC no longer matches).
"""

from __future__ import annotations

import binascii
import struct
import zlib
from dataclasses import dataclass, field

from dpslm_stream.errors import DPSLMError, InvalidInput

MAGIC = b"DPSU"
VERSION = 2  # written; 1 (constriction, every packet its own range code) is still read
READABLE_VERSIONS = (1, 2)
TERMINATIONS = ("packet", "segment")  # where the range code ends: every packet, or once per resync segment
CODERS = ("uniform", "table", "ulm")  # coder id = index
MODEL_HASH_BYTES = 16
MAX_UNITS_PER_PACKET = 4096  # a bound on what a packet may claim, checked before anything is decoded
MAX_PAYLOAD_BYTES = 65536
MAX_TABLE_BYTES = 16 << 20

# Header flags
FLAG_DURATIONS = 1  # packets carry a second payload: the units' durations (run lengths in 20 ms frames)
FLAG_TABLE_INLINE = 2  # the table coder's table follows the fixed header
FLAG_DTX = 4  # discontinuous transmission: a packet after a pause says how many packet intervals it skipped
FLAG_SEGMENT_TERMINATION = 8  # (v2) one range code per resync segment, terminated on its last packet
# Packet flags
PKT_RESYNC = 1  # the coder context is reset before this packet: decodable without any earlier packet
PKT_END = 2  # the last packet of the stream
PKT_SKIPPED = 4  # a `skipped` varint follows the lengths (DTX streams, after a pause only)
PKT_TERMINATED = 8  # (v2) the range code ends with this packet: the decoder pads it with zeros, the next one is new

_HEADER = struct.Struct(">4sBBBBHIHI16s")  # magic version flags coder reserved k lmbda packet_ms resync_ms hash


class BitstreamError(DPSLMError, ValueError):
    """A stream that cannot be decoded as it is: truncated, corrupted, another version, or other models."""


def write_varint(n: int) -> bytes:
    if n < 0:
        raise InvalidInput(f"varint of a negative number {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int, limit: int = 1 << 32) -> tuple[int, int]:
    """(value, next position); a value over `limit` or running off the end is a BitstreamError."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise BitstreamError("truncated stream: a length field runs past the end of the data")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if value > limit:
            raise BitstreamError(f"corrupted stream: a length field says {value}, more than the limit {limit}")
        if not byte & 0x80:
            return value, pos
        shift += 7


@dataclass(frozen=True)
class Header:
    """What a decoder must know before the first packet: which units, which coder, which model, which timing."""

    k: int
    lmbda: int
    coder: str
    packet_ms: int
    resync_ms: int  # coder context reset period (0: only at the start)
    model_hash: bytes = bytes(MODEL_HASH_BYTES)  # blake2b-128 of the coder's model (ULM state dict / table)
    durations: bool = False
    table: bytes | None = None  # the table coder's table, when it travels inside the stream
    dtx: bool = False  # silence is not sent; packets carry the number of packet intervals skipped before them
    termination: str = "segment"  # "packet": every packet decodes on its own; "segment": one code per segment
    version: int = VERSION  # only VERSION is written; a parsed version-1 stream says 1 (and "packet")

    def __post_init__(self):
        if self.termination not in TERMINATIONS:
            raise InvalidInput(f"termination must be one of {', '.join(TERMINATIONS)}, got {self.termination!r}")
        if self.coder not in CODERS:
            raise InvalidInput(f"unknown coder {self.coder!r}; choose one of {', '.join(CODERS)}")
        if not 1 <= self.k <= 65535:
            raise InvalidInput(f"k must be in 1..65535, got {self.k}")
        if not 0 <= self.lmbda < 2**32:
            raise InvalidInput(f"lambda must be in 0..2^32-1, got {self.lmbda}")
        if not 1 <= self.packet_ms <= 65535:
            raise InvalidInput(f"packet interval must be 1..65535 ms, got {self.packet_ms}")
        if not 0 <= self.resync_ms < 2**32:
            raise InvalidInput(f"resync interval must be 0..2^32-1 ms, got {self.resync_ms}")
        if len(self.model_hash) != MODEL_HASH_BYTES:
            raise InvalidInput(f"model hash must be {MODEL_HASH_BYTES} bytes")

    def to_bytes(self) -> bytes:
        flags = (FLAG_DURATIONS if self.durations else 0) | (FLAG_TABLE_INLINE if self.table is not None else 0)
        flags |= (FLAG_DTX if self.dtx else 0) | (FLAG_SEGMENT_TERMINATION if self.termination == "segment" else 0)
        if self.version != VERSION:
            raise InvalidInput(f"only bitstream version {VERSION} is written (this header says {self.version})")
        body = _HEADER.pack(MAGIC, VERSION, flags, CODERS.index(self.coder), 0, self.k, self.lmbda, self.packet_ms,
                            self.resync_ms, self.model_hash)  # fmt: skip
        if self.table is not None:
            body += write_varint(len(self.table)) + self.table
        return body + struct.pack(">I", zlib.crc32(body))

    @classmethod
    def parse(cls, buf: bytes | memoryview) -> tuple["Header", int]:
        """(header, bytes consumed)."""
        buf = memoryview(buf)
        if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
            raise BitstreamError("not a DP-SLM unit bitstream (.dpsu): the magic bytes 'DPSU' are missing")
        if len(buf) < _HEADER.size + 4:
            raise BitstreamError("truncated stream: the header is incomplete")
        magic, version, flags, coder, _, k, lmbda, packet_ms, resync_ms, model_hash = _HEADER.unpack_from(buf)
        if version not in READABLE_VERSIONS:
            raise BitstreamError(f"bitstream version {version} is not supported (this build reads versions "
                                 f"{', '.join(map(str, READABLE_VERSIONS))})")  # fmt: skip
        known = FLAG_DURATIONS | FLAG_TABLE_INLINE | FLAG_DTX | (FLAG_SEGMENT_TERMINATION if version >= 2 else 0)
        if flags & ~known:
            raise BitstreamError(f"corrupted header: unknown flags {flags:#x}")
        if coder >= len(CODERS):
            raise BitstreamError(f"corrupted header: unknown coder id {coder}")
        pos = _HEADER.size
        table = None
        if flags & FLAG_TABLE_INLINE:
            n, pos = read_varint(buf, pos, MAX_TABLE_BYTES)
            if pos + n > len(buf):
                raise BitstreamError("truncated stream: the inline table is incomplete")
            table, pos = bytes(buf[pos : pos + n]), pos + n
        if pos + 4 > len(buf):
            raise BitstreamError("truncated stream: the header is incomplete")
        (crc,) = struct.unpack_from(">I", buf, pos)
        if crc != zlib.crc32(buf[:pos]):
            raise BitstreamError("corrupted header: its CRC-32 does not match")
        try:
            header = cls(k=k, lmbda=lmbda, coder=CODERS[coder], packet_ms=packet_ms, resync_ms=resync_ms,
                         model_hash=bytes(model_hash), durations=bool(flags & FLAG_DURATIONS), table=table,
                         dtx=bool(flags & FLAG_DTX), version=version,
                         termination="segment" if flags & FLAG_SEGMENT_TERMINATION else "packet")  # fmt: skip
        except InvalidInput as e:
            raise BitstreamError(f"corrupted header: {e}") from None
        return header, pos + 4


@dataclass
class Packet:
    """One packet: the units committed in one packet interval, range coded (payloads are self-terminating)."""

    seq: int  # 0..65535, wraps
    flags: int
    num_units: int
    payload: bytes  # the units
    duration_payload: bytes = b""  # their durations (only with FLAG_DURATIONS)
    skipped: int = 0  # DTX: the silence not sent just before this packet, in packet intervals (flag PKT_SKIPPED)
    crc: int = field(default=0)  # CRC-16 over the packet's header bytes, payloads and the decoded unit ids

    @property
    def resync(self) -> bool:
        return bool(self.flags & PKT_RESYNC)

    @property
    def end(self) -> bool:
        return bool(self.flags & PKT_END)

    @property
    def terminated(self) -> bool:
        return bool(self.flags & PKT_TERMINATED)

    def _head(self, header: Header) -> bytes:
        head = struct.pack(">HB", self.seq & 0xFFFF, self.flags) + write_varint(self.num_units)
        head += write_varint(len(self.payload))
        if header.durations:
            head += write_varint(len(self.duration_payload))
        if self.flags & PKT_SKIPPED:
            head += write_varint(self.skipped)
        return head

    def checksum(self, units, header: Header) -> int:
        data = self._head(header) + self.payload + self.duration_payload
        data += b"".join(struct.pack(">H", int(u)) for u in units)
        return binascii.crc_hqx(data, 0xFFFF)

    def seal(self, units, header: Header) -> "Packet":
        self.crc = self.checksum(units, header)
        return self

    def to_bytes(self, header: Header) -> bytes:
        return self._head(header) + self.payload + self.duration_payload + struct.pack(">H", self.crc)

    @classmethod
    def parse(cls, buf: bytes | memoryview, pos: int, header: Header) -> tuple["Packet", int]:
        """(packet, next position). Only the framing is checked here; the CRC needs the decoded units."""
        buf = memoryview(buf)
        if pos + 3 > len(buf):
            raise BitstreamError("truncated stream: a packet header is incomplete")
        seq, flags = struct.unpack_from(">HB", buf, pos)
        known = PKT_RESYNC | PKT_END | PKT_SKIPPED | (PKT_TERMINATED if header.version >= 2 else 0)
        if flags & ~known or (flags & PKT_SKIPPED and not header.dtx):
            raise BitstreamError(f"corrupted packet: unknown flags {flags:#x}")
        n, p = read_varint(buf, pos + 3, MAX_UNITS_PER_PACKET)
        plen, p = read_varint(buf, p, MAX_PAYLOAD_BYTES)
        dlen = skipped = 0
        if header.durations:
            dlen, p = read_varint(buf, p, MAX_PAYLOAD_BYTES)
        if flags & PKT_SKIPPED:
            skipped, p = read_varint(buf, p)
        end = p + plen + dlen + 2
        if end > len(buf):
            raise BitstreamError("truncated stream: a packet runs past the end of the data")
        payload, dpayload = bytes(buf[p : p + plen]), bytes(buf[p + plen : p + plen + dlen])
        (crc,) = struct.unpack_from(">H", buf, end - 2)
        return cls(seq=seq, flags=flags, num_units=n, payload=payload, duration_payload=dpayload, skipped=skipped,
                   crc=crc), end
