"""The unit language model (ULM) of DP-SLM: a Mistral-style transformer over deduplicated DPDP units.

Upstream: nicolvisser/Mistral-ULM (`ulm/transformer.py`, `ulm/units/tokenizer.py`, `hubconf.py`); facts in
docs/references.md §ULM. Tokens: BOS = 0, unit u -> u + 1, so vocab_size = K + 1. Checkpoint file:
`{"model_args": {...}, "model_state_dict": {...}}`.

Scoring:
- `ULM.loglikelihood(tokenizer.encode(units))`: upstream semantics, sum over units of the natural-log
  probability of each unit given BOS and the units before it (BOS conditioned on, never scored, no EOS term).
- `ULM.loglikelihood_batch`: the same for many utterances in one right-padded forward.
- `IncrementalScorer`: the same sum, built up block by block while units stream in, with a KV cache (one row of a
  `ScoringPool`, the persistent batched cache that `score_blocks` runs many sessions' blocks on).
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import weakref
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    load_state_dict_strict,
    read_checkpoint_file,
    read_config_fields,
)
from dpslm_stream.validate import is_int, is_number

BOS_ID = 0


@dataclass
class ULMConfig(TransformerConfig):
    """Upstream `TransformerModelArgs` of Mistral-ULM. `dropout` is training-only: kept for to_dict, unused."""

    dropout: float = 0.15

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size", "rope_theta"
    )

    @classmethod
    def from_dict(cls, d: dict) -> "ULMConfig":
        """Read a checkpoint's "model_args" dict; unknown and training-only fields (dropout) are tolerated."""
        fields = read_config_fields(d, cls.REQUIRED, "ULM model_args")
        dropout = d.get("dropout", 0.15)
        return cls(**fields, dropout=float(dropout) if is_number(dropout) else 0.15)

    def to_dict(self) -> dict:
        """The upstream "model_args" dict (field order of the upstream dataclass)."""
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "dropout": self.dropout,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
        }


# The released size (Mistral-ULM model_config.json) for K = 500 units.
FULL = ULMConfig(
    dim=1024, n_layers=12, head_dim=64, hidden_dim=4096, n_heads=16, n_kv_heads=16,
    norm_eps=1e-6, vocab_size=501, rope_theta=10000.0, dropout=0.15,
)
# Same architecture and vocabulary, small widths: quick on CPU (tests, offline demo).
TINY = dataclasses.replace(FULL, dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=4)


def config_for_k(k: int, base: ULMConfig = FULL) -> ULMConfig:
    """`base` with the vocabulary of a K-unit codebook (K + 1 tokens: BOS and the K units)."""
    if not is_int(k, int) or k < 1:
        raise InvalidInput(f"k must be a positive integer number of units, got {k!r}")
    return dataclasses.replace(base, vocab_size=k + 1)


