"""Push-fed demuxers of the Opus uplink: Ogg pages (RFC 3533 / RFC 7845) and WebM blocks (Matroska's EBML), fed
bytes in whatever chunks the network delivers, returning the Opus packets that are complete.

Why by hand: PyAV (libavformat) demuxes by pulling bytes through a blocking ``read``; fed from a WebSocket it needs
a thread per session parked inside ``read``, and a short read in the middle of a page is an end of file it does not
recover from. The session core is push-fed and sans I/O (server/session.py), so the two framings are parsed here:
both are small (an Ogg page is a 27-byte header and a segment table; a MediaRecorder WebM stream is a few EBML
elements around ``SimpleBlock``s), and only packet boundaries, the ``OpusHead`` and the end trimming are needed. The
Opus packets themselves are decoded by PyAV's libavcodec (dpslm_stream/opus.py).

Every size the client controls is bounded: a demuxer buffers at most one Ogg page (< 64 KiB) or one EBML element it
must read whole (``MAX_ELEMENT_BYTES``); elements it does not need are skipped without being buffered; ``max_items``
bounds the pages, packets and elements one push may parse (a megabyte of empty packets is half a million of them).
A ``FramingError`` means the stream cannot go on (lost sync, another codec, more than two channels); damage the
demuxer can step over (a page whose CRC fails, a truncated block) is dropped and described in ``dropped``, and the
packets around it still come out.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

OPUS_RATE = 48000  # Opus always decodes at 48 kHz here
MAX_ELEMENT_BYTES = 256 << 10  # the largest WebM element read whole (a block, a track entry); Opus packets are < 8 KiB
OGG_MAGIC = b"OggS"
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


class FramingError(Exception):
    """Malformed framing the demuxer cannot go on from."""


@dataclass(frozen=True)
class OpusHead:
    """The stream's identification header (RFC 7845 §5.1): what the decoder needs (its bytes are its extradata)."""

    channels: int
    pre_skip: int  # 48 kHz samples the decoder drops at the start
    data: bytes

    @staticmethod
    def parse(data: bytes) -> "OpusHead":
        if len(data) < 19 or not data.startswith(b"OpusHead"):
            raise FramingError(f"not an Opus stream: its first packet starts with {bytes(data[:8])!r}, expected an "
                               "OpusHead (another codec?)")  # fmt: skip
        version, channels, pre_skip = data[8], data[9], struct.unpack_from("<H", data, 10)[0]
        if version >> 4:
            raise FramingError(f"OpusHead version {version} is not supported (major version 0 expected)")
        if not 1 <= channels <= 2:
            raise FramingError(f"an Opus stream of {channels} channels: send mono or stereo")
        return OpusHead(channels, pre_skip, bytes(data))

    @staticmethod
    def make(channels: int, pre_skip: int = 0) -> "OpusHead":
        """The header of a stream without one (raw packets): channel mapping family 0."""
        data = b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, OPUS_RATE, 0, 0)
        return OpusHead(channels, pre_skip, data)


@dataclass(frozen=True)
class OpusPacket:
    data: bytes
    discard_end: int = 0  # 48 kHz samples to drop from the end of this packet's audio (the stream's end trimming)


def packet_samples(packet: bytes) -> int:
    """48 kHz samples an Opus packet decodes to, from its TOC byte (RFC 6716 §3.1); 0 for a packet too short to say."""
    if not packet:
        return 0
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config & 3]
    if code == 0:
        return frame
    if code in (1, 2):
        return 2 * frame
    return frame * (packet[1] & 0x3F) if len(packet) > 1 else 0


class Demuxer(Protocol):
    """Bytes in (any chunking), complete Opus packets out. ``head`` is known before the first packet."""

    head: OpusHead | None
    dropped: list[str]  # damage stepped over since the caller last cleared it

    def push(self, data: bytes, max_items: int = 1 << 30) -> list[OpusPacket]:
        """The packets ``data`` completes; FramingError past ``max_items`` pages, elements or packets in one push."""
        ...

    @property
    def pending_bytes(self) -> int: ...


