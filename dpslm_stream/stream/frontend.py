"""Streaming WavLM front-end: 16 kHz samples in, projected 20 ms frames out, each computed once and exact.

Upstream pads the waveform with 40 zeros on each side and runs the conv stack (LayerNorm per time step, so no
statistic crosses frames), then LN(512) and the 512 -> D projection. Frame t therefore depends only on original
samples [320t - 40, 320t + 360) (wavlm.md §4.2), and a stream of T samples has floor(T / 320) frames. This stage
computes each frame once its last sample has arrived and keeps only the samples later frames still need (fewer
than 400), so its output equals `model.frontend(pad(whole, 40, 40))` up to float rounding, for any chunking.

The conv blocks run here with the model's weights (conv -> fp32 LayerNorm over channels -> GELU, as
`WavLM.frontend`), so that on CPU the convolutions can use weights prepacked once for oneDNN (onednn.py); the packed
conv stack (`FrontendKernels`) is one per model, shared by the streams, and each stream keeps only samples. Frames are
computed in batches: `add` only buffers, `compute` runs the conv stack once over every frame that is ready, so a
session can wait until a hop needs frames (one call per hop instead of one per 20 ms chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models.wavlm import WavLM
from dpslm_stream.stream.onednn import PackedConv1d, PackedLinear


class FrontendKernels:
    """The conv stack + LN + projection of one WavLM with its weights prepacked once: shared by every stream of that
    model (the packed copies are ~19 MB at full size, so one per stream would cost memory and a repack per open).
    Stateless: `__call__` maps a [1, 1, S] sample window to its frames."""

    def __init__(self, model: WavLM, fast_cpu: bool = True):
        if model.cfg.extractor_mode != "layer_norm":
            raise InvalidInput(
                f"streaming needs a WavLM whose conv blocks normalise per frame (extractor_mode 'layer_norm', as "
                f"WavLM-Large); got {model.cfg.extractor_mode!r}, whose GroupNorm normalises over the whole input"
            )
        self.model = model
        self.dim = model.cfg.encoder_embed_dim
        # Per conv block: (conv, its LayerNorm over channels). Blocks are Sequential(conv, dropout, norm, GELU).
        self._blocks = [
            (PackedConv1d(b[0].weight, b[0].bias, stride=b[0].stride[0], enabled=fast_cpu), b[2][1])
            for b in model.feature_extractor.conv_layers
        ]
        proj = model.post_extract_proj
        self._proj = None if proj is None else PackedLinear.of(proj, fast_cpu)

    def __call__(self, x: Tensor) -> Tensor:
        """Samples [1, 1, S] (S = 320 (n - 1) + 400) -> projected frames [n, D]."""
        with torch.inference_mode():
            for conv, norm in self._blocks:
                x = conv(x)  # [1, C, L]
                # LayerNorm over channels at each time step, in fp32 whatever the dtype (upstream's Fp32LayerNorm).
                x = F.layer_norm(x.transpose(1, 2).float(), norm.normalized_shape, norm.weight.float(),
                                 norm.bias.float(), norm.eps).type_as(x).transpose(1, 2)  # fmt: skip
                x = F.gelu(x)
            x = self.model.layer_norm(x.transpose(1, 2))
            return (x if self._proj is None else self._proj(x))[0]


class StreamingFrontend:
    """Conv front-end + LN + projection over a stream of 16 kHz samples (push / flush / reset / state_nbytes).

    `push(samples)` returns the frames [n, D] that became complete; `flush()` ends the stream (the right edge sees
    the same 40 zeros as offline) and returns the rest, then resets. `add` + `ready_frames` + `compute` split push
    into buffering and compute. Frames come out in the model's dtype and device. Built from a model (its own
    `FrontendKernels`; `fast_cpu`: see onednn.py) or from kernels shared with other streams.
    """

    def __init__(self, model: WavLM | FrontendKernels, fast_cpu: bool = True):
        self.kernels = model if isinstance(model, FrontendKernels) else FrontendKernels(model, fast_cpu)
        wavlm = self.kernels.model
        self.hop = wavlm.samples_per_frame  # 320
        self.window = wavlm.receptive_field  # 400
        self.pad = (self.window - self.hop) // 2  # 40: upstream's zero padding on each side
        param = next(wavlm.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.reset()

    def reset(self) -> None:
        """Forget the stream; the next push starts at frame 0."""
        self.num_samples = 0  # samples received
        self.num_frames = 0  # frames emitted
        # Samples from 320 * num_frames - 40 on (the left padding first): everything a future frame still reads,
        # as the carried tail `_buf` followed by the chunks added since the last compute (joined once, when a
        # compute needs them, not copied into one buffer per chunk).
        self._buf = torch.zeros(self.pad, dtype=self.dtype, device=self.device)
        self._added: list[Tensor] = []
        self._num_buffered = self.pad

    @property
    def state_nbytes(self) -> int:
        """The carried samples: fewer than 400 plus what was added since the last compute."""
        return self._num_buffered * self._buf.element_size()

    @property
    def ready_frames(self) -> int:
        """Frames whose whole 400-sample window has arrived but that are not computed yet."""
        n = self._num_buffered
        return (n - self.window) // self.hop + 1 if n >= self.window else 0

    def add(self, samples: Tensor) -> None:
        """Buffer 16 kHz samples [n] (no compute)."""
        if samples.ndim != 1:
            raise InvalidInput(f"samples must be 1-D (mono, 16 kHz), got shape {tuple(samples.shape)}")
        if samples.numel():
            self.num_samples += samples.numel()
            self._num_buffered += samples.numel()
            # A copy of the chunk (the caller may reuse its buffer before the compute that reads it).
            self._added.append(samples.to(device=self.device, dtype=self.dtype, copy=True))

    def push(self, samples: Tensor) -> Tensor:
        """Add samples; return the frames [m, D] that are now complete."""
        self.add(samples)
        return self.compute()

    def flush(self) -> Tensor:
        """End of stream: return the remaining floor(T / 320) - emitted frames, then reset."""
        self._added.append(self._buf.new_zeros(self.pad))
        self._num_buffered += self.pad
        out = self._compute(self.num_samples // self.hop - self.num_frames)
        self.reset()
        return out

    def compute(self) -> Tensor:
        """Frames [ready_frames, D] of everything ready, in one pass of the conv stack."""
        return self._compute(self.ready_frames)

    def _compute(self, count: int) -> Tensor:
        """Run the front-end on the next `count` frames and drop the samples no later frame reads."""
        if count <= 0:
            return torch.zeros(0, self.kernels.dim, dtype=self.dtype, device=self.device)
        if self._added:
            self._buf, self._added = torch.cat([self._buf, *self._added]), []
        frames = self.kernels(self._buf[None, None, : (count - 1) * self.hop + self.window])
        # clone(): keep only the small tail alive, not the whole pushed buffer.
        self._buf = self._buf[count * self.hop :].clone()
        self._num_buffered = self._buf.numel()
        self.num_frames += count
        return frames
