// AVX-512 helpers shared by the CPU kernels: bf16 <-> fp32 vectors, exp2, transposed reductions.
// Included after isa.h; empty without AVX-512.
#pragma once

#include <c10/util/BFloat16.h>

#if QUIRE_AVX512
#include <immintrin.h>

namespace quire_vec {

using bf16 = c10::BFloat16;

inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32x16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store_f32x16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
// fp32 -> bf16, round to nearest even (as PyTorch rounds).
inline __m256i cvt_bf16(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  // NaN stays NaN (quiet).
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store_f32x16(bf16* p, __m512 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_bf16(x)); }

// 2^x for x <= 0 (larger arguments are fine up to ~127).  Degree-6 Taylor
// polynomial on [-0.5, 0.5] (rel. error ~1.2e-7) and scalef for 2^n.
inline __m512 exp2_ps(__m512 x) {
  // Clamp so that neither the polynomial nor scalef ever produces a denormal
  // or underflows: both trigger slow microcode assists when FTZ is off (as it
  // is in PyTorch threads).  exp2(x <= -125) is returned as ~2^-125.5; callers
  // zero masked lanes explicitly.
  x = _mm512_max_ps(x, _mm512_set1_ps(-125.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 r = _mm512_set1_ps(1.5252734e-5f);
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.5403530e-4f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.3333558e-3f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(9.6181291e-3f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(5.5504109e-2f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(2.4022651e-1f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(6.9314718e-1f));
  r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(r, n);
}

// a[i] are 16 vectors; returns the vector whose lane i is the horizontal sum
// of a[i].  45 shuffle/add operations instead of 16 full reductions.
inline __m512 hsum16_transposed(__m512* a) {
  __m512 b[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    // lanes per 128-bit block: (x0+x2, y0+y2, x1+x3, y1+y3)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  __m512 c[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]);
    const __m512d y = _mm512_castps_pd(b[2 * i + 1]);
    // per 128-bit block: partial sums of 4 consecutive vectors, in order
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// e^x for |x| <= ~87, via exp2.
inline __m512 exp_ps(__m512 x) { return exp2_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f))); }

// Masked loads/stores of n < 16 elements (tails).
inline __m512 load_f32x16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_f32x16(const bf16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store_f32x16(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store_f32x16(bf16* p, __m512 x, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, cvt_bf16(x)); }

}  // namespace quire_vec
#endif
