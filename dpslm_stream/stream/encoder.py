"""The windowed WavLM transformer: projected frames in, layer-11 features out, in three window modes.

WavLM-Large's 11 layers are bidirectional, so no finite window reproduces the offline features exactly
(streaming-encoder.md). Frames are 20 ms; a hop emits H frames with L frames of left context and R of lookahead:

- ``full``: the whole stream is one window, encoded at flush. The exact reference.
- ``sliding``: every hop recomputes pos_conv + 11 layers on ``[L | H | R]`` and emits the H middle frames.
  With L and R covering the whole stream this is exactly the offline computation.
- ``cached`` (Emformer-style): every hop computes only its H + R newest frames; at each layer their queries attend
  to that layer's cached keys/values of the L frames before the hop plus their own. The R lookahead frames are
  recomputed by the next hop. pos_conv reads the 64 exact projected frames before the hop and zeros after it.
  With R covering the whole stream this is exactly the offline computation.

A hop is ready once its last lookahead frame exists; at the end of the stream the rest goes out in one last
window whose right edge is the true end (as offline). The first hops of a stream see less left context (the true
start is an edge offline too). Positions are purely relative (Δ-only bias, pos_conv), so a window needs no offset.

Two classes: `WindowRunner` owns the model side (weights, bias tables) and runs batched forwards; `WindowedEncoder`
is one stream's state (frames still needed, per-layer key/value cache) and plans its hops. Sessions with the same
window shape, and several pending hops of one session, go through one forward (`WindowRunner.run`). Several hops
of one cached session are exact: layer by layer, hop i's left keys are the cache plus hops 0..i-1's emitted
frames at that same layer, so the result equals running the hops one after the other.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models.precision import FastLinear, plan_for
from dpslm_stream.models.wavlm import WavLM
from dpslm_stream.stream.events import FRAME_SECONDS
from dpslm_stream.device import DeviceTimer, synchronize
from dpslm_stream.stream.onednn import PackedConv1d, PackedLinear
from dpslm_stream.validate import is_int

MODES = ("full", "sliding", "cached")
# Samples past a frame's own hop that its 400-sample window reads: 40 samples = 2.5 ms.
FRONTEND_LAG_SECONDS = 40 / 16000

# (left, hop, lookahead) in frames. Starting points from streaming-encoder.md, tuned by `dpslm-stream bench encoder`.
PRESETS: dict[str, tuple[int, int, int]] = {
    "low-latency": (125, 10, 5),  # 2.5 s left; oldest frame 0.28 s
    "balanced": (125, 20, 5),  # 2.5 s left; oldest frame 0.48 s; cheaper per frame than 10-frame hops
    "quality": (250, 25, 64),  # 5 s left; 64 lookahead frames make the emitted frames' pos_conv input exact
}
DEFAULT_PRESET = "low-latency"
# Rows a live stream's key/value buffer keeps free after its cache, in windows: while they last a hop writes only its
# own rows (WindowRunner._context_rows); each hop uses E of them, so the cache is copied once every ~(1 + S T / E)
# hops, for S T extra rows of state per layer.
KV_SLACK_WINDOWS = 3
_MAX_FRAMES = 1_000_000  # 5.5 hours: a sanity bound on window sizes, far beyond any useful window


@dataclass(frozen=True)
class WindowConfig:
    """A window mode and its sizes in frames (left context L, hop H, lookahead R). `full` ignores the sizes."""

    mode: str = "cached"
    left: int = PRESETS[DEFAULT_PRESET][0]
    hop: int = PRESETS[DEFAULT_PRESET][1]
    lookahead: int = PRESETS[DEFAULT_PRESET][2]

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInput(f"window mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name, lowest in (("left", 0), ("hop", 1), ("lookahead", 0)):
            value = getattr(self, name)
            if not is_int(value):
                raise InvalidInput(f"{name} must be an integer number of 20 ms frames, got {value!r}")
            if not lowest <= value <= _MAX_FRAMES:
                raise InvalidInput(f"{name} must be in {lowest}..{_MAX_FRAMES} frames, got {value}")

    @property
    def oldest_frame_lag_s(self) -> float:
        """Algorithmic lag of a hop's oldest frame, from the end of its own 20 ms to the moment it can be computed:
        (H + R - 1) * 20 ms + 2.5 ms. Infinite for `full` (nothing before the end of the stream)."""
        if self.mode == "full":
            return math.inf
        return (self.hop + self.lookahead - 1) * FRAME_SECONDS + FRONTEND_LAG_SECONDS

    @property
    def newest_frame_lag_s(self) -> float:
        """Algorithmic lag of a hop's newest frame: R * 20 ms + 2.5 ms."""
        if self.mode == "full":
            return math.inf
        return self.lookahead * FRAME_SECONDS + FRONTEND_LAG_SECONDS

    def describe(self) -> str:
        return "full" if self.mode == "full" else f"{self.mode} L={self.left} H={self.hop} R={self.lookahead}"


