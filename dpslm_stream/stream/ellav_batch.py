"""BatchDecoder: the decode steps of many streams' ELLA-V passes in lockstep over one KV cache
(continuous batching), and PassPlan, the pass a stream hands it (stream/ellav_stage.py makes them).

The decoder is the one owner of every pass in flight: a row holds its owner (any hashable object: the
ResynthSession in a worker, the IncrementalELLAV itself standalone), its plan and its slice of the cache and
generation state; a pass leaves by ending (`step` reports it) or by `remove(owner)`. Nothing else keeps a registry
of running passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models.ellav import ELLAV, GenerationState, generation_step, sample_rows
from dpslm_stream.models.transformer import KVCache
from dpslm_stream.validate import check_int


@dataclass(frozen=True)
class Sampling:
    """How a stream picks its tokens: greedy (argmax), or nucleus sampling with `temperature` / `top_p` drawn from
    the stream's own `generator` (so its output does not depend on other streams sharing a batch)."""

    greedy: bool
    temperature: float
    top_p: float
    generator: torch.Generator


@dataclass
class PassPlan:
    """One re-prompting pass: the prompt to prefill and where the pass stops. Indices are window-relative."""

    prompt: list[int]  # token ids: window units, BOS, committed (unit, run, EOP)s, first unit to generate
    unit_tokens: list[int]  # the prompt's global section (token ids of the window units)
    start: int  # window index of the first unit this pass generates (= number of teacher-forced units)
    stop: int  # window index of the last unit it commits: the pass ends with that unit's EOP
    counter: int  # upstream's tokens-since-EOP counter at the start: 0 at the stream's first unit, else 1
    sampling: Sampling  # how the pass picks its tokens

    def max_new_tokens(self, max_codec_tokens_per_phone: int) -> int:
        """Tokens the pass can feed back at most: per unit its forced token, M+1 codec tokens and the EOP (the first
        unit of the stream M+2 codec tokens and no forced token)."""
        return (self.stop - self.start + 1) * (max_codec_tokens_per_phone + 3)


_STATE_FIELDS = ("unit_tokens", "num_units", "unit_idx", "since_eop", "forced", "finished")


def _select_state(state: GenerationState, index: Tensor) -> GenerationState:
    return GenerationState(**{f: getattr(state, f)[index] for f in _STATE_FIELDS})


def _cat_states(a: GenerationState, b: GenerationState) -> GenerationState:
    width = max(a.unit_tokens.shape[1], b.unit_tokens.shape[1])
    padded = [torch.nn.functional.pad(s.unit_tokens, (0, width - s.unit_tokens.shape[1])) for s in (a, b)]
    fields = {f: torch.cat([getattr(a, f), getattr(b, f)]) for f in _STATE_FIELDS[1:]}
    return GenerationState(unit_tokens=torch.cat(padded), **fields)


