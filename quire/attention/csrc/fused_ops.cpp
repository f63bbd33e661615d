// Fused layer ops for the Llama layer on CPU, float32 and bfloat16 (math in float32):
//  * add_rms_norm, rotary_inplace, silu_and_mul: each replaces a chain of small PyTorch ops (and
//    their temporaries and, in bf16, their dtype round trips) by one vectorised pass over the data.
//  * small_linear: y = x W^T for a few rows of x (decode with few sequences). Such a product is
//    bound by reading W once; a GEMM library tuned for large M reaches a fraction of the memory
//    bandwidth there (and bf16 less than fp32), so W is streamed once and dotted with every row
//    of x while it is in L1 (bf16: VDPBF16PS, fp32: FMA; fp32 accumulation in both).
//  * quant_linear: the same for weights kept in their GGUF block format (Q4_1, Q8_0).
// Each op has an AVX-512 path and a portable scalar path with the same semantics.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define QUIRE_AVX512 1
#else
#define QUIRE_AVX512 0
#endif

#include "vec512.h"

namespace quire_ops {

using bf16 = c10::BFloat16;

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

#if QUIRE_AVX512
using quire_vec::exp_ps;
using quire_vec::hsum16_transposed;
using quire_vec::load_f32x16;
using quire_vec::store_f32x16;

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// ---------------------------------------------------------------------------------------------
// out = rms_norm(x + residual) * weight; residual <- x + residual (rounded to T, as an unfused add
// would). Without a residual: out = rms_norm(x) * weight.
template <typename T>
void add_rms_norm_row(const T* xr, T* rr, const T* wp, T* orow, int64_t dim, float eps, float* row) {
#if QUIRE_AVX512
  __m512 ss = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = tail_mask(dim - d);
    __m512 v = load_f32x16(xr + d, m);
    if (rr != nullptr) {
      v = _mm512_add_ps(v, load_f32x16(rr + d, m));
      store_f32x16(rr + d, v, m);
      if constexpr (!std::is_same_v<T, float>) v = load_f32x16(rr + d, m);  // the rounded sum
    }
    _mm512_mask_storeu_ps(row + d, m, v);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(dim) + eps);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = tail_mask(dim - d);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + d), vinv), load_f32x16(wp + d, m));
    store_f32x16(orow + d, v, m);
  }
#else
  float sum_sq = 0.f;
  for (int64_t d = 0; d < dim; ++d) {
    float v = to_float(xr[d]);
    if (rr != nullptr) {
      const T added = static_cast<T>(v + to_float(rr[d]));
      rr[d] = added;
      v = to_float(added);
    }
    row[d] = v;
    sum_sq += v * v;
  }
  const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t d = 0; d < dim; ++d) orow[d] = static_cast<T>(row[d] * inv * to_float(wp[d]));
#endif
}

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                       at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* rp = residual.has_value() ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim + 16);
    for (int64_t r = begin; r < end; ++r) {
      add_rms_norm_row<T>(xp + r * dim, rp == nullptr ? nullptr : rp + r * dim, wp, op + r * dim, dim,
                          static_cast<float>(eps), row.data());
    }
  });
}

void add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                  at::Tensor& out, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: contiguous 2-D tensors expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == out.scalar_type(),
              "add_rms_norm: dtypes must match");
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                    residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must match x");
  }
  if (x.scalar_type() == at::kFloat) {
    add_rms_norm_impl<float>(x, residual, weight, out, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    add_rms_norm_impl<bf16>(x, residual, weight, out, eps);
  } else {
    TORCH_CHECK(false, "add_rms_norm: float32 or bfloat16 expected");
  }
}

