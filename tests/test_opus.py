"""The Opus uplink's streaming decoder (dpslm_stream/opus.py, opus_framing.py), without a server.

Oracle: PyAV's own demuxer and decoder on the whole file (``decode_opus_file``); the streaming decoder, fed the same
bytes split at random points, must return the same samples bit for bit. Malformed streams (garbage, truncation, bit
flips, another codec, too many channels, an Opus bomb) must end in OpusDataError (bad_audio), never another
exception."""

from __future__ import annotations

import io
import random
import struct

import numpy as np
import pytest

av = pytest.importorskip("av", reason="the Opus uplink needs PyAV (pip install 'dpslm-stream[opus]')")

from dpslm_stream import protocol as P  # noqa: E402
from dpslm_stream.opus import OpusDataError, OpusUplinkDecoder, decode_opus_file, encode_opus  # noqa: E402
from dpslm_stream.opus_framing import OGG_MAGIC, OggDemuxer, ogg_crc, packet_samples, sniff_container  # noqa: E402
from dpslm_stream.tiny import speech_like  # noqa: E402

SR = 48000


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speech_like(3.0, SR, seed=5).astype(np.float32)


def feed(decoder: OpusUplinkDecoder, data: bytes, rng: random.Random, max_chunk: int = 700) -> np.ndarray:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_chunk)
        out.append(decoder.push(data[i : i + n]))
        i += n
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@pytest.mark.parametrize("container", ["ogg", "webm"])
@pytest.mark.parametrize("declared", ["auto", "given"])
def test_streaming_decode_equals_offline_decode_for_any_chunking(speech, container, declared):
    data = b"".join(encode_opus(speech, 24000, container))
    reference = decode_opus_file(data)
    assert len(reference) == len(speech)  # pre-skip and end trimming: exactly the input's length
    for seed in range(4):
        decoder = OpusUplinkDecoder("auto" if declared == "auto" else container)
        got = feed(decoder, data, random.Random(seed), max_chunk=(1, 50, 700, 5000)[seed])
        assert np.array_equal(got, reference), seed
        assert decoder.container == container and decoder.state_nbytes == 0


def test_raw_packets_decode_like_a_decoder_fed_the_same_packets(speech):
    packets = encode_opus(speech, 24000, "raw")
    assert len(packets) == len(speech) // 960 + 1 and all(len(p) < 400 for p in packets)
    decoder = OpusUplinkDecoder("raw")
    got = np.concatenate([decoder.push(p) for p in packets])
    # An independent decoder: libavcodec's Opus decoder with a mono header of no pre-skip.
    ctx = av.CodecContext.create("opus", "r")
    ctx.extradata = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, SR, 0, 0)
    ref = np.concatenate([f.to_ndarray()[0] for p in packets for f in ctx.decode(av.Packet(p))])
    assert np.array_equal(got, ref) and len(got) == sum(packet_samples(p) for p in packets)
    # The decoded audio is the speech (delayed by the codec's look-ahead): correlated, not noise.
    lag = 312
    assert np.corrcoef(got[lag : lag + len(speech) - lag], speech[: len(speech) - lag])[0, 1] > 0.9


def test_stereo_is_averaged_to_mono():
    t = np.arange(SR) / SR
    left, right = 0.3 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 500 * t)
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        s = out.add_stream("libopus", rate=SR, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([left, right]).astype(np.float32).reshape(1, -1), format="flt",
                                           layout="stereo")  # fmt: skip
        frame.sample_rate = SR
        for p in [*s.encode(frame), *s.encode(None)]:
            out.mux(p)
    data = buf.getvalue()
    got = feed(OpusUplinkDecoder(), data, random.Random(1))
    assert np.array_equal(got, decode_opus_file(data)) and len(got) == SR