class BatchDecoder:
    """Continuous batching for one ELLA-V model: passes of many streams decode in lockstep, one token per row per
    step, over one KV cache of at most `max_batch` rows.

    Active passes occupy rows 0..A-1. `admit` prefills new passes into the next free rows in one padded forward;
    `step` picks every row's next token with upstream's control loop (`generation_step`), lets rows whose pass is
    over leave (the last row moves into the hole, copying only its filled slots) and forwards the rest in one
    batched 1-token forward (2 tokens for rows whose EOP is followed by a forced unit, with `merge_forced`). Each
    row's positions start at 0 with its prompt. The cache grows (never shrinks) to the largest pass admitted:
    bounded by the streams' left_context, max_pass_units and M, not by stream length; and its rows double, up to
    `max_batch`, as more passes run at once (at full size a row is 25 MB, so a worker that serves one stream no longer
    holds 16). A step's forward covers the active rows 0..A-1 alone, with the same strides whatever the number of rows
    allocated, so the growth changes no result. `preallocate_rows` allocates `max_batch` rows at once instead: a
    compiled decode step (compile_decode) would recompile for every new row count of the cache it is given.

    Device hygiene: a step reads the device once (tokens, pass-over flags and next forced tokens in one `tolist`);
    sampling rows draw on the device from per-stream uniform numbers sent in one transfer; cache lengths live on the
    host (KVCache.lengths).
    """

    def __init__(self, model: ELLAV, max_batch: int, max_codec_tokens_per_phone: int, capacity: int = 256,
                 merge_forced: bool = False, preallocate_rows: bool = False):
        self.model = model
        # Feed the unit token forced after an EOP in the same forward as the EOP (a 2-token append for that row):
        # U fewer forwards per second of audio. Not bit-identical to one token per forward (the matmuls see other
        # shapes), so only for precision "fast".
        self.merge_forced = merge_forced
        self.max_batch = check_int("max_batch", max_batch, 1)
        self.max_codec_tokens_per_phone = max_codec_tokens_per_phone
        self._initial_capacity = capacity
        self.preallocate_rows = bool(preallocate_rows)
        self.cache: KVCache | None = None
        self.clear()

    def clear(self) -> None:
        """Drop every pass (the cache stays allocated)."""
        self.rows: list[Hashable] = []  # owner of each active row
        self._plans: list[PassPlan] = []  # its pass
        self._need: list[int] = []  # cache slots each row may fill
        self.state: GenerationState | None = None
        self.logits: Tensor | None = None  # [A, V] next-token logits of the active rows

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    @property
    def cache_nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    def _reserve(self, slots: int, rows: int) -> None:
        """Room in the cache for `rows` active rows of `slots` slots each (rows double; slots grow by 64s)."""
        batch = self.max_batch if self.preallocate_rows else min(self.max_batch, 1 << (rows - 1).bit_length())
        if self.cache is None:
            self.cache = self.model.new_cache(batch, max(self._initial_capacity, slots))
            return
        batch = max(batch, self.cache.batch_size)
        capacity = self.cache.capacity if slots <= self.cache.capacity else -(-slots // 64) * 64
        if (batch, capacity) != (self.cache.batch_size, self.cache.capacity):
            self.cache.resize(batch, capacity)  # keeps the active rows 0..A-1

    @torch.inference_mode()
    def admit(self, jobs: list[tuple[Hashable, PassPlan]]) -> None:
        """Prefill new passes into free rows (one padded forward); their first tokens come from the next step()."""
        if not jobs:
            return
        if len(jobs) > self.free:
            raise InvalidInput(f"{len(jobs)} passes do not fit: {self.free} of {self.max_batch} rows are free")
        if len({*self.rows, *(owner for owner, _ in jobs)}) < len(self.rows) + len(jobs):
            raise InvalidInput("an owner has at most one pass in flight")
        M = self.max_codec_tokens_per_phone
        plans = [plan for _, plan in jobs]
        need = [len(p.prompt) + p.max_new_tokens(M) for p in plans]
        self._reserve(max(need) + 1, len(self.rows) + len(jobs))  # + 1: a merged step pads the others by one slot
        device = self.model.device
        a, b = len(self.rows), len(self.rows) + len(jobs)
        view = self.cache.rows(a, b)
        view.clear_rows()  # a new pass: empty row, positions from 0
        lengths = [len(p.prompt) for p in plans]
        tokens = torch.zeros((len(plans), max(lengths)), dtype=torch.long)
        for i, p in enumerate(plans):
            tokens[i, : len(p.prompt)] = torch.tensor(p.prompt)
        logits = self.model(tokens.to(device), view, lengths)
        last = torch.tensor(lengths, device=device) - 1
        logits = logits[torch.arange(len(plans), device=device), last]
        state = GenerationState.start([p.unit_tokens for p in plans], [p.start for p in plans], device=device)
        # The counter restarts as offline generation has it at this unit (see PassPlan.counter), and the pass is
        # "finished" at its stop unit's EOP.
        state.since_eop = torch.tensor([p.counter for p in plans], device=device)
        state.num_units = torch.tensor([p.stop + 1 for p in plans], device=device)
        state.finished = state.unit_idx >= state.num_units
        self.state = state if self.state is None else _cat_states(self.state, state)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.rows += [owner for owner, _ in jobs]
        self._plans += plans
        self._need += need

    @torch.inference_mode()
    def set_stop(self, owner: Hashable, stop: int) -> None:
        """Move the stop unit of `owner`'s pass (window-relative); the prompt already holds the units up to it."""
        i = self.rows.index(owner)
        added = (stop + 1 - int(self.state.num_units[i])) * (self.max_codec_tokens_per_phone + 3)
        self._need[i] += max(0, added)
        self._reserve(self._need[i], len(self.rows))
        self.state.num_units[i] = stop + 1

    def has_pass(self, owner: Hashable) -> bool:
        """`owner` has a pass in flight here."""
        return any(r is owner for r in self.rows)

    @torch.inference_mode()
    def remove(self, owner: Hashable) -> None:
        """Drop `owner`'s pass (a stream that failed or was reset)."""
        if owner in self.rows:
            self._compact([i for i, r in enumerate(self.rows) if r is not owner])

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, int, bool]]:
        """One token for every active pass: [(owner, token, pass_over)]. Rows whose pass is over leave."""
        if not self.rows:
            return []
        sampled = None
        if not all(p.sampling.greedy for p in self._plans):
            sampled = self._sample()
        tok = self.model.tokenizer
        token = generation_step(self.logits, self.state, max_codec_tokens_per_phone=self.max_codec_tokens_per_phone,
                                temperature=0.0, top_p=0.0, eop_id=tok.EOP_id, eos_id=tok.EOS_id,
                                sampled=sampled)  # fmt: skip
        # The step's one device -> host transfer: every row's token, whether its pass is over, its next forced token.
        tokens, over, forced = torch.stack([token, self.state.finished.long(), self.state.forced]).tolist()
        merge = [self.merge_forced and t == tok.EOP_id and not o and f >= 0 for t, o, f in zip(tokens, over, forced)]
        out = []
        for r, t, o, f, m in zip(self.rows, tokens, over, forced, merge):
            out.append((r, t, bool(o)))
            if m:  # the forced next unit, fed in this step's forward together with the EOP
                out.append((r, f, False))
        keep = [i for i, o in enumerate(over) if not o]
        if len(keep) < len(over):
            order = self._compact(keep)
            token, merge = token[order], [merge[i] for i in order]
        if not self.rows:
            return out
        view = self.cache.rows(0, len(self.rows))
        if not any(merge):
            self.logits = self.model(token[:, None], view)[:, 0]
            return out
        merged = torch.tensor(merge, device=token.device)
        pairs = torch.stack([token, torch.where(merged, self.state.forced, 0)], dim=1)
        valid = [1 + m for m in merge]
        logits = self.model(pairs, view, valid)
        self.logits = logits[torch.arange(len(valid), device=token.device), merged.long()]
        # generation_step's update for the forced unit token: it counts towards the cap, and nothing is forced next.
        self.state.since_eop = torch.where(merged, self.state.since_eop + 1, self.state.since_eop)
        self.state.forced = torch.where(merged, -1, self.state.forced)
        return out

    def _sample(self) -> Tensor:
        """Every row's drawn token, on the device (`sample_rows`): each sampling stream draws one uniform number
        from its own generator per step (on the host, whether or not the row's token is then forced), so its
        output does not depend on its batch neighbours; one host -> device transfer carries them."""
        rows = [p.sampling for p in self._plans]
        uniform = torch.stack([torch.zeros(()) if r.greedy else torch.rand((), generator=r.generator) for r in rows])
        settings = torch.tensor([(float(r.greedy), r.temperature if r.temperature > 0 else 1.0, r.top_p)
                                 for r in rows], dtype=torch.float32)  # fmt: skip
        settings = torch.cat([settings, uniform[:, None]], dim=1).to(self.logits.device)
        greedy, temperature, top_p, uniform = settings.unbind(1)
        return sample_rows(self.logits, greedy.bool(), temperature, top_p, uniform)

    def _compact(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (old indices) in rows 0..len(keep)-1: rows already there stay, the others fill the holes.
        Returns the old index of each new row."""
        n = len(keep)
        stay = {i for i in keep if i < n}
        movers = iter(i for i in keep if i >= n)
        order = [i if i in stay else next(movers) for i in range(n)]
        for new, old in enumerate(order):
            if new != old:
                self.cache.move_row(old, new)
        self.rows = [self.rows[i] for i in order]
        self._need = [self._need[i] for i in order]
        self._plans = [self._plans[i] for i in order]
        if n:
            index = torch.tensor(order, device=self.logits.device)
            self.state = _select_state(self.state, index)
            self.logits = self.logits[index]
        else:
            self.state, self.logits = None, None
        return order

