"""WavTokenizer decoder: codec ids -> 24 kHz audio (DP-SLM's vocoder), checkpoint-compatible with the releases.

Releases (nicolvisser/WavTokenizer hubconf): `small_600_24k_4096` (40 codes/s, hop 600, n_fft 2400) and
`small_320_24k_4096` (75 codes/s, hop 320, n_fft 1280). Facts: docs/references.md §WavTokenizer.

Decode path, top to bottom:
    codes (K=1, B, L) -> codebook rows (B, 512, L)                         [feature_extractor...._codebook.embed]
    -> Conv1d k7 -> pos_net (2 ResnetBlocks, 1 self-attention, 2 ResnetBlocks, GroupNorm)   [backbone.pos_net]
    -> AdaLayerNorm -> 12 ConvNeXt blocks -> LayerNorm (B, L, 768)           [backbone]
    -> Linear -> log-magnitude, phase -> complex spectrum (B, n_fft/2+1, L) [head.out]
    -> iSTFT, "same" padding (B, hop*L)                                     [head.istft]

Only the decode path is built: the SEANet encoder/decoder that upstream also keeps under `feature_extractor.` are
never used to turn codes into audio, so loading drops them (see KEPT_KEYS_DOC / `load_checkpoint_dict`).

The GroupNorms and the attention see the whole sequence, so the decoder cannot be streamed exactly; the iSTFT can.
The streaming vocoder (`StreamingISTFT`, `IncrementalVocoder`) lives in dpslm_stream/stream/vocoder.py and builds on
`windowed_frames`, `overlap_add` and `envelope` here, the one overlap-add routine both paths share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models.precision import FastLinear, Plan, plan_for

# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------

# The Lightning checkpoint carries no architecture config, and no tensor depends on the hop length. Both releases
# use a 4x-overlapping window (n_fft = 4 * hop); map n_fft to (hop, encoder downsampling factors) for inference.
_HOP_FOR_N_FFT: dict[int, tuple[int, tuple[int, ...]]] = {2400: (600, (6, 5, 5, 4)), 1280: (320, (8, 5, 4, 2))}

# Every GroupNorm in upstream's pos_net is `Normalize()` = GroupNorm(32 groups, eps 1e-6): fixed, not configurable.
GROUPNORM_GROUPS = 32


@dataclass(frozen=True)
class WavTokenizerConfig:
    """Architecture of the WavTokenizer decoder. Field names follow upstream's configs.py (WavTokenizerArgs)."""

    # feature_extractor: the codebook(s) that turn codes into features. The SEANet dimension (the codebook width)
    # is upstream's `input_channels` of the backbone; `downsamples` only describes the (unbuilt) encoder.
    vq_bins: int = 4096
    num_quantizers: int = 1
    downsamples: tuple[int, ...] = (6, 5, 5, 4)
    # backbone
    input_channels: int = 512
    dim: int = 768
    intermediate_dim: int = 2304
    num_layers: int = 12
    adanorm_num_embeddings: int | None = 4
    # head
    n_fft: int = 2400
    hop_length: int = 600
    padding: str = "same"
    sample_rate: int = 24000

    def __post_init__(self) -> None:
        if self.padding != "same":
            raise InvalidInput(f"padding={self.padding!r} is not supported; the releases use 'same'")
        if self.n_fft % self.hop_length != 0 or (self.n_fft - self.hop_length) % 2 != 0:
            raise InvalidInput(
                f"n_fft={self.n_fft} must be a multiple of hop_length={self.hop_length} with an even difference "
                "(the exact overlap-add works in whole hops and trims (n_fft - hop) / 2 samples at each end)"
            )
        if self.dim % GROUPNORM_GROUPS != 0:
            raise InvalidInput(f"dim={self.dim} must be divisible by the {GROUPNORM_GROUPS} GroupNorm groups")
        if min(self.vq_bins, self.num_quantizers, self.input_channels, self.dim, self.intermediate_dim) < 1:
            raise InvalidInput(f"all widths and counts must be positive, got {self}")
        object.__setattr__(self, "downsamples", tuple(int(d) for d in self.downsamples))

    @property
    def overlap(self) -> int:
        """How many frames overlap each output sample (n_fft / hop; 4 for both releases)."""
        return self.n_fft // self.hop_length

    @property
    def frame_rate(self) -> float:
        """Codes per second (40 for the 600 model, 75 for the 320 model)."""
        return self.sample_rate / self.hop_length

    @classmethod
    def from_dict(cls, d: dict) -> "WavTokenizerConfig":
        """Read upstream's nested WavTokenizerArgs dict {"feature_extractor": ..., "backbone": ..., "head": ...}."""

        def need(section: str, name: str):
            if not isinstance(d.get(section), dict) or name not in d[section]:
                raise CheckpointError(f"WavTokenizer config is missing required field '{section}.{name}'")
            return d[section][name]

        if need("head", "dim") != need("backbone", "dim"):
            raise CheckpointError(f"head.dim={d['head']['dim']} must equal backbone.dim={d['backbone']['dim']}")
        try:
            return cls(
                vq_bins=int(need("feature_extractor", "vq_bins")),
                num_quantizers=int(need("feature_extractor", "num_quantizers")),
                downsamples=tuple(need("feature_extractor", "downsamples")),
                input_channels=int(need("backbone", "input_channels")),
                dim=int(need("backbone", "dim")),
                intermediate_dim=int(need("backbone", "intermediate_dim")),
                num_layers=int(need("backbone", "num_layers")),
                adanorm_num_embeddings=need("backbone", "adanorm_num_embeddings"),
                n_fft=int(need("head", "n_fft")),
                hop_length=int(need("head", "hop_length")),
                padding=str(need("head", "padding")),
            )
        except InvalidInput as e:
            raise CheckpointError(f"invalid WavTokenizer config: {e}") from e

    def to_dict(self) -> dict:
        """Upstream's nested WavTokenizerArgs layout; training-only fields carry the release values."""
        return {
            "feature_extractor": {
                "encodec_model": "encodec_24khz",
                "bandwidths": [6.6, 6.6, 6.6, 6.6],
                "train_codebooks": True,
                "num_quantizers": self.num_quantizers,
                "downsamples": list(self.downsamples),
                "vq_bins": self.vq_bins,
                "vq_kmeans": 200,
            },
            "backbone": {
                "input_channels": self.input_channels,
                "dim": self.dim,
                "intermediate_dim": self.intermediate_dim,
                "num_layers": self.num_layers,
                "layer_scale_init_value": None,
                "adanorm_num_embeddings": self.adanorm_num_embeddings,
            },
            "head": {"dim": self.dim, "n_fft": self.n_fft, "hop_length": self.hop_length, "padding": self.padding},
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> "WavTokenizerConfig":
        """Infer the architecture from tensor shapes of a (prefix-filtered) upstream state dict."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise CheckpointError(f"checkpoint state_dict is missing '{key}' (not a WavTokenizer checkpoint?)")
            return tuple(sd[key].shape)

        bins, channels = shape(_codebook_key(0))
        num_quantizers = 1
        while _codebook_key(num_quantizers) in sd:
            num_quantizers += 1
        dim = shape("backbone.embed.weight")[0]
        num_layers = 0
        while f"backbone.convnext.{num_layers}.dwconv.weight" in sd:
            num_layers += 1
        if num_layers == 0:
            raise CheckpointError("checkpoint state_dict has no 'backbone.convnext.0.*' blocks")
        intermediate_dim = shape("backbone.convnext.0.pwconv1.weight")[0]
        adanorm = shape("backbone.norm.scale.weight")[0] if "backbone.norm.scale.weight" in sd else None
        n_fft = shape("head.istft.window")[0]
        if n_fft not in _HOP_FOR_N_FFT:
            raise CheckpointError(
                f"cannot infer hop_length for n_fft={n_fft} (known: {sorted(_HOP_FOR_N_FFT)}); "
                "pass config= to load_checkpoint_dict"
            )
        hop, downsamples = _HOP_FOR_N_FFT[n_fft]
        return cls(
            vq_bins=bins, num_quantizers=num_quantizers, downsamples=downsamples, input_channels=channels, dim=dim,
            intermediate_dim=intermediate_dim, num_layers=num_layers, adanorm_num_embeddings=adanorm,
            n_fft=n_fft, hop_length=hop,
        )


FULL = WavTokenizerConfig()  # small_600_24k_4096: 40 Hz codes, 24 kHz audio
FULL_320 = WavTokenizerConfig(downsamples=(8, 5, 4, 2), n_fft=1280, hop_length=320)  # small_320_24k_4096: 75 Hz
# Reduced widths only: same hop/n_fft, kernel sizes, 12 ConvNeXt blocks (same receptive field), 4096 codes.
TINY = WavTokenizerConfig(input_channels=32, dim=64, intermediate_dim=192)


def _codebook_key(i: int) -> str:
    return f"feature_extractor.encodec.quantizer.vq.layers.{i}._codebook.embed"


# --------------------------------------------------------------------------------------------------------------------
# Modules (names mirror upstream's module tree so state-dict keys match one to one)
# --------------------------------------------------------------------------------------------------------------------


class Codebook(nn.Module):
    """One VQ codebook (upstream EuclideanCodebook, inference part): `embed` is a (bins, dim) buffer."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(bins, dim))


class CodebookFeatures(nn.Module):
    """Codes -> features by codebook lookup (upstream `feature_extractor`, reduced to what decoding reads).

    Upstream nests the codebooks at `encodec.quantizer.vq.layers[i]._codebook.embed`; the plain containers below
    exist only to reproduce that key path.
    """

    def __init__(self, config: WavTokenizerConfig):
        super().__init__()
        layers = nn.ModuleList()
        for _ in range(config.num_quantizers):
            layer = nn.Module()
            layer._codebook = Codebook(config.vq_bins, config.input_channels)
            layers.append(layer)
        vq = nn.Module()
        vq.layers = layers
        quantizer = nn.Module()
        quantizer.vq = vq
        self.encodec = nn.Module()
        self.encodec.quantizer = quantizer

    def forward(self, codes: Tensor) -> Tensor:
        """codes (K, B, L) int64 -> features (B, C, L): the K selected rows summed (K=1: just the row)."""
        tables = [layer._codebook.embed for layer in self.encodec.quantizer.vq.layers]
        return sum(F.embedding(codes[k], tables[k]) for k in range(len(tables))).transpose(1, 2)


def _groupnorm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv2(swish(GN(conv1(swish(GN(x)))))) with k3 convs; upstream's Dropout(0.1) is omitted (inference only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = _groupnorm(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.norm2 = _groupnorm(dim)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class AttnBlock(nn.Module):
    """Single-head, unmasked self-attention over all frames (1x1-conv projections), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = _groupnorm(dim)
        self.q = nn.Conv1d(dim, dim, kernel_size=1)
        self.k = nn.Conv1d(dim, dim, kernel_size=1)
        self.v = nn.Conv1d(dim, dim, kernel_size=1)
        self.proj_out = nn.Conv1d(dim, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        # (B, C, L) -> (B, 1 head, L, C); SDPA's default scale 1/sqrt(C) is upstream's int(c) ** -0.5
        q, k, v = (proj(h).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return x + self.proj_out(h)


class AdaLayerNorm(nn.Module):
    """LayerNorm whose affine weight/bias are rows of embeddings chosen by a condition id (the bandwidth id)."""

    def __init__(self, num_embeddings: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Embedding(num_embeddings, dim)
        self.shift = nn.Embedding(num_embeddings, dim)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: Tensor, cond_id: int) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.scale.weight[cond_id], self.shift.weight[cond_id], self.eps)


class ConvNeXtBlock(nn.Module):
    """x + gamma * pwconv2(GELU(pwconv1(norm(dwconv(x))))), dwconv depthwise k7; x is (B, C, L)."""

    def __init__(self, dim: int, intermediate_dim: int, adanorm_num_embeddings: int | None, num_layers: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = AdaLayerNorm(adanorm_num_embeddings, dim) if adanorm_num_embeddings else nn.LayerNorm(dim, 1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 / num_layers))  # upstream's layer-scale init

    def forward(self, x: Tensor, cond_id: int) -> Tensor:
        h = self.dwconv(x).transpose(1, 2)
        h = self.norm(h, cond_id) if isinstance(self.norm, AdaLayerNorm) else self.norm(h)
        h = self.pwconv2(F.gelu(self.pwconv1(h)))  # exact (erf) GELU, as nn.GELU()
        return x + (self.gamma * h).transpose(1, 2)


class Backbone(nn.Module):
    """Upstream VocosBackbone with its pos_net: features (B, C_in, L) -> hidden states (B, L, dim)."""

    def __init__(self, config: WavTokenizerConfig):
        super().__init__()
        d, n_emb = config.dim, config.adanorm_num_embeddings
        # Registered in upstream's order (pos_net last) so state_dict() lists keys as the release does.
        self.embed = nn.Conv1d(config.input_channels, d, kernel_size=7, padding=3)
        self.norm = AdaLayerNorm(n_emb, d) if n_emb else nn.LayerNorm(d, eps=1e-6)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(d, config.intermediate_dim, n_emb, config.num_layers) for _ in range(config.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-6)
        # Sequential indices 0..5 are the checkpoint's `pos_net.{i}` keys
        self.pos_net = nn.Sequential(ResnetBlock(d), ResnetBlock(d), AttnBlock(d), ResnetBlock(d), ResnetBlock(d),
                                     _groupnorm(d))

    def forward(self, x: Tensor, bandwidth_id: int = 0) -> Tensor:
        x = self.pos_net(self.embed(x)).transpose(1, 2)
        x = self.norm(x, bandwidth_id) if isinstance(self.norm, AdaLayerNorm) else self.norm(x)
        x = x.transpose(1, 2)
        for block in self.convnext:
            x = block(x, bandwidth_id)
        return self.final_layer_norm(x.transpose(1, 2))


# --------------------------------------------------------------------------------------------------------------------
# iSTFT with "same" padding, whole-sequence and streaming (one overlap-add routine shared by both)
# --------------------------------------------------------------------------------------------------------------------


def windowed_frames(spec: Tensor, window: Tensor, hop: int) -> Tensor:
    """Complex spectra (B, n_fft/2+1, T) -> windowed time frames (B, T, overlap, hop), float32 or float64."""
    n_fft = window.shape[0]
    frames = torch.fft.irfft(spec.transpose(1, 2), n=n_fft, dim=-1, norm="backward") * window
    return frames.reshape(frames.shape[0], frames.shape[1], n_fft // hop, hop)


def overlap_add(frames: Tensor, carry: Tensor | None = None) -> Tensor:
    """Overlap-add windowed frames (B, T, R, hop) into T + R - 1 blocks of `hop` samples, (B, T+R-1, hop).

    Frame t's part k lands in block t + k. `carry` (B, R-1, hop) holds the partial sums of blocks 0..R-2 left by
    earlier frames. Every block is summed oldest frame first (carry, then k = R-1 .. 0), so splitting the frames into
    chunks does not change the order of the float additions: chunked == whole bit for bit for equal frames.
    """
    b, t, r, hop = frames.shape
    out = frames.new_zeros(b, t + r - 1, hop)
    if carry is not None:
        out[:, : r - 1] = carry
    for k in range(r - 1, -1, -1):
        out[:, k : k + t] += frames[:, :, k]
    return out


def envelope(window: Tensor, hop: int, num_frames: int) -> Tensor:
    """Sum of squared windows over the frames covering each block, (T+R-1, hop), in the same order as the audio."""
    r = window.shape[0] // hop
    sq = window.square().reshape(1, 1, r, hop).expand(1, num_frames, r, hop)
    return overlap_add(sq)[0]


def istft(spec: Tensor, window: Tensor, hop_length: int) -> Tensor:
    """Whole-sequence iSTFT with "same" padding: complex (B, n_fft/2+1, T) -> real (B, hop*T).

    Upstream semantics: irfft (1/N scaling) of each frame, times the window, overlap-added at `hop_length`,
    divided by the overlap-added squared window, and (n_fft - hop) / 2 samples trimmed at each end.
    """
    n_fft = window.shape[0]
    pad = (n_fft - hop_length) // 2
    t = spec.shape[-1]
    audio = overlap_add(windowed_frames(spec, window, hop_length)) / envelope(window, hop_length, t)
    return audio.flatten(1)[:, pad : pad + hop_length * t]


class ISTFT(nn.Module):
    """iSTFT head part; holds the periodic Hann window that the checkpoint stores as `head.istft.window`."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, spec: Tensor) -> Tensor:
        # FFTs run in float32 whatever the model dtype (no half-precision FFT for these sizes)
        return istft(spec, self.window.float(), self.hop_length)


class ISTFTHead(nn.Module):
    """Hidden states (B, L, dim) -> complex spectrum -> audio. Output is log-magnitude then phase, n_fft/2+1 each."""

    def __init__(self, config: WavTokenizerConfig):
        super().__init__()
        self.out = nn.Linear(config.dim, config.n_fft + 2)
        self.istft = ISTFT(config.n_fft, config.hop_length)

    def spectrum(self, x: Tensor) -> Tensor:
        """(B, L, dim) -> complex64 (B, n_fft/2+1, L)."""
        logmag, phase = self.out(x).float().transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(logmag).clamp(max=1e2)  # upstream's guard against huge magnitudes
        return torch.polar(mag, phase)

    def forward(self, x: Tensor) -> Tensor:
        return self.istft(self.spectrum(x))


def apply_precision(model: "WavTokenizer", precision: str) -> Plan:
    """Convert the networks (codebook features, backbone, output layer) for `precision` on the model's device, in
    place: fast = bfloat16 where the hardware has bf16 units (models/precision.py); else, where fbgemm runs, the
    ConvNeXt blocks' MLPs (pwconv1, pwconv2) in int8 and the rest float32; else float32 unchanged. The spectrum, the
    iSTFT and the Hann window stay float32. Returns the plan (recorded as `model.precision_plan`)."""
    plan = plan_for("wavtokenizer", precision, model.head.out.weight.device)
    if plan.bulk == "bf16":
        for net in (model.feature_extractor, model.backbone, model.head.out):
            net.to(torch.bfloat16)
    convert_mlps(model, plan)
    model.precision_plan = plan
    return plan


def convert_mlps(model: "WavTokenizer", plan: Plan) -> None:
    """For an int8 plan, the ConvNeXt blocks' MLPs (pwconv1, pwconv2) become int8 FastLinears, in place; blocks
    already converted are left as they are, other plans change nothing."""
    if plan.bulk != "int8dyn":
        return
    with torch.no_grad():
        for block in model.backbone.convnext:
            if isinstance(block.pwconv1, nn.Linear):
                block.pwconv1 = FastLinear([block.pwconv1], plan.decode, plan.bulk)
                block.pwconv2 = FastLinear([block.pwconv2], plan.decode, plan.bulk)


class WavTokenizer(nn.Module):
    """The WavTokenizer decode path: codebook lookup, backbone, iSTFT head (upstream module names).

    For half precision cast the networks only (`feature_extractor`, `backbone`, `head.out`): the spectrum and the
    iSTFT always run in float32, and `.to(dtype)` on the whole model would also round the stored Hann window.
    """

    def __init__(self, config: WavTokenizerConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = CodebookFeatures(config)
        self.backbone = Backbone(config)
        self.head = ISTFTHead(config)

    def spectra(self, codes: Tensor, bandwidth_id: int = 0) -> Tensor:
        """Valid codes (K, B, L) -> complex64 spectra (B, n_fft/2+1, L), one frame per code."""
        features = self.feature_extractor(codes).to(self.backbone.embed.weight.dtype)
        hidden = self.backbone(features, bandwidth_id)
        return self.head.spectrum(hidden.to(self.head.out.weight.dtype))

    def forward(self, codes: Tensor, bandwidth_id: int = 0) -> Tensor:
        """Valid codes (K, B, L) -> float32 audio (B, hop*L)."""
        return self.head.istft(self.spectra(codes, bandwidth_id))


# --------------------------------------------------------------------------------------------------------------------
# Public decode functions (hubconf semantics)
# --------------------------------------------------------------------------------------------------------------------


def check_codes(model: WavTokenizer, codes: Tensor) -> Tensor:
    """Validate codes like upstream's codes_to_features accepts them: (K, B, L) or (K, L) -> int64 (K, B, L)."""
    cfg = model.config
    if not isinstance(codes, Tensor):
        raise InvalidInput(f"codes must be a torch integer tensor of shape (K, B, L), got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise InvalidInput(f"codes must be an integer tensor (int64 ids), got dtype {codes.dtype}")
    if codes.dim() == 2:  # upstream accepts (K, L) and adds the batch dimension
        codes = codes.unsqueeze(1)
    if codes.dim() != 3:
        raise InvalidInput(
            f"codes must have shape (K, B, L) (e.g. ids[None, None, :]) or (K, L), got shape {tuple(codes.shape)}"
        )
    if codes.shape[0] != cfg.num_quantizers:
        raise InvalidInput(f"codes have K={codes.shape[0]} codebooks, this model has {cfg.num_quantizers}")
    if codes.shape[1] == 0 or codes.shape[2] == 0:
        raise InvalidInput(f"codes are empty (shape {tuple(codes.shape)}); need at least one code per sequence")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= cfg.vq_bins:
        bad = lo if lo < 0 else hi
        raise InvalidInput(f"code id {bad} is out of range: valid ids are 0..{cfg.vq_bins - 1}")
    return codes.to(device=model.head.out.weight.device, dtype=torch.long)


@torch.inference_mode()
def spectra(model: WavTokenizer, codes: Tensor) -> Tensor:
    """Codes (K=1, B, L) -> complex64 spectra (B, n_fft/2+1, L) from backbone + head (bandwidth_id 0)."""
    return model.spectra(check_codes(model, codes))


@torch.inference_mode()
def decode(model: WavTokenizer, codes: Tensor) -> Tensor:
    """Codes (K=1, B, L) int64 in [0, vq_bins) -> float32 audio (B, hop*L) at 24 kHz (not clipped to [-1, 1])."""
    return model(check_codes(model, codes))


def vocode(model: WavTokenizer, codes: Tensor) -> tuple[Tensor, int]:
    """Upstream hubconf `decode`: codes (K=1, B, L) -> (audio (B, hop*L), 24000)."""
    return decode(model, codes), model.config.sample_rate


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints (upstream PyTorch-Lightning file: {"state_dict": {...}, "hyper_parameters": {...}, ...})
# --------------------------------------------------------------------------------------------------------------------

# What upstream hubconf keeps is every key under `backbone.`, `head.`, `feature_extractor.`. We keep the subset the
# decode path reads; the SEANet encoder/decoder and the codebook's EMA training statistics are dropped with the
# training-only modules (discriminators, losses).
KEPT_PREFIXES = ("backbone.", "head.")
KEPT_KEYS_DOC = "backbone.*, head.*, feature_extractor.encodec.quantizer.vq.layers.{i}._codebook.embed"
# A training-only entry written by checkpoint_dict (a discriminator bias of upstream's VocosExp), which loading drops.
TRAINING_ONLY_MARKER = "multiperioddisc.discriminators.0.conv_post.bias"


def _is_kept(key: object) -> bool:
    if not isinstance(key, str):  # a weights-only file may have other keys: never ours
        return False
    return key.startswith(KEPT_PREFIXES) or (
        key.startswith("feature_extractor.encodec.quantizer.vq.layers.") and key.endswith("._codebook.embed")
    )


def load_checkpoint_dict(
    ckpt: dict, map_location: str | torch.device = "cpu", config: WavTokenizerConfig | None = None
) -> WavTokenizer:
    """Build a WavTokenizer from a loaded upstream checkpoint (strict for the kept keys), in eval mode, fp32.

    The Lightning file has no architecture config, so `config` defaults to one inferred from tensor shapes
    (hop from n_fft: 2400 -> 600, 1280 -> 320). Missing or unexpected kept keys, or wrong shapes: CheckpointError.
    """
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError("expected a PyTorch-Lightning checkpoint dict with a 'state_dict' entry")
    full = ckpt["state_dict"]
    sd = {k: v for k, v in full.items() if _is_kept(k)}
    # A weights-only file may hold lists, numbers or strings where tensors belong: say so instead of crashing.
    not_tensors = sorted(k for k, v in sd.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(
            f"WavTokenizer checkpoint entries are not tensors: {', '.join(not_tensors[:8])}"
            + (", ..." if len(not_tensors) > 8 else "")
        )
    cfg = config if config is not None else WavTokenizerConfig.from_state_dict(sd)
    # Upstream loads the whole feature_extractor strictly; of it we use only `embed`, but a file without the
    # codebook's other buffers is not a WavTokenizer checkpoint (or is truncated), so say so.
    buffers = [f"{_codebook_key(i).rsplit('.', 1)[0]}.{name}" for i in range(cfg.num_quantizers)
               for name in ("inited", "cluster_size", "embed_avg")]  # fmt: skip
    absent = [k for k in buffers if k not in full]
    if absent:
        raise CheckpointError(f"WavTokenizer checkpoint is missing codebook buffers: {', '.join(absent)}")
    hparams = ckpt.get("hyper_parameters")
    rate = hparams.get("sample_rate", cfg.sample_rate) if isinstance(hparams, dict) else cfg.sample_rate
    if rate != cfg.sample_rate:
        raise CheckpointError(f"checkpoint sample_rate {rate} differs from the config's {cfg.sample_rate}")
    with torch.device("meta"):
        model = WavTokenizer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} != expected {tuple(s)}" for k, s in expected.items() if k in sd and sd[k].shape != s
    )
    problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong))
    if missing or unexpected or wrong:
        raise CheckpointError(
            "WavTokenizer checkpoint does not match the architecture: "
            + "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                        for what, keys in problems if keys)
        )
    sd = {k: v.to(device=map_location, dtype=torch.float32) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def check_release_structure(cfg: WavTokenizerConfig, release: WavTokenizerConfig) -> None:
    """Raise CheckpointError unless `cfg` has the release's structure: hop, n_fft, depth, codebook count and size,
    AdaLN. Widths may differ (the tiny random-weight set reduces them); everything the audio's timing and the codes'
    meaning depend on may not. Upstream builds the fixed release config and would reject such a file too."""
    fields = ("hop_length", "n_fft", "num_layers", "num_quantizers", "vq_bins", "adanorm_num_embeddings",
              "sample_rate")  # fmt: skip
    differ = [f"{f} {getattr(cfg, f)} (expected {getattr(release, f)})" for f in fields
              if getattr(cfg, f) != getattr(release, f)]  # fmt: skip
    if differ:
        raise CheckpointError(
            f"checkpoint is not a small_{release.hop_length}_24k_4096 WavTokenizer: {'; '.join(differ)}"
            + (f" (a hop-{cfg.hop_length} file: load it with small_{cfg.hop_length}_24k_4096)"
               if cfg.hop_length != release.hop_length else "")
        )  # fmt: skip


def checkpoint_dict(model: WavTokenizer, extra_state_dict: dict[str, Tensor] | None = None) -> dict:
    """Upstream's Lightning-style file: {"state_dict": ..., "hyper_parameters": {"sample_rate": ...}}, fp32 on CPU.

    Per codebook it writes upstream's four EuclideanCodebook buffers (inited, cluster_size, embed, embed_avg; the
    EMA stats set as for a converged codebook: cluster_size 1, embed_avg = embed). It adds one training-only
    entry, TRAINING_ONLY_MARKER, which loading drops. The SEANet encoder/decoder are not part of this model; pass
    them (or any other dropped entries of a release file) through `extra_state_dict` to keep a full upstream file.
    """
    extra = dict(extra_state_dict or {})
    ours: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu", torch.float32).clone()
        if key.endswith("._codebook.embed"):
            prefix = key[: -len("embed")]
            ours[prefix + "inited"] = torch.ones(1)
            ours[prefix + "cluster_size"] = torch.ones(value.shape[0])
            ours[key] = value
            ours[prefix + "embed_avg"] = value.clone()
        else:
            ours[key] = value

    def part(source: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        return {k: v for k, v in source.items() if k.startswith(prefix)}

    # Upstream key order: SEANet encoder, quantizer, SEANet decoder, backbone, head, then training-only modules
    sd = part(extra, "feature_extractor.encodec.encoder.")
    sd |= part(ours, "feature_extractor.")
    sd |= part(extra, "feature_extractor.encodec.decoder.")
    sd |= part(ours, "backbone.") | part(ours, "head.")
    sd[TRAINING_ONLY_MARKER] = torch.zeros(1)
    sd |= {k: v for k, v in extra.items() if k not in sd}
    return {"state_dict": sd, "hyper_parameters": {"sample_rate": model.config.sample_rate}}
