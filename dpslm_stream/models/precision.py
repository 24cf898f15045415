"""Numeric precision of the model paths: `exact` (the fp32 upstream numbers) or `fast` (what runs faster here).

`exact` changes nothing: weights and activations in float32, bit for bit what the parity tests check. `fast` picks,
per model and per machine, the kernels that measured faster (README "Precision"; `dpslm-stream bench ellav
--precision exact,fast` re-measures them):

- transformers (ELLA-V, ULM), matmuls of few rows (batched decode steps, <= DECODE_ROWS rows): int8 weights with
  one scale per output channel. Batch-1 decode reads every weight once per token, so it is bound by weight bytes
  over memory bandwidth: int8 reads a quarter of fp32's bytes. On AVX512-VNNI CPUs this project's kernel
  (int8_gemv.py, "int8gemv": activations rounded to int8 per row) gets there: ELLA-V's 48 block matmuls of a batch-1
  step in 0.25x of fp32's time, where torch's int8 kernels took 0.32-0.37x. Elsewhere, where torch has fbgemm
  (x86 CPUs), the activations are quantized to int8 per call and the products summed in int32
  (`quantized::linear_dynamic`, "int8dyn"): on an AVX-512 Xeon without AMX it ran ELLA-V's 48 block matmuls of a
  batch-1 step in 22 ms, against 40 ms for the weight-only kernel `aten._weight_int8pack_mm` (bf16 activations,
  "int8", kept where fbgemm is missing) and 70 ms in fp32, and stayed the fastest up to 64 rows. On a GPU: bfloat16
  weights.
- matmuls of many rows (prompt prefill, vocoder windows): bfloat16 where the hardware has bf16 matmul units (AMX or
  AVX512-BF16 CPUs, GPUs); else fbgemm's int8 ("int8dyn"): for the transformers (3x faster than fp32 at 64 rows
  on the Xeon above; no float copy of the weights is kept) and the vocoder's ConvNeXt MLPs (pwconv1/pwconv2, 0.6x
  fp32's time for a whole live window there; its convolutions and attention stay float32). A transformer whose
  decode and prefill kernels differ keeps both weight copies (ELLA-V at released size: 0.21 GB int8 + 0.42 GB
  bf16).
- with `compile_decode` (plan_for; `serve --compile-decode`, ResynthWorker, `bench ellav`/`bench resynth`): the
  transformer's few-row forwards run through
  torch.compile. The int8gemv kernel is an op the compiler calls as it is; without it, the int8 matmuls take
  activations quantized per row through `torch._int_mm` ("int8row"), which the compiler fuses with the norms, RoPE
  and residuals around them (fbgemm's packed weights are opaque to it). ELLA-V's batch-1 step on the Xeon above:
  0.30x exact compiled, 0.33x eager (with int8row and fbgemm: 0.37-0.40x and 0.38-0.50x).
  int4 weights were measured too and are not offered: torch 2.13's x86 int4 kernels (`_weight_int4pack_mm_for_cpu`,
  `_dyn_quant_matmul_4bit`) took 15-40x longer than fbgemm int8 per GEMV there.
- what stays float32 whatever the plan: the residual stream, RMSNorms, RoPE, attention (softmax and KV cache), the
  output projection and logits, the vocoder's FFTs and every normalisation.

Fused projections: in a fast model q/k/v are one [3 H D, dim] matmul and the SwiGLU's w1/w3 one [2 hidden, dim]
matmul, built from the upstream keys after strict loading (per-output-channel scales make the fusion exact for the
int8 weights). A fast model is for inference: its state dict no longer has the upstream keys (save the exact one).

The kernels are torch's own; the module around them is hand-written because no kept library converts these fused
modules on CPU without a dependency stack (torchao's CPU path calls the same aten kernels).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models import int8_gemv

PRECISIONS = ("exact", "fast")
# Rows up to which the int8 weight-only kernel beats fp32 GEMM (measured on AMD AVX-512 and Intel AMX CPUs: ~2.6x at
# 1 row, ~1.3x at 16; at 64 rows it is 2-3x slower).
DECODE_ROWS = 16


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def machine_summary(device: torch.device | str = "cpu") -> str:
    """One line saying what a fast plan depends on: the device and the CPU's bf16/AMX flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    flags = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx2")
             if f in cpu_flags()]  # fmt: skip
    return f"cpu, flags: {' '.join(flags) or 'none of amx/avx512/avx2'}"


