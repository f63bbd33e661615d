// Fused layer ops for the Llama layer on CPU, float32 and bfloat16 (math in float32):
//  * add_rms_norm, rotary_inplace, silu_and_mul: each replaces a chain of small PyTorch ops (and
//    their temporaries and, in bf16, their dtype round trips) by one vectorised pass over the data.
//  * small_linear: y = x W^T for a few rows of x (decode with few sequences). Such a product is
//    bound by reading W once; a GEMM library tuned for large M reaches a fraction of the memory
//    bandwidth there (and bf16 less than fp32), so W is streamed once and dotted with every row
//    of x while it is in L1 (bf16: VDPBF16PS, fp32: FMA; fp32 accumulation in both).
//  * quant_linear: y = x W^T for weights kept in their GGUF block format (Q4_1, Q8_0), up to a
//    hundred-odd rows (decode batches): W is read in its 5- or 8.5-bit form.
// Each op has a hand-written AVX-512 path, a portable path on ATen's Vectorized<float> (the AVX2
// and NEON levels; see isa.h) and the scalar loop the tests treat as the reference, with the
// same semantics.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "isa.h"
#include "ops.h"

#include "vec512.h"
#include "portable_vec.h"

namespace quire_pa {
// paged_attention.cpp: attention of [T, heads, head_dim] queries over the paged cache.
void paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     double scale, const at::Tensor& out, int64_t split_min_kv, bool force_generic,
                     bool zero_uncovered);
}  // namespace quire_pa

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

#if QUIRE_VEC
namespace pv = quire_pvec;
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
#elif QUIRE_VEC
  pv::Vec ss(0.f);
  for (int64_t d = 0; d < dim; d += pv::kW) {
    const int64_t n = dim - d;
    pv::Vec v = pv::load(xr + d, n);
    if (rr != nullptr) {
      v = v + pv::load(rr + d, n);
      pv::store(rr + d, v, n);
      if constexpr (!std::is_same_v<T, float>) v = pv::load(rr + d, n);  // the rounded sum
    }
    pv::store(row + d, v, n);
    ss = at::vec::fmadd(v, v, ss);  // tail lanes are zero
  }
  const pv::Vec vinv(1.f / std::sqrt(pv::sum(ss) / static_cast<float>(dim) + eps));
  for (int64_t d = 0; d < dim; d += pv::kW) {
    const int64_t n = dim - d;
    pv::store(orow + d, pv::load(row + d, n) * vinv * pv::load(wp + d, n), n);
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

at::Tensor add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                        double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: contiguous 2-D tensors expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "add_rms_norm: dtypes must match");
  at::Tensor out = at::empty_like(x);
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
  return out;
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
#elif QUIRE_VEC
        for (int64_t i = 0; i < half; i += pv::kW) {
          const int64_t n = half - i;
          const pv::Vec x1 = pv::load(head + i, n), x2 = pv::load(head + half + i, n);
          const pv::Vec vc = pv::load(c + i, n), vs = pv::load(s + i, n);
          pv::store(head + i, at::vec::fmsub(x1, vc, x2 * vs), n);
          pv::store(head + half + i, at::vec::fmadd(x2, vc, x1 * vs), n);
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
#elif QUIRE_VEC
      const pv::Vec one(1.f), zero(0.f);
      for (int64_t i = 0; i < inter; i += pv::kW) {
        const int64_t n = inter - i;
        const pv::Vec vg = pv::load(g + i, n);
        // exp(-g) saturates near 2^127 for g < -88: silu -> -0, as it should.
        const pv::Vec sig = vg / (one + pv::exp(zero - vg));
        pv::store(o + i, sig * pv::load(u + i, n), n);
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

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_and_mul: contiguous gate_up [T, 2I] expected");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_and_mul_impl<float>(gate_up, out);
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    silu_and_mul_impl<bf16>(gate_up, out);
  } else {
    TORCH_CHECK(false, "silu_and_mul: float32 or bfloat16 expected");
  }
  return out;
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

#if QUIRE_VEC
// One K step of the portable tile: n (< kW in the tail) elements of each row, bf16 widened to
// float32 (exact) and multiplied with FMA, so both dtypes accumulate alike.
template <typename T, int NX, bool TAIL>
inline void small_step_vec(const T* const* xr, const T* const* wr, int64_t k, int64_t n, pv::Vec* acc) {
  pv::Vec xv[NX];
#pragma GCC unroll 4
  for (int m = 0; m < NX; ++m) xv[m] = TAIL ? pv::load(xr[m] + k, n) : pv::load(xr[m] + k);
#pragma GCC unroll 4
  for (int w = 0; w < kWRows; ++w) {
    const pv::Vec wv = TAIL ? pv::load(wr[w] + k, n) : pv::load(wr[w] + k);
#pragma GCC unroll 4
    for (int m = 0; m < NX; ++m) acc[w * NX + m] = at::vec::fmadd(xv[m], wv, acc[w * NX + m]);
  }
}

// x rows a pass of the portable tile takes: 4 x 4 sums, 4 x vectors and a weight vector fit in
// NEON's and AVX-512's 32 registers, not in AVX2's 16 (spilled: 2.6x slower at 4 rows, measured).
constexpr int kSmallPassRows = pv::kW == 8 ? 2 : kXRows;

// NX rows of x against kWRows rows of W over all of K; sums[w * kXRows + m].
template <typename T, int NX>
inline void small_pass_vec(const T* const* xr, const T* const* wr, int64_t K, float* sums) {
  pv::Vec acc[kWRows * NX];
#pragma GCC unroll 16
  for (int i = 0; i < kWRows * NX; ++i) acc[i] = pv::Vec(0.f);
  int64_t k = 0;
  for (; k + pv::kW <= K; k += pv::kW) small_step_vec<T, NX, false>(xr, wr, k, pv::kW, acc);
  if (k < K) small_step_vec<T, NX, true>(xr, wr, k, K - k, acc);  // zero lanes past K
#pragma GCC unroll 16
  for (int i = 0; i < kWRows * NX; ++i) sums[(i / NX) * kXRows + i % NX] = pv::sum(acc[i]);
}

// The same tile as small_tile on Vectorized<float>, in passes of at most kSmallPassRows x rows
// (the kWRows rows of W stay in L1 between passes).
template <typename T, int NX>
inline void small_tile_vec(const T* const* xr, const T* const* wr, int64_t K, float* sums) {
  if constexpr (NX <= kSmallPassRows) {
    small_pass_vec<T, NX>(xr, wr, K, sums);
  } else {
    small_pass_vec<T, kSmallPassRows>(xr, wr, K, sums);
    small_tile_vec<T, NX - kSmallPassRows>(xr + kSmallPassRows, wr, K, sums + kSmallPassRows);
  }
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
        // 2: the AVX-512 tile (bf16 needs VDPBF16PS), 1: the portable tile, 0: scalar.
#if QUIRE_AVX512 && defined(__AVX512BF16__)
        constexpr int path = 2;
#elif QUIRE_AVX512
        constexpr int path = std::is_same_v<T, float> ? 2 : 1;
#elif QUIRE_VEC
        constexpr int path = 1;
#else
        constexpr int path = 0;
#endif
        if constexpr (path == 2) {
#if QUIRE_AVX512
          switch (nx) {  // sums[w * kXRows + m]
            case 1: small_tile<T, 1>(xr, wr, K, sums); break;
            case 2: small_tile<T, 2>(xr, wr, K, sums); break;
            case 3: small_tile<T, 3>(xr, wr, K, sums); break;
            default: small_tile<T, 4>(xr, wr, K, sums); break;
          }
#endif
        } else if constexpr (path == 1) {
#if QUIRE_VEC
          switch (nx) {
            case 1: small_tile_vec<T, 1>(xr, wr, K, sums); break;
            case 2: small_tile_vec<T, 2>(xr, wr, K, sums); break;
            case 3: small_tile_vec<T, 3>(xr, wr, K, sums); break;
            default: small_tile_vec<T, 4>(xr, wr, K, sums); break;
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
// quant_linear: out[M, N] = x[M, K] W^T for decode-sized M, with W kept in its GGUF block format
// and expanded in registers (up to 8 rows) or into a small float32 panel (more rows, below). The
// expansion is exact: Q4_1 gives d * q + m and Q8_0 gives d * q in float32 (d * q is exact in
// float32), the values the gguf package dequantizes to, so this computes with the same weights as
// the float32 copy while reading 4-6x fewer bytes.
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

// Packed layout (``pack_quantized``): the rows of W in groups of 16, each group's blocks in K
// order, and inside a (group, block) the 16 rows side by side so that one vector lane is one
// output row:
//   Q4_1 (320 bytes): 16 fp16 d, 16 fp16 m, then 16 chunks of 16 bytes; byte i of chunk c is
//        byte c of row i's block: weight c in its low nibble, weight c + 16 in its high nibble.
//   Q8_0 (544 bytes): 16 fp16 d, then 32 chunks of 16 int8; byte i of chunk k is row i's weight k.
// The product is taken per block as d * sum(q * x) (Q4_1: d * sum((q - 8) x) + (m + 8 d) sum(x)): the same weights,
// summed in another order, so it agrees with the float32 product to rounding (~1e-7 relative).
// Each x element is broadcast from memory, each weight chunk widened once and used by every row
// of the x tile, so decode with up to a few dozen rows reads W once, in its 5- or 8.5-bit form.
constexpr int64_t kGroupRows = 16;
constexpr int kQuantTileRows = 8;  // x rows per register tile

constexpr int64_t packed_block_bytes(int64_t kind) { return kind == kQ4_1 ? 320 : 544; }

// Which block of a row group to request `distance` blocks ahead of block b, counted in a tile's
// reading order: past its last block the tile's next work is the same group RG groups on (the
// groups lie back to back), so the stream stays ahead across tiles instead of stalling at each
// tile's start. A request past the end of the weights is a harmless no-op.
inline int64_t prefetch_block(int64_t b, int64_t distance, int64_t nb, int64_t rg) {
  const int64_t ahead = b + distance;
  return ahead < nb ? ahead : ahead + (rg - 1) * nb;
}

#if QUIRE_AVX512
constexpr int64_t kPrefetchBlocks = 12;  // how far ahead the register-tile path requests blocks (measured)

inline void prefetch_bytes(const uint8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

inline __m512 cvt_half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// y[r][m] (16 output rows of group r, x row m) over all K for RG row groups and MT x rows.
template <int64_t KIND, int MT, int RG>
inline void quant_tile(const float* x, int64_t K, const float* sx, const uint8_t* const* groups, float* out,
                       int64_t N, int64_t n0) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  const int64_t nb = K / 32;
  __m512 y[RG][MT];
#pragma GCC unroll 8
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) y[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    {  // keep DRAM busy: the hardware prefetcher alone leaves it half idle
      const int64_t ahead = prefetch_block(b, kPrefetchBlocks, nb, RG);
#pragma GCC unroll 2
      for (int r = 0; r < RG; ++r) prefetch_bytes(groups[r] + ahead * BB, BB);
    }
    __m512 a0[RG][MT], a1[RG][MT];
#pragma GCC unroll 8
    for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) a0[r][m] = a1[r][m] = _mm512_setzero_ps();
    const float* xb = x + b * 32;
    if constexpr (KIND == kQ4_1) {
      // Nibble k -> float k - 8 by one permute (it reads the low 4 bits of each lane): centred
      // values, and no integer-to-float conversion on the busiest port.
      const __m512 centred_values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
      const __m512 eight = _mm512_set1_ps(8.f);
#pragma GCC unroll 4
      for (int c = 0; c < 16; ++c) {
#pragma GCC unroll 2
        for (int r = 0; r < RG; ++r) {
          const uint8_t* q = groups[r] + b * BB + 64 + 16 * c;
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
          const __m512 lo = _mm512_permutexvar_ps(v, centred_values);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), centred_values);
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            a0[r][m] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xb[m * K + c]), a0[r][m]);
            a1[r][m] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xb[m * K + 16 + c]), a1[r][m]);
          }
        }
      }