// ---------------------------------------------------------------------------------------------
// Rotate, in place, the first num_heads heads of every row of x [T, row_width] (half-split layout):
// (x1, x2) <- (x1 cos - x2 sin, x2 cos + x1 sin), with cos/sin [T, head_dim / 2] float32.
template <typename T>
void rotary_impl(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t head_dim) {
  const int64_t rows = x.size(0), stride = x.stride(0), half = head_dim / 2;
  T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * half;
      const float* s = sp + r * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        T* head = xp + r * stride + h * head_dim;
#if QUIRE_AVX512
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 m = tail_mask(half - i);
          const __m512 x1 = load_f32x16(head + i, m), x2 = load_f32x16(head + half + i, m);
          const __m512 vc = _mm512_maskz_loadu_ps(m, c + i), vs = _mm512_maskz_loadu_ps(m, s + i);
          store_f32x16(head + i, _mm512_fmsub_ps(x1, vc, _mm512_mul_ps(x2, vs)), m);
          store_f32x16(head + half + i, _mm512_fmadd_ps(x2, vc, _mm512_mul_ps(x1, vs)), m);
        }
#else
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(head[i]), x2 = to_float(head[i + half]);
          head[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          head[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
#endif
      }
    }
  });
}

void rotary_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                    int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) >= num_heads * head_dim && head_dim % 2 == 0,
              "rotary_inplace: x [T, >= num_heads * head_dim] with contiguous rows expected");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) == head_dim / 2,
              "rotary_inplace: cos/sin float32 [T, head_dim / 2] expected");
  if (x.scalar_type() == at::kFloat) {
    rotary_impl<float>(x, cos, sin, num_heads, head_dim);
  } else if (x.scalar_type() == at::kBFloat16) {
    rotary_impl<bf16>(x, cos, sin, num_heads, head_dim);
  } else {
    TORCH_CHECK(false, "rotary_inplace: float32 or bfloat16 expected");
  }
}

// ---------------------------------------------------------------------------------------------
// out[T, I] = silu(gate_up[:, :I]) * gate_up[:, I:], rounded once.
template <typename T>
void silu_and_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * inter;
      const T* u = g + inter;
      T* o = op + r * inter;
#if QUIRE_AVX512
      const __m512 one = _mm512_set1_ps(1.f);
      for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 m = tail_mask(inter - i);
        const __m512 vg = load_f32x16(g + i, m);
        // exp(-g) overflows to inf for g < -88: silu -> -0, as it should.
        const __m512 sig = _mm512_div_ps(vg, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), vg))));
        store_f32x16(o + i, _mm512_mul_ps(sig, load_f32x16(u + i, m)), m);
      }
#else
      for (int64_t i = 0; i < inter; ++i) {
        const float vg = to_float(g[i]);
        o[i] = static_cast<T>(vg / (1.f + std::exp(-vg)) * to_float(u[i]));
      }
#endif
    }
  });
}

void silu_and_mul(const at::Tensor& gate_up, at::Tensor& out) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && out.is_contiguous() &&
                  out.size(0) == gate_up.size(0) && 2 * out.size(1) == gate_up.size(1) &&
                  out.scalar_type() == gate_up.scalar_type(),
              "silu_and_mul: gate_up [T, 2I] and out [T, I] contiguous, same dtype expected");
  if (gate_up.scalar_type() == at::kFloat) {
    silu_and_mul_impl<float>(gate_up, out);
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    silu_and_mul_impl<bf16>(gate_up, out);
  } else {
    TORCH_CHECK(false, "silu_and_mul: float32 or bfloat16 expected");
  }
}

// ---------------------------------------------------------------------------------------------
// small_linear: out[M, N] = x[M, K] W[N, K]^T for small M. Work unit: 4 rows of W against up to 4
// rows of x at a time (16 accumulators, summed with one transposed reduction); the 4 rows of W
// stay in L1 while every group of x rows passes over them, so W is read from memory once.
constexpr int kWRows = 4;
constexpr int kXRows = 4;

