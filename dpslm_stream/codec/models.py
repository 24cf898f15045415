"""Probability models for the unit coders: `uniform`, `table` (unigram/bigram counts) and `ulm` (the pair's ULM).

A model is the per-stream context of one coder: `frequencies()` gives the integer frequencies of the next unit
(identical at both ends, see entropy.py), `advance(unit)` moves past a unit, `reset()` returns to the start of a
resync segment, and `ideal_bits(unit)` is -log2 p(unit) under the model's unquantized probabilities (what the
efficiency figures compare the payload with).

The ULM model runs its own batch-1, one-token-per-step forward with a KV cache, at both ends, whatever else the
process batches (the server's scoring may batch sessions: those floats are never used for coding). The first
step feeds BOS alone, then each unit alone: the decoder must know the distribution of a unit before it has it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dpslm_stream.codec.entropy import frequencies_from_logits, frequencies_from_weights
from dpslm_stream.codec.format import BitstreamError, Header
from dpslm_stream.codec.tables import UnitTable
from dpslm_stream.errors import InvalidInput

if TYPE_CHECKING:
    from dpslm_stream.hub import ModelSet

MODEL_HASH_BYTES = 16


class UnitModel(Protocol):
    coder: str
    k: int

    @property
    def model_hash(self) -> bytes: ...

    def reset(self) -> None: ...

    def frequencies(self) -> np.ndarray: ...

    def ideal_bits(self, unit: int) -> float: ...

    def advance(self, unit: int) -> None: ...


class UniformModel:
    """log2 K bits a unit: every unit equally likely, no context."""

    coder = "uniform"

    def __init__(self, k: int):
        self.k = k
        self._freq = frequencies_from_weights(np.ones(k, dtype=np.int64))

    @property
    def model_hash(self) -> bytes:
        return bytes(MODEL_HASH_BYTES)

    def reset(self) -> None:
        pass

    def frequencies(self) -> np.ndarray:
        return self._freq

    def ideal_bits(self, unit: int) -> float:
        return math.log2(self.k)

    def advance(self, unit: int) -> None:
        pass


class TableModel:
    """Unigram or bigram counts, add-one smoothed; a bigram row backs off to the unigram (interpolated):
    w(next | prev) = c(prev, next) * S + BACKOFF * (c(next) + 1), S = sum over units of (c(unit) + 1).
    The first unit of a segment uses the unigram."""

    coder = "table"
    BACKOFF = 4

    def __init__(self, table: UnitTable):
        self.table = table
        self.k = table.k
        self._uni_w = table.unigram + 1
        self._uni = frequencies_from_weights(self._uni_w)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._hash = table.model_hash
        self.reset()

    @property
    def model_hash(self) -> bytes:
        return self._hash

    def reset(self) -> None:
        self._prev: int | None = None

    def _weights(self) -> np.ndarray:
        if self._prev is None or self.table.bigram is None:
            return self._uni_w
        # Exact integers (Python ints: counts of a large corpus overflow int64 when multiplied), shifted right until
        # the sum fits 62 bits: the same integers at both ends.
        w = self.table.bigram[self._prev].astype(object) * int(self._uni_w.sum()) + self.BACKOFF * self._uni_w.astype(object)
        shift = max(0, int(w.sum()).bit_length() - 62)
        return np.array([int(x) >> shift for x in w], dtype=np.int64)

    def frequencies(self) -> np.ndarray:
        if self._prev is None or self.table.bigram is None:
            return self._uni
        if self._prev not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[self._prev] = frequencies_from_weights(self._weights())
        return self._cache[self._prev]

    def ideal_bits(self, unit: int) -> float:
        w = self._weights()
        return -math.log2(float(w[unit]) / float(w.sum()))

    def advance(self, unit: int) -> None:
        self._prev = int(unit)


def ulm_hash(ulm) -> bytes:
    """blake2b-128 over the ULM's config and fp32 state dict (key, shape, bytes), in key order."""
    h = hashlib.blake2b(digest_size=MODEL_HASH_BYTES)
    h.update(repr(sorted(ulm.config.to_dict().items())).encode())
    for key, value in sorted(ulm.state_dict().items()):
        t = value.detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode() + repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()


