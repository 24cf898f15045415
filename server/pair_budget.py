"""How many (k, lambda) pairs have their large models loaded at once: ``serve --max-loaded-pairs``.

A client may ask for any pair the model set holds, and each pair brings large models: a session that scores loads
the pair's unit LM (0.8 GB at the released size), one that resynthesises its ELLA-V (about as large, plus its decode
cache), one that transmits with the ``ulm`` coder the codec thread's unit LM. Loaded on demand and never dropped, a
client that went through the 24 released pairs would make the server load tens of GB, and every other session would
go down with it. So at most ``limit`` pairs are loaded at once. A new pair first unloads the least recently used pair
that no session holds; when every loaded pair is held, the start is refused with ``busy`` (and ``retry_after_s``)
and nothing is loaded.

A pair is unloaded only once nobody has held it for ``min_idle_s`` (``serve --pair-min-idle-s``): otherwise a client
that opened short sessions of ever other pairs would keep the server loading models, seconds of CPU and disk each,
on the cores the other sessions use. So on-demand loads happen at most ``limit - pinned`` times per ``min_idle_s``.

Pinned pairs (the default pair, loaded by the start-up warm-up, and ``serve --pairs``, loaded at start) are never
unloaded; they count toward the limit. Sessions that need only a pair's codebook (no scores, no resynthesis, no
``ulm`` coder) hold nothing here: a codebook is a few MB.

This is the policy alone (sans-I/O): ``Server`` calls it on the event loop and does the unloading it asks for.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import Iterable

Pair = tuple[int, int]


class PairsInUse(Exception):
    """Every pair the server may keep loaded is held by a session, or was within ``min_idle_s``: a new pair cannot be
    loaded now. ``retry_after_s``: when the first such pair becomes free if no session holds it again (None when
    every one is held: nobody knows)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PairBudget:
    def __init__(self, limit: int, pinned: Iterable[Pair] = (), min_idle_s: float = 0.0):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.pinned = frozenset(pinned)
        self.min_idle_s = min_idle_s
        self._held: Counter[Pair] = Counter()  # sessions holding each pair (opening ones included)
        # Unpinned pairs loaded or loading, least recently used first, with when they were last released (-inf: not
        # yet held and released).
        self._loaded: OrderedDict[Pair, float] = OrderedDict()

    @property
    def loaded(self) -> list[Pair]:
        """Pairs counted as loaded: the pinned ones, then the others, least recently used first."""
        return sorted(self.pinned) + [p for p in self._loaded if p not in self.pinned]

    def held(self, pair: Pair) -> int:
        return self._held[pair]

    def acquire(self, pair: Pair, now: float) -> list[Pair]:
        """A session needs ``pair``'s models at time ``now`` (seconds): hold it, and return the pairs to unload before
        they load (least recently used first). Raises PairsInUse, holding nothing, when there is no room and too few
        loaded pairs are free (held by nobody for ``min_idle_s``)."""
        evict: list[Pair] = []
        if pair not in self.pinned and pair not in self._loaded:
            over = len(self.pinned) + len(self._loaded) + 1 - self.limit
            if over > 0:
                free = [p for p, released in self._loaded.items()
                        if self._held[p] == 0 and now - released >= self.min_idle_s]  # fmt: skip
                if len(free) < over:
                    # When the first unheld pair comes free, if nobody holds it again (None: every pair is held).
                    # One pair is enough: `over` is 1 whenever a pair is unheld (pinned and loaded pairs exceed the
                    # limit only when the pinned ones alone do, and then nothing else was ever loaded).
                    wait = min((released + self.min_idle_s - now for p, released in self._loaded.items()
                                if self._held[p] == 0), default=None)  # fmt: skip
                    raise PairsInUse(
                        f"(k, lambda) = {pair} is not loaded, and the {self.limit} pair(s) this server keeps loaded "
                        f"are in use by other sessions, or were within {self.min_idle_s:g} s: "
                        f"{', '.join(map(str, self.loaded))} (serve --max-loaded-pairs, --pair-min-idle-s); try again "
                        f"later or use one of those", wait)  # fmt: skip
                evict = free[:over]
                for p in evict:
                    del self._loaded[p]
            self._loaded[pair] = -math.inf
        elif pair in self._loaded:
            self._loaded.move_to_end(pair)
        self._held[pair] += 1
        return evict

    def release(self, pair: Pair, now: float) -> None:
        """A session that held ``pair`` is over at ``now`` (once nobody holds it for ``min_idle_s``, its models may
        be unloaded for another pair)."""
        if self._held[pair] <= 0:
            raise ValueError(f"{pair} is not held")
        self._held[pair] -= 1
        if self._held[pair] == 0:
            del self._held[pair]
            if pair in self._loaded:
                self._loaded[pair] = now