#if QUIRE_AVX512
// One tile of small_linear: kWRows rows of W against NX rows of x over all of K, accumulators in
// registers (compile-time bounds). bf16: VDPBF16PS on 32-element slices; fp32: FMA on 16.
template <typename T, int NX>
inline void small_tile(const T* const* xr, const T* const* wr, int64_t K, float* sums) {
  __m512 acc[kWRows * NX];
#pragma GCC unroll 16
  for (int i = 0; i < kWRows * NX; ++i) acc[i] = _mm512_setzero_ps();
  constexpr int64_t step = std::is_same_v<T, float> ? 16 : 32;
  for (int64_t k = 0; k < K; k += step) {
    const int64_t left = K - k;
    if constexpr (std::is_same_v<T, float>) {
      const __mmask16 mk = tail_mask(left);
      __m512 xv[NX];
#pragma GCC unroll 4
      for (int m = 0; m < NX; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, xr[m] + k);
#pragma GCC unroll 4
      for (int w = 0; w < kWRows; ++w) {
        const __m512 wv = _mm512_maskz_loadu_ps(mk, wr[w] + k);
#pragma GCC unroll 4
        for (int m = 0; m < NX; ++m) acc[w * NX + m] = _mm512_fmadd_ps(xv[m], wv, acc[w * NX + m]);
      }
    } else {
#if defined(__AVX512BF16__)
      const __mmask32 mk = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1ull << left) - 1);
      __m512bh xv[NX];
#pragma GCC unroll 4
      for (int m = 0; m < NX; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mk, xr[m] + k);
#pragma GCC unroll 4
      for (int w = 0; w < kWRows; ++w) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, wr[w] + k);
#pragma GCC unroll 4
        for (int m = 0; m < NX; ++m) acc[w * NX + m] = _mm512_dpbf16_ps(acc[w * NX + m], xv[m], wv);
      }
#endif
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kWRows * NX; ++i) sums[(i / NX) * kXRows + i % NX] = _mm512_reduce_add_ps(acc[i]);
}
#endif

template <typename T>
void small_linear_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out) {
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t blocks = (N + kWRows - 1) / kWRows;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kWRows;
      const T* wr[kWRows];
      for (int w = 0; w < kWRows; ++w) wr[w] = wp + std::min<int64_t>(n0 + w, N - 1) * K;  // pad: repeat last
      for (int64_t m0 = 0; m0 < rows; m0 += kXRows) {
        const int nx = static_cast<int>(std::min<int64_t>(kXRows, rows - m0));
        const T* xr[kXRows];
        for (int m = 0; m < kXRows; ++m) xr[m] = xp + (m0 + std::min(m, nx - 1)) * K;
        float sums[kWRows * kXRows];
#if QUIRE_AVX512 && defined(__AVX512BF16__)
        constexpr bool vectorised = true;
#elif QUIRE_AVX512
        constexpr bool vectorised = std::is_same_v<T, float>;
#else
        constexpr bool vectorised = false;
#endif
        if constexpr (vectorised) {
#if QUIRE_AVX512
          switch (nx) {  // sums[w * kXRows + m]
            case 1: small_tile<T, 1>(xr, wr, K, sums); break;
            case 2: small_tile<T, 2>(xr, wr, K, sums); break;
            case 3: small_tile<T, 3>(xr, wr, K, sums); break;
            default: small_tile<T, 4>(xr, wr, K, sums); break;
          }
#endif
        } else {
          for (int w = 0; w < kWRows; ++w) {
            for (int m = 0; m < nx; ++m) {
              float s = 0.f;
              for (int64_t k = 0; k < K; ++k) s += to_float(xr[m][k]) * to_float(wr[w][k]);
              sums[w * kXRows + m] = s;
            }
          }
        }
        for (int m = 0; m < nx; ++m) {
          T* orow = op + (m0 + m) * N;
          for (int w = 0; w < kWRows && n0 + w < N; ++w) orow[n0 + w] = static_cast<T>(sums[w * kXRows + m]);
        }
      }
    }
  });
}

void small_linear(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2 && x.is_contiguous() && weight.is_contiguous() &&
                  out.is_contiguous(),
              "small_linear: contiguous 2-D x, weight, out expected");
  TORCH_CHECK(x.size(1) == weight.size(1) && out.size(0) == x.size(0) && out.size(1) == weight.size(0),
              "small_linear: shapes x [M, K], weight [N, K], out [M, N] expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == out.scalar_type(),
              "small_linear: dtypes must match");
  if (x.scalar_type() == at::kFloat) {
    small_linear_impl<float>(x, weight, out);
  } else if (x.scalar_type() == at::kBFloat16) {
    small_linear_impl<bf16>(x, weight, out);
  } else {
    TORCH_CHECK(false, "small_linear: float32 or bfloat16 expected");
  }
}

