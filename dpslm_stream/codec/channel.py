"""Channel impairments between a sender and a receiver, for transmission experiments: seeded, sans-I/O.

`Channel.send(packet, t_ms)` returns the packets that reach the receiver and when: a packet is dropped with
probability `loss` (independently), or with `burst` by a two-state Gilbert-Elliott chain whose mean loss is `loss`
and mean burst length `burst` packets; a kept packet is delayed by a uniform 0..jitter_ms. Delivery keeps the
sending order (an ordered transport such as a WebSocket: a late packet holds back the ones after it), so jitter
shows up as delay, never as reordering. Same seed, same packets: same losses and delays.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from dpslm_stream.errors import InvalidInput


@dataclass
class ChannelReport:
    packets_sent: int = 0
    packets_dropped: int = 0
    bytes_sent: int = 0
    bytes_delivered: int = 0
    max_delay_ms: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class Channel:
    def __init__(self, loss: float = 0.0, burst: float | None = None, jitter_ms: float = 0.0, seed: int = 0):
        if not 0.0 <= loss < 1.0:
            raise InvalidInput(f"--loss must be a probability in [0, 1), got {loss}")
        if burst is not None and burst < 1.0:
            raise InvalidInput(f"--burst is a mean burst length in packets (>= 1), got {burst}")
        if not 0.0 <= jitter_ms <= 10_000:
            raise InvalidInput(f"--jitter-ms must be in 0..10000, got {jitter_ms}")
        self.loss, self.burst, self.jitter_ms = loss, burst, jitter_ms
        self._rng = random.Random(seed)
        self._bad = False  # Gilbert-Elliott state
        self._last_delivery = float("-inf")
        self.report = ChannelReport()

    def _drop(self) -> bool:
        if self.burst is None:
            return self._rng.random() < self.loss
        # Good -> bad with p, bad -> good with r = 1/burst; stationary loss p / (p + r) = loss.
        r = 1.0 / self.burst
        p = self.loss * r / (1.0 - self.loss) if self.loss else 0.0
        self._bad = (self._rng.random() >= r) if self._bad else (self._rng.random() < p)
        return self._bad

    def send(self, packet: bytes, t_ms: float) -> list[tuple[float, bytes]]:
        """[(delivery time in ms, packet)]: empty when the packet is lost."""
        rep = self.report
        rep.packets_sent += 1
        rep.bytes_sent += len(packet)
        if self._drop():
            rep.packets_dropped += 1
            return []
        at = max(t_ms + self._rng.uniform(0.0, self.jitter_ms), self._last_delivery)
        self._last_delivery = at
        rep.bytes_delivered += len(packet)
        rep.max_delay_ms = max(rep.max_delay_ms, at - t_ms)
        return [(at, packet)]
