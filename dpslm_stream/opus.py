"""The Opus uplink (``start.format: "opus"``): the server's streaming decoder and the clients' streaming encoder.

Both use PyAV (``pip install 'dpslm-stream[opus]'``: its wheels bundle FFmpeg with libopus), imported lazily so the
rest of the package works without it. The decoder is fed the client's binary messages as they come, in any chunking
(``container``: Ogg or WebM byte streams, split anywhere, framed by dpslm_stream/opus_framing.py; or ``raw``: one
Opus packet per message, as WebCodecs' AudioEncoder emits them), and returns mono float32 samples at 48 kHz, which
the server feeds to the same encoder path as PCM (whose resampler takes them to 16 kHz). Stereo is averaged to mono.

Decoding is libavcodec's native Opus decoder (what PyAV picks when it opens an Ogg or WebM file), with the stream's
``OpusHead`` as its extradata, so it drops the header's pre-skip; the end trimming (the last Ogg page's granule
position, a WebM block's DiscardPadding) is applied here. The samples therefore equal those of decoding the whole file
offline with ``av.open`` (tests/test_opus.py checks it bit for bit). Raw packets carry no header: their decoder
starts with a header of the first packet's channel count and no pre-skip.

Bounds: a message decodes to at most ``max_samples`` (an Opus packet of 3 bytes can stand for 120 ms of audio, so a
megabyte of tiny packets would otherwise be hours of audio: an "Opus bomb"); beyond it the message is refused, fatally
(the stream cannot be resumed in the middle of a message). The demuxers bound what they buffer.

Cost (measured, README "Opus uplink"): decoding is a few milliseconds of one core per second of audio, so the
server decodes on its event loop, as it parses PCM; a message is bounded in what it decodes to (max_samples).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from dpslm_stream import protocol as P
from dpslm_stream.audio import StreamingResampler
from dpslm_stream.errors import InvalidInput
from dpslm_stream.opus_framing import (OPUS_RATE, Demuxer, FramingError, OggDemuxer, OpusHead, OpusPacket,
                                       WebmDemuxer, sniff_container)  # fmt: skip

OPUS_CONTAINERS = P.OPUS_CONTAINERS
OPUS_BITRATES = (6000, 256000)  # libopus' range of target bitrates for mono (bit/s)
INSTALL_HINT = "the Opus uplink needs PyAV: pip install 'dpslm-stream[opus]' (or pip install av)"


def import_av() -> Any:
    """PyAV, or InvalidInput saying how to install it."""
    try:
        import av
    except ImportError as e:
        raise InvalidInput(f"{INSTALL_HINT} ({e})") from None
    return av


def opus_available() -> bool:
    try:
        import_av()
    except InvalidInput:
        return False
    return True


class OpusDataError(P.ProtocolError):
    """Opus data the decoder cannot go on from (code bad_audio): the stream is over."""

    def __init__(self, message: str):
        super().__init__(P.ErrorCode.BAD_AUDIO, message)


class OpusUplinkDecoder:
    """One session's Opus stream: ``push(message)`` -> mono float32 samples at 48 kHz (possibly none).

    Damage the decoder steps over (an Ogg page failing its CRC, a packet libopus refuses: its audio is concealed by
    the next one) does not stop the stream: ``take_dropped()`` says what was dropped (the server sends each as a
    non-fatal bad_audio). What it cannot go on from raises OpusDataError, and every later push raises it again."""

    sample_rate = OPUS_RATE

    def __init__(self, container: str = "auto", max_samples: int = 10 * OPUS_RATE):
        if container not in OPUS_CONTAINERS:
            raise InvalidInput(f"container must be one of {OPUS_CONTAINERS}, got {container!r}")
        self._av = import_av()
        self.container = container
        self.max_samples = max_samples
        self._sniffed = bytearray()  # auto: the first bytes, until they tell the framing
        self._demuxer: Demuxer | None = None
        self._decoder: Any = None  # av.CodecContext, opened with the stream's OpusHead
        self._dropped: list[str] = []
        self.failed: str | None = None  # why the stream cannot go on
        self.packets = 0
        self.samples = 0  # 48 kHz samples returned

    @property
    def state_nbytes(self) -> int:
        return len(self._sniffed) + (self._demuxer.pending_bytes if self._demuxer is not None else 0)

    def truncation(self) -> str | None:
        """At the end of the stream: what an unfinished page or block leaves undecoded (a truncated stream), or None."""
        pending = self.state_nbytes if self.failed is None else 0
        return (f"the Opus stream ended inside a page or block: its last {pending} bytes were dropped (a truncated "
                "stream)") if pending else None  # fmt: skip

    def take_dropped(self) -> list[str]:
        """What was dropped since the last call (damaged pages, undecodable packets), one line each; each ends with
        "the stream goes on"."""
        dropped = self._dropped + (self._demuxer.dropped if self._demuxer is not None else [])
        self._dropped = []
        if self._demuxer is not None:
            self._demuxer.dropped = []
        return dropped

    def push(self, data: bytes) -> np.ndarray:
        """Decode what ``data`` completes; OpusDataError (bad_audio) when the stream cannot go on."""
        if self.failed is not None:
            raise OpusDataError(f"the Opus stream already failed ({self.failed})")
        try:
            return self._push(bytes(data))
        except FramingError as e:
            self.failed = f"{self.container} framing: {e}"
        except OpusDataError as e:
            self.failed = str(e)
        raise OpusDataError(self.failed)

    def _push(self, data: bytes) -> np.ndarray:
        if self.container == "auto":
            self._sniffed += data
            found = sniff_container(bytes(self._sniffed))
            if found is None:
                return np.zeros(0, np.float32)
            self.container, data = found, bytes(self._sniffed)
            self._sniffed.clear()
        if self.container == "raw":
            if not data:
                self._dropped.append("an empty Opus packet was dropped (send one packet per binary message); the "
                                     "stream goes on")  # fmt: skip
                return np.zeros(0, np.float32)
            if self._decoder is None:
                self._open(OpusHead.make(2 if data[0] & 0x04 else 1))
            return self._decode([OpusPacket(data)])
        if self._demuxer is None:
            self._demuxer = OggDemuxer() if self.container == "ogg" else WebmDemuxer()
        # Parsing work per message: as many packets as max_samples of audio could hold at 2.5 ms each, at least 64.
        packets = self._demuxer.push(data, max(64, self.max_samples // 120))
        if packets and self._decoder is None:
            assert self._demuxer.head is not None  # the demuxers return packets only after the head
            self._open(self._demuxer.head)
        return self._decode(packets)

    def _open(self, head: OpusHead) -> None:
        ctx = self._av.CodecContext.create("opus", "r")
        ctx.extradata = head.data
        self._decoder = ctx

    def _decode(self, packets: list[OpusPacket]) -> np.ndarray:
        out: list[np.ndarray] = []
        n = 0
        for packet in packets:
            try:
                frames = self._decoder.decode(self._av.Packet(packet.data))
            except self._av.FFmpegError as e:
                self._dropped.append(f"an Opus packet of {len(packet.data)} bytes could not be decoded and was "
                                     f"dropped ({e.strerror or e}); the stream goes on")  # fmt: skip
                continue
            audio = [f.to_ndarray().reshape(f.layout.nb_channels, -1).mean(axis=0, dtype=np.float32) for f in frames]
            samples = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            if packet.discard_end:
                samples = samples[: max(0, len(samples) - packet.discard_end)]
            n += len(samples)
            if n > self.max_samples:
                raise OpusDataError(f"one message decodes to more than {self.max_samples / OPUS_RATE:g} s of audio "
                                    "(the server's max_buffer_s); send smaller messages")  # fmt: skip
            out.append(samples)
            self.packets += 1
        self.samples += n
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class OpusUplinkEncoder:
    """A client's streaming Opus encoder: ``push(float32 samples at input_rate)`` -> the messages to send now (bytes
    of an Ogg or WebM stream, or raw packets, one per message); ``finish()`` -> the rest. Input at another rate than
    48 kHz goes through the project's streaming resampler first (the same sinc kernel the server uses)."""

    def __init__(self, bitrate: int = 24000, container: str = "ogg", frame_ms: float = 20.0, page_ms: float = 100.0,
                 input_rate: int = OPUS_RATE):  # fmt: skip
        if container not in ("ogg", "webm", "raw"):
            raise InvalidInput(f"container must be ogg, webm or raw, got {container!r}")
        if isinstance(bitrate, bool) or not isinstance(bitrate, int) or not OPUS_BITRATES[0] <= bitrate <= OPUS_BITRATES[1]:
            raise InvalidInput(f"Opus bitrate must be an integer in [{OPUS_BITRATES[0]}, {OPUS_BITRATES[1]}] bit/s, "
                               f"got {bitrate!r}")  # fmt: skip
        av = import_av()
        self._av = av
        self.container = container
        self._sink = io.BytesIO()
        self._out: Any = None
        if container == "raw":
            self._stream = av.CodecContext.create("libopus", "w")
        else:
            # The Ogg muxer closes a page, the WebM muxer a cluster, every page_ms (their defaults, about 1 s, would
            # hold the audio back that long).
            options = {"page_duration": str(int(page_ms * 1000))} if container == "ogg" else {"live": "1", "cluster_time_limit": str(int(page_ms))}
            self._out = av.open(self._sink, "w", format=container, options=options)
            self._stream = self._out.add_stream("libopus", rate=OPUS_RATE, layout="mono").codec_context
        ctx = self._stream
        ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = OPUS_RATE, "mono", "flt", bitrate
        ctx.options = {"frame_duration": f"{frame_ms:g}", "application": "voip"}
        self._pts = 0
        self._resampler = StreamingResampler(input_rate, OPUS_RATE) if input_rate != OPUS_RATE else None

    def push(self, samples: np.ndarray) -> list[bytes]:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            samples = self._resampler.push(samples).numpy()
        return self._encode(samples)

    def _encode(self, samples: np.ndarray) -> list[bytes]:
        x = np.ascontiguousarray(samples.reshape(1, -1))
        if x.shape[1] == 0:
            return []
        frame = self._av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate, frame.pts = OPUS_RATE, self._pts
        self._pts += x.shape[1]
        return self._emit(self._stream.encode(frame))

    def finish(self) -> list[bytes]:
        out = self._encode(self._resampler.flush().numpy()) if self._resampler is not None else []
        out += self._emit(self._stream.encode(None))
        if self._out is not None:
            self._out.close()
            out += self._drain()
        return out

    def _emit(self, packets: list) -> list[bytes]:
        if self._out is None:
            return [bytes(p) for p in packets if p.size]
        for p in packets:
            self._out.mux(p)
        return self._drain()

    def _drain(self) -> list[bytes]:
        data = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return [data] if data else []


def encode_opus(samples: np.ndarray, bitrate: int = 24000, container: str = "ogg") -> list[bytes]:
    """A whole 48 kHz signal as the messages an OpusUplinkEncoder sends (a file's bytes, joined, for ogg/webm)."""
    enc = OpusUplinkEncoder(bitrate, container)
    return enc.push(samples) + enc.finish()


def decode_opus_file(data: bytes) -> np.ndarray:
    """An Ogg or WebM Opus file decoded offline by PyAV's own demuxer and decoder: mono float32 at 48 kHz (the
    reference the streaming decoder is checked against)."""
    av = import_av()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(f.layout.nb_channels, -1).mean(axis=0, dtype=np.float32)
                  for packet in container.demux(stream) for f in packet.decode()]  # fmt: skip
    return np.concatenate(frames) if frames else np.zeros(0, np.float32)