// ---------------------------------------------------------------------------------------------
// quant_linear: out[M, N] = x[M, K] W^T for small M, with W kept in its GGUF block format and
// expanded in registers. The expansion is exact: Q4_1 gives d * q + m and Q8_0 gives d * q in
// float32 (d * q is exact in float32), the values the gguf package dequantizes to, so this computes
// with the same weights as the float32 copy while reading 4-6x fewer bytes.
//   Q4_1 block (20 bytes, 32 weights): fp16 d, fp16 m, 16 bytes: weight j in the low nibble of
//   byte j, weight j + 16 in the high nibble.  Q8_0 block (34 bytes): fp16 d, 32 int8.
enum QuantKind : int64_t { kQ4_1 = 0, kQ8_0 = 1 };

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// The 32 weights of one block as float32, scalar (reference and portable path).
inline void expand_block(const uint8_t* blk, int64_t kind, float* w) {
  const float d = half_to_float(blk);
  if (kind == kQ4_1) {
    const float m = half_to_float(blk + 2);
    const uint8_t* qs = blk + 4;
    for (int j = 0; j < 16; ++j) {
      w[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
      w[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
    }
  } else {
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < 32; ++j) w[j] = d * static_cast<float>(qs[j]);
  }
}

#if QUIRE_AVX512
inline float half_to_float_f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

inline void expand_block_avx512(const uint8_t* blk, int64_t kind, __m512& lo, __m512& hi) {
  const __m512 vd = _mm512_set1_ps(half_to_float_f16c(blk));
  if (kind == kQ4_1) {
    // The 16 possible values d * k + m (k = 0..15), each rounded once (fma; d * k is exact): the
    // gguf package's values. Each nibble then selects its value with one permute.
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = _mm512_fmadd_ps(vd, iota, _mm512_set1_ps(half_to_float_f16c(blk + 2)));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m512i idx = _mm512_cvtepu8_epi32(raw);  // permutexvar reads the low 4 bits only
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
  } else {
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    lo = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)))));
    hi = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)))));
  }
}
#endif