def window_config(mode: str = "cached", preset: str | None = None, left: int | None = None, hop: int | None = None,
                  lookahead: int | None = None) -> WindowConfig:  # fmt: skip
    """A WindowConfig from a preset name (default low-latency) with any of its sizes overridden explicitly."""
    if preset is not None and preset not in PRESETS:
        raise InvalidInput(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)} (or give left/hop/lookahead)")
    base = PRESETS[preset or DEFAULT_PRESET]
    if mode == "full":
        return WindowConfig("full", *base)
    return WindowConfig(mode, *(base[i] if v is None else v for i, v in enumerate((left, hop, lookahead))))


# ----------------------------------------------------------------------------------------------------------------
# One unit of work: some hops of one stream


@dataclass(eq=False)
class HopPlan:
    """`hops` consecutive windows of one stream, all of one shape, for `WindowRunner.run`.

    Each window has `query_len` query frames, of which rows [emit_offset, emit_offset + emit_len) are emitted.
    Cached mode: every window's queries also attend to `left_keys` earlier frames per layer (from `cache`, the
    stream's per-layer keys/values [heads, cache_len, head_dim], and from the emitted frames of earlier windows of
    this plan); afterwards the last `keep` of those frames form the new cache.
    """

    pos_in: Tensor  # [hops, pos_left + query_len + pos_right, D]: projected frames with pos_conv context
    hops: int
    query_len: int
    emit_offset: int
    emit_len: int
    cached: bool = False
    cache: list[tuple[Tensor, Tensor]] | None = None
    cache_len: int = 0
    left_keys: int = 0
    keep: int = 0
    # Filled in by WindowRunner.run:
    features: Tensor | None = None  # [hops * emit_len, D]
    new_cache: list[tuple[Tensor, Tensor]] | None = None
    compute_s: float = 0.0  # this plan's share of the batched forward's wall time

    @property
    def shape_key(self) -> tuple:
        """Plans with equal keys run in one batched forward."""
        return (self.cached, self.hops, self.query_len, self.emit_offset, self.emit_len, self.cache_len,
                self.left_keys, self.keep)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The model side