#pragma GCC unroll 2
      for (int r = 0; r < RG; ++r) {
        // Centred: d * sum((q - 8) x) + (m + 8 d) sum(x). Blocks have m ~ -8 d, so both terms
        // stay small and adding them loses nothing to cancellation.
        const __m512 d = cvt_half16(groups[r] + b * BB);
        const __m512 mv = _mm512_fmadd_ps(d, eight, cvt_half16(groups[r] + b * BB + 32));
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) {
          y[r][m] = _mm512_fmadd_ps(d, _mm512_add_ps(a0[r][m], a1[r][m]), y[r][m]);
          y[r][m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * nb + b]), y[r][m]);
        }
      }
    } else {
#pragma GCC unroll 4
      for (int k = 0; k < 32; k += 2) {
#pragma GCC unroll 2
        for (int r = 0; r < RG; ++r) {
          const uint8_t* q = groups[r] + b * BB + 32 + 16 * k;
          const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
          const __m512 q1 =
              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            a0[r][m] = _mm512_fmadd_ps(q0, _mm512_set1_ps(xb[m * K + k]), a0[r][m]);
            a1[r][m] = _mm512_fmadd_ps(q1, _mm512_set1_ps(xb[m * K + k + 1]), a1[r][m]);
          }
        }
      }
#pragma GCC unroll 2
      for (int r = 0; r < RG; ++r) {
        const __m512 d = cvt_half16(groups[r] + b * BB);
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) y[r][m] = _mm512_fmadd_ps(d, _mm512_add_ps(a0[r][m], a1[r][m]), y[r][m]);
      }
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < RG; ++r) {
    const int64_t first = n0 + r * kGroupRows;
    const __mmask16 mask = tail_mask(N - first);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) _mm512_mask_storeu_ps(out + m * N + first, mask, y[r][m]);
  }
}

template <int64_t KIND, int MT>
inline void quant_rows(const float* x, int64_t K, const float* sx, const uint8_t* const* groups, int ngroups,
                       float* out, int64_t N, int64_t n0) {
  if (MT <= 2 && ngroups == 2) {  // few x rows: two row groups give enough independent sums
    quant_tile<KIND, MT, 2>(x, K, sx, groups, out, N, n0);
    return;
  }
  for (int r = 0; r < ngroups; ++r) quant_tile<KIND, MT, 1>(x, K, sx, groups + r, out, N, n0 + r * kGroupRows);
}

template <int64_t KIND>
void quant_linear_avx512(const float* x, int64_t M, int64_t K, const float* sx, const uint8_t* packed, int64_t N,
                         float* out) {
  const int64_t nb = K / 32, group_bytes = nb * packed_block_bytes(KIND);
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
  const int64_t units = (ngroups + 1) / 2;  // two row groups per unit
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int ng = static_cast<int>(std::min<int64_t>(2, ngroups - 2 * u));
      const uint8_t* groups[2] = {packed + 2 * u * group_bytes, packed + (2 * u + 1) * group_bytes};
      const int64_t n0 = 2 * u * kGroupRows;
      for (int64_t m0 = 0; m0 < M; m0 += kQuantTileRows) {
        const float* xm = x + m0 * K;
        const float* sxm = sx + m0 * nb;
        float* om = out + m0 * N;
        switch (std::min<int64_t>(kQuantTileRows, M - m0)) {
          case 1: quant_rows<KIND, 1>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 2: quant_rows<KIND, 2>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 3: quant_rows<KIND, 3>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 4: quant_rows<KIND, 4>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 5: quant_rows<KIND, 5>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 6: quant_rows<KIND, 6>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 7: quant_rows<KIND, 7>(xm, K, sxm, groups, ng, om, N, n0); break;
          default: quant_rows<KIND, 8>(xm, K, sxm, groups, ng, om, N, n0); break;
        }
      }
    }
  });
}

// Beyond 8 rows the register-tile expansion above would be repeated for every 8 rows and bound
// the product. The panel path expands the weights of 32 output rows once per K chunk into an
// L1-resident float32 panel (the exact gguf values, d * q + m and d * q) and runs a plain
// register-blocked product over it for every x row: the weights are still read from memory in
// their 5- or 8.5-bit form, the expansion costs ~1/M of the multiply-adds, and with 12 rows a
// tile the loop runs at the machine's float32 FMA rate. oneDNN on the float32 weights catches up
// at ~128 rows (all 121 linears of the default model, 2 threads: 0.6-0.7x its time at 24 rows,
// 0.65-0.85x at 64).
constexpr int kPanelCols = 2 * kGroupRows;
constexpr int kPanelTileRows = 12;  // x rows per register tile: 24 accumulators
// From the row count that would need a second register tile on, the panel path is faster (measured).
constexpr int64_t kPanelMinRows = kQuantTileRows;
constexpr int64_t kPanelChunk = 192;  // K per panel chunk: 24 KB, half of L1

template <int64_t KIND>
inline void expand_group(const uint8_t* group, int64_t nb, float* panel, int col0) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * BB;
    const __m512 d = cvt_half16(blk);
    float* w = panel + b * 32 * kPanelCols + col0;
    if constexpr (KIND == kQ4_1) {
      const __m512 m = cvt_half16(blk + 32);
      // Nibble -> float by one permute of a 16-entry table (it reads the low 4 bits of each lane).
      const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma GCC unroll 4
      for (int c = 0; c < 16; ++c) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 64 + 16 * c)));
        const __m512 lo = _mm512_permutexvar_ps(v, values);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), values);
        // d * q is exact in float32, so the fused and the separate forms round the same.
        _mm512_store_ps(w + c * kPanelCols, _mm512_fmadd_ps(d, lo, m));
        _mm512_store_ps(w + (c + 16) * kPanelCols, _mm512_fmadd_ps(d, hi, m));
      }
    } else {
#pragma GCC unroll 4
      for (int k = 0; k < 32; ++k) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * k)));
        _mm512_store_ps(w + k * kPanelCols, _mm512_mul_ps(d, _mm512_cvtepi32_ps(v)));
      }
    }
  }
}