class UnitTokenizer:
    """Upstream `UnitTokenizer`: encode(units) = [BOS=0, u1+1, ..., uN+1]; decode drops every 0 and subtracts 1.

    With `num_units` (K) given, unit ids outside 0..K-1 are rejected. encode does not deduplicate: pass
    deduplicated units, as DP-SLM does (`unique_consecutive`).
    """

    BOS_id: int = BOS_ID

    def __init__(self, num_units: int | None = None):
        self.num_units = num_units

    def encode(self, units: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """int64 tensor [N + 1]. encode([]) is int64 [0] (upstream returns a float tensor there)."""
        u = _units_tensor(units, self.num_units)
        return torch.cat([torch.tensor([self.BOS_id], dtype=torch.long), u + 1])

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
            raise InvalidInput(f"ids must be a 1-D integer sequence, got shape {tuple(ids.shape)} {ids.dtype}")
        return (ids[ids != self.BOS_id] - 1).tolist()


class PhonemeTokenizer:
    """Upstream `ulm.phones.PhonemeTokenizer` (the phone LM's tokenizer, released as `us_arpa_tokenizer.json`).

    encode("H EY1") = [BOS, id(H), id(EY1)] (split on `delimiter`, unknown phones -> UNK); ids 0 and 1 are always
    BOS and UNK. decode drops BOS and joins the phones back with the delimiter.
    """

    BOS_id: int = 0
    UNK_id: int = 1

    def __init__(self, phoneme_to_id: dict[str, int], delimiter: str = " "):
        if not isinstance(phoneme_to_id, dict) or not all(
            isinstance(k, str) and is_int(v, int) for k, v in phoneme_to_id.items()
        ):
            raise CheckpointError("phone tokenizer: phoneme_to_id must map phone strings to integer ids")
        if len(set(phoneme_to_id.values())) != len(phoneme_to_id):
            raise CheckpointError("phone tokenizer: the phoneme to id mapping must be one-to-one")
        if not isinstance(delimiter, str) or delimiter in phoneme_to_id:
            raise CheckpointError(f"phone tokenizer: delimiter {delimiter!r} must be a string not in the vocabulary")
        inverse = {v: k for k, v in phoneme_to_id.items()}
        if self.BOS_id not in inverse or self.UNK_id not in inverse:
            raise CheckpointError("phone tokenizer: ids 0 (BOS) and 1 (UNK) must be in the vocabulary")
        self.phoneme_to_id = dict(phoneme_to_id)
        self.delimiter = delimiter
        self.id_to_phoneme = inverse

    @property
    def vocab_size(self) -> int:
        return len(self.phoneme_to_id)

    @property
    def BOS_token(self) -> str:
        return self.id_to_phoneme[self.BOS_id]

    @property
    def UNK_token(self) -> str:
        return self.id_to_phoneme[self.UNK_id]

    def encode(self, phoneme_string: str) -> torch.Tensor:
        if not isinstance(phoneme_string, str):
            raise InvalidInput(f"encode takes a string of phones such as 'H EY1', got {type(phoneme_string).__name__}")
        phones = [self.BOS_token, *phoneme_string.split(self.delimiter)]
        return torch.tensor([self.phoneme_to_id.get(p, self.UNK_id) for p in phones], dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        ids = torch.as_tensor(ids)
        return self.delimiter.join(self.id_to_phoneme.get(i, self.UNK_token) for i in ids[ids != self.BOS_id].tolist())

    @classmethod
    def from_dict(cls, d: object) -> "PhonemeTokenizer":
        """The upstream JSON (simple-parsing `to_dict`: phoneme_to_id, delimiter, and the constants BOS_id/UNK_id)."""
        if not isinstance(d, dict) or "phoneme_to_id" not in d:
            raise CheckpointError("not a phone tokenizer file: expected a JSON object with 'phoneme_to_id'")
        for name in ("BOS_id", "UNK_id"):
            if name in d and d[name] != getattr(cls, name):
                raise CheckpointError(f"phone tokenizer: {name} is {d[name]!r}, upstream fixes it to {getattr(cls, name)}")
        return cls(d["phoneme_to_id"], d.get("delimiter", " "))

    def to_dict(self) -> dict:
        return {"phoneme_to_id": dict(self.phoneme_to_id), "delimiter": self.delimiter, "BOS_id": self.BOS_id,
                "UNK_id": self.UNK_id}  # fmt: skip


class ULM(Transformer):
    """The unit LM. Parameter names are the upstream state-dict keys; runs in the dtype of its weights."""

    def __init__(self, config: ULMConfig):
        if config.output_bias:
            raise InvalidInput("the ULM output layer has no bias")
        super().__init__(config)

    @property
    def k(self) -> int:
        """Number of units the model scores (vocab_size - 1; token 0 is BOS)."""
        return self.config.vocab_size - 1

    def tokenizer(self) -> UnitTokenizer:
        return UnitTokenizer(self.k)

    @torch.inference_mode()
    def unit_logprobs(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Per-unit log-probabilities [N] (fp32, CPU) of ids[1:] given the preceding ids; ids = encode(units)."""
        ids = self._check_ids(ids)
        if ids.numel() < 2:
            return torch.zeros(0)
        logits = self(ids[None, :-1])[0]
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[1:, None])[:, 0].cpu()

    def loglikelihood(self, ids: torch.Tensor | Sequence[int]) -> float:
        """Upstream `TransformerModel.loglikelihood`: sum of natural-log probabilities of ids[1:] (0.0 for no units)."""
        return float(self.unit_logprobs(ids).sum())

    @torch.inference_mode()
    def loglikelihood_batch(self, batch: Sequence[torch.Tensor | Sequence[int]]) -> list[float]:
        """loglikelihood of each id sequence, computed in one right-padded forward (each row at positions 0..)."""
        rows = [self._check_ids(ids) for ids in batch]
        lengths = [len(r) - 1 for r in rows]  # number of scored tokens per row
        out = [0.0] * len(rows)
        live = [i for i, n in enumerate(lengths) if n > 0]
        if not live:
            return out
        width = max(lengths[i] for i in live)
        inputs = torch.full((len(live), width), BOS_ID, dtype=torch.long, device=self.device)
        targets = torch.zeros((len(live), width), dtype=torch.long, device=self.device)
        for j, i in enumerate(live):
            inputs[j, : lengths[i]] = rows[i][:-1]
            targets[j, : lengths[i]] = rows[i][1:]
        logp = torch.log_softmax(self(inputs), dim=-1).gather(-1, targets[..., None])[..., 0]
        for j, i in enumerate(live):
            out[i] = float(logp[j, : lengths[i]].sum())
        return out

    def _check_ids(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.ndim != 1:
            raise InvalidInput(
                f"ids must be a 1-D token sequence (tokenizer.encode(units)), got shape {tuple(ids.shape)}"
            )
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidInput(f"ids must be integers, got {ids.dtype}")
        if ids.numel() == 0:
            raise InvalidInput("ids is empty; it must start with BOS (0): use tokenizer.encode(units)")
        ids = ids.long()  # numpy's uint16/uint32 arrays become torch dtypes without min/max kernels
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise InvalidInput(
                f"token ids must lie in 0..{self.config.vocab_size - 1} (BOS = 0, unit u = u + 1), "
                f"got min {int(ids.min())} max {int(ids.max())}"
            )
        return ids.to(self.device)


class ScoringPool:
    """One KV cache whose rows are lent to the IncrementalScorers of one ULM (one max_context, one chunk size).

    Each attached scorer owns one row, written in place: a batched forward over several scorers (`score_blocks`)
    runs on the pool's rows directly, so a step copies nothing but its new tokens (no per-step stacking of every
    session's cache). Live rows are 0..N-1: a scorer that closes (or is garbage-collected) leaves, and the last row
    moves into its hole (one copy of that row's filled slots). The cache grows by doubling (rows as scorers attach;
    slots, without a window, as the longest stream grows) and shrinks by half when at most a quarter is used, so it
    stays within 4x of what the live rows need, each resize copying only the live contents.

    A forward covers the span of rows from the first to the last scorer with new tokens; rows in between without
    any are carried along as padding (they compute, their cache is read, nothing of theirs changes). Thread safety:
    every operation holds the pool's lock, so sessions on one pool may be reset or closed from another thread.
    """

    def __init__(self, ulm: ULM, max_context: int | None = None, chunk: int = 256, rows: int = 1):
        if max_context is not None and (not is_int(max_context, int) or max_context < 1):
            raise InvalidInput(f"max_context must be a positive number of tokens or None, got {max_context!r}")
        if not is_int(chunk, int) or chunk < 1:
            raise InvalidInput(f"chunk must be a positive number of tokens, got {chunk!r}")
        if not is_int(rows, int) or rows < 1:
            raise InvalidInput(f"rows must be a positive number of rows, got {rows!r}")
        self.ulm = ulm
        self.max_context = max_context
        self.chunk = chunk  # most tokens fed per forward; longer blocks are split (same scores)
        # With a window, a row needs the W - 1 tokens the next query attends to plus one chunk: fixed capacity.
        self._min_capacity = chunk if max_context is None else max_context - 1 + chunk
        self.cache: KVCache = ulm.new_cache(rows, self._min_capacity, window=max_context)
        self._owners: list[weakref.ref[IncrementalScorer]] = []  # row i's scorer
        self._collected = False  # set by a weakref callback (no lock there): some owner is gone
        self._lock = threading.RLock()

    @property
    def num_rows(self) -> int:
        """Rows lent to scorers (live or not yet reclaimed)."""
        return len(self._owners)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def row_nbytes(self) -> int:
        """One row's share of the cache."""
        return self.cache.nbytes // self.cache.batch_size

    def row(self, scorer: "IncrementalScorer") -> KVCache | None:
        """A view of `scorer`'s row (None when it holds none); stale after the pool's next operation."""
        with self._lock:
            return None if scorer._row is None else self.cache.rows(scorer._row, scorer._row + 1)

    @torch.inference_mode()  # the cache may have been (re)allocated in inference mode
    def attach(self, scorer: "IncrementalScorer") -> None:
        """Give `scorer` an empty row (its own row, emptied, when it already holds one): the stream restarts."""
        with self._lock:
            self._reclaim()
            if scorer._row is None:
                if len(self._owners) == self.cache.batch_size:
                    self.cache.resize(2 * self.cache.batch_size, self.cache.capacity)
                scorer._row = len(self._owners)
                self._owners.append(weakref.ref(scorer, self._on_collected))
            self.cache.rows(scorer._row, scorer._row + 1).clear_rows()

    @torch.inference_mode()  # the cache may have been (re)allocated in inference mode
    def detach(self, scorer: "IncrementalScorer") -> None:
        """Free `scorer`'s row (no-op when it holds none)."""
        with self._lock:
            if scorer._row is not None:
                self._free(scorer._row)
                scorer._row = None
            self._reclaim()
            self._shrink()

    def _on_collected(self, _ref: weakref.ref) -> None:
        self._collected = True

    def _reclaim(self) -> None:
        """Free the rows of scorers that were garbage-collected without closing."""
        if self._collected:
            self._collected = False
            for i in reversed(range(len(self._owners))):
                if self._owners[i]() is None:
                    self._free(i)

    def _free(self, i: int) -> None:
        last = len(self._owners) - 1
        if i != last:
            self.cache.move_row(last, i)
            self._owners[i] = self._owners[last]
            moved = self._owners[i]()
            if moved is not None:
                moved._row = i
        self._owners.pop()
        self.cache.rows(last, last + 1).clear_rows()  # a freed row holds nothing (resize keeps only filled slots)

    def _shrink(self) -> None:
        rows, capacity = self.cache.batch_size, self.cache.capacity
        live = len(self._owners)
        if rows > 1 and live <= rows // 4:
            rows = max(1, rows // 2)
        used = int(self.cache.lengths[:live].max(initial=0))
        if self.max_context is None and capacity > self._min_capacity and used <= capacity // 4:
            capacity = max(self._min_capacity, capacity // 2)
        if (rows, capacity) != (self.cache.batch_size, self.cache.capacity):
            self.cache.resize(rows, capacity)

    @torch.inference_mode()  # the cache may have been (re)allocated in inference mode
    def forward(self, scorers: Sequence["IncrementalScorer"], pieces: Sequence[list[int]]) -> list[torch.Tensor]:
        """Feed each scorer its piece of tokens (at most `chunk`) in one forward over its rows; returns each
        scorer's log-probabilities [len(piece), V] (fp32, CPU)."""
        with self._lock:
            self._reclaim()
            rows = [s._row for s in scorers]
            if any(r is None for r in rows):
                raise InvalidInput("a scorer of this pool was closed; reset() it to start a new stream")
            lo, hi = min(rows), max(rows) + 1
            width = max(len(p) for p in pieces)
            self._make_room(lo, hi, width)
            tokens = torch.zeros((hi - lo, width), dtype=torch.long)
            valid = [0] * (hi - lo)  # host counts: the cache keeps its lengths on the host
            for r, piece in zip(rows, pieces):
                tokens[r - lo, : len(piece)] = torch.tensor(piece, dtype=torch.long)
                valid[r - lo] = len(piece)
            logits = self.ulm(tokens.to(self.ulm.device), self.cache.rows(lo, hi), valid)
            logp = torch.log_softmax(logits, dim=-1).cpu()
            return [logp[r - lo, : len(p)] for r, p in zip(rows, pieces)]

    def _make_room(self, lo: int, hi: int, num_tokens: int) -> None:
        """Ensure `num_tokens` free slots in rows [lo, hi): drop what the window no longer needs, or grow."""
        cache = self.cache
        if self.max_context is not None:
            # The next query sits at the current position; it still needs the W - 1 tokens before it.
            for r in range(lo, hi):
                if int(cache.lengths[r]) + num_tokens > cache.capacity:
                    cache.rows(r, r + 1).drop_oldest(self.max_context - 1)
        else:
            needed = int(cache.lengths[lo:hi].max()) + num_tokens
            if needed > cache.capacity:
                cache.grow(max(needed, 2 * cache.capacity))


class IncrementalScorer:
    """Scores one stream of deduplicated units block by block, with a KV cache (one row of a `ScoringPool`).

    `push(units)` returns the natural-log probability of each new unit given BOS and every earlier unit, running
    all of the block's tokens through the model in one forward (the weights are read once per block). The stream
    is fed as [BOS, u1+1, u2+1, ...] at positions 0, 1, 2, ...; each push also feeds its last unit, so the
    distribution of the next unit is ready (`next_logprobs`) before the next block arrives.

    Without `pool` the scorer has a pool of its own; scorers that share one (a worker's sessions) are scored
    together by `score_blocks` in one forward over their rows. `close()` gives the row back (a scorer that is
    garbage-collected gives it back too); `reset()` starts a new stream, taking a row again if needed.

    Exactness: with `max_context=None` the cache keeps every token and the scores of units 1..N sum to
    `ulm.loglikelihood(encode(units))` up to float rounding, whatever the block sizes. The cache then grows
    without bound (96 KiB per unit for the full fp32 model).

    With `max_context=W` each token attends only to the W most recent tokens, itself included (Mistral
    sliding-window attention, identical to Hugging Face Mistral with sliding_window=W over the whole stream):
    - scores are exact while at most W units have been pushed (the query scoring unit t sits at position t-1);
    - afterwards BOS and the oldest units leave the window. Cached keys/values are NOT recomputed: each kept
      entry is what the token computed when it was appended, from its own window. The receptive field of a
      score therefore still reaches n_layers * (W - 1) tokens back through the layers, but no further;
    - positions keep increasing (no reset), and RoPE makes attention depend only on position differences, so
      a window far into the stream sees the same geometry as one near the start; the rotary angles are computed
      by formula, past upstream's 8000-position table (at very large positions fp32 angle rounding grows
      slowly: ~6e-8 relative, i.e. ~5e-4 rad at position 8000);
    - the model was trained on chunks of <= 1023 tokens (often starting mid-utterance, without BOS), so
      W <= 1023 stays in distribution; scores past W differ from `loglikelihood` of the full utterance.
    Memory is then bounded: a row holds W - 1 + `chunk` tokens.
    """

    def __init__(
        self,
        ulm: ULM,
        max_context: int | None = None,
        device: torch.device | str | None = None,
        chunk: int = 256,
        pool: ScoringPool | None = None,
    ):
        if device is not None and torch.device(device) != ulm.device:
            raise InvalidInput(f"the scorer's cache must live with the model: model on {ulm.device}, asked {device}")
        if pool is None:
            pool = ScoringPool(ulm, max_context, chunk)
        elif (pool.ulm, pool.max_context, pool.chunk) != (ulm, max_context, chunk):
            raise InvalidInput("the pool must hold the scorer's ULM, max_context and chunk")
        self.ulm = ulm
        self.max_context = max_context
        self.chunk = chunk
        self.pool = pool
        self._row: int | None = None  # the pool's row of this scorer (kept up to date by the pool)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next push starts again from BOS at position 0."""
        self.pool.attach(self)
        self.next_logprobs: torch.Tensor | None = None  # [V] fp32: distribution of the next token
        self.num_units = 0
        self.total_logprob = 0.0

    def close(self) -> None:
        """End of the stream: give the cache row back to the pool (`reset()` takes one again)."""
        self.pool.detach(self)
        self.next_logprobs = None

    @property
    def cache(self) -> KVCache | None:
        """A view of this scorer's cache row (None after close)."""
        return self.pool.row(self)

    @property
    def state_nbytes(self) -> int:
        extra = 0 if self.next_logprobs is None else self.next_logprobs.numel() * 4
        return (0 if self._row is None else self.pool.row_nbytes()) + extra

    def push(self, units: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-probabilities [len(units)] (fp32, CPU) of a block of new deduplicated units."""
        return score_blocks([self], [units])[0]


@torch.inference_mode()
def score_blocks(
    scorers: Sequence[IncrementalScorer], blocks: Sequence[Sequence[int] | np.ndarray | torch.Tensor]
) -> list[torch.Tensor]:
    """`[s.push(b) for s, b in zip(scorers, blocks)]`, but the blocks of scorers sharing a pool run in one
    right-padded forward over the pool's rows (scorers of different pools: one forward per pool)."""
    if len(scorers) != len(blocks):
        raise InvalidInput(f"got {len(scorers)} scorers but {len(blocks)} blocks")
    if len({id(s) for s in scorers}) != len(scorers):
        raise InvalidInput("a scorer appears more than once; push its blocks one after the other instead")
    units = [_units_tensor(b, s.ulm.k) for s, b in zip(scorers, blocks)]
    if any(s._row is None for s, u in zip(scorers, units) if len(u)):
        raise InvalidInput("this scorer was closed; reset() it to start a new stream")
    # Token stream each session still has to feed (BOS first for a fresh session), and where its scores come from.
    feeds = [
        ([BOS_ID] if s.next_logprobs is None else []) + (u + 1).tolist() for s, u in zip(scorers, units)
    ]
    dists: list[list[torch.Tensor]] = [[] if s.next_logprobs is None else [s.next_logprobs] for s in scorers]
    done = [0] * len(scorers)
    pools = {id(s.pool): s.pool for s in scorers}
    for pool in pools.values():
        mine = [i for i, s in enumerate(scorers) if s.pool is pool and len(units[i]) > 0]
        while True:
            rows = [i for i in mine if done[i] < len(feeds[i])]
            if not rows:
                break
            pieces = [feeds[i][done[i] : done[i] + pool.chunk] for i in rows]
            for i, piece, logp in zip(rows, pieces, pool.forward([scorers[i] for i in rows], pieces)):
                dists[i].extend(logp)
                done[i] += len(piece)
    out = []
    for s, u, d in zip(scorers, units, dists):
        if len(u) == 0:
            out.append(torch.zeros(0))
            continue
        # d[t] is the distribution of the (t+1)-th new unit; the last one predicts the unit after the block.
        scores = torch.stack([d[t][int(u[t]) + 1] for t in range(len(u))])
        s.next_logprobs = d[len(u)].clone()  # clone: do not keep the whole chunk's logits alive
        s.num_units += len(u)
        s.total_logprob += float(scores.sum())
        out.append(scores)
    return out


def _units_tensor(units: Sequence[int] | np.ndarray | torch.Tensor, k: int | None) -> torch.Tensor:
    """Validated unit ids as an int64 CPU tensor [N]."""
    if isinstance(units, torch.Tensor):
        u = units.detach().cpu()
    else:
        arr = np.asarray(units)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)):
            raise InvalidInput(f"units must be integers, got {arr.dtype} ({np.asarray(units).ravel()[:5]!r}...)")
        u = torch.from_numpy(arr.astype(np.int64))
    if u.ndim != 1:
        raise InvalidInput(f"units must be a 1-D sequence, got shape {tuple(u.shape)}")
    if u.is_floating_point() or u.is_complex() or u.dtype == torch.bool:
        raise InvalidInput(f"units must be integers, got {u.dtype}")
    u = u.long()
    if u.numel():
        lo, hi = int(u.min()), int(u.max())
        if lo < 0 or (k is not None and hi >= k):
            raise InvalidInput(f"unit ids must lie in 0..{'K-1' if k is None else k - 1}, got min {lo} max {hi}")
    return u


def load_checkpoint_dict(
    ckpt: dict, map_location: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ULM:
    """Build the ULM from a checkpoint's own "model_args" and load "model_state_dict" strictly; eval mode."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"a ULM checkpoint is a dict, got {type(ckpt).__name__}")
    for key in ("model_args", "model_state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"not a ULM checkpoint: top-level key {key!r} missing (has {sorted(map(str, ckpt))})")
    config = ULMConfig.from_dict(ckpt["model_args"])
    with torch.device("meta"):
        model = ULM(config)
    load_state_dict_strict(model, ckpt["model_state_dict"], "ULM checkpoint")
    return model.to(device=map_location, dtype=dtype).eval()


def checkpoint_dict(model: ULM) -> dict:
    """The upstream file content: {"model_args": dict, "model_state_dict": fp32 CPU tensors}."""
    return {
        "model_args": model.config.to_dict(),
        "model_state_dict": {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
    }


def load_checkpoint(path: str | os.PathLike | io.BufferedIOBase, map_location: torch.device | str = "cpu") -> ULM:
    """Read an upstream ULM file (weights_only) and load it; unreadable files are a CheckpointError."""
    return load_checkpoint_dict(read_checkpoint_file(path, "ULM"), map_location)
