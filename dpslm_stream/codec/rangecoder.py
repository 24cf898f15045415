"""A byte-wise range coder whose output can be handed out as it settles, and whose decoder says when a symbol is
determined by the bytes received so far.

Why hand-written: the bitstream (version 2) codes a resync segment as ONE range code spread over many packets, so a
packet must carry exactly the bytes that became final since the previous one, and the receiver must know which
units those bytes already determine. constriction's Python `RangeEncoder` only gives sealed output
(`get_compressed()` appends the termination words; there is no call that returns the settled prefix alone), works in
32-bit words (a unit's bits would wait for a whole word) and its decoder cannot say "not determined yet". This coder
is the classic carry-propagating range coder (the LZMA scheme: a cached byte plus a count of pending 0xFF bytes that
a carry may still turn into 0x00), with a 64-bit window in Python integers:

    encode (cum, f) of total T = 2^24:  r = range >> 24; low += r*cum; range = r*f
    normalize: while range < 2^56: shift the top byte of low out (settled unless a carry can still reach it;
               the held bytes are released as soon as the interval cannot carry any more)

so r >= 2^32 and the truncation of r costs < 2^-32 of the interval a symbol (nothing measurable). A segment ends with
the shortest value in the final interval that has the most trailing zero bytes (at most one byte past the settled
ones), trailing zero bytes dropped: the decoder pads a terminated segment with zeros. Termination costs about 8 bits.

The decoder keeps `code = window - low` with the not-yet-received bytes of the 8-byte window taken as 0 (and as 0xFF
for the upper bound): a symbol is determined when both bounds fall in the same symbol's interval, so a receiver
decodes each unit as soon as, and only when, the bytes it holds fix it. `mirror_decodable` runs the same test from
the encoder's side (it knows the symbols), so both ends agree on which units each packet makes decodable (the
packet CRC covers them).
"""

from __future__ import annotations

import numpy as np

from dpslm_stream.codec.entropy import PRECISION
from dpslm_stream.codec.format import BitstreamError

_WINDOW_BITS = 64
_MASK = (1 << _WINDOW_BITS) - 1
_TOP = 1 << (_WINDOW_BITS - 8)  # normalize below this range
_FF_ZONE = 0xFF << (_WINDOW_BITS - 8)


def interval(freq: np.ndarray, symbol: int) -> tuple[int, int]:
    """(cumulative frequency below `symbol`, its frequency)."""
    return int(freq[:symbol].sum()), int(freq[symbol])


class RangeEncoder:
    """Encodes symbols into bytes; `take_settled()` returns the bytes that no later symbol can change."""

    def __init__(self) -> None:
        self._out = bytearray()
        self.reset()

    def reset(self) -> None:
        self._low = 0  # may exceed 2^64 by a carry, which goes into the cached byte
        self._range = _MASK
        self._cache: int | None = None  # the last byte shifted out, held back: a carry may still add 1 to it
        self._ff = 0  # 0xFF bytes after the cached one, also held back (a carry turns them to 0x00)
        self.symbols = 0

    def encode(self, cum: int, freq: int) -> None:
        r = self._range >> PRECISION
        self._low += r * cum
        self._range = r * freq
        while self._range < _TOP:
            self._range <<= 8
            self._shift_low()
        self.symbols += 1

    def _shift_low(self) -> None:
        low = self._low
        if low < _FF_ZONE or low > _MASK:
            carry = low >> _WINDOW_BITS
            if self._cache is not None:
                self._out.append((self._cache + carry) & 0xFF)
            if self._ff:
                self._out += bytes([(0xFF + carry) & 0xFF]) * self._ff
                self._ff = 0
            self._cache = (low >> (_WINDOW_BITS - 8)) & 0xFF
        else:
            self._ff += 1
        self._low = (low << 8) & _MASK

    def take_settled(self) -> bytes:
        """The bytes settled since the last call (final: a decoder may use them at once). The held bytes go too
        once no carry can reach them: when the interval no longer crosses the window's top (it only shrinks)."""
        if self._low + self._range <= _MASK + 1 and (self._cache is not None or self._ff):
            if self._cache is not None:
                self._out.append(self._cache)
            self._out += b"\xff" * self._ff
            self._cache, self._ff = None, 0
        out = bytes(self._out)
        self._out.clear()
        return out

    def finish(self) -> bytes:
        """Terminate the code: the remaining bytes (trailing zeros dropped); the encoder starts a new code."""
        low, top = self._low, self._low + self._range
        for nbytes in range(_WINDOW_BITS // 8 + 1):
            step = 1 << (_WINDOW_BITS - 8 * nbytes)
            value = -(-low // step) * step
            if value < top:
                break
        self._low = value
        for _ in range(nbytes + 1):
            self._shift_low()
        out = self.take_settled().rstrip(b"\x00")
        self.reset()
        return out


class RangeDecoder:
    """Decodes one code (a resync segment) from bytes as they arrive. `end()`: no more bytes (zeros follow)."""

    def __init__(self) -> None:
        self._data = bytearray()  # received bytes not yet shifted into the window
        self._code = 0  # window - low, missing window bytes taken as 0
        self._missing = _WINDOW_BITS // 8  # window bytes not received yet (the last ones)
        self._range = _MASK
        self._ended = False
        self.symbols = 0

    def feed(self, data: bytes) -> None:
        if self._ended:
            raise BitstreamError("corrupted stream: bytes after the end of a terminated code")
        self._data += data
        self._fill()

    def end(self) -> None:
        self._ended = True
        self._missing = 0

    def _fill(self) -> None:
        take = min(self._missing, len(self._data))
        for i in range(take):
            self._missing -= 1
            self._code += self._data[i] << (8 * self._missing)
        del self._data[:take]

    def _bounds(self) -> tuple[int, int, int]:
        r = self._range >> PRECISION
        lo = self._code // r
        hi = (self._code + (1 << (8 * self._missing)) - 1) // r if self._missing else lo
        return r, lo, hi

    def _consume(self, r: int, cum: int, freq: int) -> None:
        self._code -= r * cum
        self._range = r * freq
        while self._range < _TOP:
            self._range <<= 8
            self._code <<= 8
            if self._data:
                self._code += self._data.pop(0)
            elif not self._ended:
                self._missing += 1
        self.symbols += 1

    def decode(self, freq: np.ndarray, cumulative: np.ndarray | None = None) -> int | None:
        """The next symbol under integer frequencies `freq` (total 2^24), or None while the bytes received so far do
        not determine it. Data no encoder could have produced is a BitstreamError."""
        r, lo, hi = self._bounds()
        total = 1 << PRECISION
        if lo >= total:
            raise BitstreamError("corrupted payload: the range decoder left the coded interval")
        if hi >= total:
            return None
        cum = np.cumsum(freq) if cumulative is None else cumulative
        s = int(np.searchsorted(cum, lo, side="right"))
        if hi >= int(cum[s]):
            return None
        below = int(cum[s - 1]) if s else 0
        self._consume(r, below, int(cum[s]) - below)
        return s

    def decode_known(self, cum: int, freq: int) -> bool:
        """The encoder's mirror: is the symbol with interval (cum, freq) determined yet? If so, move past it."""
        r, lo, hi = self._bounds()
        if not cum <= lo <= hi < cum + freq:
            return False
        self._consume(r, cum, freq)
        return True
