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
