"""The Mistral-style decoder-only transformer shared by the unit LM (ULM) and ELLA-V.

Both upstream repositories (nicolvisser/Mistral-ULM `ulm/transformer.py`, nicolvisser/ELLA-V
`ellav/transformer/inference.py`) use the same network: token embedding, n pre-norm blocks
(RMSNorm -> attention with interleaved-pair RoPE -> residual, RMSNorm -> SwiGLU -> residual), a final RMSNorm and
an untied output projection whose logits are returned in fp32. ELLA-V's output projection has a bias (added by
accident upstream, but every checkpoint carries it); the ULM's has none. Parameter names equal the upstream
state-dict keys, so checkpoints load with a plain strict `load_state_dict`.

Differences from upstream that do not change the numbers:
- attention is `F.scaled_dot_product_attention` (upstream: xformers) on padded [B, T] batches instead of packed
  1-D sequences with block-diagonal masks;
- rotary cos/sin are computed in fp32 from the positions at every forward (upstream: a complex64 table of 8000
  rows). The values are the same (angle = float32(position) * float32(inverse frequency)), and positions past
  upstream's 8000-row table simply continue the formula instead of raising an IndexError.

`fused_ops` (set by a fast precision plan, models/precision.py; off for `exact`) computes the same functions with
fewer, larger ops, for the per-op dispatch cost that dominates a batch-1 decode step outside its matmuls: the
RMSNorms as `F.rms_norm`, q and k rotated together by one complex multiply, the attention mask made additive once
per forward instead of converted from booleans in every layer. Same math, other float rounding.
`compile_decode` (a fast plan's option) runs the blocks of decode steps through torch.compile; the KV-cache write and
attention are then one custom op (`dpslm::cached_attention`, the same function eagerly), which the compiler keeps
opaque and lets write the cache in place.
"""

from __future__ import annotations

import copy
import io
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.validate import is_int, is_number


