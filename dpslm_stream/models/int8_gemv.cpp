// int8 x int8 matmul of few rows (decode steps) for AVX512-VNNI CPUs: dpslm_stream/models/int8_gemv.py says why.
//
// y[m, n] = float(sum_k xq[m, k] * q[n, k]) * xs[m] * ws[n], where xq is row m of x rounded to int8 with its own
// scale xs[m] = max(max_k |x[m, k]|, 1e-12) / 127 (round half to even, as torch.round), q the int8 weights and ws
// their per-output-channel scales: bit for bit what the Python reference computes with torch._int_mm.
//
// The weights come packed in blocks of BLOCK output channels, [ceil(N / BLOCK)][Kp / 64][BLOCK][64] (Kp: in
// padded to a multiple of 64 with zeros), so that a block is read front to back as one sequential stream: the
// hardware prefetcher then keeps far more bytes in flight than with one short stream per output row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16;       // output channels per block (int8_gemv.py BLOCK)
constexpr int64_t PREFETCH = 4096;  // bytes ahead of the block's read position (measured best of 0-4096)

// acc[j] = sum_k xq[k] * w[j][k] for the BLOCK channels of one packed block.
inline void dot_block(const uint8_t* xq, const int8_t* w, int64_t kp, int32_t* acc) {
  __m512i a[BLOCK];
  for (int64_t j = 0; j < BLOCK; ++j) a[j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kp; k += 64, w += BLOCK * 64) {
    const __m512i xv = _mm512_loadu_si512(xq + k);
    _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int64_t j = 0; j < BLOCK; ++j) a[j] = _mm512_dpbusd_epi32(a[j], xv, _mm512_loadu_si512(w + j * 64));
  }
  for (int64_t j = 0; j < BLOCK; ++j) acc[j] = _mm512_reduce_add_epi32(a[j]);
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                     const at::Tensor& w_sum) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "int8_gemv: x must be a float32 "
              "CPU matrix [rows, in]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
              packed.size(1) % (BLOCK * 64) == 0, "int8_gemv: packed weights must come from int8_gemv.pack");
  const int64_t rows = x.size(0), in = x.size(1), out = w_scale.numel();
  const int64_t blocks = packed.size(0), kp = packed.size(1) / BLOCK;
  TORCH_CHECK(in <= kp && kp < in + 64 && (out + BLOCK - 1) / BLOCK == blocks, "int8_gemv: x has ", in,
              " columns and the scales ", out, " channels; the packed weights are for ", kp, " x ", blocks * BLOCK);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(), "int8_gemv: w_scale float32");
  TORCH_CHECK(w_sum.scalar_type() == at::kInt && w_sum.is_contiguous() && w_sum.numel() == out,
              "int8_gemv: w_sum int32 [out]");
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0 || out == 0) return y;
  const at::Tensor xc = x.contiguous();

  // Activations as uint8 = int8 + 128 (vpdpbusd multiplies unsigned by signed bytes); the 128 * sum_k q[n, k] this
  // adds is taken back out below. Padding columns hold 128, i.e. 0.
  std::vector<uint8_t> xq(rows * kp, 128);
  std::vector<float> xs(rows);
  std::vector<char> finite(rows);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = xp + m * in;
    float amax = 0.f;
    bool ok = true;
    for (int64_t k = 0; k < in; ++k) {
      const float a = std::fabs(row[k]);
      ok = ok && std::isfinite(a);
      amax = std::max(amax, a);
    }
    const float scale = std::max(amax, 1e-12f) / 127.f;
    xs[m] = scale;
    finite[m] = ok;
    if (!ok) continue;  // the row's output is NaN
    for (int64_t k = 0; k < in; ++k) {
      const float v = std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / scale)));
      xq[m * kp + k] = static_cast<uint8_t>(static_cast<int32_t>(v) + 128);
    }
  }

  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* ws = w_scale.data_ptr<float>();
  const int32_t* wsum = w_sum.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    int32_t acc[BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * BLOCK, n1 = std::min(out, n0 + BLOCK);
      for (int64_t m = 0; m < rows; ++m) {  // the block's weights stay in L1/L2 across the rows
        float* ym = yp + m * out;
        if (!finite[m]) {
          std::fill(ym + n0, ym + n1, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        dot_block(xq.data() + m * kp, wp + b * kp * BLOCK, kp, acc);
        for (int64_t n = n0; n < n1; ++n) ym[n] = static_cast<float>(acc[n - n0] - 128 * wsum[n]) * xs[m] * ws[n];
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(dpslm_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor w_scale, Tensor w_sum) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpslm_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
}
