"""Integer frequencies, deterministically, and range coding of one packet with `constriction`.

Decodability rests on both ends deriving bit-identical integer frequencies for every symbol. Everything from a
float (ULM logits) to integers happens here, in steps whose result depends only on the input bits:
  logits (float32) -> q_i = rint(16 * (l_i - max l)) clipped to [-QMAX, 0]  (1/16-nat grid; exact float64 ops)
  -> weights EXP_TABLE[-q_i] (integers computed once with `decimal`, correctly rounded, so the same everywhere)
  -> frequencies with a floor of 1 per symbol and an exact total of 2^PRECISION (integer arithmetic only).
The grid makes the result independent of the last bits of a logit except within 2^-24 nat of a grid boundary; a
different kernel (another CPU family, a GPU) can still land on the other side of one, so the packet CRC checks the
decoded units and the stream resynchronises (see packets.py).

The range coder itself is constriction's (queue.RangeEncoder/RangeDecoder, 32-bit words); the frequencies are
handed to it as exactly representable float64 values, so its own fixed-point conversion sees identical inputs at
both ends. Packets are self-terminating: the encoder keeps the shortest byte string that still decodes to the same
symbols when the decoder pads it with zero bytes (the sealed words truncated or rounded up to n bytes; checked by
decoding, not assumed), which brings the termination cost from up to two 32-bit words down to about one byte.
"""

from __future__ import annotations

from decimal import Context, Decimal
from typing import Sequence

import numpy as np

from dpslm_stream.codec.format import BitstreamError

PRECISION = 24  # constriction's Categorical uses 24-bit fixed point; our totals match it
TOTAL = 1 << PRECISION
GRID = 16  # logit quantization steps per nat
QMAX = 24 * GRID  # logits more than 24 nats below the maximum get the floor frequency anyway
_WEIGHT_BITS = 32
EXP_TABLE = np.array(
    [int((Context(prec=60).exp(Decimal(-j) / GRID)) * (1 << _WEIGHT_BITS)) for j in range(QMAX + 1)], dtype=np.int64
)
_PAD = bytes(8)  # zero bytes the decoder appends to a payload (two words: the coder reads ahead at most that far)


def frequencies_from_weights(weights: np.ndarray) -> np.ndarray:
    """Non-negative integer weights [K] -> int64 frequencies >= 1 summing to exactly TOTAL (integer arithmetic)."""
    w = np.asarray(weights, dtype=np.int64)
    k = len(w)
    if k == 0 or k >= TOTAL // 2:
        raise ValueError(f"alphabet of {k} symbols is not codable with {PRECISION}-bit frequencies")
    shift = max(0, int(w.sum(dtype=np.uint64)).bit_length() - _WEIGHT_BITS)
    w = w >> shift
    total_w = int(w.sum())
    spare = TOTAL - k
    freq = (w * spare // total_w + 1) if total_w else np.ones(k, dtype=np.int64)
    freq[int(np.argmax(freq))] += TOTAL - int(freq.sum())  # exact total; lowest index of the largest on ties
    return freq


def frequencies_from_logits(logits: np.ndarray) -> np.ndarray:
    """float logits [K] -> integer frequencies, through the 1/GRID-nat grid and the exact exp table."""
    x = np.asarray(logits, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("logits must be finite")
    q = np.minimum(np.rint((x.max() - x) * GRID), QMAX).astype(np.int64)
    return frequencies_from_weights(EXP_TABLE[q])


def _model(freq: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(freq.astype(np.float64), perfect=False)


def _decode_all(data: bytes, freqs: Sequence[np.ndarray]) -> list[int] | None:
    reader = RangeReader(data)
    try:
        return [reader.decode(f) for f in freqs]
    except BitstreamError:
        return None


def encode_packet(freqs: Sequence[np.ndarray], symbols: Sequence[int]) -> bytes:
    """Range code `symbols[i]` with frequencies `freqs[i]`; the shortest self-terminating byte string."""
    import constriction

    if not symbols:
        return b""
    enc = constriction.stream.queue.RangeEncoder()
    for f, s in zip(freqs, symbols):
        enc.encode(int(s), _model(f))
    full = enc.get_compressed().astype(">u4").tobytes()
    want = [int(s) for s in symbols]
    # Any value inside the final coding interval decodes; try, for each length, the sealed value truncated and
    # rounded up to that many bytes (the decoder pads with zeros). The candidates are cheap to check: the
    # frequencies are already computed.
    for n in range(1, len(full) + 1):
        down = int.from_bytes(full[:n], "big")
        for value in (down, down + 1):
            if value >= 1 << (8 * n):
                continue
            candidate = value.to_bytes(n, "big")
            if _decode_all(candidate, freqs) == want:
                return candidate
    raise AssertionError("constriction's sealed output does not decode")  # pragma: no cover - library contract


class RangeReader:
    """Decodes one packet's symbols one by one (the next frequencies may depend on the symbol just decoded)."""

    def __init__(self, data: bytes):
        import constriction

        padded = data + bytes((-len(data)) % 4) + _PAD
        self._dec = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype=">u4").astype(np.uint32))

    def decode(self, freq: np.ndarray) -> int:
        try:
            return int(self._dec.decode(_model(freq)))
        except Exception as e:  # constriction raises on data that no encoder could have produced
            raise BitstreamError(f"corrupted payload: the range decoder failed ({e})") from None
