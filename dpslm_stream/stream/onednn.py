"""Linear layers and 1-D convolutions with weights prepacked once for oneDNN, for the streaming encoder's small
per-hop products on CPU.

A hop multiplies 10-100 frames by WavLM's weights. For products that small, torch's default CPU paths are far from
the machine's speed: MKL's sgemm (measured 40-70 GFLOP/s on one core of this project's AMD CPU for 15-row inputs)
and oneDNN convolutions that reorder their weights on every call (pos_conv: ~30 ms per hop). oneDNN with the weight
reordered once into its blocked layout measured 2-3x faster for the linears and 8x for pos_conv, and agrees to float
rounding. These are the kernels torch's own inductor uses after freezing (`torch.ops.mkldnn.*`); they exist only
for CPU tensors, so everywhere else (CUDA, half precision, a torch build without them) the wrappers are plain
`F.linear` / `F.conv1d` on the original weights: the same arithmetic, one code path for the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpslm_stream.models.wavlm import grouped_conv_dtype


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the prepacked oneDNN kernels apply: CPU, float32, oneDNN built in."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear:
    """y = x W^T + b for x [..., in]; W [out, in] prepacked for oneDNN when `enabled`, else F.linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None, enabled: bool = True):
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.packed = None
        if enabled and onednn_usable(self.weight.device, self.weight.dtype):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            except (AttributeError, RuntimeError):  # an op this torch build lacks: keep F.linear
                self.packed = None

    @classmethod
    def of(cls, module: torch.nn.Linear, enabled: bool = True) -> "PackedLinear":
        return cls(module.weight, module.bias, enabled)

    @property
    def extra_nbytes(self) -> int:
        """Memory of the packed copy (the original weight stays with the model)."""
        return 0 if self.packed is None else self.weight.numel() * self.weight.element_size()

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


class PackedConv1d:
    """conv1d without padding, x [N, C_in, L] -> [N, C_out, (L - K) // stride + 1]. oneDNN prepacks only 2-D
    kernels, so when `enabled` it runs as a 1 x K conv2d on a height-1 input; otherwise F.conv1d."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: int = 1, groups: int = 1, enabled: bool = True):
        # A half-precision grouped conv on CPU computes in fp32 (wavlm.grouped_conv_dtype: a wrong oneDNN kernel).
        dtype = grouped_conv_dtype(weight.device, weight.dtype, groups)
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.stride, self.groups = stride, groups
        self.packed = None
        if enabled and onednn_usable(self.weight.device, self.weight.dtype):
            try:
                self.packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight[:, :, None, :].contiguous(), [0, 0], [1, stride], [1, 1], groups, None
                )
            except (AttributeError, RuntimeError):
                self.packed = None

    @property
    def extra_nbytes(self) -> int:
        return 0 if self.packed is None else self.weight.numel() * self.weight.element_size()

    def __call__(self, x: Tensor) -> Tensor:
        """The result has x's dtype. On the oneDNN path the convolution reads and writes channels-last memory: an
        input that is a transposed [N, L, C] tensor (the streaming encoder's frames) is read where it is, and the
        result [N, C_out, L_out] is a transposed [N, L_out, C_out] tensor, so a LayerNorm over its channels needs no
        copy either (the front-end's conv blocks spent a quarter of their time in those two copies). It was bit-equal
        to the channels-first call on the CPUs measured; tests/test_stream_encoder.py checks it against F.conv1d."""
        x_dtype, x = x.dtype, x.to(self.weight.dtype)
        if self.packed is None:
            return F.conv1d(x, self.weight, self.bias, stride=self.stride, groups=self.groups).to(x_dtype)
        out = torch.ops.mkldnn._convolution_pointwise(
            x[:, :, None, :].contiguous(memory_format=torch.channels_last), self.packed, self.bias, [0, 0],
            [1, self.stride], [1, 1], self.groups, "none", [], "",
        )  # fmt: skip
        return out[:, :, 0, :].to(x_dtype)
