"""Binary frames: client audio (PCM16 / float32) to samples and back, the server's resynthesized-audio chunks and
unit-bitstream frames. Part of dpslm_stream.protocol."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpslm_stream.audio import check_finite, float32le_to_float, float_to_pcm16, pcm16_to_float
from dpslm_stream.errors import InvalidInput

from .messages import (
    AUDIO_FRAME_KIND, AUDIO_HEADER, BYTES_PER_SAMPLE, ErrorCode, PCM_FORMATS, ProtocolError, RESYNTH_SAMPLE_RATE,
)

@dataclass(frozen=True)
class AudioChunk:
    """Server -> client binary frame: resynthesized audio (see AUDIO_HEADER). ``samples`` is float32 in [-1, 1)."""

    seq: int
    start_sample: int  # at 24 kHz, from the start of the session's resynthesized audio
    samples: np.ndarray

    @property
    def start_s(self) -> float:
        return self.start_sample / RESYNTH_SAMPLE_RATE


def encode_audio_chunk(seq: int, start_sample: int, pcm16: bytes) -> bytes:
    """One binary server frame: the header, then little-endian PCM16 samples at 24 kHz."""
    return AUDIO_HEADER.pack(AUDIO_FRAME_KIND, seq, start_sample) + pcm16


def decode_audio_chunk(data: bytes) -> AudioChunk:
    """Parse a binary server frame (ProtocolError for anything that is not an audio chunk)."""
    if len(data) < AUDIO_HEADER.size or (len(data) - AUDIO_HEADER.size) % 2:
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"binary server frame of {len(data)} bytes is not an audio chunk")
    kind, seq, start = AUDIO_HEADER.unpack_from(data)
    if kind != AUDIO_FRAME_KIND:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown binary frame kind {kind}")
    return AudioChunk(seq, start, pcm16_to_float(data[AUDIO_HEADER.size :]))



# ---------------------------------------------------------------------------------------------------------------------
# Audio frames


def decode_audio(data: bytes, fmt: str) -> np.ndarray:
    """A binary PCM audio frame -> float32 samples; ProtocolError for empty frames, partial samples and NaN/Inf.
    Finite float32 samples outside [-1, 1] are clipped to it (the range PCM16 covers; the models were trained on it).
    Opus frames are a stream, not frames of samples: dpslm_stream.opus.OpusUplinkDecoder decodes them."""
    if fmt not in BYTES_PER_SAMPLE:
        raise InvalidInput(f"format must be one of {PCM_FORMATS}, got {fmt!r}")
    width = BYTES_PER_SAMPLE[fmt]
    if len(data) == 0:
        raise ProtocolError(ErrorCode.BAD_AUDIO, "empty audio frame; send at least one sample per binary frame")
    if len(data) % width:
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"audio frame of {len(data)} bytes is not a whole number of {fmt} "
                                                 f"samples ({width} bytes each); the frame was dropped")  # fmt: skip
    if fmt == "pcm16":
        return pcm16_to_float(data)  # every int16 is a finite sample
    samples = float32le_to_float(data)
    try:
        check_finite(samples, "float32 audio frame")
    except InvalidInput as e:
        raise ProtocolError(ErrorCode.NON_FINITE, f"{e}; the frame was dropped") from None
    return np.clip(samples, -1.0, 1.0, out=samples)


def encode_audio(samples: np.ndarray, fmt: str) -> bytes:
    """Float samples in [-1, 1] -> one binary audio frame in ``fmt`` (what clients send)."""
    if fmt == "pcm16":
        return float_to_pcm16(np.asarray(samples, dtype=np.float32))
    if fmt == "float32":
        return np.asarray(samples, dtype="<f4").tobytes()
    raise InvalidInput(f"format must be one of {PCM_FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The unit bitstream (start.transmit, subscribe.format = "bitstream"): binary frames, server -> client.
#   kind (uint8, BITSTREAM_FRAME_KIND) | part (uint8: 0 the stream header, 1 a packet) | the .dpsu bytes
# docs/bitstream.md defines the header and packet bytes. A transmitting sender gets its own session's frames; a
# bitstream listener gets the header first, then every packet from its subscription on (it decodes from the next
# RESYNC packet: dpslm_stream.codec.PacketDecoder skips what comes before).

BITSTREAM_FRAME_KIND = 2
BITSTREAM_PARTS = ("header", "packet")


@dataclass(frozen=True)
class BitstreamFrame:
    part: str  # "header" or "packet"
    data: bytes


def encode_bitstream_frame(part: str, data: bytes) -> bytes:
    return bytes((BITSTREAM_FRAME_KIND, BITSTREAM_PARTS.index(part))) + data


def decode_bitstream_frame(data: bytes) -> BitstreamFrame:
    if len(data) < 3 or data[0] != BITSTREAM_FRAME_KIND or data[1] >= len(BITSTREAM_PARTS):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"binary server frame of {len(data)} bytes is not a bitstream frame")
    return BitstreamFrame(BITSTREAM_PARTS[data[1]], bytes(data[2:]))


def decode_server_binary(data: bytes) -> "AudioChunk | BitstreamFrame":
    """A binary server frame of either kind: resynthesized audio or the unit bitstream."""
    if len(data) and data[0] == BITSTREAM_FRAME_KIND:
        return decode_bitstream_frame(data)
    return decode_audio_chunk(data)