def slow_ogg_crc(data: bytes) -> int:
    """RFC 3533's CRC, bit by bit: polynomial 0x04c11db7, MSB first, initial value 0, no final xor."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def test_ogg_crc_is_the_ogg_polynomial():
    rng = random.Random(0)
    for n in (0, 1, 2, 27, 1000):
        data = rng.randbytes(n)
        assert ogg_crc(data) == slow_ogg_crc(data), n
    # A page written by libavformat's muxer carries the checksum our function computes.
    page = b"".join(encode_opus(np.zeros(4800, np.float32), 24000, "ogg"))
    size = 27 + page[26] + sum(page[27 : 27 + page[26]])
    first = page[:size]
    assert ogg_crc(first[:22] + b"\0\0\0\0" + first[26:]) == struct.unpack_from("<I", first, 22)[0]


def test_sniff_container():
    assert sniff_container(b"OggS\0") == "ogg" and sniff_container(b"\x1a\x45\xdf\xa3") == "webm"
    assert sniff_container(b"Og") is None and sniff_container(b"\x1a") is None
    assert sniff_container(b"\xfc\xff\xfe") == "raw"


def other_codec_file(codec: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        s = out.add_stream(codec, rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 9600), np.float32), format="flt", layout="mono")
        frame.sample_rate = SR
        for p in [*s.encode(frame), *s.encode(None)]:
            out.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["ogg vorbis", "matroska pcm"])
def test_a_container_of_another_codec_is_a_fatal_bad_audio(kind):
    # An Ogg stream whose first packet is a Vorbis identification header; a Matroska file of PCM written by PyAV.
    vorbis_head = b"\x01vorbis" + struct.pack("<IBIiiiBB", 0, 1, SR, 0, 128000, 0, 0xB8, 1)
    data = ogg_page(0x02, 0, [vorbis_head]) if kind == "ogg vorbis" else other_codec_file("pcm_s16le", "matroska")
    decoder = OpusUplinkDecoder()
    with pytest.raises(OpusDataError) as e:
        decoder.push(data)
    assert e.value.code.value == "bad_audio"
    with pytest.raises(OpusDataError, match="already failed"):
        decoder.push(b"OggS")


def test_more_than_two_channels_is_refused():
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 6, 312, SR, 0, 1) + bytes([4, 2, 0, 4, 1, 2, 3, 5])
    page = ogg_page(0x02, 0, [head])
    with pytest.raises(OpusDataError, match="6 channels"):
        OpusUplinkDecoder("ogg").push(page)


def ogg_page(flags: int, granule: int, packets: list[bytes], serial: int = 7, seq: int = 0) -> bytes:
    lacing = b"".join(bytes([255] * (len(p) // 255) + [len(p) % 255]) for p in packets)
    header = struct.pack("<4sBBqIIIB", OGG_MAGIC, 0, flags, granule, serial, seq, 0, len(lacing)) + lacing
    page = header + b"".join(packets)
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


def test_an_opus_bomb_is_bounded_per_message():
    """Tiny packets that each stand for 60 ms of audio (a SILK packet of one empty 60 ms frame: 1 byte): a message
    of them would decode to hours; the decoder refuses past max_samples instead of allocating them."""
    tags = b"OpusTags" + struct.pack("<I", 0) + struct.pack("<I", 0)
    opus_head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, SR, 0, 0)
    bomb_packet = bytes([3 << 3])  # config 3 (SILK NB 60 ms), code 0: one frame, no bytes
    assert packet_samples(bomb_packet) == 2880
    data = ogg_page(0x02, 0, [opus_head]) + ogg_page(0, 0, [tags], seq=1)
    data += b"".join(ogg_page(0, -1, [bomb_packet] * 255, seq=2 + i) for i in range(7))  # 7 * 255 * 60 ms = 107 s
    decoder = OpusUplinkDecoder("ogg", max_samples=5 * SR)
    with pytest.raises(OpusDataError, match="more than 5 s"):
        decoder.push(data)
    assert decoder.samples == 0 and decoder.failed


def test_a_damaged_page_is_dropped_and_the_stream_goes_on(speech):
    data = bytearray(b"".join(encode_opus(speech, 24000, "ogg")))
    pages = []
    pos = 0
    while pos < len(data):
        size = 27 + data[pos + 26] + sum(data[pos + 27 : pos + 27 + data[pos + 26]])
        pages.append(bytes(data[pos : pos + size]))
        pos += size
    assert len(pages) > 5
    damaged = bytearray(pages[4])
    damaged[-5] ^= 0x10  # a payload bit: the CRC fails
    decoder = OpusUplinkDecoder("ogg")
    before = np.concatenate([decoder.push(p) for p in pages[:3]])
    # The damaged page arrives with its neighbours in one message: theirs still come out.
    got = decoder.push(pages[3] + bytes(damaged) + pages[5])
    dropped = decoder.take_dropped()
    assert len(dropped) == 1 and "CRC" in dropped[0] and decoder.take_dropped() == []
    rest = np.concatenate([decoder.push(p) for p in pages[6:]])
    reference = decode_opus_file(bytes(data))
    # Exactly page 4's audio is missing: everything before it is bit-exact, and the stream went on after it.
    assert np.array_equal(np.concatenate([before, got])[: len(before) + 1], reference[: len(before) + 1])
    assert len(rest) > 0 and len(before) + len(got) + len(rest) < len(reference)


def test_lost_sync_is_fatal():
    decoder = OpusUplinkDecoder("ogg")
    with pytest.raises(OpusDataError, match="sync"):
        decoder.push(b"OggT" + bytes(40))
    with pytest.raises(OpusDataError, match="already failed"):
        decoder.push(b"OggS")
    with pytest.raises(OpusDataError, match="EBML"):
        OpusUplinkDecoder("webm").push(b"not webm at all")


def test_undecodable_raw_packets_are_dropped_non_fatally():
    decoder = OpusUplinkDecoder("raw")
    good = encode_opus(np.zeros(9600, np.float32), 24000, "raw")
    assert len(decoder.push(good[0])) == 960
    assert len(decoder.push(bytes([0xFF, 0xFF]))) == 0  # code 3 with a frame count of 63: over 120 ms, invalid
    assert "could not be decoded" in decoder.take_dropped()[0]
    assert len(decoder.push(good[1])) == 960  # the stream goes on
    assert len(decoder.push(b"")) == 0 and "empty" in decoder.take_dropped()[0]


@pytest.mark.parametrize("container", ["ogg", "webm", "auto"])
def test_fuzz_never_raises_anything_but_bad_audio(speech, container):
    """Truncation at random points, bit flips and garbage: every push returns samples or raises OpusDataError."""
    files = {c: b"".join(encode_opus(speech[: SR // 2], 16000, c)) for c in ("ogg", "webm")}
    rng = random.Random(hash(container) & 0xFFFF)
    outcomes = {"fatal": 0, "non_fatal": 0, "clean": 0}
    for trial in range(60):
        data = bytearray(files[rng.choice(["ogg", "webm"]) if container == "auto" else container])
        kind = trial % 3
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            cut = rng.randrange(len(data))
            data[cut:] = rng.randbytes(rng.randint(1, 2000))
        decoder = OpusUplinkDecoder(container)
        result = "clean"
        i = 0
        while i < len(data):
            n = rng.randint(1, 900)
            try:
                out = decoder.push(bytes(data[i : i + n]))
                assert out.dtype == np.float32 and np.isfinite(out).all() and len(out) <= decoder.max_samples
            except OpusDataError:
                result = "fatal"
                break
            if decoder.take_dropped():
                result = "non_fatal"
            i += n
        outcomes[result] += 1
    assert outcomes["fatal"] > 0 and outcomes["clean"] + outcomes["non_fatal"] > 0, outcomes


def test_demuxer_buffer_is_bounded():
    """An Ogg page announces its size in its header: a stream that never completes one buffers less than a page."""
    demuxer = OggDemuxer()
    header = struct.pack("<4sBBqIIIB", OGG_MAGIC, 0, 2, 0, 1, 0, 0, 255) + bytes([255] * 255)
    demuxer.push(header)
    for _ in range(65):
        demuxer.push(bytes(1000))
    assert demuxer.pending_bytes == len(header) + 65000  # the page (65 307 bytes) is not complete yet
    assert demuxer.push(bytes(25)) == [] and demuxer.pending_bytes == 0  # complete: it fails its CRC, dropped
    assert demuxer.dropped


def test_start_of_an_opus_stream():
    start = P.parse_client_message('{"type": "start", "format": "opus"}')
    assert start.format == "opus" and start.container == "auto" and start.sample_rate == P.OPUS_SAMPLE_RATE
    # A sample rate given with opus is checked, then the decoded rate counts.
    assert P.parse_client_message('{"type":"start","format":"opus","sample_rate":44100,"container":"webm"}') == \
        P.Start(sample_rate=48000, format="opus", container="webm")
    for bad, code in (('"format":"opus","container":"mp4"', "bad_message"), ('"container":"ogg","sample_rate":16000',
                      "bad_message"), ('"format":"opus","sample_rate":1', "bad_sample_rate")):  # fmt: skip
        with pytest.raises(P.ProtocolError) as e:
            P.parse_client_message('{"type":"start",' + bad + "}")
        assert e.value.code.value == code, bad
    assert P.parse_client_message('{"type":"start","sample_rate":16000}').container is None
    assert P.close_code(P.ErrorCode.BAD_AUDIO) == 1007 and P.close_code(P.ErrorCode.BUSY) == 1013


def test_parsing_work_per_message_is_bounded():
    """Empty packets decode to nothing, so the samples bound does not stop them: a message of 100 pages of 255 empty
    packets each (28 KB) is refused by the per-message bound on pages and packets instead of parsed to the end."""
    opus_head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, SR, 0, 0)
    tags = b"OpusTags" + struct.pack("<II", 0, 0)
    data = ogg_page(0x02, 0, [opus_head]) + ogg_page(0, 0, [tags], seq=1)
    data += b"".join(ogg_page(0, -1, [b""] * 255, seq=2 + i) for i in range(100))
    decoder = OpusUplinkDecoder("ogg", max_samples=SR)  # 1 s: at most 400 pages and packets per message
    with pytest.raises(OpusDataError, match="more than 400 Ogg pages and packets"):
        decoder.push(data)
    ok = OpusUplinkDecoder("ogg", max_samples=SR)
    assert len(ok.push(data[: len(data) // 100 * 1])) == 0  # a few pages of it are fine