@dataclass
class TransformerConfig:
    """Hyper-parameters of the network (the fields both upstream `TransformerModelArgs` share)."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float
    output_bias: bool = False  # True for ELLA-V only


class RMSNorm(nn.Module):
    """x / rms(x), computed in fp32 and cast back to the input dtype, then scaled by a learnt weight (init ones)."""

    fused = False  # one F.rms_norm kernel (Transformer.use_fused_ops); else upstream's op order, bit for bit

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Upstream order: cast back to the activation dtype first, multiply by the weight second.
        return normed.type_as(x) * self.weight


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """fp32 rotary angles, shape positions.shape + [head_dim // 2].

    Angle of pair i at position p is p * theta^(-2i/head_dim), evaluated with the same fp32 operations as the
    upstream table (`outer(arange(8000), freqs)`), so the values agree bit for bit.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2].float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    return positions.float()[..., None] * inv_freq


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of the rotary angles (bit for bit upstream's table up to the cos/sin kernels)."""
    angles = rotary_angles(positions, head_dim, theta)
    return torch.cos(angles), torch.sin(angles)


@dataclass
class Rotation:
    """The rotary angles of one forward: cos, sin [B, T, D/2] (upstream's op order) or, with fused ops, `polar`
    = cos + i sin [B, T, 1, D/2] (complex64), which rotates interleaved pairs as one complex multiply."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    polar: torch.Tensor | None = None

    @classmethod
    def at(cls, positions: torch.Tensor, head_dim: int, theta: float, fused: bool) -> "Rotation":
        if not fused:
            return cls(*rotary_cos_sin(positions, head_dim, theta))
        angles = rotary_angles(positions, head_dim, theta)
        return cls(polar=torch.polar(torch.ones_like(angles), angles)[:, :, None, :])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (dims 2i, 2i+1) of x [B, T, H, D] by the angles in cos/sin [B, T, D/2].

    This is the Meta/Mistral complex-number layout, not Hugging Face's rotate-half layout; the rotation runs in
    fp32 and the result is cast back to x's dtype, as upstream does.
    """
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Preallocated keys/values of every layer for a batch of B sequences, each with its own length.

    Storage is rectangular, k and v of shape [n_layers, B, n_kv_heads, capacity, head_dim] (keys stored after
    RoPE), plus `slot_pos` [B, capacity]: the absolute position held by each slot, -1 for an empty slot.
    Attention masks are derived from slot positions alone: a query at position p sees slot s iff
    0 <= slot_pos[s] <= p (causal, bottom-right aligned for multi-token appends) and, with a `window` W,
    slot_pos[s] > p - W (Mistral-style sliding window: the W most recent tokens including itself).
    So rows may have different lengths, appended chunks may be right-padded, and old slots may be dropped
    (`drop_oldest`) without touching anything else. Filled slots of a row are always [0, length).

    The filled lengths are mirrored on the host (`lengths`, a numpy array; views from `rows` share it), so a
    forward never reads a device value back: a decode step through the cache makes no host sync.
    """

    def __init__(
        self,
        config: TransformerConfig,
        batch_size: int,
        capacity: int,
        *,
        window: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1 or capacity < 1:
            raise InvalidInput(f"KVCache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}")
        if window is not None and window < 1:
            raise InvalidInput(f"window must be a positive number of tokens or None, got {window}")
        self.config = config
        self.window = window
        shape = (config.n_layers, batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # filled slots per row
        self.lengths = np.zeros(batch_size, dtype=np.int64)  # the same on the host
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # position of the next token
        # Set by begin() for the forward in flight.
        self._rows: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._extent = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache (keys, values and slot bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_pos, self.length, self.next_pos))

    def begin(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for `num_new` appended tokens per row (real tokens first, then any right padding).

        Returns the absolute positions [B, T] of the new tokens and the boolean attention mask
        [B, 1, T, extent] over slots [0, extent).
        """
        device = self.slot_pos.device
        offsets = torch.arange(num_new, device=device)
        slots = self.length[:, None] + offsets  # [B, T]
        positions = self.next_pos[:, None] + offsets
        extent = int(self.lengths.max()) + num_new
        if extent > self.capacity:
            raise InvalidInput(
                f"KV cache overflow: {extent} slots needed, capacity is {self.capacity}; "
                "allocate a larger cache (or drop old entries first)"
            )
        rows = torch.arange(self.batch_size, device=device)[:, None]
        # Padding tokens get real positions for this forward (each can then attend to itself, so no softmax row
        # is empty); they lie after every real token of their row, so causality hides them from real queries.
        # end() clears them.
        self.slot_pos[rows, slots] = positions
        key_pos = self.slot_pos[:, None, :extent]  # [B, 1, S]
        query_pos = positions[:, :, None]  # [B, T, 1]
        mask = (key_pos >= 0) & (key_pos <= query_pos)
        if self.window is not None:
            mask &= key_pos > query_pos - self.window
        self._rows, self._slots, self._extent = rows, slots, extent
        return positions, mask[:, None]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Store one layer's new keys/values [B, H_kv, T, D] and attend the queries q [B, H, T, D] over the layer's
        slots [0, extent) with begin()'s `mask` (boolean, or additive float)."""
        # Inside torch.compile the write and the attention are one opaque op (the compiler then writes the cache
        # in place instead of copying it); eagerly, the same function called directly.
        attend = _cached_attention_op if torch.compiler.is_compiling() else cached_attention
        return attend(q, k, v, self.k, self.v, layer, self._rows, self._slots, mask)

    def end(self, valid: Sequence[int] | None = None) -> None:
        """Commit the real tokens of the forward in flight (host counts per row; None: all) and forget its padding."""
        num_new = self._slots.shape[1]
        if valid is None or all(v == num_new for v in valid):
            self.length += num_new
            self.next_pos += num_new
            self.lengths += num_new
        else:
            for b, v in enumerate(valid):
                if v < num_new:
                    start = int(self.lengths[b])
                    self.slot_pos[b, start + v : start + num_new] = -1
            add = torch.as_tensor(list(valid), dtype=torch.long).to(self.length.device)
            self.length += add
            self.next_pos += add
            self.lengths += np.asarray(valid, dtype=np.int64)
        self._rows, self._slots, self._extent = None, None, 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A KVCache over rows [start, stop), sharing this cache's storage and host lengths (basic slices are
        views, and KVCache only writes in place), so a forward over some rows updates this cache directly."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.slot_pos, view.length, view.next_pos = (
            self.slot_pos[start:stop], self.length[start:stop], self.next_pos[start:stop])  # fmt: skip
        view.lengths = self.lengths[start:stop]
        return view

    def clear_rows(self) -> None:
        """Empty every row (positions restart at 0)."""
        self.slot_pos.fill_(-1)
        self.length.zero_()
        self.next_pos.zero_()
        self.lengths[:] = 0

    def move_row(self, old: int, new: int) -> None:
        """Copy row `old` (its filled slots) into row `new`."""
        used = int(self.lengths[old])
        self.k[:, new, :, :used] = self.k[:, old, :, :used]
        self.v[:, new, :, :used] = self.v[:, old, :, :used]
        self.slot_pos[new] = self.slot_pos[old]
        self.length[new], self.next_pos[new] = self.length[old], self.next_pos[old]
        self.lengths[new] = self.lengths[old]

    def drop_oldest(self, keep: int) -> None:
        """Keep only the `keep` most recent tokens of every row (moved to the front); positions are unchanged."""
        for b in range(self.batch_size):
            n = int(self.lengths[b])
            if n <= keep:
                continue
            start = n - keep
            # clone: source and destination ranges overlap.
            self.k[:, b, :, :keep] = self.k[:, b, :, start:n].clone()
            self.v[:, b, :, :keep] = self.v[:, b, :, start:n].clone()
            self.slot_pos[b, :keep] = self.slot_pos[b, start:n].clone()
            self.slot_pos[b, keep:] = -1
            self.length[b] = keep
            self.lengths[b] = keep

    def grow(self, capacity: int) -> None:
        """Reallocate with a larger capacity, keeping the contents."""
        if capacity > self.capacity:
            self.resize(self.batch_size, capacity)

    def resize(self, batch_size: int, capacity: int) -> None:
        """Reallocate with `batch_size` rows and `capacity` slots, keeping rows [0, batch_size) (new rows empty).
        The kept rows' filled slots must fit. Copies the kept contents once; views from `rows` go stale."""
        keep_rows = min(batch_size, self.batch_size)
        used = int(self.lengths[:keep_rows].max(initial=0))
        if batch_size < 1 or capacity < max(1, used):
            raise InvalidInput(f"cannot resize to {batch_size} rows x {capacity} slots: rows hold {used} slots")
        keep = min(capacity, self.capacity)
        shape = self.k.shape[:1] + (batch_size,) + self.k.shape[2:3] + (capacity, self.k.shape[4])
        k, v = self.k.new_zeros(shape), self.k.new_zeros(shape)
        k[:, :keep_rows, :, :used] = self.k[:, :keep_rows, :, :used]
        v[:, :keep_rows, :, :used] = self.v[:, :keep_rows, :, :used]
        slot_pos = self.slot_pos.new_full((batch_size, capacity), -1)
        slot_pos[:keep_rows, :keep] = self.slot_pos[:keep_rows, :keep]
        same_rows = batch_size == self.batch_size  # then the per-row counters stay the same objects
        self.k, self.v, self.slot_pos = k, v, slot_pos
        if not same_rows:
            length, next_pos = self.length.new_zeros(batch_size), self.next_pos.new_zeros(batch_size)
            length[:keep_rows], next_pos[:keep_rows] = self.length[:keep_rows], self.next_pos[:keep_rows]
            lengths = np.zeros(batch_size, dtype=np.int64)
            lengths[:keep_rows] = self.lengths[:keep_rows]
            self.length, self.next_pos, self.lengths = length, next_pos, lengths


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    rows: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Write k, v [B, H_kv, T, D] into `layer` of the caches [n_layers, B, H_kv, capacity, D] at slots [B, T] of rows
    [B, 1], then attend q [B, H, T, D] over slots [0, extent) with `mask` [B, 1, T, extent] (KVCache.begin)."""
    # Advanced indices (rows, slots) around a slice put the [B, T] index dims first: [B, T, H_kv, D].
    k_cache[layer][rows, :, slots] = k.transpose(1, 2)
    v_cache[layer][rows, :, slots] = v.transpose(1, 2)
    extent = mask.shape[-1]
    keys, values = _repeat_kv(q, k_cache[layer, :, :, :extent], v_cache[layer, :, :, :extent])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).contiguous()


# The same function as a torch custom op: opaque to torch.compile, mutating the two caches in place. Its output is
# contiguous, the layout its fake (shape-only) version declares to the compiler. A decorated wrapper, not
# custom_op(name, cached_attention): torch reads the op's schema from the annotations of the function it is given,
# and mutation testing (docs/mutation.md) replaces undecorated functions with wrappers whose annotations it cannot
# resolve.
@torch.library.custom_op("dpslm::cached_attention", mutates_args=("k_cache", "v_cache"))
def _cached_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, layer: int, rows: torch.Tensor, slots: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    return cached_attention(q, k, v, k_cache, v_cache, layer, rows, slots, mask)


_cached_attention_op.register_fake(lambda q, *_: q.new_empty(q.shape))


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: query head h uses kv head h // repeats, as upstream's repeat_interleave."""
    repeats = q.shape[1] // k.shape[1]
    if repeats == 1:
        return k, v
    return k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)