template <int MT>
inline void panel_tile(const float* x, int64_t K, int64_t k0, int64_t kc, const float* panel, float* out, int64_t N,
                       int64_t n0) {
  const __mmask16 mask0 = tail_mask(N - n0), mask1 = n0 + 16 < N ? tail_mask(N - n0 - 16) : __mmask16(0);
  __m512 y0[MT], y1[MT];
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) y0[m] = y1[m] = _mm512_setzero_ps();
  const float* xk = x + k0;
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_load_ps(panel + k * kPanelCols);
    const __m512 w1 = _mm512_load_ps(panel + k * kPanelCols + 16);
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_set1_ps(xk[m * K + k]);
      y0[m] = _mm512_fmadd_ps(xv, w0, y0[m]);
      y1[m] = _mm512_fmadd_ps(xv, w1, y1[m]);
    }
  }
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) {
    if (k0 > 0) {  // chunk sums added to the earlier chunks': shorter chains, smaller rounding error
      y0[m] = _mm512_add_ps(y0[m], _mm512_maskz_loadu_ps(mask0, out + m * N + n0));
      y1[m] = _mm512_add_ps(y1[m], _mm512_maskz_loadu_ps(mask1, out + m * N + n0 + 16));
    }
    _mm512_mask_storeu_ps(out + m * N + n0, mask0, y0[m]);
    _mm512_mask_storeu_ps(out + m * N + n0 + 16, mask1, y1[m]);
  }
}

template <int64_t KIND>
void quant_linear_panel(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, float* out) {
  const int64_t nb = K / 32, group_bytes = nb * packed_block_bytes(KIND);
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
  const int64_t units = (ngroups + 1) / 2;
  constexpr int64_t BB = packed_block_bytes(KIND);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float panel[kPanelChunk * kPanelCols];  // 24 KB
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n0 = u * kPanelCols;
      // K in chunks whose panel stays in L1; each tile adds its chunk's sums to those in `out`.
      for (int64_t k0 = 0; k0 < K; k0 += kPanelChunk) {
        const int64_t kc = std::min<int64_t>(kPanelChunk, K - k0), b0 = k0 / 32;
        // Request the next chunk's blocks now, so that reading them overlaps this chunk's products.
        const int64_t next_u = k0 + kc < K ? u : u + 1, next_b0 = k0 + kc < K ? b0 + kc / 32 : 0;
        if (next_u < end) {
          const int64_t bytes = std::min<int64_t>(kPanelChunk, K - next_b0 * 32) / 32 * BB;
          prefetch_bytes(packed + 2 * next_u * group_bytes + next_b0 * BB, bytes);
          if (2 * next_u + 1 < ngroups) prefetch_bytes(packed + (2 * next_u + 1) * group_bytes + next_b0 * BB, bytes);
        }
        expand_group<KIND>(packed + 2 * u * group_bytes + b0 * BB, kc / 32, panel, 0);
        if (2 * u + 1 < ngroups) {
          expand_group<KIND>(packed + (2 * u + 1) * group_bytes + b0 * BB, kc / 32, panel, kGroupRows);
        } else {
          for (int64_t k = 0; k < kc; ++k) _mm512_store_ps(panel + k * kPanelCols + kGroupRows, _mm512_setzero_ps());
        }
        for (int64_t m0 = 0; m0 < M; m0 += kPanelTileRows) {
          const float* xm = x + m0 * K;
          float* om = out + m0 * N;
          switch (std::min<int64_t>(kPanelTileRows, M - m0)) {
            case 1: panel_tile<1>(xm, K, k0, kc, panel, om, N, n0); break;
            case 2: panel_tile<2>(xm, K, k0, kc, panel, om, N, n0); break;
            case 3: panel_tile<3>(xm, K, k0, kc, panel, om, N, n0); break;
            case 4: panel_tile<4>(xm, K, k0, kc, panel, om, N, n0); break;
            case 5: panel_tile<5>(xm, K, k0, kc, panel, om, N, n0); break;
            case 6: panel_tile<6>(xm, K, k0, kc, panel, om, N, n0); break;
            case 7: panel_tile<7>(xm, K, k0, kc, panel, om, N, n0); break;
            case 8: panel_tile<8>(xm, K, k0, kc, panel, om, N, n0); break;
            case 9: panel_tile<9>(xm, K, k0, kc, panel, om, N, n0); break;
            case 10: panel_tile<10>(xm, K, k0, kc, panel, om, N, n0); break;
            case 11: panel_tile<11>(xm, K, k0, kc, panel, om, N, n0); break;
            default: panel_tile<12>(xm, K, k0, kc, panel, om, N, n0); break;
          }
        }
      }
    }
  });
}
#endif

#if QUIRE_VEC && !QUIRE_AVX512
// Portable quant_linear on Vectorized<float> (AVX2, NEON): the same two paths as above. A row
// group (16 output rows) is kGroupVecs vectors; pv::nibbles_to_float / int8_to_float widen the
// packed bytes.
constexpr int kGroupVecs = kGroupRows / pv::kW;
constexpr int kVecTileRows = 4;  // x rows per register tile: 4 x kGroupVecs block sums (2 and 3 measured slower)
constexpr int64_t kVecPrefetchBlocks = 12;

// y (16 output rows of each of RG groups, x rows m < MT) over all K.
template <int64_t KIND, int MT, int RG>
inline void quant_tile_vec(const float* x, int64_t K, const float* sx, const uint8_t* const* groups, float* out,
                           int64_t N, int64_t n0) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  constexpr int V = kGroupVecs;
  // Few sums in flight: split the block sums into two chains each (FMA latency, not throughput).
  constexpr bool two_chains = RG * V * MT < 8;
  const int64_t nb = K / 32;
  alignas(64) float ys[RG][V][MT][pv::kW] = {};  // running sums, touched once a block
  for (int64_t b = 0; b < nb; ++b) {
    {
      const int64_t ahead = prefetch_block(b, kVecPrefetchBlocks, nb, RG);
#pragma GCC unroll 2
      for (int r = 0; r < RG; ++r) pv::prefetch(groups[r] + ahead * BB, BB);
    }
    pv::Vec a0[RG][V][MT], a1[RG][V][MT];
#pragma GCC unroll 16
    for (int r = 0; r < RG; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v)
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) a0[r][v][m] = a1[r][v][m] = pv::Vec(0.f);
    const float* xb = x + b * 32;
    if constexpr (KIND == kQ4_1) {
#pragma GCC unroll 2
      for (int c = 0; c < 16; ++c) {
#pragma GCC unroll 2
        for (int r = 0; r < RG; ++r) {
          pv::Vec lo[V], hi[V];
          pv::nibbles_to_float(groups[r] + b * BB + 64 + 16 * c, 8.f, lo, hi);  // centred: q - 8
          // x rows outermost: two broadcasts live at a time, not 2 MT (AVX2 has 16 registers).
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            const pv::Vec xl(xb[m * K + c]), xh(xb[m * K + 16 + c]);
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) {
              a0[r][v][m] = at::vec::fmadd(lo[v], xl, a0[r][v][m]);
              auto& ah = two_chains ? a1[r][v][m] : a0[r][v][m];
              ah = at::vec::fmadd(hi[v], xh, ah);
            }
          }
        }
      }
#pragma GCC unroll 2
      for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          // Centred: d * sum((q - 8) x) + (m + 8 d) sum(x), as the AVX-512 path.
          const uint8_t* blk = groups[r] + b * BB;
          const pv::Vec d = pv::load_half(blk + 2 * v * pv::kW);
          const pv::Vec mv = at::vec::fmadd(d, pv::Vec(8.f), pv::load_half(blk + 32 + 2 * v * pv::kW));
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            const pv::Vec a = two_chains ? a0[r][v][m] + a1[r][v][m] : a0[r][v][m];
            pv::Vec y = at::vec::fmadd(d, a, pv::load(ys[r][v][m]));
            at::vec::fmadd(mv, pv::Vec(sx[m * nb + b]), y).store(ys[r][v][m]);
          }
        }
      }
    } else {
#pragma GCC unroll 2
      for (int k = 0; k < 32; k += 2) {
#pragma GCC unroll 2
        for (int r = 0; r < RG; ++r) {
          pv::Vec q0[V], q1[V];
          pv::int8_to_float(groups[r] + b * BB + 32 + 16 * k, q0);
          pv::int8_to_float(groups[r] + b * BB + 48 + 16 * k, q1);
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            const pv::Vec x0(xb[m * K + k]), x1(xb[m * K + k + 1]);
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) {
              a0[r][v][m] = at::vec::fmadd(q0[v], x0, a0[r][v][m]);
              auto& ah = two_chains ? a1[r][v][m] : a0[r][v][m];
              ah = at::vec::fmadd(q1[v], x1, ah);
            }
          }
        }
      }
