// Portable vector helpers on ATen's Vectorized<float> (8 lanes on AVX2, 16 on AVX-512, 4 on NEON):
// the building blocks of the kernels' paths for every ISA level without a hand-written one.
// Included after isa.h; empty at the scalar level.
#pragma once

#include <c10/util/BFloat16.h>

#if QUIRE_VEC
#include <cstdint>

namespace quire_pvec {

using bf16 = c10::BFloat16;
using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;
constexpr int kW = Vec::size();

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const float* p, int64_t n) { return n >= kW ? Vec::loadu(p) : Vec::loadu(p, n); }
inline Vec load(const bf16* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}
inline Vec load(const bf16* p, int64_t n) {
  if (n >= kW) return load(p);
  alignas(64) float tmp[kW] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

inline void store(float* p, const Vec& v) { v.store(p); }
inline void store(float* p, const Vec& v, int64_t n) { v.store(p, static_cast<int>(n < kW ? n : kW)); }
// fp32 -> bf16 rounds to nearest even, as PyTorch does.
inline void store(bf16* p, const Vec& v, int64_t n = kW) {
  at::vec::convert_from_float<bf16>(v, v).store(p, static_cast<int>(n < kW ? n : kW));
}

inline float sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}
inline float max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// 2^x, the same polynomial as the AVX-512 path (degree 6 on [-0.5, 0.5], rel. error ~1.2e-7), so
// every level computes the softmax alike. x is clamped at -125 (no denormals); callers zero
// masked lanes themselves.
inline Vec exp2(Vec x) {
  x = at::vec::maximum(x, Vec(-125.f));
  x = at::vec::minimum(x, Vec(127.f));
  const Vec n = x.round();
  const Vec f = x - n;
  Vec r = Vec(1.5252734e-5f);
  r = at::vec::fmadd(r, f, Vec(1.5403530e-4f));
  r = at::vec::fmadd(r, f, Vec(1.3333558e-3f));
  r = at::vec::fmadd(r, f, Vec(9.6181291e-3f));
  r = at::vec::fmadd(r, f, Vec(5.5504109e-2f));
  r = at::vec::fmadd(r, f, Vec(2.4022651e-1f));
  r = at::vec::fmadd(r, f, Vec(6.9314718e-1f));
  r = at::vec::fmadd(r, f, Vec(1.0f));
  // 2^n as float bits: (n + 127) << 23, n in [-125, 127].
  const VecI bits = (at::vec::convert_to_int_of_same_size(n) + VecI(127)) << VecI(23);
  return r * at::vec::cast<float>(bits);
}
inline Vec exp(const Vec& x) { return exp2(x * Vec(1.4426950408889634f)); }

}  // namespace quire_pvec
#endif

// ---- Paged-attention helpers ---------------------------------------------------------------
#if QUIRE_VEC
namespace quire_pvec {

// Lane i of the result = sum of the lanes of a[i]: kW horizontal sums in one tree of pairwise
// sums, every step halving the vectors and keeping the order.  (An AVX2 hadd version measured no
// faster in the decode loop.)
inline Vec hsum_transposed(const Vec* a) {
  // deinterleave2(x, y) splits the pair into even and odd lanes: their sum holds the pairwise
  // sums of x in its first half and of y in its second.
  Vec t[kW];
  for (int i = 0; i < kW; ++i) t[i] = a[i];
  for (int n = kW; n > 1; n /= 2) {
    for (int i = 0; i < n / 2; ++i) {
      const auto eo = at::vec::deinterleave2(t[2 * i], t[2 * i + 1]);
      t[i] = eo.first + eo.second;
    }
  }
  return t[0];
}

// The first n lanes of x, the rest from `rest`.
inline Vec keep_first(const Vec& x, int64_t n, const Vec& rest) { return n >= kW ? x : Vec::set(rest, x, n); }

}  // namespace quire_pvec
#endif

// ---- fused_ops.cpp: GGUF block helpers ------------------------------------------------------
#if QUIRE_VEC
#include <c10/util/Half.h>

namespace quire_pvec {

// kW fp16 values given as raw bytes (a GGUF block's scales) as float32.
inline Vec load_half(const uint8_t* p) {
  Vec v;
  at::vec::load_to_float(reinterpret_cast<const c10::Half*>(p), v);
  return v;
}

// Asks for `bytes` from p into L1 ahead of use (the hardware prefetcher alone leaves DRAM idle
// between a thread's block groups).
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}

// 16 bytes of Q4_1 nibbles -> the low nibbles (weights 0-15) and the high ones (16-31) as
// 16 / kW vectors each, minus `offset`. GCC turns the portable loop into scalar byte code on x86
// (measured: slower than the scalar level), hence the AVX2 widening where Vec is a __m256.
inline void nibbles_to_float(const uint8_t* q, float offset, Vec* lo, Vec* hi) {
#if defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)  // ATen's Vectorized<float> is one __m256
  {
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    for (int j = 0; j < 2; ++j) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j)));
      lo[j] = Vec(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4))) - Vec(offset);
      hi[j] = Vec(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4))) - Vec(offset);
    }
    return;
  }
#endif
  alignas(64) float l[16], h[16];
  for (int i = 0; i < 16; ++i) {
    l[i] = static_cast<float>(q[i] & 0x0F) - offset;
    h[i] = static_cast<float>(q[i] >> 4) - offset;
  }
  for (int j = 0; j < 16 / kW; ++j) {
    lo[j] = Vec::loadu(l + j * kW);
    hi[j] = Vec::loadu(h + j * kW);
  }
}

// 16 int8 -> 16 / kW float vectors.
inline void int8_to_float(const uint8_t* q, Vec* w) {
#if defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)  // ATen's Vectorized<float> is one __m256
  {
    for (int j = 0; j < 2; ++j) {
      w[j] = Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j)))));
    }
    return;
  }
#endif
  alignas(64) float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(static_cast<int8_t>(q[i]));
  for (int j = 0; j < 16 / kW; ++j) w[j] = Vec::loadu(f + j * kW);
}

}  // namespace quire_pvec
#endif