# ---------------------------------------------------------------------------------------------------------------------
# Ogg


_REVERSED_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's page checksum: CRC-32 with polynomial 0x04c11db7, not reflected, initial value 0, no final xor. zlib's
    crc32 (C speed; a Python loop over a megabyte would hold the event loop for a third of a second) computes the
    reflected CRC, so it is fed the bytes bit-reversed and its result is bit-reversed back; zlib's own initial and
    final inversions are undone through its start value."""
    reflected = zlib.crc32(bytes(data).translate(_REVERSED_BITS), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


_OGG_HEADER = struct.Struct("<4sBBqIIIB")  # magic, version, flags, granule, serial, page seq, crc, segment count


class OggDemuxer:
    """Ogg Opus: the first logical stream's pages; its first packet is the OpusHead, its second OpusTags."""

    def __init__(self) -> None:
        self.head: OpusHead | None = None
        self.dropped: list[str] = []
        self._buf = bytearray()
        self._serial: int | None = None
        self._packet = bytearray()  # a packet continued on the next page
        self._headers_seen = 0  # OpusHead, OpusTags
        self._granule = 0  # granule position (48 kHz samples, pre-skip included) at the end of the last page
        self._ended = False

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) + len(self._packet)

    def push(self, data: bytes, max_items: int = 1 << 30) -> list[OpusPacket]:
        self._buf += data
        out: list[OpusPacket] = []
        items = 0
        while True:
            page = self._next_page()
            if page is None:
                return out
            items += 1 + len(page[3])  # the page and its segments: the parsing work, bounded per message
            if items > max_items:
                raise FramingError(f"more than {max_items} Ogg pages and packets in one message")
            out += self._page_packets(*page)

    def _next_page(self) -> tuple[int, int, int, list[int], bytes] | None:
        """The next complete page whose CRC holds (damaged ones are dropped), None when more bytes are needed."""
        while True:
            page = self._read_page()
            if page != "damaged":
                return page

    def _read_page(self) -> tuple[int, int, int, list[int], bytes] | str | None:
        buf = self._buf
        if len(buf) < 4:
            if not OGG_MAGIC.startswith(bytes(buf)):
                raise FramingError("lost Ogg page sync: the data is not at an Ogg page")
            return None
        if buf[:4] != OGG_MAGIC:
            raise FramingError("lost Ogg page sync: expected an Ogg page ('OggS') here (truncated or damaged data)")
        if len(buf) < _OGG_HEADER.size:
            return None
        _, version, flags, granule, serial, _, crc, nsegs = _OGG_HEADER.unpack_from(buf)
        if version != 0:
            raise FramingError(f"Ogg page version {version} (expected 0)")
        head_len = _OGG_HEADER.size + nsegs
        if len(buf) < head_len:
            return None
        lacing = list(buf[_OGG_HEADER.size : head_len])
        size = head_len + sum(lacing)
        if len(buf) < size:
            return None
        page = bytes(buf[:size])
        del buf[:size]
        if ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != crc:
            self._packet.clear()  # a packet continued from the dropped page is incomplete
            self.dropped.append(f"an Ogg page of {size} bytes failed its CRC check and was dropped (damaged data); "
                                "the stream goes on")  # fmt: skip
            return "damaged"
        return flags, granule, serial, lacing, page[head_len:]

    def _page_packets(self, flags: int, granule: int, serial: int, lacing: list[int], body: bytes) -> list[OpusPacket]:
        if self._serial is None:
            if not flags & 0x02:
                raise FramingError("the Ogg stream does not begin with a beginning-of-stream page")
            self._serial = serial
        if serial != self._serial or self._ended:
            return []  # another multiplexed or chained logical stream: not ours
        if flags & 0x01 and not self._packet:
            skip = 0  # the continued packet's start was dropped: drop its rest too
            while skip < len(lacing) and lacing[skip] == 255:
                skip += 1
            lacing, body = lacing[skip + 1 :], body[sum(lacing[: skip + 1]) :]
        packets: list[bytes] = []
        pos = 0
        for n in lacing:
            self._packet += body[pos : pos + n]
            pos += n
            if n < 255:
                packets.append(bytes(self._packet))
                self._packet.clear()
        if len(self._packet) > MAX_ELEMENT_BYTES:
            raise FramingError(f"an Ogg packet over {MAX_ELEMENT_BYTES} bytes (Opus packets are small)")
        audio: list[bytes] = []
        for packet in packets:
            if self._headers_seen == 0:
                self.head = OpusHead.parse(packet)
            elif self._headers_seen == 1 and not packet.startswith(b"OpusTags"):
                raise FramingError("the Ogg Opus stream lacks its OpusTags header")
            if self._headers_seen < 2:
                self._headers_seen += 1
            elif packet:
                audio.append(packet)
        out = [OpusPacket(p) for p in audio]
        durations = sum(packet_samples(p) for p in audio)
        if flags & 0x04:  # end of stream: the granule position trims the last packet (RFC 7845 §4.5)
            self._ended = True
            extra = self._granule + durations - granule
            if out and extra > 0:
                out[-1] = OpusPacket(out[-1].data, min(extra, packet_samples(out[-1].data)))
        if granule != -1 and audio:
            self._granule = granule
        return out