class Attention(nn.Module):
    """Multi-head attention with RoPE; grouped-query when n_kv_heads < n_heads (the releases use plain MHA)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.wqkv: nn.Module | None = None  # q/k/v fused by a fast precision plan (models/precision.py)

    def forward(
        self, x: torch.Tensor, rot: Rotation, cache: KVCache | None, layer: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if rot.polar is not None and self.wqkv is not None and x.dtype == torch.float32:
            # Fused: q and k heads rotated in one complex multiply over the interleaved (2i, 2i+1) pairs.
            qkv = self.wqkv(x).view(B, T, H + 2 * H_kv, D)
            qk = torch.view_as_complex(qkv[:, :, : H + H_kv].reshape(B, T, H + H_kv, D // 2, 2)) * rot.polar
            q, k = torch.view_as_real(qk).flatten(-2).split([H, H_kv], dim=2)
            v = qkv[:, :, H + H_kv :]
        else:
            if self.wqkv is None:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            else:
                q, k, v = self.wqkv(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
            if rot.polar is not None:
                rot = Rotation(rot.polar.real[:, :, 0], rot.polar.imag[:, :, 0])
            q, k = apply_rotary(q, rot.cos, rot.sin), apply_rotary(k, rot.cos, rot.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        # Default scale 1/sqrt(head_dim), as xformers upstream. Without a cache every row starts at position 0,
        # so top-left-aligned is_causal is right; with a cache the explicit bottom-right mask is used.
        if cache is not None:
            out = cache.attend(layer, q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, *_repeat_kv(q, k, v), is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, *_repeat_kv(q, k, v), attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1/w3 fused by a fast precision plan (models/precision.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rot: Rotation, cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rot, cache, layer, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only transformer; forward(tokens [B, T]) -> fp32 logits [B, T, vocab_size]."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        validate_config(config)
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=config.output_bias)
        self.precision_plan = None  # models/precision.py: the Plan this model was converted for (None: as loaded)
        self.fused_ops = False  # see the module docstring; use_fused_ops() sets it
        self.compiled_layers = None  # the blocks and final norm through torch.compile (compile_decode)
        self.compiled_max_rows = 0  # forwards of at most this many tokens (B x T) with a cache run compiled_layers

    def use_fused_ops(self, on: bool = True) -> None:
        """Fused kernels for norms, RoPE and the mask (not bit-identical to upstream's op order; fast plans only)."""
        self.fused_ops = on
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused = on

    def compile_decode(self, max_rows: int) -> None:
        """Run the blocks and the final norm of forwards with a cache and at most `max_rows` tokens (decode steps)
        through torch.compile (dynamic shapes: one graph serves every cache extent, with one more for each batch size
        or token count of 1 the compiler specializes); the first calls compile (minutes at the released size).
        The compiled graph fuses the norms, RoPE, residuals and activation quantization between the matmuls and the
        cached attention (an opaque op), so a step makes about a hundred kernel calls instead of ~1,000 ops."""
        self.compiled_layers = torch.compile(self.layers_forward, dynamic=True)
        self.compiled_max_rows = max_rows

    def layers_forward(
        self, h: torch.Tensor, rot: Rotation, cache: KVCache | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The blocks and the final norm on embedded tokens h [B, T, dim]."""
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, cache, i, mask)
        return self.norm(h)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def new_cache(self, batch_size: int, capacity: int, window: int | None = None) -> KVCache:
        """An empty KV cache on this model's device, in its dtype."""
        return KVCache(self.config, batch_size, capacity, window=window, device=self.device, dtype=self.dtype)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """Logits (fp32) for every input token: the output layer on `hidden`."""
        return self.output(self.hidden(tokens, cache, valid)).float()

    def hidden(
        self, tokens: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """The final-norm hidden state [B, T, dim] of every input token, in the weights' dtype.

        tokens: int64 [B, T]. Rows may be right-padded; `valid` [B] says how many leading tokens of each row are
        real (default: all T). Padding never influences real tokens (causality); its logits are garbage.
        Without a cache, every row starts at position 0. With a cache, row b continues at the cache's next
        position for b, attends to everything the cache holds for b, and the real tokens are appended to it.
        """
        B, T = tokens.shape
        if cache is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            mask = None
        else:
            positions, mask = cache.begin(T)
        compiled = self.compiled_layers is not None and cache is not None and B * T <= self.compiled_max_rows
        # A compiled forward rotates with cos/sin: plain float ops the compiler fuses into its kernels (complex
        # tensors it runs op by op).
        rot = Rotation.at(positions, self.config.head_dim, self.config.rope_theta, self.fused_ops and not compiled)
        if self.fused_ops and mask is not None:  # additive once, instead of a bool -> float conversion per layer
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, -math.inf)
        h = self.tok_embeddings(tokens)
        h = (self.compiled_layers if compiled else self.layers_forward)(h, rot, cache, mask)
        if cache is not None:
            cache.end(None if valid is None else (valid.tolist() if isinstance(valid, torch.Tensor) else valid))
        return h


def validate_config(config: TransformerConfig) -> None:
    """Raise CheckpointError for hyper-parameters no network can be built from."""
    for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
        value = getattr(config, name)
        if not is_int(value, int) or value < 1:
            raise CheckpointError(f"model config field {name!r} must be a positive integer, got {value!r}")
    if config.head_dim % 2:
        raise CheckpointError(f"head_dim must be even for rotary pairs, got {config.head_dim}")
    if config.n_heads % config.n_kv_heads:
        raise CheckpointError(
            f"n_heads ({config.n_heads}) must be a multiple of n_kv_heads ({config.n_kv_heads})"
        )
    for name in ("norm_eps", "rope_theta"):
        value = getattr(config, name)
        if not is_number(value) or value <= 0:
            raise CheckpointError(f"model config field {name!r} must be a positive number, got {value!r}")


def read_config_fields(d: object, required: tuple[str, ...], what: str) -> dict:
    """The required fields of a checkpoint's config dict; CheckpointError naming any that is missing."""
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{what} must be a dict, got {type(d).__name__}")
    missing = [name for name in required if name not in d]
    if missing:
        raise CheckpointError(f"{what} is missing required field(s) {missing}; it has {sorted(d)}")
    return {name: d[name] for name in required}


def load_state_dict_strict(model: nn.Module, state_dict: object, what: str) -> None:
    """Load `state_dict` into `model` (which may live on the meta device) with strict key, shape and dtype checks.

    Every mismatch is a CheckpointError naming the offending keys. Tensors are assigned (no copy); the caller
    moves/casts the model afterwards.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{what}: the state dict must be a dict of tensors, got {type(state_dict).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: state dict keys do not match the architecture built from its config; "
            f"missing keys: {_short(missing)}; unexpected keys: {_short(unexpected)}"
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{what}: entries that are not tensors: {_short(not_tensors)}")
    bad_shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        raise CheckpointError(f"{what}: shape mismatches: {_short(bad_shapes)}")
    not_float = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{what}: weights must be floating point; these are not: {_short(not_float)}")
    model.load_state_dict(dict(state_dict), strict=True, assign=True)


def read_checkpoint_file(path: str | os.PathLike | io.BufferedIOBase, what: str) -> object:
    """torch.load(path, weights_only=True) on CPU; a corrupt, truncated or code-carrying file is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many different types for unreadable files
        raise CheckpointError(f"cannot read the {what} checkpoint {path!r} (corrupt or truncated?): {e}") from e


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})" if items else "[]"