#pragma GCC unroll 2
      for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          const pv::Vec d = pv::load_half(groups[r] + b * BB + 2 * v * pv::kW);
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            const pv::Vec a = two_chains ? a0[r][v][m] + a1[r][v][m] : a0[r][v][m];
            at::vec::fmadd(d, a, pv::load(ys[r][v][m])).store(ys[r][v][m]);
          }
        }
      }
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const int64_t first = n0 + r * kGroupRows + v * pv::kW;
      if (first >= N) break;
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) pv::store(out + m * N + first, pv::load(ys[r][v][m]), N - first);
    }
  }
}

template <int64_t KIND, int MT>
inline void quant_rows_vec(const float* x, int64_t K, const float* sx, const uint8_t* const* groups, int ngroups,
                           float* out, int64_t N, int64_t n0) {
  if (MT == 1 && ngroups == 2) {  // one x row: two row groups give enough independent sums
    quant_tile_vec<KIND, MT, 2>(x, K, sx, groups, out, N, n0);
    return;
  }
  for (int r = 0; r < ngroups; ++r) quant_tile_vec<KIND, MT, 1>(x, K, sx, groups + r, out, N, n0 + r * kGroupRows);
}

template <int64_t KIND>
void quant_linear_vec(const float* x, int64_t M, int64_t K, const float* sx, const uint8_t* packed, int64_t N,
                      float* out) {
  const int64_t nb = K / 32, group_bytes = nb * packed_block_bytes(KIND);
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
  const int64_t units = (ngroups + 1) / 2;  // two row groups per unit
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int ng = static_cast<int>(std::min<int64_t>(2, ngroups - 2 * u));
      const uint8_t* groups[2] = {packed + 2 * u * group_bytes, packed + (2 * u + 1) * group_bytes};
      const int64_t n0 = 2 * u * kGroupRows;
      for (int64_t m0 = 0; m0 < M; m0 += kVecTileRows) {
        const float* xm = x + m0 * K;
        const float* sxm = sx + m0 * nb;
        float* om = out + m0 * N;
        switch (std::min<int64_t>(kVecTileRows, M - m0)) {
          case 1: quant_rows_vec<KIND, 1>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 2: quant_rows_vec<KIND, 2>(xm, K, sxm, groups, ng, om, N, n0); break;
          case 3: quant_rows_vec<KIND, 3>(xm, K, sxm, groups, ng, om, N, n0); break;
          default: quant_rows_vec<KIND, 4>(xm, K, sxm, groups, ng, om, N, n0); break;
        }
      }
    }
  });
}

// The panel path on Vectorized<float>: 32 output rows of a K chunk expanded to their exact
// float32 values in an L1 panel, then register tiles of kVecPanelTileRows x rows by 2 vectors
// (6 x 2 = 12 accumulators, 2 weight vectors and a broadcast: 15 of AVX2's 16 registers).
constexpr int kVecPanelCols = 2 * kGroupRows;
constexpr int kVecPanelVecs = kVecPanelCols / pv::kW;
constexpr int kVecPanelTileRows = 6;
// From 9 rows on the panel is faster for Q4_1 (1 thread, AVX2: 0.18 vs 0.16 ms at 9 rows, 0.30 vs
// 0.26 at 16); two register tiles of 4 still win at 7-8 rows, and for Q8_0 up to ~16 (measured).
constexpr int64_t kVecPanelMinRows = 9;
constexpr int64_t kVecPanelChunk = 192;  // K per panel chunk: 24 KB

template <int64_t KIND>
inline void expand_group_vec(const uint8_t* group, int64_t nb, float* panel, int col0) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * BB;
    float* w = panel + b * 32 * kVecPanelCols + col0;
    pv::Vec d[kGroupVecs], m[kGroupVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kGroupVecs; ++v) {
      d[v] = pv::load_half(blk + 2 * v * pv::kW);
      if constexpr (KIND == kQ4_1) m[v] = pv::load_half(blk + 32 + 2 * v * pv::kW);
    }
    if constexpr (KIND == kQ4_1) {
#pragma GCC unroll 2
      for (int c = 0; c < 16; ++c) {
        pv::Vec lo[kGroupVecs], hi[kGroupVecs];
        pv::nibbles_to_float(blk + 64 + 16 * c, 0.f, lo, hi);
#pragma GCC unroll 4
        for (int v = 0; v < kGroupVecs; ++v) {
          // d * q is exact in float32, so the fused and the separate forms round the same.
          at::vec::fmadd(d[v], lo[v], m[v]).store(w + c * kVecPanelCols + v * pv::kW);
          at::vec::fmadd(d[v], hi[v], m[v]).store(w + (c + 16) * kVecPanelCols + v * pv::kW);
        }
      }
    } else {
#pragma GCC unroll 2
      for (int k = 0; k < 32; ++k) {
        pv::Vec q[kGroupVecs];
        pv::int8_to_float(blk + 32 + 16 * k, q);
#pragma GCC unroll 4
        for (int v = 0; v < kGroupVecs; ++v) (d[v] * q[v]).store(w + k * kVecPanelCols + v * pv::kW);
      }
    }
  }
}

// MT x rows against NV vectors of panel columns from col over a K chunk, added to the earlier
// chunks' sums in out.
template <int MT, int NV>
inline void panel_tile_vec(const float* x, int64_t K, int64_t k0, int64_t kc, const float* panel, int col,
                           float* out, int64_t N, int64_t n0) {
  pv::Vec y[NV][MT];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) y[v][m] = pv::Vec(0.f);
  const float* xk = x + k0;
  const float* p = panel + col;
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    pv::Vec w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = pv::load(p + k * kVecPanelCols + v * pv::kW);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const pv::Vec xv(xk[m * K + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) y[v][m] = at::vec::fmadd(xv, w[v], y[v][m]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t c = n0 + col + v * pv::kW;
    if (c >= N) break;
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      float* o = out + m * N + c;
      // Chunk sums added to the earlier chunks': shorter chains, smaller rounding error.
      pv::store(o, k0 > 0 ? y[v][m] + pv::load(o, N - c) : y[v][m], N - c);
    }
  }
}

// The tile shape for MT rows: 1 or 2 rows take 4 vectors (enough independent sums to hide the FMA
// latency), 3 to 6 rows take 2 (up to 12 sums, 2 weight vectors and a broadcast in 16 registers;
// 3 x 4 spills, measured).
template <int MT>
inline void panel_rows_vec(const float* x, int64_t K, int64_t k0, int64_t kc, const float* panel, int cols,
                           float* out, int64_t N, int64_t n0) {
  constexpr int NV = MT <= 2 ? std::min(4, kVecPanelVecs) : 2;
  for (int col = 0; col < cols * pv::kW; col += NV * pv::kW)
    panel_tile_vec<MT, NV>(x, K, k0, kc, panel, col, out, N, n0);
}

template <int64_t KIND>
void quant_linear_panel_vec(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, float* out) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  const int64_t nb = K / 32, group_bytes = nb * BB;
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
  const int64_t units = (ngroups + 1) / 2;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float panel[kVecPanelChunk * kVecPanelCols];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n0 = u * kVecPanelCols;
      for (int64_t k0 = 0; k0 < K; k0 += kVecPanelChunk) {
        const int64_t kc = std::min<int64_t>(kVecPanelChunk, K - k0), b0 = k0 / 32;
        // Request the next chunk's blocks now, so that reading them overlaps this chunk's products.
        const int64_t next_u = k0 + kc < K ? u : u + 1, next_b0 = k0 + kc < K ? b0 + kc / 32 : 0;
        if (next_u < end) {
          const int64_t bytes = std::min<int64_t>(kVecPanelChunk, K - next_b0 * 32) / 32 * BB;
          pv::prefetch(packed + 2 * next_u * group_bytes + next_b0 * BB, bytes);
          if (2 * next_u + 1 < ngroups) pv::prefetch(packed + (2 * next_u + 1) * group_bytes + next_b0 * BB, bytes);
        }
        expand_group_vec<KIND>(packed + 2 * u * group_bytes + b0 * BB, kc / 32, panel, 0);
        const bool second = 2 * u + 1 < ngroups;
        if (second) {
          expand_group_vec<KIND>(packed + (2 * u + 1) * group_bytes + b0 * BB, kc / 32, panel, kGroupRows);
        } else {  // wide tiles read the missing group's columns (never stored): zeros, not stale values
          for (int64_t k = 0; k < kc; ++k) std::fill_n(panel + k * kVecPanelCols + kGroupRows, kGroupRows, 0.f);
        }
        const int cols = second ? kVecPanelVecs : kGroupVecs;  // vectors of the panel to multiply
        // Rows in tiles of near-equal size (13 = 5 + 4 + 4, not 6 + 6 + 1): small tiles are slow.
        const int64_t ntiles = (M + kVecPanelTileRows - 1) / kVecPanelTileRows;
        for (int64_t t = 0, m0 = 0; t < ntiles; ++t) {
          const int64_t mt = M / ntiles + (t < M % ntiles ? 1 : 0);
          const float* xm = x + m0 * K;
          float* om = out + m0 * N;
          switch (mt) {
            case 1: panel_rows_vec<1>(xm, K, k0, kc, panel, cols, om, N, n0); break;
            case 2: panel_rows_vec<2>(xm, K, k0, kc, panel, cols, om, N, n0); break;
            case 3: panel_rows_vec<3>(xm, K, k0, kc, panel, cols, om, N, n0); break;
            case 4: panel_rows_vec<4>(xm, K, k0, kc, panel, cols, om, N, n0); break;
            case 5: panel_rows_vec<5>(xm, K, k0, kc, panel, cols, om, N, n0); break;
            default: panel_rows_vec<6>(xm, K, k0, kc, panel, cols, om, N, n0); break;
          }
          m0 += mt;
        }
      }
    }
  });
}
#endif