# ---------------------------------------------------------------------------------------------------------------------
# WebM (Matroska): EBML elements. Segment, Cluster and Tracks are entered (their children read in turn, whatever
# their size, which MediaRecorder leaves unknown); track entries and blocks are read whole; the rest is skipped.

_ENTERED = {0x18538067, 0x1F43B675, 0x1654AE6B}  # Segment, Cluster, Tracks
_TRACK_ENTRY, _SIMPLE_BLOCK, _BLOCK_GROUP, _BLOCK = 0xAE, 0xA3, 0xA0, 0xA1
_TRACK_NUMBER, _CODEC_ID, _CODEC_PRIVATE, _AUDIO, _CHANNELS = 0xD7, 0x86, 0x63A2, 0xE1, 0x9F
_DISCARD_PADDING = 0x75A2
_READ_WHOLE = {_TRACK_ENTRY, _SIMPLE_BLOCK, _BLOCK_GROUP}


def _vint(buf: bytes | bytearray, pos: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at ``pos``: (value, length), None when incomplete. A size of all ones is
    unknown (-1)."""
    if pos >= len(buf):
        return None
    first = buf[pos]
    if first == 0:
        raise FramingError("an invalid EBML number (a zero first byte): not WebM, or damaged data")
    length = 8 - first.bit_length() + 1
    if pos + length > len(buf):
        return None
    value = first if keep_marker else first & (0xFF >> length)
    for b in buf[pos + 1 : pos + length]:
        value = (value << 8) | b
    if not keep_marker and value == (1 << (7 * length)) - 1:
        value = -1
    return value, length


def _elements(data: bytes):
    """(id, payload) of the complete elements inside a master element read whole."""
    pos = 0
    while pos < len(data):
        ident, size = _vint(data, pos, True), None
        if ident is not None:
            size = _vint(data, pos + ident[1], False)
        if ident is None or size is None or size[0] < 0 or pos + ident[1] + size[1] + size[0] > len(data):
            raise FramingError("a truncated or damaged WebM element")
        start = pos + ident[1] + size[1]
        yield ident[0], data[start : start + size[0]]
        pos = start + size[0]


def _uint(data: bytes) -> int:
    return int.from_bytes(data, "big") if data else 0


class WebmDemuxer:
    """WebM with an A_OPUS track (what MediaRecorder's audio/webm;codecs=opus writes); other tracks are ignored."""

    def __init__(self) -> None:
        self.head: OpusHead | None = None
        self.dropped: list[str] = []
        self._buf = bytearray()
        self._skip = 0  # bytes of an element being skipped still to come
        self._track: int | None = None
        self._codecs: list[str] = []  # the codecs of the tracks seen (for the error when none is Opus)
        self._started = False

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def push(self, data: bytes, max_items: int = 1 << 30) -> list[OpusPacket]:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        out: list[OpusPacket] = []
        items = 0
        while self._buf and not self._skip:
            element = self._next_element()
            if element is None:
                break
            items += 1
            if items > max_items:
                raise FramingError(f"more than {max_items} WebM elements in one message")
            out += element
        return out

    def _next_element(self) -> list[OpusPacket] | None:
        buf = self._buf
        if not self._started:
            if len(buf) < 4:
                if not EBML_MAGIC.startswith(bytes(buf)):
                    raise FramingError("not a WebM stream (no EBML header)")
                return None
            if buf[:4] != EBML_MAGIC:
                raise FramingError("not a WebM stream (no EBML header)")
            self._started = True
        ident = _vint(buf, 0, True)
        size = _vint(buf, ident[1], False) if ident is not None else None
        if ident is None or size is None:
            if len(buf) > 16:
                raise FramingError("a damaged WebM element header")
            return None
        head = ident[1] + size[1]
        if ident[0] in _ENTERED:
            del buf[:head]
            return []
        if size[0] < 0:
            raise FramingError(f"a WebM element 0x{ident[0]:X} of unknown size (only segments and clusters may be)")
        if ident[0] not in _READ_WHOLE:
            n = min(len(buf), head + size[0])
            self._skip = head + size[0] - n
            del buf[:n]
            return []
        if size[0] > MAX_ELEMENT_BYTES:
            raise FramingError(f"a WebM element of {size[0]} bytes (at most {MAX_ELEMENT_BYTES} are read whole)")
        if len(buf) < head + size[0]:
            return None
        payload = bytes(buf[head : head + size[0]])
        del buf[: head + size[0]]
        if ident[0] == _TRACK_ENTRY:
            self._track_entry(payload)
            return []
        if ident[0] == _SIMPLE_BLOCK:
            return self._block(payload, 0)
        block, discard_ns = None, 0
        for child, data in _elements(payload):
            if child == _BLOCK:
                block = data
            elif child == _DISCARD_PADDING:
                discard_ns = int.from_bytes(data, "big", signed=True) if data else 0
        return [] if block is None else self._block(block, max(0, discard_ns) * OPUS_RATE // 1_000_000_000)

    def _track_entry(self, payload: bytes) -> None:
        number, codec, private, channels = None, "", b"", 1
        for child, data in _elements(payload):
            if child == _TRACK_NUMBER:
                number = _uint(data)
            elif child == _CODEC_ID:
                codec = data.decode("ascii", "replace").rstrip("\0")
            elif child == _CODEC_PRIVATE:
                private = data
            elif child == _AUDIO:
                channels = next((_uint(d) for c, d in _elements(data) if c == _CHANNELS), 1)
        self._codecs.append(codec)
        if codec != "A_OPUS" or self._track is not None:
            return
        self.head = OpusHead.parse(private) if private else OpusHead.make(channels)
        self._track = number

    def _block(self, block: bytes, discard: int) -> list[OpusPacket]:
        if self._track is None:
            raise FramingError(f"a WebM stream without an Opus track (tracks: {self._codecs or 'none'})")
        track = _vint(block, 0, False)
        if track is None or len(block) < track[1] + 3:
            self.dropped.append(f"a WebM block of {len(block)} bytes is too short and was dropped; the stream goes on")
            return []
        if track[0] != self._track:
            return []
        flags = block[track[1] + 2]
        if flags & 0x06:
            raise FramingError("a laced WebM block (several packets in one): not supported; MediaRecorder and "
                               "ffmpeg write one packet per block")  # fmt: skip
        packet = block[track[1] + 3 :]
        return [OpusPacket(packet, min(discard, packet_samples(packet)))] if packet else []


def sniff_container(data: bytes) -> str | None:
    """The framing of a stream from its first bytes: "ogg", "webm", "raw", or None when more bytes are needed."""
    for magic, name in ((OGG_MAGIC, "ogg"), (EBML_MAGIC, "webm")):
        if data.startswith(magic):
            return name
    if len(data) < 4 and any(m.startswith(bytes(data)) for m in (OGG_MAGIC, EBML_MAGIC)):
        return None
    return "raw"
