"""WavLM (Large) in plain PyTorch, checkpoint-compatible with nicolvisser/WavLM-codebooks, plus its extract_features.

The released file `wavlm-large-6fb4b3c3.pt` is `{"cfg": dict, "model": state_dict}`; this module builds the network
from that cfg and loads the state dict strictly. Parameter names mirror the upstream module tree (including the
nn.Sequential indices of the conv blocks and of `encoder.pos_conv`), so loading is a plain `load_state_dict`.

The forward pass is split into the pieces a streaming encoder needs (facts: docs/references.md §WavLM):

    wav (16 kHz, padded 40 zeros each side)
      -> frontend()      conv stack (LayerNorm per frame) + LN(512) + Linear 512->D      exact per 20 ms frame
      -> positional()    x + GELU(pos_conv(x))   (grouped conv over +-64 frames, SamePad trim)
      -> layers[0..n-1]  pre-LN blocks; attention bias = relative-position table (layer 0's embedding) gated per
                         layer from its own input; `layer(x, bias, past_kv)` lets queries attend to cached keys
      -> (final encoder LN only for the full-depth default path)

`extract_features(model, wav, sr, layer=None)` reproduces upstream hubconf `wavlm_large`'s feature function (default:
the full depth with the final LN, as upstream; DP-SLM passes layer=11).
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.validate import is_int

SAMPLE_RATE = 16000

# Keys of upstream's WavLMConfig that the network never reads at inference (dropouts, masking, waveform
# normalisation flag, gradient scaling), with upstream's defaults (WavLM.py:162-247). They are carried through
# `extra` so that `to_dict()` writes a cfg with upstream's full key set, as `WavLMConfig.__dict__` holds it.
_UNREAD_DEFAULTS: dict[str, object] = {
    "feature_grad_mult": 1.0,
    "normalize": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "mask_length": 10,
    "mask_prob": 0.65,
    "mask_selection": "static",
    "mask_other": 0,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "mask_channel_length": 10,
    "mask_channel_prob": 0.0,
    "mask_channel_selection": "static",
    "mask_channel_other": 0,
    "no_mask_channel_overlap": False,
    "mask_channel_min_space": 1,
}


def _parse_conv_layers(spec: object) -> list[tuple[int, int, int]]:
    """Parse upstream's `conv_feature_layers` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2".

    Upstream `eval`s it; a checkpoint is untrusted input, so only int literals, lists, tuples, `+` and `*` are
    evaluated here. A list of (dim, kernel, stride) triples is accepted as well."""

    def ev(node: ast.AST) -> object:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Mult) and any(isinstance(v, int) and v > 1000 for v in (left, right)):
                raise ValueError("repeat count above 1000")
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported syntax {type(node).__name__}")

    try:
        value = ev(ast.parse(spec, mode="eval")) if isinstance(spec, str) else spec
        layers = [tuple(int(v) for v in layer) for layer in value]  # type: ignore[union-attr]
        if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
            raise ValueError("expected a non-empty list of positive (dim, kernel, stride) triples")
    except (SyntaxError, TypeError, ValueError) as e:
        raise InvalidInput(
            f"conv_feature_layers {spec!r} is not a list of (dim, kernel, stride) triples such as "
            f"\"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2\": {e}"
        ) from None
    return layers  # type: ignore[return-value]


@dataclass(frozen=True)
class WavLMConfig:
    """The fields of upstream's WavLMConfig that define the network, with upstream's defaults (WavLM.py:162-247).

    `extra` holds every other cfg key verbatim (upstream's unread defaults plus any unknown key of a checkpoint), as
    (key, value) pairs so that the config stays immutable; `to_dict()` writes them back."""

    extractor_mode: str = "default"  # "layer_norm": LN in every conv block; "default": GroupNorm in block 0 only
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False  # True: pre-LN blocks (Large)
    conv_feature_layers: str = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    conv_bias: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    extra: tuple[tuple[str, object], ...] = tuple(_UNREAD_DEFAULTS.items())

    def __post_init__(self) -> None:
        # f.type is the annotation as a string ("int", "bool") because of `from __future__ import annotations`.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not is_int(value, int) or value < 1):
                raise InvalidInput(f"WavLM config field {f.name} must be a positive int, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise InvalidInput(f"WavLM config field {f.name} must be a bool, got {value!r}")
        if self.extractor_mode not in ("default", "layer_norm"):
            raise InvalidInput(f"extractor_mode must be 'default' or 'layer_norm', got {self.extractor_mode!r}")
        if self.activation_fn != "gelu":
            raise InvalidInput(f"activation_fn {self.activation_fn!r} is not supported; WavLM releases use 'gelu'")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise InvalidInput(
                f"encoder_embed_dim {self.encoder_embed_dim} must be divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise InvalidInput(
                f"encoder_embed_dim {self.encoder_embed_dim} must be divisible by "
                f"conv_pos_groups {self.conv_pos_groups}"
            )
        if self.relative_position_embedding and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            raise InvalidInput(
                f"num_buckets {self.num_buckets} / max_distance {self.max_distance}: need num_buckets >= 4 and "
                f"max_distance > num_buckets // 4"
            )
        _parse_conv_layers(self.conv_feature_layers)

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        """(channels, kernel, stride) of each conv block."""
        return _parse_conv_layers(self.conv_feature_layers)

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "WavLMConfig":
        """Read a checkpoint's cfg dict the way upstream does (`__dict__.update` over the defaults): missing keys
        take upstream's defaults, unknown keys are kept in `extra`. Bad values raise CheckpointError."""
        if not isinstance(d, dict):
            raise CheckpointError(f"WavLM checkpoint 'cfg' must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(_UNREAD_DEFAULTS)
        extra.update((k, v) for k, v in d.items() if k not in names)
        try:
            return cls(**{k: v for k, v in d.items() if k in names}, extra=tuple(extra.items()))
        except InvalidInput as e:
            raise CheckpointError(f"WavLM checkpoint cfg is invalid: {e}") from None

    def to_dict(self) -> dict:
        """The cfg dict in upstream's format (the keys of upstream WavLMConfig.__dict__, plus unknown extras)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d


# WavLM-Large as released (spec §1 table). `normalize` is True in Microsoft's cfg but never read by the network.
FULL = WavLMConfig(
    extractor_mode="layer_norm",
    encoder_layers=24,
    encoder_embed_dim=1024,
    encoder_ffn_embed_dim=4096,
    encoder_attention_heads=16,
    layer_norm_first=True,
    conv_bias=False,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=True,
    num_buckets=320,
    max_distance=800,
    gru_rel_pos=True,
    extra=tuple({**_UNREAD_DEFAULTS, "normalize": True}.items()),
)

# Same architecture with reduced widths: strides/kernels (320-sample hop, 400-sample receptive field), pos_conv
# kernel/groups, bucket count and max_distance are kept, so every index computation is the released one.
TINY = dataclasses.replace(
    FULL,
    conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    encoder_embed_dim=64,
    encoder_ffn_embed_dim=128,
    encoder_attention_heads=4,
    encoder_layers=12,
)


# ----------------------------------------------------------------------------------------------------------------
# Conv front-end


class TransposeLast(nn.Module):
    """Swap the last two dims (mirrors upstream's module so that LayerNorm keys sit at `conv_layers.{i}.2.1`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-2, -1)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (upstream does this in the conv blocks)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (only the 'default' extractor mode, WavLM-Base, uses it; it normalises over time)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type_as(x)


class SamePad(nn.Module):
    """Drop the last output frame of an even-kernel conv padded by kernel//2, so output length = input length."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : x.shape[-1] - self.remove]


class ConvFeatureExtractor(nn.Module):
    """Strided Conv1d blocks (seven in the releases), waveform [B, S] -> features [B, C, T]. Each block is
    Sequential(0 Conv1d, 1 Dropout, 2 norm, 3 GELU) as upstream, so the state-dict keys match."""

    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(cfg.conv_layers):
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=cfg.conv_bias)
            if cfg.extractor_mode == "layer_norm":
                # LayerNorm over channels at each time step: no statistic crosses frames (what makes streaming exact).
                norm = nn.Sequential(TransposeLast(), Fp32LayerNorm(dim), TransposeLast())
                block = nn.Sequential(conv, nn.Dropout(0.0), norm, nn.GELU())
            elif i == 0:
                block = nn.Sequential(conv, nn.Dropout(0.0), Fp32GroupNorm(dim, dim), nn.GELU())
            else:
                block = nn.Sequential(conv, nn.Dropout(0.0), nn.GELU())
            self.conv_layers.append(block)
            in_dim = dim

    def forward(self, wav: Tensor) -> Tensor:
        x = wav.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Relative position bias


def relative_position_buckets(
    q_len: int, k_len: int, q_offset: int, num_buckets: int, max_distance: int, device: torch.device | str | None = None
) -> Tensor:
    """Bucket index [q_len, k_len] (long) of upstream's bidirectional relative-position scheme (modules.py:417-455).

    Query i sits at key position `q_offset + i`; rel = key - query. Half the buckets are for keys to the right.
    |rel| < num_buckets/4 gets its own bucket, larger distances share log-spaced buckets up to max_distance,
    beyond which they saturate. The float32 arithmetic is written in upstream's order, so boundary cases round alike.
    """
    query = torch.arange(q_len, dtype=torch.long, device=device)[:, None] + q_offset
    key = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
    rel = key - query
    half = num_buckets // 2
    max_exact = half // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    # Only |rel| >= max_exact uses the log branch; clamping keeps log(0) = -inf (cast to long) out of the others.
    large = max_exact + (
        torch.log(rel.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


# ----------------------------------------------------------------------------------------------------------------
# Transformer


class WavLMSelfAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections and WavLM's gated relative position bias.

    Keys `q_proj`, `k_proj`, `v_proj`, `out_proj`, `grep_linear`, `grep_a` as upstream; the bucket embedding
    `relative_attention_bias` exists in layer 0 only (the table it gives is shared by all layers)."""

    def __init__(self, cfg: WavLMConfig, has_relative_attention_bias: bool):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.num_heads)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, D] -> [B, H, T, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, x: Tensor, bias: Tensor | None, past_kv: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend from the frames `x` [B, Tq, D] to `past_kv` (cached keys/values [B, H, Tp, hd]) followed by
        `x`'s own keys/values. `bias` is the ungated table [H, Tq, Tp+Tq] (or None: no position bias).

        Returns the output [B, Tq, D] and `x`'s own (k, v) [B, H, Tq, hd], for callers that cache them."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        return self.attend(x, q, k, v, bias), new_kv

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """The attention output [B, Tq, D] of queries q [B, H, Tq, hd] (projected from the input rows x [B, Tq, D],
        which also drive the bias gate) over keys/values k, v [B, H, Tk, hd]; bias: ungated [H, Tq, Tk] or None."""
        mask = None
        if bias is not None:
            if bias.shape[-2:] != (q.shape[2], k.shape[2]):
                raise InvalidInput(
                    f"relative bias has shape {tuple(bias.shape)}, expected [{self.num_heads}, {q.shape[2]}, "
                    f"{k.shape[2]}] (heads, query frames, cached + new key frames)"
                )
            mask = bias.to(q.dtype).unsqueeze(0)  # [1, H, Tq, Tk]
            if self.gru_rel_pos:
                # Gate per (query frame, head) from the attention *input* (not the projected query), as upstream's
                # fast path: 8 outputs, summed in two groups of 4, each through a sigmoid.
                g = self.grep_linear(x.unflatten(-1, (self.num_heads, self.head_dim)))  # [B, Tq, H, 8]
                a, b = torch.sigmoid(g.unflatten(-1, (2, 4)).sum(-1)).transpose(1, 2).chunk(2, dim=-1)  # [B,H,Tq,1]
                gate = a * (b * self.grep_a - 1.0) + 2.0
                mask = gate * mask  # [B, H, Tq, Tk]

        # softmax(q k^T / sqrt(hd) + mask) v: the bias is added after the scaling, as upstream.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class WavLMLayer(nn.Module):
    """One transformer block: self-attention + FFN (D -> ffn -> D, exact GELU in fp32), pre-LN for Large."""

    def __init__(self, cfg: WavLMConfig, has_relative_attention_bias: bool):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = WavLMSelfAttention(cfg, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def _ffn(self, x: Tensor) -> Tensor:
        # Upstream computes the transformer GELU in fp32 (modules.py:140-141); a no-op in fp32.
        return self.fc2(F.gelu(self.fc1(x).float()).type_as(x))

    def forward(
        self, x: Tensor, bias: Tensor | None, past_kv: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, Tq, D] -> (output [B, Tq, D], this layer's (k, v) of x). See WavLMSelfAttention.forward."""
        h, kv = self.self_attn(self.attention_input(x), bias, past_kv)
        return self.after_attention(x, h), kv

    def attention_input(self, x: Tensor) -> Tensor:
        """What the attention reads (and its gate is computed from): LN(x) in pre-LN blocks, x itself in post-LN."""
        return self.self_attn_layer_norm(x) if self.layer_norm_first else x

    def after_attention(self, x: Tensor, h: Tensor) -> Tensor:
        """The block's output from its input rows x and their attention output h: residual, FFN (row-wise)."""
        if self.layer_norm_first:
            x = x + h
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + h)  # post-LN (WavLM-Base)
        return self.final_layer_norm(x + self._ffn(x))


def grouped_conv_dtype(device: torch.device, dtype: torch.dtype, groups: int) -> torch.dtype:
    """The dtype a grouped conv1d (pos_conv) computes in: float32 for half-precision weights on CPU, else `dtype`.

    torch 2.13's oneDNN bf16 grouped conv1d with few channels per group is wrong on AMX CPUs (Sapphire Rapids and
    later): with 4 channels per group and kernel 128 (the tiny set's pos_conv) the relative error is ~1.06, while the
    full-size shape (64 per group) is fine. Which shapes and CPUs are affected cannot be listed, so on CPU every
    half-precision grouped conv computes in fp32 (pos_conv is ~6% of the layer-11 encoder's work at full size).
    CUDA keeps the model's dtype."""
    if device.type == "cpu" and groups > 1 and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def pos_conv_forward(pos_conv: nn.Sequential, x: Tensor) -> Tensor:
    """`pos_conv(x)` for x [B, D, T] (conv, SamePad, GELU), computing the conv in `grouped_conv_dtype`; the result
    has x's dtype."""
    conv, same_pad, gelu = pos_conv
    weight = conv.weight  # weight norm: evaluated once per call
    dtype = grouped_conv_dtype(weight.device, weight.dtype, conv.groups)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    y = F.conv1d(x.to(dtype), weight.to(dtype), bias, padding=conv.padding, groups=conv.groups)
    return gelu(same_pad(y.to(x.dtype)))  # GELU in the model's dtype, as upstream and the streaming encoder


class WavLMEncoder(nn.Module):
    """Positional conv + the transformer layers + the final LayerNorm (`encoder.*` keys)."""

    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        conv = nn.Conv1d(d, d, kernel_size=cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups)
        # Weight norm over (out, in/group) for each tap (dim=2), as upstream; keys
        # pos_conv.0.parametrizations.weight.original0 (g) / original1 (v).
        conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, SamePad(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(
            WavLMLayer(cfg, has_relative_attention_bias=cfg.relative_position_embedding and i == 0)
            for i in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d)


class WavLM(nn.Module):
    """WavLM with upstream's parameter names. Use the pieces (frontend, positional, relative_bias, layers, encode)
    or `forward(wav_padded, layer)` for upstream's `extract_features(output_layer=layer)`."""

    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        self.cfg = cfg
        conv_dim = cfg.conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(conv_dim)
        # Upstream has no projection when the conv width equals the model width (then no key either).
        self.post_extract_proj = (
            nn.Linear(conv_dim, cfg.encoder_embed_dim) if conv_dim != cfg.encoder_embed_dim else None
        )
        # Masked-prediction embedding: unused at inference, kept so the checkpoint round-trips.
        self.mask_emb = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.encoder = WavLMEncoder(cfg)

    # -- geometry -------------------------------------------------------------------------------------------------

    @property
    def samples_per_frame(self) -> int:
        """Total conv stride: 320 samples (20 ms at 16 kHz) for the released model."""
        return math.prod(s for _, _, s in self.cfg.conv_layers)

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees: 400 (25 ms) for the released model."""
        rf, jump = 1, 1
        for _, k, s in self.cfg.conv_layers:
            rf += (k - 1) * jump
            jump *= s
        return rf

    def num_parameters(self, num_layers: int | None = None) -> int:
        """Parameters that the forward pass up to `num_layers` blocks uses (None: all, i.e. every parameter)."""
        if num_layers is None:
            return sum(p.numel() for p in self.parameters())
        used = [self.feature_extractor, self.layer_norm, self.encoder.pos_conv, *self.encoder.layers[:num_layers]]
        if self.post_extract_proj is not None:
            used.append(self.post_extract_proj)
        if num_layers > 0 and self.cfg.relative_position_embedding:
            used.append(self.encoder.layers[0].self_attn.relative_attention_bias)
        if not self.cfg.layer_norm_first:  # post-LN models apply the encoder LN right after pos_conv
            used.append(self.encoder.layer_norm)
        # Dedupe: layer 0 (and with it the bias embedding) may be listed twice.
        params = {id(p): p for m in used for p in m.parameters()}
        return sum(p.numel() for p in params.values())

    # -- pieces ---------------------------------------------------------------------------------------------------

    def frontend(self, wav_padded: Tensor) -> Tensor:
        """Padded 16 kHz waveform [B, S] -> projected frames [B, T, D], T = (S - 400) // 320 + 1.

        Frame t depends only on samples [320t, 320t + 400) (in layer_norm mode), so running it on a chunk that
        overlaps its neighbours by 80 samples gives exactly the corresponding frames of the whole sequence."""
        if wav_padded.ndim != 2 or wav_padded.shape[-1] < self.receptive_field:
            raise InvalidInput(
                f"frontend expects a waveform [B, S] with S >= {self.receptive_field} samples, "
                f"got shape {tuple(wav_padded.shape)}"
            )
        x = self.feature_extractor(wav_padded).transpose(1, 2)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return x

    def positional(self, x: Tensor) -> Tensor:
        """Projected frames [B, T, D] -> transformer input: x + GELU(pos_conv(x)). Output frame t uses input frames
        t-64 .. t+63; frames outside [0, T) are zeros (the conv's padding)."""
        x = x + pos_conv_forward(self.encoder.pos_conv, x.transpose(1, 2)).transpose(1, 2)
        if not self.cfg.layer_norm_first:
            x = self.encoder.layer_norm(x)  # post-LN models normalise here instead of at the end
        return x

    def relative_bias(self, q_len: int, k_len: int, q_offset: int | None = None) -> Tensor | None:
        """Ungated relative-position bias table [H, q_len, k_len] for queries at key positions
        q_offset .. q_offset+q_len-1 (default k_len - q_len: the queries are the last q_len keys, e.g. new frames
        after cached ones). None when the model has no relative position embedding. Build it once per window shape
        and pass it to every layer; each layer gates it with its own input."""
        if not self.cfg.relative_position_embedding:
            return None
        if q_offset is None:
            q_offset = k_len - q_len
        table = self.encoder.layers[0].self_attn.relative_attention_bias.weight  # [num_buckets, H]
        idx = relative_position_buckets(
            q_len, k_len, q_offset, self.cfg.num_buckets, self.cfg.max_distance, device=table.device
        )
        return F.embedding(idx, table).permute(2, 0, 1)

    def layer(
        self, i: int, x: Tensor, bias: Tensor | None, past_kv: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run block i on query frames x [B, Tq, D] attending to cached `past_kv` (keys/values [B, H, Tp, hd] from
        an earlier call of the same block) plus x itself. bias: `relative_bias(Tq, Tp + Tq)` or None.
        Returns (output [B, Tq, D], (k, v) of x [B, H, Tq, hd])."""
        return self.encoder.layers[i](x, bias, past_kv)

    def encode(self, x: Tensor, num_layers: int = 11) -> Tensor:
        """Projected frames [B, T, D] -> output of block `num_layers` (1-indexed), without the final encoder LN.
        Only the first num_layers blocks run. Long inputs run in blocks (see `encode_steps`)."""
        return run_steps(self.encode_steps(x, num_layers))

    def forward(self, wav_padded: Tensor, layer: int | None = 11) -> Tensor:
        """Upstream `extract_features(wav_padded, output_layer=layer)[0]`: [B, S] -> [B, T, D].
        layer=n: output of block n without the final LN; layer=None: all blocks, then the final LN (pre-LN models)."""
        return run_steps(self.forward_steps(wav_padded, layer))

    # -- the same computation in bounded slices ---------------------------------------------------------------------
    # A generator per computation: it yields after each slice of bounded work and returns the result, so that a
    # scheduler (the server's model worker) can interleave a long input with other work; `run_steps` runs one to the
    # end. The slicing depends only on the input's length, so every caller gets the same bits for the same input.
    # Inputs whose whole attention bias fits ATTENTION_ELEMENTS run dense (bit for bit the plain layer-by-layer
    # computation); longer ones run in blocks of query rows whose bias is cut from a per-distance table, so memory
    # is O(T * rows), not O(T^2). Generators never hold a context manager across a yield (no leaked inference mode).

    def forward_steps(self, wav_padded: Tensor, layer: int | None = 11):
        """`forward` as a generator of slices (see above); its return value is forward's result."""
        hop, rf = self.samples_per_frame, self.receptive_field
        frames = (wav_padded.shape[-1] - rf) // hop + 1 if wav_padded.ndim == 2 else 0
        if frames <= ROW_BLOCK or self.cfg.extractor_mode != "layer_norm":
            x = self.frontend(wav_padded)  # validates; GroupNorm (default mode) normalises over all frames at once
        else:  # LayerNorm per frame: frames [s, e) read samples [hop s, hop (e - 1) + rf) only
            parts = []
            for s in range(0, frames, ROW_BLOCK):
                e = min(frames, s + ROW_BLOCK)
                parts.append(self.frontend(wav_padded[:, hop * s : hop * (e - 1) + rf]))
                yield
            x = torch.cat(parts, dim=1)
        yield
        x = yield from self.encode_steps(x, self.cfg.encoder_layers if layer is None else layer)
        if layer is None and self.cfg.layer_norm_first:
            x = self.encoder.layer_norm(x)
        return x

    def encode_steps(self, x: Tensor, num_layers: int = 11):
        """`encode` as a generator of slices (see above); its return value is encode's result."""
        if not 0 <= num_layers <= self.cfg.encoder_layers:
            raise InvalidInput(f"num_layers must be in 0..{self.cfg.encoder_layers}, got {num_layers}")
        T, heads = x.shape[1], self.cfg.encoder_attention_heads
        blocks = self.encoder.layers[:num_layers]
        if heads * T * T <= ATTENTION_ELEMENTS:  # dense
            x = self.positional(x)
            yield
            bias = self.relative_bias(T, T)  # computed once per call, shared by all layers
            for block in blocks:
                x, _ = block(x, bias)
                yield
            return x
        x = yield from self._positional_steps(x)
        by_distance = self.relative_bias_by_distance(T)
        rows = max(MIN_ROWS, ATTENTION_ELEMENTS // (heads * T))
        for block in blocks:
            attn = block.self_attn
            h = block.attention_input(x)
            keys, values = [], []
            for s in range(0, T, ROW_BLOCK):
                hs = h[:, s : s + ROW_BLOCK]
                keys.append(attn._heads(attn.k_proj(hs)))
                values.append(attn._heads(attn.v_proj(hs)))
                yield
            k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
            out = []
            for s in range(0, T, rows):
                hs = h[:, s : s + rows]
                bias = None if by_distance is None else bias_rows(by_distance, s, hs.shape[1])
                out.append(block.after_attention(x[:, s : s + rows], attn.attend(hs, attn._heads(attn.q_proj(hs)), k,
                                                                                  v, bias)))  # fmt: skip
                yield
            x = torch.cat(out, dim=1)
        return x

    def _positional_steps(self, x: Tensor):
        """`positional(x)` in blocks of ROW_BLOCK output frames (each reads its 64 / 63 neighbours)."""
        conv = self.encoder.pos_conv[0]
        weight = conv.weight  # the weight-normalised g * v / ||v||, evaluated once
        pad = self.cfg.conv_pos // 2
        padded = F.pad(x.transpose(1, 2), (pad, pad))  # the module's own zero padding; SamePad drops its extra frame
        out = []
        for s in range(0, x.shape[1], ROW_BLOCK):
            e = min(x.shape[1], s + ROW_BLOCK)
            c = F.conv1d(padded[:, :, s : e + self.cfg.conv_pos - 1], weight, conv.bias, groups=conv.groups)
            out.append(x[:, s:e] + F.gelu(c).transpose(1, 2))
            yield
        x = torch.cat(out, dim=1)
        if not self.cfg.layer_norm_first:
            x = self.encoder.layer_norm(x)
        return x

    def relative_bias_by_distance(self, k_len: int) -> Tensor | None:
        """The ungated bias [H, 2 k_len - 1] of each key-minus-query distance -(k_len - 1) .. k_len - 1 (the same
        values `relative_bias` puts in its table, from the same bucket arithmetic); None without the embedding."""
        return self.relative_bias(1, 2 * k_len - 1, q_offset=k_len - 1)[:, 0] if self.cfg.relative_position_embedding \
            else None


# Bias elements (heads x query rows x keys) of one attention block (at least MIN_ROWS rows); a whole input up to this
# runs dense. 2^21 floats are 8 MB, a block of ~40 ms on one core: 724 frames (14 s) run dense with 4 heads (tiny),
# 362 frames (7 s) with 16 (Large).
ATTENTION_ELEMENTS = 1 << 21
MIN_ROWS = 16
ROW_BLOCK = 512  # frames per slice of the row-wise pieces (front-end, pos_conv, key/value projections) of long inputs


def bias_rows(by_distance: Tensor, start: int, rows: int) -> Tensor:
    """Rows [start, start + rows) of the square bias table [H, T, T] from its per-distance form [H, 2T - 1]:
    entry (i, j) is by_distance[:, j - i + T - 1]."""
    T = (by_distance.shape[1] + 1) // 2
    windows = by_distance.unfold(1, T, 1)  # [H, T, T]: windows[:, a, j] = by_distance[:, a + j], a view
    first = T - start - rows  # row i uses a = T - 1 - i
    return windows[:, first : first + rows].flip(1)


def run_steps(steps):
    """Run a generator of slices (`WavLM.forward_steps`, `encode_steps`) to its end; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# ----------------------------------------------------------------------------------------------------------------
# Upstream's feature function


def extract_features(
    model: WavLM, wav: Tensor, sr: int, layer: int | None = None
) -> Tensor:
    """Features [N, D] of mono audio; see `extract_features_steps`, which this runs to the end."""
    steps = extract_features_steps(model, wav, sr, layer)
    with torch.inference_mode():
        return run_steps(steps)


def extract_features_steps(model: WavLM, wav: Tensor, sr: int, layer: int | None = 11):
    """A generator of bounded slices (see `WavLM.forward_steps`) whose return value is `extract_features`'s result;
    validation and resampling happen in this call. Run its slices under torch.inference_mode().

    Features [N, D] of mono audio `wav` [1, T] at sample rate `sr`, as upstream's `wavlm_for_dpslm` function:
    resample to 16 kHz (torchaudio's defaults), pad 40 zeros each side, no waveform normalisation, N = floor(T16/320)
    frames; layer=11 is the output of the 11th block without the final LN (only 11 blocks run); layer=None is the
    full-depth output with the final LN. The result has the model's dtype and device."""
    if not isinstance(wav, Tensor):
        raise InvalidInput(f"wav must be a torch.Tensor of shape (1, T), got {type(wav).__name__}")
    if wav.ndim != 2 or wav.shape[0] != 1:
        hint = " (mix down with wav.mean(0, keepdim=True))" if wav.ndim == 2 else ""
        raise InvalidInput(f"wav must be mono audio of shape (1, T), got shape {tuple(wav.shape)}{hint}")
    if not wav.is_floating_point():
        raise InvalidInput(f"wav must be floating point in [-1, 1], got dtype {wav.dtype}")
    if not is_int(sr) or sr <= 0:
        raise InvalidInput(f"sample rate must be a positive int (e.g. 16000), got {sr!r}")
    if wav.shape[1] == 0:
        raise InvalidInput("wav is empty (0 samples); need at least one 20 ms frame (320 samples at 16 kHz)")
    if not bool(torch.isfinite(wav).all()):
        raise InvalidInput("wav contains NaN or Inf samples")
    if layer is not None and (not is_int(layer, int)
                              or not 1 <= layer <= model.cfg.encoder_layers):
        raise InvalidInput(f"layer must be None or an int in 1..{model.cfg.encoder_layers}, got {layer!r}")

    sr = int(sr)
    if sr != SAMPLE_RATE:
        from dpslm_stream.audio import resample  # lazy: the 16 kHz path needs no resampler

        wav = resample(wav, sr, SAMPLE_RATE)
    hop = model.samples_per_frame
    if wav.shape[1] < hop:
        raise InvalidInput(
            f"audio too short: {wav.shape[1]} samples at 16 kHz, need at least {hop} (one 20 ms frame)"
        )
    param = next(model.parameters())
    pad = (model.receptive_field - hop) // 2  # 40: centres each 400-sample window on its 320-sample hop
    wav = F.pad(wav.to(device=param.device, dtype=param.dtype), (pad, pad))
    return _first_item(model.forward_steps(wav, layer))


def _first_item(steps):
    return (yield from steps).squeeze(0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

_LEGACY_WEIGHT_NORM = {
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv.0.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv.0.parametrizations.weight.original1",
}


def load_checkpoint_dict(
    ckpt: dict, map_location: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WavLM:
    """Build WavLM from `ckpt["cfg"]` and load `ckpt["model"]` strictly. Both weight-norm key styles of the
    positional conv are accepted (legacy weight_g/weight_v and parametrizations.weight.original0/1).
    Returns the model in eval mode, in `dtype` (fp32 by default; conv-block LayerNorms always compute in fp32)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"WavLM checkpoint must be a dict with keys 'cfg' and 'model', got {type(ckpt).__name__}")
    for key in ("cfg", "model"):
        if key not in ckpt:
            raise CheckpointError(f"WavLM checkpoint has no {key!r} entry (found keys {sorted(ckpt, key=str)})")
    cfg = WavLMConfig.from_dict(ckpt["cfg"])
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"WavLM checkpoint 'model' must be a state dict, got {type(state).__name__}")
    state = {_LEGACY_WEIGHT_NORM.get(k, k): v for k, v in state.items()}

    # Build without allocating or initialising (315M parameters), then materialise and copy.
    with torch.device("meta"):
        model = WavLM(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    # A weights-only file may hold lists, numbers or strings where tensors belong: say so instead of crashing.
    misshaped = [
        f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else 'a ' + type(v).__name__} "
        f"(expected {'' if isinstance(v, Tensor) else 'a tensor of shape '}{tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{name} {items}" for name, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped)) if items
        ]
        raise CheckpointError(f"WavLM checkpoint does not match its cfg: {'; '.join(problems)}")
    model.to_empty(device=map_location)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def checkpoint_dict(model: WavLM, weight_norm_style: str = "parametrizations") -> dict:
    """`{"cfg": dict, "model": state_dict}` in the release format: fp32 CPU tensors, upstream key names.
    weight_norm_style: "parametrizations" (what upstream's module produces) or "legacy" (weight_g / weight_v)."""
    if weight_norm_style not in ("parametrizations", "legacy"):
        raise InvalidInput(f"weight_norm_style must be 'parametrizations' or 'legacy', got {weight_norm_style!r}")
    to_legacy = {v: k for k, v in _LEGACY_WEIGHT_NORM.items()} if weight_norm_style == "legacy" else {}
    state = {to_legacy.get(k, k): v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return {"cfg": model.cfg.to_dict(), "model": state}