def has_bf16_units(device: torch.device | str) -> bool:
    """bf16 matmuls run faster than fp32 ones: a GPU, or a CPU with AMX-BF16 or AVX512-BF16."""
    device = torch.device(device)
    return device.type == "cuda" or bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def has_int8_weight_kernel(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.cache
def _fbgemm_dynamic_linear() -> bool:
    """torch's fbgemm int8 linear with dynamically quantized activations (`quantized::linear_dynamic`) runs here."""
    try:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return False
        packed = _fbgemm_pack(torch.ones(8, 8, dtype=torch.int8), torch.ones(8), None)
        return torch.ops.quantized.linear_dynamic(torch.ones(1, 8), packed, False).shape == (1, 8)
    except (RuntimeError, AttributeError):
        return False


def has_int8_gemv_kernel(device: torch.device | str) -> bool:
    """The int8 decode kernel built here (int8_gemv.py; AVX512-VNNI CPUs with a C++ compiler)."""
    return torch.device(device).type == "cpu" and int8_gemv.available(cpu_flags())


def has_int8_dynamic_kernel(device: torch.device | str) -> bool:
    """int8 x int8 matmuls with dynamically quantized activations (fbgemm; x86 CPUs)."""
    return torch.device(device).type == "cpu" and _fbgemm_dynamic_linear()


@dataclass(frozen=True)
class Plan:
    """What a model runs its matmuls in: `decode` for few-row matmuls, `bulk` for many-row ones."""

    precision: str  # "exact" or "fast"
    model: str  # "ellav", "ulm" or "wavtokenizer"
    decode: str  # "fp32", "bf16", "int8" (weight-only, per output channel), "int8dyn" (int8 activations too, fbgemm),
    # "int8row" (int8 activations with one scale per row, torch._int_mm: for a compiled decode step) or "int8gemv"
    # (int8row's arithmetic in the kernel of int8_gemv.py)
    bulk: str  # "fp32", "bf16" or "int8dyn"
    compiled: bool = False  # the transformer's few-row forwards (decode steps) run through torch.compile

    def describe(self) -> str:
        if self.precision == "exact":
            return f"{self.model}: exact (float32)"
        if self.model == "wavtokenizer":
            if self.bulk == "int8dyn":
                return (f"{self.model}: fast = ConvNeXt MLPs int8 (weights per channel, activations dynamic, fbgemm); "
                        "convolutions, attention, norms, FFTs float32")  # fmt: skip
            return f"{self.model}: fast = backbone {self.bulk} (FFTs and norms float32)"
        if self.model == "wavlm":
            kernel = "int8 (weights per channel, activations dynamic, fbgemm)" if self.bulk == "int8dyn" else self.bulk
            return (f"{self.model}: fast = streaming blocks' linear layers {kernel}; front-end, pos_conv, norms, "
                    "attention float32")  # fmt: skip
        names = {"int8": "int8 weight-only (bf16 activations)",
                 "int8dyn": "int8 (weights per channel, activations dynamic, fbgemm)",
                 "int8row": "int8 (weights per channel, activations per row, torch._int_mm)",
                 "int8gemv": "int8 (weights per channel, activations per row, AVX512-VNNI kernel)"}
        decode, bulk = names.get(self.decode, self.decode), names.get(self.bulk, self.bulk)
        step = "; decode step compiled (torch.compile)" if self.compiled else ""
        if decode == bulk:
            return f"{self.model}: fast = matmuls {decode}; norms, RoPE, attention, logits float32{step}"
        return (f"{self.model}: fast = decode matmuls {decode}, prefill {bulk}; norms, RoPE, attention, logits "
                f"float32{step}")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def plan_for(model: str, precision: str, device: torch.device | str = "cpu", compile_decode: bool = False) -> Plan:
    """The plan `precision` gives `model` ("ellav", "ulm", "wavtokenizer", "wavlm") on `device` (this machine's CPU
    flags). For "wavlm" it covers the streaming encoder's block linears (stream/encoder.py WindowRunner).

    compile_decode (transformers, precision "fast"): the few-row forwards (decode steps) run through torch.compile,
    which removes most of their per-op dispatch; on a CPU their int8 matmuls keep the kernel "int8gemv" (an op the
    compiler calls as it is) or else take the per-row activation kernel "int8row" (`torch._int_mm`, plain aten ops
    that the compiler fuses; fbgemm's packed weights are opaque to it). The first steps of each new shape pay the
    compilation (a minute or more at the released size)."""
    plan = _plan_for(model, precision, device)
    if not compile_decode or plan.precision == "exact" or model not in ("ellav", "ulm"):
        return plan
    decode = "int8row" if plan.decode in ("int8", "int8dyn") and hasattr(torch, "_int_mm") else plan.decode
    return Plan(plan.precision, model, decode, plan.bulk, compiled=True)


def _plan_for(model: str, precision: str, device: torch.device | str) -> Plan:
    check_precision(precision)
    if precision == "exact":
        return Plan("exact", model, "fp32", "fp32")
    bulk = "bf16" if has_bf16_units(device) else "fp32"
    if model == "wavlm" and bulk == "fp32" and has_int8_dynamic_kernel(device):
        # 15-120-row hops: fbgemm int8 3.3x (15 rows) to 2.7x (120) faster than oneDNN's prepacked fp32 here
        return Plan("fast", model, "int8dyn", "int8dyn")
    if model == "wavtokenizer":
        if bulk == "fp32" and has_int8_dynamic_kernel(device):
            # the ConvNeXt MLPs of a 56-frame window: 93 -> 58 ms for the whole decode on the Xeon above
            return Plan("fast", model, "int8dyn", "int8dyn")
        return Plan("fast", model, bulk, bulk)
    if has_int8_dynamic_kernel(device):
        # fbgemm's int8 GEMM also beat fp32 at prompt sizes (64 rows: 3x) where there are no bf16 units
        decode = "int8gemv" if has_int8_gemv_kernel(device) else "int8dyn"
        return Plan("fast", model, decode, bulk if bulk == "bf16" else "int8dyn")
    if has_int8_gemv_kernel(device):
        return Plan("fast", model, "int8gemv", bulk)
    return Plan("fast", model, "int8" if has_int8_weight_kernel(device) else bulk, bulk)


_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights with one float32 scale per output row (max |W| of the row maps to 127)."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object:
    """fbgemm's packed form of per-channel int8 weights (an opaque torch object, not a tensor)."""
    with warnings.catch_warnings():  # torch flags the quantized-tensor constructors for a future removal
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            q.cpu(), scale.double().cpu(), torch.zeros(len(scale), dtype=torch.long), 0)  # fmt: skip
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.cpu())


