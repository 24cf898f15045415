"""Integer frequencies, deterministically (and the version-1 packet reader, constriction's range decoder).

Decodability rests on both ends deriving bit-identical integer frequencies for every symbol. Everything from a
float (ULM logits) to integers happens here, in steps whose result depends only on the input bits:
  logits (float32) -> q_i = rint(16 * (l_i - max l)) clipped to [-QMAX, 0]  (1/16-nat grid; exact float64 ops)
  -> weights EXP_TABLE[-q_i] (integers computed once with `decimal`, correctly rounded, so the same everywhere)
  -> frequencies with a floor of 1 per symbol and an exact total of 2^PRECISION (integer arithmetic only).
The grid makes the result independent of the last bits of a logit except within 2^-24 nat of a grid boundary; a
different kernel (another CPU family, a GPU) can still land on the other side of one, so the packet CRC checks the
decoded units and the stream resynchronises (see packets.py).

Version 2 codes with rangecoder.py (one code per resync segment, bytes handed out as they settle). Version-1
streams coded every packet with constriction (queue.RangeEncoder, 32-bit words, frequencies passed as exact float64
values); `RangeReader` still decodes them.
"""

from __future__ import annotations

from decimal import Context, Decimal
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


class RangeReader:
    """Version 1: decodes one packet's symbols one by one (the next frequencies may depend on the symbol just decoded)."""

    def __init__(self, data: bytes):
        import constriction

        padded = data + bytes((-len(data)) % 4) + _PAD
        self._dec = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype=">u4").astype(np.uint32))

    def decode(self, freq: np.ndarray) -> int:
        try:
            return int(self._dec.decode(_model(freq)))
        except Exception as e:  # constriction raises on data that no encoder could have produced
            raise BitstreamError(f"corrupted payload: the range decoder failed ({e})") from None