class ULMModel:
    """The pair's ULM as the probability model, one batch-1 step per unit with its own KV cache.

    The output layer runs in float64 on the CPU: fp32 matrix-vector kernels for an output size that is not a
    multiple of the SIMD width (K + 1 = 501) give other last bits with other thread counts (measured with torch
    2.13, oneDNN/MKL), and the logits are what gets quantized. The layers before it are the ULM's own fp32 path;
    across thread counts 1 and 2 they are bit-identical on batch-1 steps (tests/test_codec_ulm.py checks it).
    `max_units` bounds a segment's cache (the packetizer resets the context at every resync point anyway)."""

    coder = "ulm"

    def __init__(self, ulm, model_hash: bytes | None = None, max_units: int = 4096):
        self.ulm = ulm
        self.k = ulm.k
        self.max_units = max_units
        self._hash = ulm_hash(ulm) if model_hash is None else model_hash
        self._head = ulm.output.weight.detach().to("cpu", torch.float64)  # [vocab, dim]
        self.reset()

    @property
    def model_hash(self) -> bytes:
        return self._hash

    def reset(self) -> None:
        self._cache = None  # created on the first step
        self._pending: int | None = 0  # token to feed before the next distribution is known (BOS first)
        self._logits: np.ndarray | None = None
        self._logprobs: np.ndarray | None = None
        self._count = 0

    @property
    def state_nbytes(self) -> int:
        return 0 if self._cache is None else self._cache.nbytes

    @torch.inference_mode()
    def _step(self) -> np.ndarray:
        if self._pending is not None:
            if self._cache is None:
                self._cache = self.ulm.new_cache(1, 64)
            cache = self._cache
            if int(cache.length[0]) + 1 > cache.capacity:
                cache.grow(2 * cache.capacity)
            tokens = torch.tensor([[self._pending]], dtype=torch.long, device=self.ulm.device)
            hidden = self.ulm.hidden(tokens, cache)[0, -1].to("cpu", torch.float64)
            logits = self._head @ hidden  # float64 output layer: see the class docstring
            self._logits = logits[1:].numpy()  # unit u is token u + 1; BOS is never coded, so it gets no frequency
            self._logprobs = torch.log_softmax(logits, -1)[1:].numpy()
            self._pending = None
        return self._logits

    def frequencies(self) -> np.ndarray:
        return frequencies_from_logits(self._step())

    def ideal_bits(self, unit: int) -> float:
        """-log2 of the ULM's own probability (softmax over the whole vocabulary, BOS included, as `score`)."""
        self._step()
        return float(-self._logprobs[unit] / math.log(2))

    def advance(self, unit: int) -> None:
        if not 0 <= unit < self.k:
            raise InvalidInput(f"unit {unit} outside 0..{self.k - 1}")
        self._count += 1
        if self._count >= self.max_units:
            raise InvalidInput(f"more than {self.max_units} units in one resync segment; lower the resync interval")
        self._step()
        self._pending = int(unit) + 1


@dataclass
class ModelCache:
    """Loads each model once per process (and hashes each ULM once): decoders and the resync scan reuse them."""

    models: ModelSet
    device: str = "cpu"
    table: UnitTable | None = None
    _ulms: dict = field(default_factory=dict)

    def ulm(self, k: int, lmbda: int):
        if (k, lmbda) not in self._ulms:
            ulm, _ = self.models.ulm(k, lmbda, self.device)
            self._ulms[(k, lmbda)] = (ulm, ulm_hash(ulm))
        return self._ulms[(k, lmbda)]

    def unload(self, k: int, lmbda: int) -> None:
        """Drop (k, lambda)'s ULM (coders made from it keep it until they go); the next use loads it again."""
        self._ulms.pop((k, lmbda), None)

    def model(self, coder: str, k: int, lmbda: int, table: UnitTable | None = None) -> UnitModel:
        if coder == "uniform":
            return UniformModel(k)
        if coder == "table":
            table = table or self.table
            if table is None:
                raise InvalidInput("the table coder needs a table: --table FILE (make one with `codec fit`)")
            if table.k != k:
                raise BitstreamError(f"the table is for k={table.k} units, the stream has k={k}")
            return TableModel(table)
        ulm, digest = self.ulm(k, lmbda)
        return ULMModel(ulm, model_hash=digest)

    def for_header(self, header: Header) -> UnitModel:
        table = UnitTable.from_bytes(header.table) if header.table is not None else None
        return self.model(header.coder, header.k, header.lmbda, table)