class FastLinear(nn.Module):
    """y = x W^T (+ b), W the row-wise concatenation of one or more nn.Linear weights, stored for a fast plan.

    Up to DECODE_ROWS input rows run the `decode` kernel, more rows the `bulk` one:
    - int8dyn: W = q * s (q int8, s float32 per output row), activations quantized to 8 bits per call (one scale
      and zero point over the call's rows, as torch's dynamic quantization does), int8 x int8 products accumulated
      in int32 by fbgemm (`quantized::linear_dynamic`; AVX512-VNNI or AVX2), output float32. Fastest on x86 CPUs
      without bf16 units at every row count measured (1-64), but a row's rounding depends on the other rows of
      the call (the shared activation scale), and a NaN among finite activations comes out finite (fbgemm's
      scale ignores it; calls with no rows or no finite value run the float32 fallback).
    - int8row: W = q * s as above, activations quantized to 8 bits symmetrically with one scale per row,
      `torch._int_mm` (int8 x int8 -> int32, oneDNN), output float32: for a compiled decode step (plain aten ops the
      compiler fuses; on the Xeon above its GEMV read the weights as fast as fbgemm's). Rows are independent; a
      NaN or inf in a row makes that row's output non-finite.
    - int8gemv: int8row's arithmetic (bit for bit) in the kernel of int8_gemv.py, whose packed weights are read as
      one sequential stream per block of output channels: at one row it took 0.25x of fp32 GEMV time on the Xeon
      above (fbgemm: 0.32-0.37x). The default few-row kernel where the CPU has AVX512-VNNI and the kernel builds.
    - int8: weight-only, `aten._weight_int8pack_mm(x.bf16, q, 1)` with the output scaled in float32 (activations
      rounded to bfloat16); rows are independent. Used where fbgemm is missing.
    - bf16/fp32: a plain GEMM on W stored in that dtype. Many-row calls of an int8 plan use a copy of W in the bulk
      dtype (the weight-only int8 kernel in row chunks measured slower than fp32 GEMM at 64-256 rows on AMX
      machines); a bulk "int8dyn" keeps no copy (int8 at every row count: a quarter of fp32's memory).
    Input and output are float32 (the residual stream stays float32); a bias stays float32.
    """

    def __init__(self, linears: list[nn.Linear], decode: str, bulk: str):
        super().__init__()
        weight = torch.cat([lin.weight.detach().float() for lin in linears])
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([torch.zeros(lin.out_features, device=weight.device) if lin.bias is None
                              else lin.bias.detach().float() for lin in linears])  # fmt: skip
        self.decode, self.bulk = decode, bulk
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", bias)
        self.packed: object = None  # fbgemm's packed int8 weights and bias (decode "int8dyn")
        if decode in ("int8", "int8dyn", "int8row", "int8gemv"):
            qweight, scale = _per_channel_int8(weight)
            self.register_buffer("scale", scale)
            if decode == "int8gemv":  # the packed copy only; a bulk int8dyn unpacks fbgemm's for its float fallback
                if not has_int8_gemv_kernel(weight.device):
                    raise InvalidInput("the int8gemv kernel needs an AVX512-VNNI CPU and a C++ compiler to build it")
                self.register_buffer("packed_weight", int8_gemv.pack(qweight))
                self.register_buffer("weight_sums", qweight.sum(dim=1, dtype=torch.int32))
            else:
                self.register_buffer("qweight", qweight)
            if decode == "int8":
                self.register_buffer("_ones", torch.ones(self.out_features, dtype=torch.bfloat16,
                                                         device=weight.device))  # fmt: skip
            if bulk != "int8dyn":
                self.register_buffer("weight", weight.to(_DTYPE[bulk]))  # for many-row calls
            if "int8dyn" in (decode, bulk):
                self.packed = _fbgemm_pack(qweight, scale, bias)
                # Without VNNI fbgemm multiplies int8 pairs with int16 saturation: 7-bit activations avoid it.
                self.reduce_range = not {"avx512_vnni", "avx_vnni"} & cpu_flags()
        else:
            self.register_buffer("weight", weight.to(_DTYPE[decode]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        kernel = self.decode if x2.shape[0] <= DECODE_ROWS else self.bulk
        if kernel == "int8dyn":
            try:
                y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self.packed, self.reduce_range)
                return y.reshape(*shape[:-1], self.out_features)
            except RuntimeError:  # no rows, or a NaN/inf: fbgemm cannot pick an activation scale
                y = F.linear(x2, self._int8_weight().float() * self.scale[:, None])  # the same weights, in float32
        elif kernel == "int8gemv":
            y = int8_gemv.matmul(x2, self.packed_weight, self.scale, self.weight_sums)
        elif kernel == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self._ones)
            y = y.float() * self.scale
        elif kernel == "int8row":
            # Symmetric 8-bit activations, one scale per row (max |x| of the row maps to 127): rows are independent,
            # and every op is one the compiler fuses into its neighbours, but for the int8 x int8 -> int32 GEMM.
            row_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            xq = torch.round(x2 / row_scale).to(torch.int8)
            y = torch._int_mm(xq, self.qweight.t()).float() * row_scale * self.scale
        else:
            dtype = _DTYPE[self.bulk]
            y = F.linear(x2.to(dtype), self.weight.to(dtype)).float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _int8_weight(self) -> torch.Tensor:
        """q, the int8 weights [out, in] (an int8gemv layer keeps only its packed copy and fbgemm's)."""
        if hasattr(self, "qweight"):
            return self.qweight
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, decode={self.decode}, bulk={self.bulk}"