#if QUIRE_AVX512 && defined(__AVX512BF16__)
#define QUIRE_BF16_PAIRS 1
// The blocks expanded to bf16 weights (the float32 gguf values rounded to nearest even, as
// ``.to(torch.bfloat16)`` rounds them) in pairs: for the 16 output rows n of a group and K pair
// p, the weights k = 2p and 2p + 1 side by side in one 32-bit word (words 2n and 2n + 1 of a
// vector). That is the operand layout of VDPBF16PS and of AMX's B tiles, so both bf16 paths below
// (the tile unit, and the bf16 panel on CPUs without it) expand with expand_tile.

// Bytes of two chunks (k = 2p and 2p + 1, one byte a row each) interleaved, so that lane j of the
// widened vectors holds row j / 2 (first vector; second: 8 + j / 2) at k = 2p + j % 2: the floats
// of a pair vector in order, and cvtne2ps writes them as one (no word permute after it).
inline void interleave_chunks(const uint8_t* two_chunks, __m128i& rows0_7, __m128i& rows8_15) {
  const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(two_chunks));
  const __m128i o = _mm_loadu_si128(reinterpret_cast<const __m128i*>(two_chunks + 16));
  rows0_7 = _mm_unpacklo_epi8(e, o);
  rows8_15 = _mm_unpackhi_epi8(e, o);
}

// 32 float32 weights in pair order (rows 0-7, then 8-15) -> one vector (tile row) of bf16 pairs.
inline __m512i pair_row(__m512 rows0_7, __m512 rows8_15) {
  return (__m512i)_mm512_cvtne2ps_pbh(rows8_15, rows0_7);  // words 0-15 from rows0_7
}

// One (group, block) of the packed layout -> its 16 pair vectors, tile[p] for K pair p.
template <int64_t KIND>
inline void expand_tile(const uint8_t* blk, __m512i* tile) {
  // Per-row scales spread to the pair order: lane j takes row j / 2 (8 + j / 2).
  const __m512i first = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512 d = cvt_half16(blk);
  const __m512 d0 = _mm512_permutexvar_ps(first, d), d1 = _mm512_permutexvar_ps(second, d);
  if constexpr (KIND == kQ4_1) {
    // Chunks 2p and 2p + 1 give tile row p from their low nibbles (k < 16) and p + 8 from the high.
    const __m512 m = cvt_half16(blk + 32);
    const __m512 m0 = _mm512_permutexvar_ps(first, m), m1 = _mm512_permutexvar_ps(second, m);
    const __m512i low = _mm512_set1_epi32(0x0F);
#pragma GCC unroll 2
    for (int p = 0; p < 8; ++p) {
      __m128i b0, b1;
      interleave_chunks(blk + 64 + 32 * p, b0, b1);
      const __m512i v0 = _mm512_cvtepu8_epi32(b0), v1 = _mm512_cvtepu8_epi32(b1);
      // d * q is exact in float32, so the fused and the separate forms round the same.
      tile[p] = pair_row(_mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(_mm512_and_si512(v0, low)), m0),
                         _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(_mm512_and_si512(v1, low)), m1));
      tile[p + 8] = pair_row(_mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), m0),
                             _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), m1));
    }
  } else {
#pragma GCC unroll 4
    for (int p = 0; p < 16; ++p) {
      __m128i b0, b1;
      interleave_chunks(blk + 32 + 32 * p, b0, b1);
      tile[p] = pair_row(_mm512_mul_ps(d0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0))),
                         _mm512_mul_ps(d1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1))));
    }
  }
}
#else
#define QUIRE_BF16_PAIRS 0
#endif

#if QUIRE_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define QUIRE_AMX 1
// bf16 activations from 5 rows on: the blocks are expanded to the bf16 model's weights (the
// float32 gguf values rounded to nearest even, as ``.to(torch.bfloat16)`` rounds them) directly
// in the layout of AMX's B tiles and multiplied on the tile unit, accumulating in float32 over all
// of K and rounding once. oneDNN on the bf16 weights streams 2 bytes a weight and moves them at
// about half the DRAM bandwidth here, so its time is flat from 8 to 64 rows; this path reads 5
// (Q4_1) or 8.5 (Q8_0) bits a weight and expands each once per call, whatever the row count.
// A B tile is 16 rows of 64 bytes; tile row p holds, for the 16 output rows n of a group, the
// weights k = 2p and 2p + 1 side by side (word 2n and 2n + 1). One (group, block) is one tile.
constexpr int64_t kAmxMinRows = 5;  // fewer rows: the register-tile path above is faster (measured)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux grants the tile registers' state only on request, once per process; asked on first use.
inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// 16 rows x 16 float32 sums of a C tile -> bf16 out rows (rows < rows_left, columns < cols_left).
inline void store_tile_bf16(const float* sums, bf16* out, int64_t N, int64_t rows_left, int64_t cols_left) {
  if (cols_left <= 0) return;
  const __mmask16 mask = tail_mask(cols_left);
  for (int64_t r = 0; r < std::min<int64_t>(16, rows_left); ++r) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + 16 * r));
    _mm256_mask_storeu_epi16(out + r * N, mask, v);
  }
}

// Expands block b of unit u's two row groups into its two B tiles (zeros past the last group) and
// requests the same block of the unit `ahead` units on.
template <int64_t KIND>
inline void expand_unit_block(const uint8_t* packed, int64_t group_bytes, int64_t ngroups, int64_t u, int64_t b,
                              int64_t ahead, __m512i* tiles) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  const uint8_t* g0 = packed + 2 * u * group_bytes + b * BB;
  if (2 * (u + ahead) < ngroups) prefetch_bytes(g0 + 2 * ahead * group_bytes, BB);
  if (2 * (u + ahead) + 1 < ngroups) prefetch_bytes(g0 + (2 * ahead + 1) * group_bytes, BB);
  expand_tile<KIND>(g0, tiles);
  if (2 * u + 1 < ngroups) {
    expand_tile<KIND>(g0 + group_bytes, tiles + 16);
  } else {
    for (int p = 0; p < 16; ++p) tiles[16 + p] = _mm512_setzero_si512();
  }
}

