"""The int8 decode kernel (models/int8_gemv.py, int8_gemv.cpp) against its obviously-correct reference: `int8row`'s
arithmetic in plain torch (per-row int8 activations, `torch._int_mm`, the same float scaling), bit for bit, at shapes
that exercise the packing's padding, every row count a decode step uses, non-contiguous inputs and non-finite rows.
Skipped where the CPU lacks AVX512-VNNI or the kernel does not build (no C++ compiler)."""

import shutil

import pytest
import torch

from dpslm_stream.models import int8_gemv
from dpslm_stream.models import precision as PR

CAN_BUILD = int8_gemv.CPU_FLAGS <= PR.cpu_flags() and bool(shutil.which("c++") or shutil.which("g++")) and bool(
    shutil.which("ninja"))  # fmt: skip
needs_kernel = pytest.mark.skipif(not PR.has_int8_gemv_kernel("cpu"), reason="no AVX512-VNNI or no C++ compiler here")


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX512-VNNI CPU, or no C++ compiler and ninja")
def test_the_kernel_builds_where_it_can():
    """On a VNNI machine with a compiler the kernel must build: a broken source would otherwise only show as every
    test below skipping and the fast plans quietly falling back to fbgemm."""
    assert int8_gemv.load() and PR.plan_for("ellav", "fast", "cpu").decode == "int8gemv"


def quantized(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return PR._per_channel_int8(torch.randn(out, inp, generator=g) * 0.05)


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FastLinear's int8row: rows rounded to int8 with their own scale, int32 sums, float32 scaling."""
    row_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    xq = torch.round(x / row_scale).to(torch.int8)
    acc = xq.int() @ q.int().t()  # exact int32 sums (torch._int_mm needs more than 16 rows on some builds)
    return acc.float() * row_scale * scale


def run(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_gemv.matmul(x, int8_gemv.pack(q), scale, q.sum(dim=1, dtype=torch.int32))


@needs_kernel
@pytest.mark.parametrize("out,inp", [(48, 1024), (37, 100), (1, 5), (130, 200), (16, 64), (17, 65), (3072, 1024)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11, 16, 17])
def test_equals_the_int8row_reference_bit_for_bit(out, inp, rows):
    q, scale = quantized(out, inp, seed=out * 1000 + inp)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)) * torch.logspace(-3, 3, rows)[:, None]
    assert torch.equal(run(x, q, scale), reference(x, q, scale))


@needs_kernel
def test_the_reference_is_torch_int_mm():
    """The reference's int32 sums are torch._int_mm's (int8row's kernel), where torch runs it."""
    q, scale = quantized(64, 128, seed=1)
    x = torch.randn(32, 128)
    row_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    xq = torch.round(x / row_scale).to(torch.int8)
    assert torch.equal(torch._int_mm(xq, q.t()).float() * row_scale * scale, reference(x, q, scale))


@needs_kernel
def test_extreme_weights_and_activations_do_not_overflow():
    """Every weight at +-127 and activations at the row maximum: the largest int32 sums the kernel meets (and the
    uint8 offset's correction) stay exact."""
    q = torch.full((20, 4096), 127, dtype=torch.int8)
    q[1::2] = -127
    scale = torch.ones(20)
    x = torch.full((3, 4096), -2.5)
    x[1] = 7.0
    x[2, ::2] = 1.0
    assert torch.equal(run(x, q, scale), reference(x, q, scale))


@needs_kernel
def test_ties_round_half_to_even_as_torch_round():
    """A row whose maximum is 127 has scale 1, so x.5 values are exact ties: torch.round sends them to the even
    neighbour (2.5 -> 2, -3.5 -> -4), and so must the kernel."""
    q, scale = quantized(24, 64, seed=7)
    x = torch.tensor([127.0] + [2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 9)[None, :64]
    assert torch.equal(run(x, q, scale), reference(x, q, scale))
    assert not torch.equal(run(x, q, scale), reference(x + 1e-3 * torch.sign(x), q, scale))  # the ties matter


@needs_kernel
def test_non_contiguous_input_and_zero_rows():
    q, scale = quantized(40, 96, seed=2)
    x = torch.randn(96, 6).t()  # a transposed view
    assert not x.is_contiguous()
    assert torch.equal(run(x, q, scale), reference(x.contiguous(), q, scale))
    assert torch.equal(run(torch.zeros(2, 96), q, scale), torch.zeros(2, 40))
    assert run(torch.zeros(0, 96), q, scale).shape == (0, 40)


@needs_kernel
def test_a_non_finite_row_comes_out_nan_and_leaves_the_others():
    q, scale = quantized(33, 70, seed=3)
    x = torch.randn(4, 70)
    x[1, 5], x[3, 0] = float("nan"), float("inf")
    got = run(x, q, scale)
    assert torch.isnan(got[1]).all() and torch.isnan(got[3]).all()
    assert torch.equal(got[[0, 2]], reference(x[[0, 2]], q, scale))


@needs_kernel
def test_mismatched_shapes_raise_instead_of_reading_out_of_bounds():
    q, scale = quantized(40, 96, seed=4)
    packed, sums = int8_gemv.pack(q), q.sum(dim=1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int8_gemv"):
        int8_gemv.matmul(torch.randn(1, 200), packed, scale, sums)  # more columns than the packed weights
    with pytest.raises(RuntimeError, match="int8_gemv"):
        int8_gemv.matmul(torch.randn(1, 96), packed, torch.ones(80), torch.zeros(80, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int8_gemv"):
        int8_gemv.matmul(torch.randn(1, 96, dtype=torch.float64), packed, scale, sums)
    with pytest.raises(RuntimeError, match="int8_gemv"):
        int8_gemv.matmul(torch.randn(1, 96), q, scale, sums)  # not packed


@needs_kernel
def test_two_threads_give_the_same_result():
    q, scale = quantized(3072, 1024, seed=5)
    x = torch.randn(3, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, q, scale)
        torch.set_num_threads(2)
        two = run(x, q, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, reference(x, q, scale))


@needs_kernel
def test_torch_compile_calls_the_op_as_it_is():
    """Inside a compiled function the op keeps its result (its fake version gives the compiler the output shape)."""
    q, scale = quantized(40, 96, seed=6)
    packed, sums = int8_gemv.pack(q), q.sum(dim=1, dtype=torch.int32)

    def f(x):
        return int8_gemv.matmul(torch.relu(x), packed, scale, sums) + 1

    x = torch.randn(3, 96)
    compiled = torch.compile(f, dynamic=True)
    assert torch.equal(compiled(x), reference(torch.relu(x), q, scale) + 1)


@needs_kernel
def test_a_layer_asking_for_the_kernel_loads_it_or_says_why(monkeypatch):
    """FastLinear with decode "int8gemv" built without plan_for (which loads the kernel) still finds the op; on a
    machine without the kernel it refuses with a clear error instead of failing at its first call."""
    assert PR.FastLinear([torch.nn.Linear(8, 4)], "int8gemv", "fp32")(torch.ones(1, 8)).shape == (1, 4)
    monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(PR.InvalidInput, match="AVX512-VNNI"):
        PR.FastLinear([torch.nn.Linear(8, 4)], "int8gemv", "fp32")


def test_a_failed_build_falls_back_with_a_warning(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'dpslm_int8_gemv'")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert int8_gemv.load.__wrapped__() is False