def apply_to_transformer(model: nn.Module, plan: Plan) -> Plan:
    """Convert a (strictly loaded, float32) Transformer's block matmuls for `plan`, in place; returns the plan.

    exact: nothing changes. fast: per block, q/k/v fused into `attention.wqkv`, w1/w3 into `feed_forward.w13`, and
    wo, w2 converted; embeddings, norms and the output projection stay float32. Records `model.precision_plan`.
    """
    if plan.precision == "exact":
        model.precision_plan = plan
        return plan
    if model.precision_plan is not None and model.precision_plan.precision != "exact":
        raise InvalidInput("this model was already converted to a fast plan; load it again for another plan")
    if model.tok_embeddings.weight.dtype != torch.float32:
        raise InvalidInput(f"precision 'fast' converts a float32 model; this one is {model.tok_embeddings.weight.dtype}")
    with torch.no_grad():
        for block in model.layers:
            attn, ffn = block.attention, block.feed_forward
            attn.wqkv = FastLinear([attn.wq, attn.wk, attn.wv], plan.decode, plan.bulk)
            attn.wo = FastLinear([attn.wo], plan.decode, plan.bulk)
            del attn.wq, attn.wk, attn.wv
            ffn.w13 = FastLinear([ffn.w1, ffn.w3], plan.decode, plan.bulk)
            ffn.w2 = FastLinear([ffn.w2], plan.decode, plan.bulk)
            del ffn.w1, ffn.w3
    model.use_fused_ops()
    if plan.compiled:
        model.compile_decode(DECODE_ROWS)
    model.precision_plan = plan
    return plan


def transformer_precision(model: nn.Module, precision: str, kind: str, compile_decode: bool = False) -> Plan:
    """plan_for(kind, precision, model's device, compile_decode) applied to a Transformer (ELLA-V or ULM)."""
    return apply_to_transformer(model, plan_for(kind, precision, model.tok_embeddings.weight.device, compile_decode))