// XT (1 or 2) x tiles from row m0 against a unit's two column tiles over all K blocks, C tiles
// 0, 1 (and 2, 3), then rounded into out. `between` runs once per block, between the multiplies.
template <int XT, typename F>
inline void tile_pass(const bf16* x, int64_t M, int64_t m0, int64_t K, int64_t nb, const __m512i* panel, bf16* out,
                      int64_t N, int64_t n0, float (*sums)[256], F&& between) {
  static_assert(XT == 1 || XT == 2, "one or two x tiles");
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (XT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const bf16* xa = x + m0 * K;
  for (int64_t b = 0; b < nb; ++b) {
    _tile_loadd(4, xa + 32 * b, K * 2);
    _tile_loadd(6, panel + 32 * b, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, panel + 32 * b + 16, 64);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (XT == 2) {
      _tile_loadd(5, xa + 16 * K + 32 * b, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    between();
  }
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  if constexpr (XT == 2) {
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
  }
  for (int t = 0; t < 2 * XT; ++t) {
    const int64_t row = m0 + 16 * (t / 2), col = n0 + 16 * (t % 2);
    store_tile_bf16(sums[t], out + row * N + col, N, M - row, N - col);
  }
}

// out[M, N] (bf16) = x[Mp, K] (bf16, rows padded with zeros to a multiple of 16) times the blocks.
// Units of two row groups (32 outputs) go to the threads; a unit's tiles for all of K (2 KB a
// block: 36 KB at K = 576, 96 KB at 1536) are expanded once and serve every 16 x rows. The
// expansion (vector ports) of the next unit is interleaved with this unit's tile multiplies (the
// tile unit), two panels in turn, so that each hides part of the other.
template <int64_t KIND>
void quant_linear_amx(const bf16* x, int64_t M, int64_t Mp, int64_t K, const uint8_t* packed, int64_t N, bf16* out) {
  const int64_t nb = K / 32, group_bytes = nb * packed_block_bytes(KIND);
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
  const int64_t units = (ngroups + 1) / 2;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {  // 0-3: C (16 x 16 float32); 4, 5: A (16 x rows of 32 bf16); 6, 7: B
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    std::vector<__m512i> panel_store(static_cast<size_t>(nb) * 2 * 32);
    __m512i* panels[2] = {panel_store.data(), panel_store.data() + nb * 32};
    alignas(64) float sums[4][256];
    for (int64_t b = 0; b < nb; ++b) expand_unit_block<KIND>(packed, group_bytes, ngroups, begin, b, 1, panels[0] + 32 * b);
    for (int64_t u = begin; u < end; ++u) {
      const __m512i* panel = panels[(u - begin) & 1];
      __m512i* next_panel = panels[(u - begin + 1) & 1];
      int64_t next_b = u + 1 < end ? 0 : nb;  // the next unit's blocks still to expand
      const int64_t n0 = u * kPanelCols;
      auto expand_next = [&] {
        if (next_b < nb) {
          expand_unit_block<KIND>(packed, group_bytes, ngroups, u + 1, next_b, 1, next_panel + 32 * next_b);
          ++next_b;
        }
      };
      int64_t m0 = 0;
      for (; m0 + 32 <= Mp; m0 += 32) tile_pass<2>(x, M, m0, K, nb, panel, out, N, n0, sums, expand_next);
      if (m0 < Mp) tile_pass<1>(x, M, m0, K, nb, panel, out, N, n0, sums, expand_next);
    }
    _tile_release();
  });
}
#else
#define QUIRE_AMX 0
#endif

#if QUIRE_BF16_PAIRS
// bf16 activations on a CPU with VDPBF16PS but no tile unit: the float32 panel path's scheme with
// bf16 weights. Per unit of two row groups (32 outputs) and K chunk, the blocks are expanded once
// into an L1 panel of bf16 pairs (expand_tile: per block 16 pair vectors of group 0, then 16 of
// group 1), and every x row's pair (x[2p], x[2p + 1]) is broadcast and multiplied into 2 x 16
// float32 sums with VDPBF16PS: twice the FMA path's multiplies an instruction and half its panel
// bytes, and no widening of x. Chunk sums are added in float32; the result is rounded once, so
// the product is that of the AMX path (exact products of bf16 x and weights, float32 sums).
constexpr int kBf16TileRows = 12;  // x rows per register tile: 24 accumulators, 2 weight vectors
// K per chunk at most: a panel of up to 24 KB and 9 KB of x rows, in a 32 KB L1. Fewer chunks
// write fewer float32 partial sums: 576 = 2 x 288 is 2% faster than 3 x 192 on the LM head at 256
// rows, 1 x 576 (a 36 KB panel) 7%; the MLP shapes do not care (measured).
constexpr int64_t kBf16PanelMaxChunk = 384;
constexpr int64_t kBf16PrefetchBlocks = 8;  // 4.3 (Q4_1) or 8.7 KB ahead: 4 and 16 measured no better
// From here on the bf16 panel beats the float32 register tile on the widened x (1024 x 1024 Q4_1,
// 2 threads: 26.5 against 29 us at 3 rows, 26 against 22 at 2; the LM head wins from 1 row).
constexpr int64_t kBf16PanelMinRows = 3;

inline __m512bh broadcast_pair(const bf16* p) {
  uint32_t pair;
  std::memcpy(&pair, p, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
}

// MT x rows against one chunk's panel (nbc blocks). acc: the float32 sums of the earlier chunks
// (row stride kPanelCols), read unless this is the first chunk, written unless it is the last;
// the last chunk rounds to bf16 into out.
template <int MT>
inline void bf16_panel_tile(const bf16* x, int64_t K, int64_t k0, int64_t nbc, const __m512i* panel, float* acc,
                            bf16* out, int64_t N, int64_t n0, bool first, bool last) {
  // Few rows give few independent sums, and each waits for VDPBF16PS's latency: then S sets of
  // sums take the pairs in turn (at least 12 chains), added at the end.
  constexpr int S = MT == 1 ? 8 : MT == 2 ? 4 : MT <= 5 ? 2 : 1;
  __m512 y0[S][MT], y1[S][MT];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) y0[s][m] = y1[s][m] = _mm512_setzero_ps();
  const bf16* xk = x + k0;
  for (int64_t b = 0; b < nbc; ++b) {
    const __m512i* pb = panel + 32 * b;
    const bf16* xb = xk + 32 * b;
#pragma GCC unroll 2
    for (int p = 0; p < 16; p += S) {
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(pb + p + s);
        const __m512bh w1 = (__m512bh)_mm512_load_si512(pb + 16 + p + s);
#pragma GCC unroll 12
        for (int m = 0; m < MT; ++m) {
          const __m512bh xv = broadcast_pair(xb + m * K + 2 * (p + s));
          y0[s][m] = _mm512_dpbf16_ps(y0[s][m], xv, w0);
          y1[s][m] = _mm512_dpbf16_ps(y1[s][m], xv, w1);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int s = 1; s < S; ++s)
#pragma GCC unroll 12
    for (int m = 0; m < MT; ++m) {
      y0[0][m] = _mm512_add_ps(y0[0][m], y0[s][m]);
      y1[0][m] = _mm512_add_ps(y1[0][m], y1[s][m]);
    }
  const __mmask16 mask0 = tail_mask(N - n0), mask1 = n0 + 16 < N ? tail_mask(N - n0 - 16) : __mmask16(0);
#pragma GCC unroll 12
  for (int m = 0; m < MT; ++m) {
    float* a = acc + m * kPanelCols;
    __m512 s0 = y0[0][m], s1 = y1[0][m];
    if (!first) {  // unaligned forms: the float buffer is not 64-byte aligned
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + 16));
    }
    if (last) {
      _mm256_mask_storeu_epi16(out + m * N + n0, mask0, (__m256i)_mm512_cvtneps_pbh(s0));
      _mm256_mask_storeu_epi16(out + m * N + n0 + 16, mask1, (__m256i)_mm512_cvtneps_pbh(s1));
    } else {
      _mm512_storeu_ps(a, s0);
      _mm512_storeu_ps(a + 16, s1);
    }
  }
}

// out[M, N] (bf16) = x[M, K] (bf16) times the blocks, from kBf16PanelMinRows rows on.
template <int64_t KIND>
void quant_linear_bf16_panel(const bf16* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, bf16* out) {
  constexpr int64_t BB = packed_block_bytes(KIND);
  const int64_t nb = K / 32, group_bytes = nb * BB;
  const int64_t ngroups = (N + kGroupRows - 1) / kGroupRows;
  const int64_t units = (ngroups + 1) / 2;
  // K in near-equal chunks of whole blocks (1056 = 3 x 352, not 384 + 384 + 288).
  const int64_t nchunks = (K + kBf16PanelMaxChunk - 1) / kBf16PanelMaxChunk;
  const int64_t chunk_blocks = (nb + nchunks - 1) / nchunks;
  // Rows in tiles of near-equal size (13 = 7 + 6, not 12 + 1).
  const int64_t ntiles = (M + kBf16TileRows - 1) / kBf16TileRows;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    alignas(64) __m512i panel[kBf16PanelMaxChunk];  // kBf16PanelMaxChunk / 32 blocks x 32 vectors
    std::vector<float> acc_store(nchunks > 1 ? static_cast<size_t>(M) * kPanelCols : 0);
    float* acc = acc_store.data();
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n0 = u * kPanelCols;
      const uint8_t* g0 = packed + 2 * u * group_bytes;
      const bool second = 2 * u + 1 < ngroups;
      for (int64_t b0 = 0; b0 < nb; b0 += chunk_blocks) {
        const int64_t nbc = std::min<int64_t>(chunk_blocks, nb - b0);
        for (int64_t b = 0; b < nbc; ++b) {
          // Request the block kBf16PrefetchBlocks on in this thread's (unit, block) order: a steady
          // stream of requests keeps DRAM busy (the next chunk's at once left it idle half the time).
          const int64_t ahead = (u - begin) * nb + b0 + b + kBf16PrefetchBlocks;
          const int64_t au = begin + ahead / nb, ab = ahead % nb;
          if (au < end) {
            prefetch_bytes(packed + 2 * au * group_bytes + ab * BB, BB);
            if (2 * au + 1 < ngroups) prefetch_bytes(packed + (2 * au + 1) * group_bytes + ab * BB, BB);
          }
          expand_tile<KIND>(g0 + (b0 + b) * BB, panel + 32 * b);
          if (second) {
            expand_tile<KIND>(g0 + group_bytes + (b0 + b) * BB, panel + 32 * b + 16);
          } else {  // the missing group's columns are multiplied (never stored): zeros, not stale values
            for (int p = 0; p < 16; ++p) panel[32 * b + 16 + p] = _mm512_setzero_si512();
          }
        }
        const bool first = b0 == 0, last = b0 + nbc >= nb;
        for (int64_t t = 0, m0 = 0; t < ntiles; ++t) {
          const int64_t mt = M / ntiles + (t < M % ntiles ? 1 : 0);
          const bf16* xm = x + m0 * K;
          float* am = acc + m0 * kPanelCols;
          bf16* om = out + m0 * N;
          const int64_t k0 = b0 * 32;
          switch (mt) {
            case 1: bf16_panel_tile<1>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 2: bf16_panel_tile<2>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 3: bf16_panel_tile<3>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 4: bf16_panel_tile<4>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 5: bf16_panel_tile<5>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 6: bf16_panel_tile<6>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 7: bf16_panel_tile<7>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 8: bf16_panel_tile<8>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 9: bf16_panel_tile<9>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 10: bf16_panel_tile<10>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            case 11: bf16_panel_tile<11>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
            default: bf16_panel_tile<12>(xm, K, k0, nbc, panel, am, om, N, n0, first, last); break;
          }
          m0 += mt;
        }
      }
    }
  });
}
#endif