class WindowRunner:
    """pos_conv + the first `num_layers` WavLM blocks on batches of windows; one per model, shared by every stream.

    The weight-normalised pos_conv weight is computed once here (the module recomputes it on every call), and the
    relative-position bias table of each window shape is built once and kept (a few shapes per preset).
    `timings` accumulates wall time per phase (positional, attention, ffn) when `profile` is True.

    fast_cpu: on CPU in fp32, run pos_conv and the blocks' linear layers through oneDNN with weights prepacked once
    (see onednn.py; a second copy of those weights, ~560 MB at full size). Elsewhere it changes nothing.
    precision: "exact" (float32) or "fast": the blocks' linear layers in what `plan_for("wavlm", "fast")` picks for
    the device (int8 through fbgemm on x86 CPUs without bf16 units, bf16 where there are; models/precision.py),
    a quantized copy of those weights; everything else as exact. Only the windowed modes run here: `full` mode
    stays the offline float32 computation.
    """

    def __init__(self, model: WavLM, num_layers: int = 11, max_tables: int = 64, fast_cpu: bool = True,
                 precision: str = "exact"):  # fmt: skip
        cfg = model.cfg
        if not 1 <= num_layers <= cfg.encoder_layers:
            raise InvalidInput(f"num_layers must be in 1..{cfg.encoder_layers}, got {num_layers}")
        self.model = model
        self.num_layers = num_layers
        self.blocks = list(model.encoder.layers[:num_layers])
        self.pre_ln = cfg.layer_norm_first
        self.heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim
        self.dim = cfg.encoder_embed_dim
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        conv = model.encoder.pos_conv[0]
        with torch.no_grad():  # the weight-normalised weight g * v / ||v||, evaluated once
            self.pos_conv = PackedConv1d(conv.weight, conv.bias, groups=conv.groups, enabled=fast_cpu)
        # Output frame t of pos_conv reads input frames t - pos_left .. t + pos_right (64 / 63: even kernel, SamePad).
        self.pos_left = cfg.conv_pos // 2
        self.pos_right = cfg.conv_pos - 1 - self.pos_left
        self.precision_plan = plan_for("wavlm", precision, self.device)
        fast = self.precision_plan.precision == "fast" and self.precision_plan.bulk != "fp32"
        if fast and self.dtype != torch.float32:
            raise InvalidInput(f"precision 'fast' picks the dtypes itself: load the encoder in float32, "
                               f"not {self.dtype}")

        def linear(*ms: torch.nn.Linear) -> PackedLinear | FastLinear:
            if fast:  # several modules: one matmul over their stacked weights
                return FastLinear(list(ms), self.precision_plan.decode, self.precision_plan.bulk)
            (m,) = ms
            return PackedLinear.of(m, fast_cpu)

        # Per block: the q/k/v projections, out, fc1, fc2. A fast runner computes q, k and v in one int8 matmul: with
        # one scale per output channel and the activations quantized once per call, the same numbers bit for bit as
        # three (tested). Per block 0.81-0.85 ms against 0.98-1.00 ms at 8 streams' 120 rows, 0.16 against 0.21 ms at
        # 15 (fbgemm, Xeon without AMX); a whole hop gains less than the run-to-run noise of `bench encoder`.
        self.linears: list[list[PackedLinear | FastLinear]] = []
        for b in self.blocks:
            a = b.self_attn
            qkv = [linear(a.q_proj, a.k_proj, a.v_proj)] if fast else [linear(a.q_proj), linear(a.k_proj),
                                                                       linear(a.v_proj)]  # fmt: skip
            self.linears.append([*qkv, linear(a.out_proj), linear(b.fc1), linear(b.fc2)])
        self._tables: OrderedDict[tuple[int, int], Tensor | None] = OrderedDict()
        self._max_tables = max_tables
        self.profile = False
        self.timings: dict[str, float] = defaultdict(float)
        # Running counts for batching figures (the server's per-forward batch metric): forwards run, and the streams
        # (plans) they carried.
        self.forwards = 0
        self.forward_streams = 0

    # -- pieces ----------------------------------------------------------------------------------------------------

    def positional(self, pos_in: Tensor) -> Tensor:
        """[N, pos_left + T + pos_right, D] projected frames (zeros where there is no frame) -> [N, T, D] transformer
        input x + GELU(pos_conv(x)), i.e. `WavLM.positional` restricted to the T middle frames."""
        conv = self.pos_conv(pos_in.transpose(1, 2))
        x = pos_in[:, self.pos_left : pos_in.shape[1] - self.pos_right] + F.gelu(conv).transpose(1, 2)
        if not self.pre_ln:
            x = self.model.encoder.layer_norm(x)  # post-LN models normalise right after pos_conv
        return x

    def bias_table(self, q_len: int, k_len: int) -> Tensor | None:
        """Ungated relative-position bias [heads, q_len, k_len] for queries that are the last q_len of the keys."""
        key = (q_len, k_len)
        if key not in self._tables:
            self._tables[key] = self.model.relative_bias(q_len, k_len)
            if len(self._tables) > self._max_tables:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key]

    def _split_heads(self, x: Tensor) -> Tensor:
        """[N, T, D] -> [N, heads, T, head_dim]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _project_qkv(self, projections: list[PackedLinear | FastLinear], h: Tensor) -> list[Tensor]:
        """q, keys, values [N, heads, T, head_dim] of the attention input h: three matmuls, or one (fast)."""
        if len(projections) == 1:
            return [self._split_heads(t) for t in projections[0](h).split(self.dim, dim=-1)]
        return [self._split_heads(p(h)) for p in projections]

    def _gated_bias(self, block, h: Tensor, table: Tensor | None) -> Tensor | None:
        """The bias each query row uses: the shared table scaled per (row, head, query) by this layer's gate, computed
        from the attention input h (not the projected query), as upstream's fast path."""
        if table is None:
            return None
        attn = block.self_attn
        mask = table.to(h.dtype).unsqueeze(0)
        if attn.gru_rel_pos:
            g = attn.grep_linear(h.unflatten(-1, (self.heads, self.head_dim)))  # [N, T, heads, 8]
            a, b = torch.sigmoid(g.unflatten(-1, (2, 4)).sum(-1)).transpose(1, 2).chunk(2, dim=-1)
            mask = (a * (b * attn.grep_a - 1.0) + 2.0) * mask
        return mask

    @staticmethod
    def _ffn(fc1: PackedLinear | FastLinear, fc2: PackedLinear | FastLinear, x: Tensor) -> Tensor:
        # Upstream computes this GELU in fp32 (a no-op for fp32 weights).
        return fc2(F.gelu(fc1(x).float()).type_as(x))

    # -- batched forward -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, plans: list[HopPlan]) -> None:
        """Run every plan, one batched forward per group of equal shape keys; fills plan.features / new_cache."""
        groups: dict[tuple, list[HopPlan]] = defaultdict(list)
        for plan in plans:
            groups[plan.shape_key].append(plan)
        self.forwards += len(groups)
        self.forward_streams += len(plans)
        for group in groups.values():
            with DeviceTimer(self.device) as timer:  # synchronizes on CUDA: the kernels' time, not their launch
                self._run_group(group)
            share = timer.seconds / len(group)  # equal shapes: equal work per plan
            for plan in group:
                plan.compute_s = share

    def _tick(self, phase: str, started: float) -> float:
        if self.profile:
            synchronize(self.device)  # profiling only: a phase's time is its kernels' (CUDA is asynchronous)
        now = time.perf_counter()
        if self.profile:
            self.timings[phase] += now - started
        return now

    def _run_group(self, group: list[HopPlan]) -> None:
        p0 = group[0]
        B, k, T, E = len(group), p0.hops, p0.query_len, p0.emit_len
        Tp, Lk, keep = p0.cache_len, p0.left_keys, p0.keep
        clock = time.perf_counter()
        pos_in = p0.pos_in if B == 1 else torch.cat([p.pos_in for p in group])
        x = self.positional(pos_in.to(self.dtype))  # [B*k, T, D]
        table = self.bias_table(T, Lk + T)
        new_caches: list[list[tuple[Tensor, Tensor]]] = [[] for _ in group]
        clock = self._tick("positional", clock)

        for layer, block in enumerate(self.blocks):
            *qkv, out_proj, fc1, fc2 = self.linears[layer]
            h = block.self_attn_layer_norm(x) if self.pre_ln else x
            q, keys, values = self._project_qkv(qkv, h)
            mask = self._gated_bias(block, h, table)
            if p0.cached and p0.hops == 1:  # one attention per stream, on its own [cache | window] keys
                kv = self._one_window_contexts(group, layer, keys, values, new_caches)
                out = torch.cat([F.scaled_dot_product_attention(q[b : b + 1], keys_b, values_b,
                                                                attn_mask=None if mask is None else mask[b : b + 1])
                                 for b, (keys_b, values_b) in enumerate(kv)])  # fmt: skip
            else:
                if p0.cached:
                    keys, values = self._with_left_context(group, layer, keys, values, new_caches)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            out = out_proj(out.transpose(1, 2).flatten(2))
            clock = self._tick("attention", clock)
            if self.pre_ln:
                x = x + out
                x = x + self._ffn(fc1, fc2, block.final_layer_norm(x))
            else:  # post-LN (WavLM-Base)
                x = block.self_attn_layer_norm(x + out)
                x = block.final_layer_norm(x + self._ffn(fc1, fc2, x))
            clock = self._tick("ffn", clock)

        emitted = x[:, p0.emit_offset : p0.emit_offset + E].reshape(B, k * E, self.dim)
        for b, plan in enumerate(group):
            plan.features = emitted[b]
            plan.new_cache = new_caches[b] if p0.cached else None

    def _one_window_contexts(self, group: list[HopPlan], layer: int, keys: Tensor, values: Tensor,
                             new_caches: list[list[tuple[Tensor, Tensor]]]) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        """`_with_left_context` for plans of one window per stream (the live case), per stream: its keys and values
        [1, heads, Lk + T, hd] at this layer, each [cache | window's own rows] in one tensor that attention reads as
        it is (`_context_rows`); the stream's new cache (the last `keep` of [cache | emitted rows], keep <= Lk + E)
        is a view of it. Nothing is stacked, concatenated or cloned, and no stream's cache keeps another stream's
        memory alive. Equal to `_with_left_context` bit for bit (tests/test_stream_encoder.py)."""
        p0 = group[0]
        E, Tp, Lk, keep = p0.emit_len, p0.cache_len, p0.left_keys, p0.keep
        contexts = []
        for b, plan in enumerate(group):
            pair = [self._context_rows(plan.cache[layer][j] if Lk > 0 else None, Tp, Lk, own[b])
                    for j, own in enumerate((keys, values))]  # fmt: skip
            contexts.append((pair[0][None], pair[1][None]))
            new_caches[b].append((pair[0][:, Lk + E - keep : Lk + E], pair[1][:, Lk + E - keep : Lk + E]))
        return contexts

    def _context_rows(self, cache: Tensor | None, Tp: int, Lk: int, own: Tensor) -> Tensor:
        """[the cache's last Lk rows | own rows] as one [heads, Lk + T, hd] tensor.

        A live cache is a view into a buffer this function made for its stream, with room for a few more windows
        after it (KV_SLACK_WINDOWS): while the room lasts, the window's own rows are written right after the cache
        and the cache is not copied at all (it was ~5 % of an 8-stream hop: 125 rows per layer, keys and values).
        Otherwise (no room, or a cache the general path made) a new buffer gets the cache's rows and the window's.
        The buffer's rows after a cache hold only the previous window's lookahead rows, which no cache includes."""
        heads, T, hd = own.shape
        if cache is not None:
            # Such a buffer is the cache's whole storage, [heads, rows, hd] row-major (views made in inference mode
            # record no base tensor, so the storage says it). A clone of the general path spans exactly its rows,
            # and a slice of a stacked batch has another head stride: neither passes.
            rows = cache.untyped_storage().nbytes() // (heads * hd * cache.element_size())
            row, extra = divmod(cache.storage_offset(), hd)
            if cache.stride() == (rows * hd, hd, 1) and not extra and row + Tp + T <= rows:
                buffer = cache.as_strided((heads, rows, hd), (rows * hd, hd, 1), 0)
                buffer[:, row + Tp : row + Tp + T] = own
                return buffer[:, row + Tp - Lk : row + Tp + T]
        full = own.new_empty(heads, Lk + T + KV_SLACK_WINDOWS * T, hd)
        if Lk > 0:
            assert cache is not None
            full[:, :Lk] = cache[:, Tp - Lk :]
        full[:, Lk : Lk + T] = own
        return full[:, : Lk + T]

    def _with_left_context(self, group: list[HopPlan], layer: int, keys: Tensor, values: Tensor,
                           new_caches: list[list[tuple[Tensor, Tensor]]]) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Prepend to every window's own keys/values [B*k, heads, T, hd] its left context at this layer, and record each
        stream's new cache.

        Per stream, the frames before window i are the cache followed by the emitted frames of windows 0..i-1 (their
        first emit_len rows; the rest is lookahead that window i recomputes). Window i's left context is the last
        `left_keys` of those: exactly what running the windows one after another would have cached.
        """
        p0 = group[0]
        B, k, E, Tp, Lk, keep = len(group), p0.hops, p0.emit_len, p0.cache_len, p0.left_keys, p0.keep
        result, tails = [], []
        for j, own in enumerate((keys, values)):
            centre = own.unflatten(0, (B, k))[:, :, :, :E]  # [B, k, heads, E, hd]
            centre = centre.permute(0, 2, 1, 3, 4).reshape(B, self.heads, k * E, self.head_dim)
            if Tp > 0:
                past = torch.stack([p.cache[layer][j] for p in group]) if B > 1 else p0.cache[layer][j][None]
                seq = torch.cat([past, centre], dim=2)  # [B, heads, Tp + k*E, hd] in time order
            else:
                seq = centre
            if Lk > 0:
                left = torch.stack([seq[:, :, Tp + i * E - Lk : Tp + i * E] for i in range(k)], dim=1)
                own = torch.cat([left.flatten(0, 1), own], dim=2)  # [B*k, heads, Lk + T, hd]
            result.append(own)
            # clone(): a stream's cache must not keep this forward's larger tensors alive.
            tails.append([seq[b, :, seq.shape[2] - keep :].clone() for b in range(B)])
        for b in range(B):
            new_caches[b].append((tails[0][b], tails[1][b]))
        return result[0], result[1]


# ----------------------------------------------------------------------------------------------------------------
# One stream's state


class WindowedEncoder:
    """One stream's window state: projected frames in (`add` / `push`), layer-11 features out, never revised.

    `push(frames)` adds frames and runs every ready hop (a single stream, unbatched); `flush()` ends the stream and
    returns the rest, then resets. The worker instead calls `add`, `plan`, `WindowRunner.run` (batched over
    streams) and `complete`. State: the projected frames later windows still read (L + pending frames for sliding,
    64 + pending for cached) and, for cached, per-layer keys/values of L frames; independent of stream length,
    except in `full` mode, which keeps every frame until the end.
    """

    def __init__(self, runner: WindowRunner, config: WindowConfig):
        self.runner = runner
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the stream; frame numbering restarts at 0."""
        self._frames = torch.zeros(0, self.runner.dim, dtype=self.runner.dtype, device=self.runner.device)
        self._first = 0  # stream index of self._frames[0]
        self.num_frames = 0  # frames added
        self.num_emitted = 0  # features emitted (the next hop starts here)
        self._cache: list[tuple[Tensor, Tensor]] | None = None
        self._cache_len = 0
        self.hops_done = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of frames and key/value cache held between hops (the cache's whole storage: it may be a view)."""
        n = self._frames.numel() * self._frames.element_size()
        for k, v in self._cache or []:
            n += k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
        return n

    @property
    def pending_frames(self) -> int:
        """Frames added but not yet emitted as features."""
        return self.num_frames - self.num_emitted

    def add(self, frames: Tensor) -> None:
        """Append projected frames [n, D] (cheap; no compute)."""
        if frames.ndim != 2 or frames.shape[1] != self.runner.dim:
            raise InvalidInput(f"frames must have shape [n, {self.runner.dim}], got {tuple(frames.shape)}")
        if frames.shape[0]:
            self._frames = torch.cat([self._frames, frames.to(self.runner.dtype)])
            self.num_frames += frames.shape[0]

    def push(self, frames: Tensor) -> Tensor:
        """Add frames and return the features [m, D] of every hop that became ready."""
        self.add(frames)
        return self._drain(final=False)

    def flush(self) -> Tensor:
        """End of stream: return the features of every remaining frame, then reset."""
        out = self._drain(final=True)
        self.reset()
        return out

    def _drain(self, final: bool) -> Tensor:
        outs = [self._frames.new_zeros(0, self.runner.dim)]
        while (plan := self.plan(final)) is not None:
            self.runner.run([plan])
            outs.append(self.complete(plan))
        return torch.cat(outs)

    # -- planning --------------------------------------------------------------------------------------------------

    def _window(self, start: int, end: int, pad_right: int) -> Tensor:
        """Frames [start, end) with zeros for indices < 0, then pad_right zeros, plus pos_conv's zero context."""
        left_zeros = self.runner.pos_left + max(0, -start)
        rows = self._frames[max(start, 0) - self._first : end - self._first]
        return F.pad(rows, (0, 0, left_zeros, pad_right + self.runner.pos_right))

    @property
    def ready_hops(self) -> int:
        """Full hops whose lookahead has arrived."""
        return self.hops_ready_after(0)

    def hops_ready_after(self, more_frames: int) -> int:
        """Full hops that would be ready once `more_frames` further frames were added."""
        H, R = self.config.hop, self.config.lookahead
        return max(0, (self.pending_frames + more_frames - R) // H)

    def plan(self, final: bool = False, max_hops: int = 1 << 30) -> HopPlan | None:
        """The next work for this stream: up to `max_hops` ready hops of one shape; with `final` (end of stream)
        also the last window once no full hop is left. None when there is nothing to do."""
        mode, L, H, R = self.config.mode, self.config.left, self.config.hop, self.config.lookahead
        m, n = self.num_emitted, self.num_frames
        if mode == "full":
            if not final or n == m:
                return None
            return HopPlan(self._window(0, n, 0)[None], hops=1, query_len=n, emit_offset=0, emit_len=n)

        hops = min(self.ready_hops, max_hops)
        if mode == "sliding":
            context = min(L, m)
            if context < L:
                hops = min(hops, 1)  # windows of one plan need equal left context
            if hops > 0:
                windows = [self._window(s - context, s + H + R, 0) for s in range(m, m + hops * H, H)]
                return HopPlan(torch.stack(windows), hops, context + H + R, context, H)
            if final and n > m:
                return HopPlan(self._window(m - context, n, 0)[None], 1, context + n - m, context, n - m)
            return None

        # cached: window i's queries are frames [s, s + H + R), s = m + i H; pos_conv reads 64 frames back.
        if self._cache_len < L:
            hops = min(hops, 1)  # while the cache fills, each window has a different amount of left context
        if hops > 0:
            query_len, emit = H + R, H
        elif final and n > m:
            hops, query_len, emit = 1, n - m, n - m
        else:
            return None
        pos_left = self.runner.pos_left
        windows = [self._window(s - pos_left, s + query_len, 0)[pos_left:] for s in range(m, m + hops * emit, emit)]
        return HopPlan(torch.stack(windows), hops, query_len, 0, emit, cached=True, cache=self._cache,
                       cache_len=self._cache_len, left_keys=min(L, self._cache_len),
                       keep=min(L, self._cache_len + hops * emit))  # fmt: skip

    def complete(self, plan: HopPlan) -> Tensor:
        """Take a finished plan's results into the state; return its features [hops * emit_len, D]."""
        assert plan.features is not None, "plan has not been run"
        self.num_emitted += plan.features.shape[0]
        self.hops_done += plan.hops
        if plan.cached:
            self._cache, self._cache_len = plan.new_cache, plan.keep
        # Drop the frames no later window reads: sliding needs L frames of left context, cached 64 for pos_conv.
        if self.config.mode != "full":
            context = self.config.left if self.config.mode == "sliding" else self.runner.pos_left
            first = max(0, self.num_emitted - context)
            if first > self._first:
                self._frames = self._frames[first - self._first :].clone()
                self._first = first
        return plan.features