#if QUIRE_AVX512
// One tile: kWRows weight rows (pointers; padding repeats the last row) against NX rows of x.
// All loop bounds are compile-time constants so the 4 * NX accumulators stay in registers.
template <int NX>
inline void quant_tile(const float* x0, int64_t K, const uint8_t* const* wrow, int64_t block_bytes, int64_t kind,
                       float* sums) {
  __m512 acc[kWRows * NX];
#pragma GCC unroll 16
  for (int i = 0; i < kWRows * NX; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    __m512 xl[NX], xh[NX];
#pragma GCC unroll 4
    for (int m = 0; m < NX; ++m) {
      xl[m] = _mm512_loadu_ps(x0 + m * K + b * 32);
      xh[m] = _mm512_loadu_ps(x0 + m * K + b * 32 + 16);
    }
#pragma GCC unroll 4
    for (int w = 0; w < kWRows; ++w) {
      __m512 lo, hi;
      expand_block_avx512(wrow[w] + b * block_bytes, kind, lo, hi);
#pragma GCC unroll 4
      for (int m = 0; m < NX; ++m) {
        acc[w * NX + m] = _mm512_fmadd_ps(xh[m], hi, _mm512_fmadd_ps(xl[m], lo, acc[w * NX + m]));
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kWRows * NX; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
}
#endif

void quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t kind, at::Tensor& out) {
  TORCH_CHECK(kind == kQ4_1 || kind == kQ8_0, "quant_linear: kind 0 (Q4_1) or 1 (Q8_0) expected");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "quant_linear: x float32 [M, K]");
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte,
              "quant_linear: blocks uint8 [N, bytes per row]");
  const int64_t rows = x.size(0), K = x.size(1), N = blocks.size(0);
  const int64_t block_bytes = kind == kQ4_1 ? 20 : 34;
  TORCH_CHECK(K % 32 == 0 && blocks.size(1) == K / 32 * block_bytes, "quant_linear: K must be 32 * blocks per row");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == rows &&
                  out.size(1) == N,
              "quant_linear: out float32 [M, N]");
  const float* xp = x.data_ptr<float>();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = blocks.size(1), nblocks = K / 32;
  const int64_t tiles = (N + kWRows - 1) / kWRows;
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kWRows;
      const int nw = static_cast<int>(std::min<int64_t>(kWRows, N - n0));
      for (int64_t m0 = 0; m0 < rows; m0 += kXRows) {
        const int nx = static_cast<int>(std::min<int64_t>(kXRows, rows - m0));
        float sums[kWRows * kXRows] = {};
#if QUIRE_AVX512
        const uint8_t* wrow[kWRows];
        for (int w = 0; w < kWRows; ++w) wrow[w] = bp + (n0 + std::min(w, nw - 1)) * row_bytes;
        const float* x0 = xp + m0 * K;
        switch (nx) {  // sums[w * nx + m]
          case 1: quant_tile<1>(x0, K, wrow, block_bytes, kind, sums); break;
          case 2: quant_tile<2>(x0, K, wrow, block_bytes, kind, sums); break;
          case 3: quant_tile<3>(x0, K, wrow, block_bytes, kind, sums); break;
          default: quant_tile<4>(x0, K, wrow, block_bytes, kind, sums); break;
        }
        const int stride = nx;
#else
        const int stride = kXRows;
        float wv[32];
        for (int w = 0; w < nw; ++w) {
          for (int64_t b = 0; b < nblocks; ++b) {
            expand_block(bp + (n0 + w) * row_bytes + b * block_bytes, kind, wv);
            for (int m = 0; m < nx; ++m) {
              const float* xr = xp + (m0 + m) * K + b * 32;
              float s = 0.f;
              for (int j = 0; j < 32; ++j) s += xr[j] * wv[j];
              sums[w * kXRows + m] += s;
            }
          }
        }
#endif
        for (int m = 0; m < nx; ++m) {
          for (int w = 0; w < nw; ++w) op[(m0 + m) * N + n0 + w] = sums[w * stride + m];
        }
      }
    }
  });
}

// The float32 values of a block-format weight [N, K] (tests compare them with the gguf package's).
at::Tensor dequantize_blocks(const at::Tensor& blocks, int64_t kind, int64_t K) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte && K % 32 == 0,
              "dequantize_blocks: uint8 [N, bytes per row] and K % 32 == 0 expected");
  const int64_t N = blocks.size(0), block_bytes = kind == kQ4_1 ? 20 : 34;
  at::Tensor out = at::empty({N, K}, blocks.options().dtype(at::kFloat));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < K / 32; ++b) {
      expand_block(blocks.data_ptr<uint8_t>() + n * blocks.size(1) + b * block_bytes, kind,
                   out.data_ptr<float>() + n * K + b * 32);
    }
  }
  return out;
}

}  // namespace quire_ops

#ifndef QUIRE_PA_NAMESPACE
#define QUIRE_PA_NAMESPACE quire_pa
#endif

TORCH_LIBRARY_FRAGMENT(QUIRE_PA_NAMESPACE, m) {
  m.def("add_rms_norm(Tensor x, Tensor(b!)? residual, Tensor weight, Tensor(a!) out, float eps) -> ()",
        &quire_ops::add_rms_norm);
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int num_heads, int head_dim) -> ()",
        &quire_ops::rotary_inplace);
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()", &quire_ops::silu_and_mul);
  m.def("small_linear(Tensor x, Tensor weight, Tensor(a!) out) -> ()", &quire_ops::small_linear);
  m.def("quant_linear(Tensor x, Tensor blocks, int kind, Tensor(a!) out) -> ()", &quire_ops::quant_linear);
  m.def("dequantize_blocks(Tensor blocks, int kind, int K) -> Tensor", &quire_ops::dequantize_blocks);
}
