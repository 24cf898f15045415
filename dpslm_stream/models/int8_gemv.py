"""An int8 matmul for few rows (transformer decode steps) on AVX512-VNNI CPUs, compiled here on first use.

Why hand-written: a batch-1 decode step reads every weight once, so it is bound by the weights' bytes over memory
bandwidth, and int8 weights should take a quarter of fp32's time. torch's int8 kernels do not get there at one row:
on a 2-core AVX-512 Xeon (no AMX), ELLA-V's 48 block matmuls took 0.32-0.37x of fp32 GEMV time with fbgemm
(`quantized::linear_dynamic`), about the same with oneDNN (`onednn::qlinear_pointwise`) and `torch._int_mm`, and
0.25x with this kernel, which is the bytes' ratio (README "Precision"; `dpslm-stream bench ellav`). The difference
is the layout: torch's kernels stream each output row's 1-4 KB of int8 weights separately, too short a stream for
the hardware prefetcher to keep enough bytes in flight; here every block of 16 output channels is packed so that it
is read front to back as one sequential stream, and up to 8 rows share each weight load. Threads: torch's OpenMP
pool (at::parallel_for over the blocks). No kept library ships such a kernel for torch on CPU (torchao's CPU path
calls the aten kernels above).

What it computes is `int8row`'s arithmetic (precision.py FastLinear): activations rounded to int8 with one scale per
row, int8 weights with one scale per output channel, int32 sums; the result is bit for bit the `torch._int_mm`
reference (tests/test_int8_gemv.py). The source is int8_gemv.cpp beside this file; torch's cpp_extension builds it
with the machine's C++ compiler (g++ and ninja) into torch's extension cache the first time a process asks for it
(about 10 s), then loads it from there. Where the CPU lacks AVX512-VNNI, or the build fails (no compiler), it is
not used, and the fast plans take torch's kernels instead (with a warning for a failed build).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("int8_gemv.cpp")
BLOCK = 16  # output channels per packed block (int8_gemv.cpp BLOCK)
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})  # what the kernel's instructions need


@functools.cache
def load() -> bool:
    """Build (first time) and load the kernel into torch.ops.dpslm_cpu; False, with a warning, if that fails."""
    from torch.utils import cpp_extension

    try:
        # -fopenmp: at::parallel_for is OpenMP in this header-only form (serial without it); the libgomp.so.1 it
        # links is resolved to the one torch already loaded, so torch.set_num_threads governs its threads too.
        cpp_extension.load(
            name="dpslm_int8_gemv", sources=[str(SOURCE)], extra_ldflags=["-fopenmp"],
            extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni"], is_python_module=False,
            verbose=False)  # fmt: skip
    except Exception as e:  # whatever stops it (no compiler or ninja, a failed build, an unwritable cache): fall back
        warnings.warn(f"the int8 decode kernel could not be built ({type(e).__name__}: {str(e)[:200]}); fast plans "
                      "use torch's int8 kernels instead", RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    torch.library.register_fake("dpslm_cpu::int8_gemv")(
        lambda x, packed, w_scale, w_sum: x.new_empty((x.shape[0], w_scale.shape[0])))  # fmt: skip
    return True


def available(flags: frozenset[str]) -> bool:
    """The CPU with these /proc/cpuinfo flags runs the kernel, and it builds and loads here."""
    return CPU_FLAGS <= flags and load()


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 weights [out, in] in the kernel's layout, [ceil(out / BLOCK), Kp / 4 * BLOCK * 4] (Kp = in rounded up to
    a multiple of 64, padding zeros): per block of BLOCK channels, groups of 4 inputs, each group's 4 bytes for every
    channel of the block in turn."""
    out, inp = q.shape
    blocks, kp = -(-out // BLOCK), -(-inp // 64) * 64
    padded = F.pad(q, (0, kp - inp, 0, blocks * BLOCK - out))
    return padded.view(blocks, BLOCK, kp // 4, 4).permute(0, 2, 1, 3).contiguous().view(blocks, kp * BLOCK)


def matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, weight_sums: torch.Tensor) -> torch.Tensor:
    """x [rows, in] float32 times the packed int8 weights (`pack`), scaled per output channel: float32 [rows, out].
    weight_sums: each output channel's sum of int8 weights (int32). A row with a NaN or inf comes out all NaN."""
    return torch.ops.dpslm_cpu.int8_gemv(x, packed, scale, weight_sums)