// From how many rows on quant_linear multiplies bf16 activations by the bf16-rounded weights (the
// tile unit or the bf16 panel; fewer rows: the exact float32 weights), 0 if it never does.
int64_t quant_linear_bf16_rows() {
#if QUIRE_AMX
  if (amx_permitted()) return kAmxMinRows;
#endif
#if QUIRE_BF16_PAIRS
  return kBf16PanelMinRows;
#else
  return 0;
#endif
}

// Whether quant_linear multiplies bf16 activations on the tile unit (from kAmxMinRows rows on).
bool quant_linear_uses_amx() {
#if QUIRE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// Portable path over the same layout.
void quant_linear_scalar(const float* x, int64_t M, int64_t K, const float* sx, const uint8_t* packed, int64_t kind,
                         int64_t N, float* out) {
  const int64_t nb = K / 32, bb = packed_block_bytes(kind), group_bytes = nb * bb;
  at::parallel_for(0, (N + kGroupRows - 1) / kGroupRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t i = 0; i < kGroupRows && g * kGroupRows + i < N; ++i) {
        for (int64_t m = 0; m < M; ++m) {
          float y = 0.f;
          for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = packed + g * group_bytes + b * bb;
            const float* xb = x + m * K + b * 32;
            const float d = half_to_float(blk + 2 * i);
            float s = 0.f;
            if (kind == kQ4_1) {
              for (int c = 0; c < 16; ++c) {
                const uint8_t q = blk[64 + 16 * c + i];
                s += static_cast<float>((q & 0x0F) - 8) * xb[c] + static_cast<float>((q >> 4) - 8) * xb[16 + c];
              }
              y += d * s + (half_to_float(blk + 32 + 2 * i) + 8.f * d) * sx[m * nb + b];
            } else {
              for (int k = 0; k < 32; ++k) s += static_cast<float>(static_cast<int8_t>(blk[32 + 16 * k + i])) * xb[k];
              y += d * s;
            }
          }
          out[m * N + g * kGroupRows + i] = y;
        }
      }
    }
  });
}

// bf16 <-> float32 (round to nearest even, as Tensor.to) for activations.
template <typename S, typename D>
void convert_rows(const S* src, D* dst, int64_t n) {
#if QUIRE_VEC
  at::vec::convert(src, dst, n);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(src[i]);
#endif
}

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t kind, int64_t N) {
  TORCH_CHECK(kind == kQ4_1 || kind == kQ8_0, "quant_linear: kind 0 (Q4_1) or 1 (Q8_0) expected");
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "quant_linear: x float32 or bfloat16 [M, K]");
  const int64_t K = x_in.size(1), nb = K / 32;
  TORCH_CHECK(K % 32 == 0 && packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.size(0) == (N + kGroupRows - 1) / kGroupRows && packed.size(1) == nb &&
                  packed.size(2) == packed_block_bytes(kind),
              "quant_linear: packed uint8 [ceil(N / 16), K / 32, block bytes] expected (pack_quantized)");
#if QUIRE_AMX
  if (x_in.scalar_type() == at::kBFloat16 && x_in.size(0) >= kAmxMinRows && amx_permitted()) {
    const int64_t M = x_in.size(0), Mp = (M + 15) / 16 * 16;
    at::Tensor x = x_in.contiguous();
    if (Mp != M) {  // the tile rows past M multiply zeros
      at::Tensor padded = at::empty({Mp, K}, x.options());
      padded.narrow(0, 0, M).copy_(x);
      padded.narrow(0, M, Mp - M).zero_();
      x = padded;
    }
    at::Tensor out = at::empty({M, N}, x.options());
    const bf16* xp = x.data_ptr<bf16>();
    bf16* op = out.data_ptr<bf16>();
    if (kind == kQ4_1) {
      quant_linear_amx<kQ4_1>(xp, M, Mp, K, packed.data_ptr<uint8_t>(), N, op);
    } else {
      quant_linear_amx<kQ8_0>(xp, M, Mp, K, packed.data_ptr<uint8_t>(), N, op);
    }
    return out;
  }
#endif
#if QUIRE_BF16_PAIRS
  if (x_in.scalar_type() == at::kBFloat16 && x_in.size(0) >= kBf16PanelMinRows) {
    const at::Tensor x = x_in.contiguous();
    const int64_t M = x.size(0);
    at::Tensor out = at::empty({M, N}, x.options());
    if (kind == kQ4_1) {
      quant_linear_bf16_panel<kQ4_1>(x.data_ptr<bf16>(), M, K, packed.data_ptr<uint8_t>(), N, out.data_ptr<bf16>());
    } else {
      quant_linear_bf16_panel<kQ8_0>(x.data_ptr<bf16>(), M, K, packed.data_ptr<uint8_t>(), N, out.data_ptr<bf16>());
    }
    return out;
  }
#endif
  // bf16 activations are widened (exact); the float32 result is rounded once at the end. Here,
  // not by Tensor.to: two dispatcher round trips cost as much as a small layer's product.
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  const bool widen = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({M, N}, x.options());
  // Uninitialised (every element is written before it is read): a std::vector would zero the LM
  // head's 49152 floats a row on every decode step for nothing.
  std::unique_ptr<float[]> x_wide(widen ? new float[M * K] : nullptr), out_wide(widen ? new float[M * N] : nullptr);
  if (widen) convert_rows(x.data_ptr<bf16>(), x_wide.get(), M * K);
  const float* xp = widen ? x_wide.get() : x.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* op = widen ? out_wide.get() : out.data_ptr<float>();
#if QUIRE_AVX512
  const bool panel = M > kPanelMinRows;
#elif QUIRE_VEC
  const bool panel = M >= kVecPanelMinRows;
#else
  const bool panel = false;
#endif
  // Block sums of x: the Q4_1 offset multiplies them in the per-block paths.
  std::vector<float> sx(panel ? 0 : static_cast<size_t>(M * nb));
  for (size_t i = 0; i < sx.size(); ++i) {
    float s = 0.f;
    for (int j = 0; j < 32; ++j) s += xp[i * 32 + j];
    sx[i] = s;
  }
#if QUIRE_AVX512
  if (panel) {
    if (kind == kQ4_1) {
      quant_linear_panel<kQ4_1>(xp, M, K, wp, N, op);
    } else {
      quant_linear_panel<kQ8_0>(xp, M, K, wp, N, op);
    }
  } else if (kind == kQ4_1) {
    quant_linear_avx512<kQ4_1>(xp, M, K, sx.data(), wp, N, op);
  } else {
    quant_linear_avx512<kQ8_0>(xp, M, K, sx.data(), wp, N, op);
  }
#elif QUIRE_VEC
  if (panel) {
    if (kind == kQ4_1) {
      quant_linear_panel_vec<kQ4_1>(xp, M, K, wp, N, op);
    } else {
      quant_linear_panel_vec<kQ8_0>(xp, M, K, wp, N, op);
    }
  } else if (kind == kQ4_1) {
    quant_linear_vec<kQ4_1>(xp, M, K, sx.data(), wp, N, op);
  } else {
    quant_linear_vec<kQ8_0>(xp, M, K, sx.data(), wp, N, op);
  }
#else
  quant_linear_scalar(xp, M, K, sx.data(), wp, kind, N, op);
#endif
  if (widen) convert_rows(out_wide.get(), out.data_ptr<bf16>(), M * N);
  return out;
}

