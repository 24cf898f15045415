// int8 x int8 matmul of few rows (decode steps) for AVX512-VNNI CPUs: dpslm_stream/models/int8_gemv.py says why.
//
// y[m, n] = float(sum_k xq[m, k] * q[n, k]) * xs[m] * ws[n], where xq is row m of x rounded to int8 with its own
// scale xs[m] = max(max_k |x[m, k]|, 1e-12) / 127 (round half to even, as torch.round), q the int8 weights and ws
// their per-output-channel scales: bit for bit what the Python reference computes with torch._int_mm.
//
// The weights come packed in blocks of BLOCK = 16 output channels, [ceil(N / 16)][Kp / 4][16][4] (Kp: in padded to a
// multiple of 64 with zeros): one 64-byte vector holds 4 consecutive inputs of each of the 16 channels, the layout
// of vpdpbusd, and a block is read front to back as one sequential stream, so the hardware prefetcher keeps far more
// bytes in flight than with one short stream per output row. Each weight vector serves every row of the call (the
// rows' 4 inputs are broadcast), and each row's 16 int32 sums come out in one vector, without horizontal adds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16;       // output channels per block (int8_gemv.py BLOCK)
constexpr int64_t ROWS = 8;         // rows of the call sharing each weight vector load (accumulators in registers)
// A software prefetch this many bytes ahead, once per 1 KB read: best of 0-16384 at 1 and 2 threads; one per 64-byte
// line measured ~20 % slower (the hardware prefetcher does the rest).
constexpr int64_t PREFETCH = 8192;

// out[r] (16 channels) = sum_k xq[r][k] * w[k][channel] for R rows (xq rows kp apart) and one packed block.
template <int R>
inline void block_rows(const uint8_t* xq, int64_t kp, const int8_t* w, __m512i* out) {
  __m512i acc[R];  // local: xq is a byte pointer, which may alias `out`, so `out` would be stored at every step
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kp; k += 4, w += BLOCK * 4) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH), _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(w);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t x4;
      std::memcpy(&x4, xq + r * kp + k, 4);
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(x4), wv);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

// Row x (n values) to uint8 = round(x / s) + 128 with s = max(max|x|, 1e-12) / 127, round half to even (as
// torch.round); `finite` false (and q untouched) if the row holds a NaN or an inf.
inline void quantize_row(const float* x, int64_t n, uint8_t* q, float* scale_out, char* finite) {
  const int64_t n16 = n & ~int64_t(15);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = k < n16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + k);
    bad |= _mm512_cmp_ps_mask(_mm512_mul_ps(v, _mm512_setzero_ps()), _mm512_setzero_ps(), _CMP_UNORD_Q);  // NaN, inf
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float scale = std::max(_mm512_reduce_max_ps(vmax), 1e-12f) / 127.f;
  *scale_out = scale;
  *finite = bad == 0;
  if (bad) return;
  const __m512 vs = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = k < n16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - k)) - 1);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + k), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    const __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128));
    _mm512_mask_cvtepi32_storeu_epi8(q + k, mask, i);  // the low byte of 1..255
  }
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
  for (int64_t m = 0; m < rows; ++m) quantize_row(xp + m * in, in, xq.data() + m * kp, &xs[m], &finite[m]);

  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* ws = w_scale.data_ptr<float>();
  const int32_t* wsum = w_sum.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    __m512i acc[ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * BLOCK, width = std::min(out, n0 + BLOCK) - n0;
      const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
      const __m512i offset = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(mask, wsum + n0), _mm512_set1_epi32(128));
      const __m512 wscale = _mm512_maskz_loadu_ps(mask, ws + n0);
      const int8_t* wb = wp + b * kp * BLOCK;
      for (int64_t m0 = 0; m0 < rows; m0 += ROWS) {  // the block's weights stay in L1/L2 across the row groups
        const int64_t r = std::min(ROWS, rows - m0);
        const uint8_t* x = xq.data() + m0 * kp;
        switch (r) {
          case 1: block_rows<1>(x, kp, wb, acc); break;
          case 2: block_rows<2>(x, kp, wb, acc); break;
          case 3: block_rows<3>(x, kp, wb, acc); break;
          case 4: block_rows<4>(x, kp, wb, acc); break;
          case 5: block_rows<5>(x, kp, wb, acc); break;
          case 6: block_rows<6>(x, kp, wb, acc); break;
          case 7: block_rows<7>(x, kp, wb, acc); break;
          default: block_rows<8>(x, kp, wb, acc); break;
        }
        for (int64_t i = 0; i < r; ++i) {
          const int64_t m = m0 + i;
          // float(acc - 128 * sum q) * xs * ws, in that order: the reference's rounding
          __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], offset)),
                                                 _mm512_set1_ps(xs[m])), wscale);
          if (!finite[m]) v = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
          _mm512_mask_storeu_ps(yp + m * out + n0, mask, v);
        }
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