// ---------------------------------------------------------------------------------------------
// write_kv: key[t] and value[t] ([T, heads, head_dim], rows may be strided views of the fused
// qkv projection) into cache slot slot_mapping[t] of key_cache / value_cache ([slots, heads,
// head_dim] views of the paged cache). One op for both instead of two index_copy_ calls.
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.scalar_type() == key_cache.scalar_type() &&
                  value.scalar_type() == value_cache.scalar_type() && key.scalar_type() == value.scalar_type(),
              "write_kv: key and value [T, heads, head_dim] of the cache dtype expected");
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && key_cache.size(1) == key.size(1) &&
                  key_cache.size(2) == key.size(2),
              "write_kv: contiguous caches [slots, heads, head_dim] matching key expected");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && key.stride(1) == key.size(2) &&
                  value.stride(1) == value.size(2),
              "write_kv: each token's heads must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0),
              "write_kv: int64 slot_mapping of one entry per token expected");
  const int64_t T = key.size(0), slots = key_cache.size(0);
  const int64_t row_bytes = key.size(1) * key.size(2) * key.element_size();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "write_kv: slot ", slot[t], " out of range");
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const int64_t ks = key.stride(0) * key.element_size(), vs = value.stride(0) * value.element_size();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + slot[t] * row_bytes, kp + t * ks, row_bytes);
      std::memcpy(vc + slot[t] * row_bytes, vp + t * vs, row_bytes);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// attend_qkv: a layer's whole attention between its two projections, in one call. qkv holds each
// token's row of the fused projection, [q heads | k heads | v heads] x head_dim. The q and k heads
// are rotated in place (when cos/sin are given), k and v are written into the token's cache slot,
// and the queries attend through the block tables. Returns [T, q heads * head_dim].
at::Tensor attend_qkv(at::Tensor& qkv, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                      at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping,
                      const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                      int64_t num_heads, int64_t num_kv_heads, double scale, int64_t split_min_kv) {
  TORCH_CHECK(key_cache.dim() == 4, "attend_qkv: key_cache [blocks, block_size, kv heads, head_dim] expected");
  const int64_t T = qkv.size(0), D = key_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= (num_heads + 2 * num_kv_heads) * D &&
                  key_cache.size(2) == num_kv_heads,
              "attend_qkv: qkv [T, (heads + 2 kv heads) * head_dim] with contiguous rows expected");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "attend_qkv: cos and sin go together");
  if (cos.has_value()) rotary_inplace(qkv, *cos, *sin, num_heads + num_kv_heads, D);
  const int64_t row = qkv.stride(0), offset = qkv.storage_offset();
  const at::Tensor query = qkv.as_strided({T, num_heads, D}, {row, D, 1}, offset);
  const at::Tensor key = qkv.as_strided({T, num_kv_heads, D}, {row, D, 1}, offset + num_heads * D);
  const at::Tensor value = qkv.as_strided({T, num_kv_heads, D}, {row, D, 1}, offset + (num_heads + num_kv_heads) * D);
  at::Tensor key_slots = key_cache.view({-1, num_kv_heads, D}), value_slots = value_cache.view({-1, num_kv_heads, D});
  write_kv(key, value, key_slots, value_slots, slot_mapping);
  at::Tensor out = at::empty({T, num_heads, D}, qkv.options());
  quire_pa::paged_attention(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, out, split_min_kv,
                            false, true);
  return out.view({T, num_heads * D});
}

// ---------------------------------------------------------------------------------------------
// argmax_logsumexp: per row of float32 logits, the first index of the maximum (torch.argmax's
// choice) and log(sum(exp(x))). A greedy step needs exactly these two (the chosen token's
// logprob is max - logsumexp); PyTorch spends two passes on argmax and four on logsumexp, each
// single-threaded over few long rows. Here: one pass for the maximum, one for the sum (the row is
// then in L2), rows spread over the threads.
std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat &&
                  logits.size(1) > 0,
              "argmax_logsumexp: float32 [rows, vocab] logits expected");
  const int64_t rows = logits.size(0), V = logits.size(1);
  at::Tensor indices = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor lse = at::empty({rows}, logits.options());
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  float* sp = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = lp + r * V;
      float best = x[0];
      int64_t arg = 0;
      int64_t i = 0;
#if QUIRE_AVX512
      if (V >= 16) {
        __m512 vmax = _mm512_loadu_ps(x);
        __m512i varg = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i idx = varg;
        const __m512i step = _mm512_set1_epi32(16);
        for (i = 16; i + 16 <= V; i += 16) {
          idx = _mm512_add_epi32(idx, step);
          const __m512 v = _mm512_loadu_ps(x + i);
          const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strictly greater: first index wins
          vmax = _mm512_mask_mov_ps(vmax, gt, v);
          varg = _mm512_mask_mov_epi32(varg, gt, idx);
        }
        best = _mm512_reduce_max_ps(vmax);
        const __mmask16 at_best = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best), _CMP_EQ_OQ);
        arg = _mm512_mask_reduce_min_epi32(at_best, varg);
      }
#elif QUIRE_VEC
      if (V >= 2 * pv::kW && V < (int64_t{1} << 24)) {  // lane indices are exact as floats
        // Two (max, index) pairs over alternate vectors: the compare-and-blend chain is the limit.
        alignas(64) float lanes[2 * pv::kW], lane_arg[2 * pv::kW];
        for (int j = 0; j < 2 * pv::kW; ++j) lanes[j] = static_cast<float>(j);
        pv::Vec vmax0 = pv::load(x), vmax1 = pv::load(x + pv::kW);
        pv::Vec varg0 = pv::load(lanes), varg1 = pv::load(lanes + pv::kW), idx0 = varg0, idx1 = varg1;
        const pv::Vec step(static_cast<float>(2 * pv::kW));
        // Strictly greater: each lane keeps the first index of its maximum.
        auto update = [](pv::Vec& vmax, pv::Vec& varg, const pv::Vec& v, const pv::Vec& idx) {
          const pv::Vec gt = v > vmax;
          vmax = pv::Vec::blendv(vmax, v, gt);
          varg = pv::Vec::blendv(varg, idx, gt);
        };
        for (i = 2 * pv::kW; i + 2 * pv::kW <= V; i += 2 * pv::kW) {
          idx0 = idx0 + step;
          idx1 = idx1 + step;
          update(vmax0, varg0, pv::load(x + i), idx0);
          update(vmax1, varg1, pv::load(x + i + pv::kW), idx1);
        }
        best = std::max(pv::max(vmax0), pv::max(vmax1));
        vmax0.store(lanes);
        vmax1.store(lanes + pv::kW);
        varg0.store(lane_arg);
        varg1.store(lane_arg + pv::kW);
        arg = V;  // the smallest index holding the maximum; the scalar loop below takes the tail
        for (int j = 0; j < 2 * pv::kW; ++j) {
          if (lanes[j] == best) arg = std::min(arg, static_cast<int64_t>(lane_arg[j]));
        }
      }
#endif
      for (; i < V; ++i) {
        if (x[i] > best) {
          best = x[i];
          arg = i;
        }
      }
      double sum = 0.0;
      int64_t j = 0;
#if QUIRE_AVX512
      const __m512 vb = _mm512_set1_ps(best);
      __m512 acc = _mm512_setzero_ps();
      for (; j + 16 <= V; j += 16) acc = _mm512_add_ps(acc, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vb)));
      sum = _mm512_reduce_add_ps(acc);
#elif QUIRE_VEC
      const pv::Vec vb(best);
      pv::Vec acc0(0.f), acc1(0.f);
      for (; j + 2 * pv::kW <= V; j += 2 * pv::kW) {
        acc0 = acc0 + pv::exp(pv::load(x + j) - vb);
        acc1 = acc1 + pv::exp(pv::load(x + j + pv::kW) - vb);
      }
      if (j + pv::kW <= V) {
        acc0 = acc0 + pv::exp(pv::load(x + j) - vb);
        j += pv::kW;
      }
      sum = pv::sum(acc0 + acc1);
#endif
      for (; j < V; ++j) sum += std::exp(x[j] - best);
      ip[r] = arg;
      sp[r] = best + static_cast<float>(std::log(sum));
    }
  });
  return {indices, lse};
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
  m.def("add_rms_norm(Tensor x, Tensor(b!)? residual, Tensor weight, float eps) -> Tensor",
        &quire_ops::add_rms_norm);
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int num_heads, int head_dim) -> ()",
        &quire_ops::rotary_inplace);
  m.def("silu_and_mul(Tensor gate_up) -> Tensor", &quire_ops::silu_and_mul);
  m.def("small_linear(Tensor x, Tensor weight, Tensor(a!) out) -> ()", &quire_ops::small_linear);
  m.def("quant_linear(Tensor x, Tensor packed, int kind, int N) -> Tensor", &quire_ops::quant_linear);
  m.def("quant_linear_uses_amx() -> bool", &quire_ops::quant_linear_uses_amx);
  m.def("quant_linear_bf16_rows() -> int", &quire_ops::quant_linear_bf16_rows);
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()",
        &quire_ops::write_kv);
  m.def(
      "attend_qkv(Tensor(a!) qkv, Tensor? cos, Tensor? sin, Tensor(b!) key_cache, Tensor(c!) value_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, int num_heads, "
      "int num_kv_heads, float scale, int split_min_kv) -> Tensor",
      &quire_ops::attend_qkv);
  m.def("argmax_logsumexp(Tensor logits) -> (Tensor, Tensor)", &quire_ops::argmax_logsumexp);
  m.def("dequantize_blocks(Tensor blocks, int kind, int K) -> Tensor", &quire_ops::dequantize_blocks);
}
