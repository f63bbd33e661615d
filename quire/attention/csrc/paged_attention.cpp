// Quire CPU paged attention.
//
// One call handles a mixed batch: decode rows (query_len == 1) and prefill
// chunks (query_len > 1, with or without previously cached context).  K/V are
// read in place through the block table; nothing is gathered or copied.
//
// Work decomposition: a work item is (sequence, kv head, tile of query
// tokens).  Every query head that shares the kv head is processed together,
// so each K/V row that an item touches is loaded from memory once and reused
// for all of its "rows" (row = query token x query head in the group).  Decode
// items have one token, i.e. `group` rows.  Items are sorted by estimated cost
// (longest first) and handed out dynamically to the threads of ATen's pool
// (at::parallel_for), so uneven context lengths still balance.
//
// Inside an item the KV positions are walked in chunks of 16 with an online
// (streaming) softmax kept per row in float32: logits of the chunk, one max
// and one rescale per chunk, then the probability-weighted V accumulation.
// Logits are kept in base 2 (the query is pre-scaled by scale * log2(e)) so
// the exponential is a plain exp2.
//
// The AVX-512 path covers head_dim = 16 * n for n in 1..8, 10, 12, 16
// (16..128, 160, 192, 256).  bf16 Q.K uses the
// AVX512-BF16 dot-product instruction when the compiler targets it.  Any
// other configuration (or a compiler without AVX-512) uses a portable scalar
// path with the same semantics.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define QUIRE_AVX512 1
#include <immintrin.h>
#else
#define QUIRE_AVX512 0
#endif

namespace quire_pa {

using bf16 = c10::BFloat16;

constexpr int kSub = 16;         // KV positions per logit vector
constexpr int kChunk = 64;       // KV positions per softmax step (multiple of kSub)
constexpr int kMaxTileRows = 32; // target rows (tokens x group heads) per item
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const char* q;
  int64_t q_s_tok, q_s_head;  // element strides
  const char* k;
  int64_t k_s_blk, k_s_tok, k_s_head;
  const char* v;
  int64_t v_s_blk, v_s_tok, v_s_head;
  char* out;
  int64_t o_s_tok, o_s_head;
  const int32_t* block_tables;
  int64_t bt_stride;
  const int32_t* qsl;
  const int32_t* seq_lens;
  int num_q_heads;
  int num_kv_heads;
  int group;
  int head_dim;
  int block_size;
  float scale;
};

struct WorkItem {
  int32_t seq;
  int32_t kv_head;
  int32_t tok_begin;  // first query token of the tile, relative to the sequence
  int32_t ntok;       // query tokens in the tile
  int64_t cost;
};

// Positions of a work item, derived from the sequence metadata.
struct ItemGeom {
  int64_t first_row;   // global query row of the tile's first token
  int64_t pos0;        // KV position of the tile's first token
  int64_t kv_end;      // exclusive end of KV positions touched by the tile
};

inline ItemGeom geom(const Params& p, const WorkItem& w) {
  const int64_t qs = p.qsl[w.seq];
  const int64_t qlen = p.qsl[w.seq + 1] - qs;
  const int64_t ctx = static_cast<int64_t>(p.seq_lens[w.seq]) - qlen;
  ItemGeom g;
  g.first_row = qs + w.tok_begin;
  g.pos0 = ctx + w.tok_begin;
  g.kv_end = g.pos0 + w.ntok;
  return g;
}

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// ---------------------------------------------------------------------------
// Portable scalar path (any head_dim, any ISA).
// ---------------------------------------------------------------------------
template <typename T>
void run_item_generic(const Params& p, const WorkItem& w, std::vector<float>& buf) {
  const int D = p.head_dim;
  const ItemGeom g = geom(p, w);
  const int32_t* bt = p.block_tables + static_cast<int64_t>(w.seq) * p.bt_stride;
  buf.resize(2 * static_cast<size_t>(D));
  float* qf = buf.data();
  float* acc = qf + D;
  const T* qb = reinterpret_cast<const T*>(p.q);
  const T* kb = reinterpret_cast<const T*>(p.k);
  const T* vb = reinterpret_cast<const T*>(p.v);
  T* ob = reinterpret_cast<T*>(p.out);
  for (int t = 0; t < w.ntok; ++t) {
    const int64_t row = g.first_row + t;
    const int64_t pos = g.pos0 + t;
    for (int gi = 0; gi < p.group; ++gi) {
      const int64_t head = static_cast<int64_t>(w.kv_head) * p.group + gi;
      const T* qr = qb + row * p.q_s_tok + head * p.q_s_head;
      for (int d = 0; d < D; ++d) {
        qf[d] = to_f(qr[d]) * p.scale;
        acc[d] = 0.f;
      }
      float m = -std::numeric_limits<float>::infinity();
      float l = 0.f;
      for (int64_t j = 0; j <= pos; ++j) {
        const int64_t blk = bt[j / p.block_size];
        const int64_t off = j % p.block_size;
        const T* kr = kb + blk * p.k_s_blk + off * p.k_s_tok + w.kv_head * p.k_s_head;
        const T* vr = vb + blk * p.v_s_blk + off * p.v_s_tok + w.kv_head * p.v_s_head;
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += qf[d] * to_f(kr[d]);
        if (s > m) {
          const float corr = std::exp(m - s);
          l *= corr;
          for (int d = 0; d < D; ++d) acc[d] *= corr;
          m = s;
        }
        const float e = std::exp(s - m);
        l += e;
        for (int d = 0; d < D; ++d) acc[d] += e * to_f(vr[d]);
      }
      T* orow = ob + row * p.o_s_tok + head * p.o_s_head;
      const float inv = 1.f / l;
      for (int d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] * inv);
    }
  }
}

#if QUIRE_AVX512
// ---------------------------------------------------------------------------
// AVX-512 path.
// ---------------------------------------------------------------------------

inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32x16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store_f32x16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store_f32x16(bf16* p, __m512 x) {
#if defined(__AVX512BF16__)
  const __m256bh h = _mm512_cvtneps_pbh(x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)h);
#else
  // Round to nearest even; NaN stays NaN (quiet).
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#endif
}

// 2^x for x <= 0 (larger arguments are fine up to ~127).  Degree-6 Taylor
// polynomial on [-0.5, 0.5] (rel. error ~1.2e-7) and scalef for 2^n.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.f));  // -inf -> exactly 0 below
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

// Logits of one row against 16 K rows (pointers; padding entries repeat the
// last valid row).  fp32: q already scaled by scale*log2e, NV vectors of 16.
template <int NV>
inline __m512 qk_row(const float* q, const float* const* kp, float /*post_scale*/) {
  __m512 qv[NV];
#pragma GCC unroll 16
  for (int c = 0; c < NV; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  __m512 a[kSub];
#pragma GCC unroll 16
  for (int i = 0; i < kSub; ++i) {
    const float* k = kp[i];
    __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
#pragma GCC unroll 16
    for (int c = 1; c < NV; ++c) s = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), s);
    a[i] = s;
  }
  return hsum16_transposed(a);
}

#if defined(__AVX512BF16__)
// bf16: q holds the raw (unscaled) bf16 query row; products are accumulated in
// fp32 by VDPBF16PS, then the logits are scaled.
template <int NV>
inline __m512 qk_row(const bf16* q, const bf16* const* kp, float post_scale) {
  constexpr int NP = NV / 2;  // full 32-element pairs
  constexpr bool ODD = (NV % 2) != 0;
  __m512bh qv[NP > 0 ? NP : 1];
  __m256bh qt;
#pragma GCC unroll 8
  for (int c = 0; c < NP; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
  if constexpr (ODD) qt = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * NP));
  __m512 a[kSub];
#pragma GCC unroll 16
  for (int i = 0; i < kSub; ++i) {
    const bf16* k = kp[i];
    __m512 s = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NP; ++c) s = _mm512_dpbf16_ps(s, qv[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
    if constexpr (ODD) {
      const __m256 t = _mm256_dpbf16_ps(
          _mm256_setzero_ps(), qt,
          (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 32 * NP)));
      s = _mm512_add_ps(s, _mm512_zextps256_ps512(t));
    }
    a[i] = s;
  }
  return _mm512_mul_ps(hsum16_transposed(a), _mm512_set1_ps(post_scale));
}
#else
template <int NV>
inline __m512 qk_row(const bf16* q, const bf16* const* kp, float post_scale) {
  __m512 qv[NV];
#pragma GCC unroll 16
  for (int c = 0; c < NV; ++c) qv[c] = load_f32x16(q + 16 * c);
  __m512 a[kSub];
#pragma GCC unroll 16
  for (int i = 0; i < kSub; ++i) {
    const bf16* k = kp[i];
    __m512 s = _mm512_mul_ps(qv[0], load_f32x16(k));
#pragma GCC unroll 16
    for (int c = 1; c < NV; ++c) s = _mm512_fmadd_ps(qv[c], load_f32x16(k + 16 * c), s);
    a[i] = s;
  }
  return _mm512_mul_ps(hsum16_transposed(a), _mm512_set1_ps(post_scale));
}
#endif

// acc[r] = acc[r] * alpha[r] + sum_i P[r][i] * V[i] for R rows (R*NV
// accumulators stay in registers for the whole chunk).
template <typename T, int NV, int R>
inline void pv_rows(float* acc, int64_t acc_stride, const float* P, const float* alpha,
                    const T* const* vp, int n) {
  __m512 a[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * acc_stride + 16 * c), al);
  }
  for (int i = 0; i < n; ++i) {
    const T* v = vp[i];
    __m512 vv[NV];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) vv[c] = load_f32x16(v + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(P[r * kChunk + i]);
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + r * acc_stride + 16 * c, a[r][c]);
  }
}

template <int NV>
constexpr int max_pv_rows() {
  return NV >= 16 ? 1 : (24 / NV > 6 ? 6 : 24 / NV);
}

// Rows are processed in blocks of RM; a block only walks the KV positions
// that its most-advanced row can see (nvalid[r]); the probabilities beyond a
// row's own limit are zero.
template <typename T, int NV>
inline void pv_block(float* acc, int64_t acc_stride, const float* P, const float* alpha,
                     const T* const* vp, const int* nvalid, int rows) {
  constexpr int RM = max_pv_rows<NV>();
  int r = 0;
  for (; r + RM <= rows; r += RM) {
    int n = 0;
    for (int i = 0; i < RM; ++i) n = std::max(n, nvalid[r + i]);
    pv_rows<T, NV, RM>(acc + r * acc_stride, acc_stride, P + r * kChunk, alpha + r, vp, n);
  }
  const int rem = rows - r;
  if (rem <= 0) return;
  int n = 0;
  for (int i = 0; i < rem; ++i) n = std::max(n, nvalid[r + i]);
  float* ar = acc + r * acc_stride;
  const float* pr = P + r * kChunk;
  const float* alr = alpha + r;
  switch (rem) {
    case 1: pv_rows<T, NV, 1>(ar, acc_stride, pr, alr, vp, n); break;
    case 2: if constexpr (RM > 2) pv_rows<T, NV, 2>(ar, acc_stride, pr, alr, vp, n); break;
    case 3: if constexpr (RM > 3) pv_rows<T, NV, 3>(ar, acc_stride, pr, alr, vp, n); break;
    case 4: if constexpr (RM > 4) pv_rows<T, NV, 4>(ar, acc_stride, pr, alr, vp, n); break;
    case 5: if constexpr (RM > 5) pv_rows<T, NV, 5>(ar, acc_stride, pr, alr, vp, n); break;
    default: break;
  }
}

struct Scratch {
  std::vector<float> qf;     // rows x head_dim, scaled fp32 query (fp32 inputs)
  std::vector<bf16> qb;      // rows x head_dim, raw bf16 query (bf16 inputs)
  std::vector<float> acc;    // rows x head_dim
  std::vector<float> P;      // rows x kChunk
  std::vector<float> m, l, alpha;
  std::vector<int> nvalid;
  std::vector<float> vf;     // kChunk x head_dim, V chunk converted to fp32
  void ensure(int rows, int width) {
    const size_t n = static_cast<size_t>(rows) * width;
    if (acc.size() < n) {
      qf.resize(n);
      qb.resize(n);
      acc.resize(n);
    }
    if (vf.size() < static_cast<size_t>(kChunk) * width) vf.resize(static_cast<size_t>(kChunk) * width);
    if (m.size() < static_cast<size_t>(rows)) {
      P.resize(static_cast<size_t>(rows) * kChunk);
      m.resize(rows);
      l.resize(rows);
      alpha.resize(rows);
      nvalid.resize(rows);
    }
  }
};

template <typename T, int NV>
void run_item_avx512(const Params& p, const WorkItem& w, Scratch& sc) {
  constexpr int W = NV * 16;  // row width (== head_dim)
  const int D = p.head_dim;
  const int G = p.group;
  const int rows = w.ntok * G;
  const ItemGeom g = geom(p, w);
  sc.ensure(rows, W);
  const float qscale = p.scale * kLog2e;

  const T* qbase = reinterpret_cast<const T*>(p.q);
  float* acc = sc.acc.data();
  // Load the query rows (row r = t * G + gi).
  for (int t = 0; t < w.ntok; ++t) {
    for (int gi = 0; gi < G; ++gi) {
      const int r = t * G + gi;
      const int64_t head = static_cast<int64_t>(w.kv_head) * G + gi;
      const T* src = qbase + (g.first_row + t) * p.q_s_tok + head * p.q_s_head;
      if constexpr (std::is_same_v<T, float>) {
        float* dst = sc.qf.data() + static_cast<int64_t>(r) * W;
        for (int d = 0; d < W; ++d) dst[d] = src[d] * qscale;
      } else {
        bf16* dst = sc.qb.data() + static_cast<int64_t>(r) * W;
        std::memcpy(dst, src, sizeof(bf16) * W);
      }
      std::memset(acc + static_cast<int64_t>(r) * W, 0, sizeof(float) * W);
      sc.m[r] = -std::numeric_limits<float>::infinity();
      sc.l[r] = 0.f;
    }
  }

  const T* kbase = reinterpret_cast<const T*>(p.k) + static_cast<int64_t>(w.kv_head) * p.k_s_head;
  const T* vbase = reinterpret_cast<const T*>(p.v) + static_cast<int64_t>(w.kv_head) * p.v_s_head;
  const int32_t* bt = p.block_tables + static_cast<int64_t>(w.seq) * p.bt_stride;
  const T* kp[kChunk];
  const T* vp[kChunk];
  const float* vfp[kChunk];
  const int BS = p.block_size;
  constexpr int RM = max_pv_rows<NV>();
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());

  int64_t blk_idx = 0;
  int off = 0;
  for (int64_t j0 = 0; j0 < g.kv_end; j0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, g.kv_end - j0));
    // Row pointers of this chunk, walked through the block table.
    for (int i = 0; i < n; ++i) {
      const int64_t blk = bt[blk_idx];
      kp[i] = kbase + blk * p.k_s_blk + off * p.k_s_tok;
      vp[i] = vbase + blk * p.v_s_blk + off * p.v_s_tok;
      if (++off == BS) {
        off = 0;
        ++blk_idx;
      }
    }
    const int npad = (n + kSub - 1) / kSub * kSub;
    for (int i = n; i < npad; ++i) {
      kp[i] = kp[n - 1];
      vp[i] = vp[n - 1];
    }
    // Rows whose position is < j0 see nothing of this chunk.
    const int t_first = static_cast<int>(std::max<int64_t>(0, j0 - g.pos0));
    const int r0 = t_first * G;
    for (int r = r0; r < rows; ++r) {
      const int t = r / G;
      const int64_t limit = g.pos0 + t + 1;  // valid KV positions: [0, limit)
      const int nv = static_cast<int>(std::min<int64_t>(n, limit - j0));
      const int nsub = (nv + kSub - 1) / kSub;
      sc.nvalid[r] = nv;
      __m512 s[kChunk / kSub];
      __m512 vmax = ninf;
#pragma GCC unroll 4
      for (int b = 0; b < kChunk / kSub; ++b) {
        if (b < nsub) {
          if constexpr (std::is_same_v<T, float>) {
            s[b] = qk_row<NV>(sc.qf.data() + static_cast<int64_t>(r) * W, kp + b * kSub, 1.f);
          } else {
            s[b] = qk_row<NV>(sc.qb.data() + static_cast<int64_t>(r) * W, kp + b * kSub, qscale);
          }
          const int left = nv - b * kSub;
          if (left < kSub) s[b] = _mm512_mask_mov_ps(ninf, static_cast<__mmask16>((1u << left) - 1u), s[b]);
          vmax = _mm512_max_ps(vmax, s[b]);
        }
      }
      const float m_old = sc.m[r];
      const float m_new = std::max(m_old, _mm512_reduce_max_ps(vmax));
      const float alpha = m_new == m_old ? 1.f : std::exp2(m_old - m_new);
      const __m512 mn = _mm512_set1_ps(m_new);
      float* prow = sc.P.data() + static_cast<int64_t>(r) * kChunk;
      __m512 vsum = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int b = 0; b < kChunk / kSub; ++b) {
        __m512 e = _mm512_setzero_ps();
        if (b < nsub) {
          // exp2(-inf - m) underflows to exactly 0 via the clamp + scalef.
          e = exp2_ps(_mm512_sub_ps(s[b], mn));
          vsum = _mm512_add_ps(vsum, e);
        }
        _mm512_storeu_ps(prow + b * kSub, e);
      }
      sc.l[r] = sc.l[r] * alpha + _mm512_reduce_add_ps(vsum);
      sc.m[r] = m_new;
      sc.alpha[r] = alpha;
    }
    float* accr = acc + static_cast<int64_t>(r0) * W;
    const float* Pr = sc.P.data() + static_cast<int64_t>(r0) * kChunk;
    if constexpr (std::is_same_v<T, bf16>) {
      if (rows - r0 > RM) {
        // Several row blocks will walk V: convert the chunk to fp32 once.
        for (int i = 0; i < n; ++i) {
          float* dst = sc.vf.data() + static_cast<int64_t>(i) * W;
#pragma GCC unroll 16
          for (int c = 0; c < NV; ++c) _mm512_storeu_ps(dst + 16 * c, load_f32x16(vp[i] + 16 * c));
          vfp[i] = dst;
        }
        pv_block<float, NV>(accr, W, Pr, sc.alpha.data() + r0, vfp, sc.nvalid.data() + r0, rows - r0);
        continue;
      }
    }
    pv_block<T, NV>(accr, W, Pr, sc.alpha.data() + r0, vp, sc.nvalid.data() + r0, rows - r0);
  }

  // Normalise and store.
  T* obase = reinterpret_cast<T*>(p.out);
  for (int t = 0; t < w.ntok; ++t) {
    for (int gi = 0; gi < G; ++gi) {
      const int r = t * G + gi;
      const int64_t head = static_cast<int64_t>(w.kv_head) * G + gi;
      T* dst = obase + (g.first_row + t) * p.o_s_tok + head * p.o_s_head;
      const float* a = acc + static_cast<int64_t>(r) * W;
      const __m512 inv = _mm512_set1_ps(1.f / sc.l[r]);
      int d = 0;
      for (; d + 16 <= D; d += 16) store_f32x16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), inv));
      const float invs = 1.f / sc.l[r];
      for (; d < D; ++d) dst[d] = static_cast<T>(a[d] * invs);
    }
  }
}
#endif  // QUIRE_AVX512

// Returns the padded vector count used by the AVX-512 path, or 0 when the
// head size must use the generic path.
inline int avx512_nv(int head_dim) {
#if QUIRE_AVX512
  if (head_dim <= 0 || head_dim % 16 != 0) return 0;
  const int nv = head_dim / 16;
  if (nv <= 8 || nv == 10 || nv == 12 || nv == 16) return nv;
  return 0;
#else
  (void)head_dim;
  return 0;
#endif
}

template <typename T>
void run_all(const Params& p, const std::vector<WorkItem>& items, bool force_generic) {
  const int nv = force_generic ? 0 : avx512_nv(p.head_dim);
  std::atomic<int64_t> next{0};
  const int64_t nitems = static_cast<int64_t>(items.size());
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nitems));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
#if QUIRE_AVX512
    Scratch sc;
#endif
    std::vector<float> gbuf;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= nitems) break;
      const WorkItem& w = items[i];
      switch (nv) {
#if QUIRE_AVX512
        case 1: run_item_avx512<T, 1>(p, w, sc); break;
        case 2: run_item_avx512<T, 2>(p, w, sc); break;
        case 3: run_item_avx512<T, 3>(p, w, sc); break;
        case 4: run_item_avx512<T, 4>(p, w, sc); break;
        case 5: run_item_avx512<T, 5>(p, w, sc); break;
        case 6: run_item_avx512<T, 6>(p, w, sc); break;
        case 7: run_item_avx512<T, 7>(p, w, sc); break;
        case 8: run_item_avx512<T, 8>(p, w, sc); break;
        case 10: run_item_avx512<T, 10>(p, w, sc); break;
        case 12: run_item_avx512<T, 12>(p, w, sc); break;
        case 16: run_item_avx512<T, 16>(p, w, sc); break;
#endif
        default: run_item_generic<T>(p, w, gbuf); break;
      }
    }
  });
}

void check_inner_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables_in,
                           const at::Tensor& query_start_loc_in, const at::Tensor& seq_lens_in,
                           double scale, c10::optional<at::Tensor> out_opt, bool force_generic) {
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu() &&
                  block_tables_in.device().is_cpu() && query_start_loc_in.device().is_cpu() &&
                  seq_lens_in.device().is_cpu(),
              "paged_attention: all tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_q_heads, head_dim]");
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of key_cache");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "query must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(key_cache.scalar_type() == dtype && value_cache.scalar_type() == dtype,
              "key_cache/value_cache must have the dtype of query");
  const int64_t T = query.size(0);
  const int64_t Hq = query.size(1);
  const int64_t D = query.size(2);
  const int64_t NB = key_cache.size(0);
  const int64_t BS = key_cache.size(1);
  const int64_t Hkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "head_dim of key_cache (", key_cache.size(3), ") != head_dim of query (", D, ")");
  TORCH_CHECK(BS > 0 && Hkv > 0 && D > 0, "empty cache dimensions");
  TORCH_CHECK(Hq % Hkv == 0, "num_q_heads (", Hq, ") must be a multiple of num_kv_heads (", Hkv, ")");
  check_inner_contiguous(query, "query");
  check_inner_contiguous(key_cache, "key_cache");
  check_inner_contiguous(value_cache, "value_cache");

  TORCH_CHECK(block_tables_in.scalar_type() == at::kInt && block_tables_in.dim() == 2,
              "block_tables must be an int32 [num_seqs, max_blocks_per_seq] tensor");
  TORCH_CHECK(query_start_loc_in.scalar_type() == at::kInt && query_start_loc_in.dim() == 1,
              "query_start_loc must be a 1-D int32 tensor");
  TORCH_CHECK(seq_lens_in.scalar_type() == at::kInt && seq_lens_in.dim() == 1, "seq_lens must be a 1-D int32 tensor");
  const int64_t S = seq_lens_in.size(0);
  TORCH_CHECK(query_start_loc_in.size(0) == S + 1, "query_start_loc must have num_seqs + 1 entries");
  TORCH_CHECK(block_tables_in.size(0) >= S, "block_tables has fewer rows than num_seqs");
  const at::Tensor block_tables = block_tables_in.stride(1) == 1 ? block_tables_in : block_tables_in.contiguous();
  const at::Tensor qsl = query_start_loc_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();

  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype, "out must be a CPU tensor of the query dtype");
    TORCH_CHECK(out.sizes() == query.sizes(), "out must have the shape of query");
    check_inner_contiguous(out, "out");
  } else {
    out = at::empty_like(query, at::MemoryFormat::Contiguous);
  }

  Params p;
  p.q = static_cast<const char*>(query.data_ptr());
  p.q_s_tok = query.stride(0);
  p.q_s_head = query.stride(1);
  p.k = static_cast<const char*>(key_cache.data_ptr());
  p.k_s_blk = key_cache.stride(0);
  p.k_s_tok = key_cache.stride(1);
  p.k_s_head = key_cache.stride(2);
  p.v = static_cast<const char*>(value_cache.data_ptr());
  p.v_s_blk = value_cache.stride(0);
  p.v_s_tok = value_cache.stride(1);
  p.v_s_head = value_cache.stride(2);
  p.out = static_cast<char*>(out.data_ptr());
  p.o_s_tok = out.stride(0);
  p.o_s_head = out.stride(1);
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.bt_stride = block_tables.stride(0);
  p.qsl = qsl.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.num_q_heads = static_cast<int>(Hq);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.head_dim = static_cast<int>(D);
  p.block_size = static_cast<int>(BS);
  p.scale = static_cast<float>(scale);

  // Validate the metadata (everything the kernel dereferences) and build the
  // work list.
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(S == 0 || p.qsl[0] >= 0, "query_start_loc[0] must be >= 0");
  TORCH_CHECK(S == 0 || p.qsl[S] <= T, "query_start_loc[-1] (", S ? p.qsl[S] : 0, ") exceeds num_tokens (", T, ")");
  const int tile_tok = std::max(1, kMaxTileRows / p.group);
  std::vector<WorkItem> items;
  items.reserve(static_cast<size_t>(S * Hkv));
  for (int64_t s = 0; s < S; ++s) {
    const int64_t qlen = static_cast<int64_t>(p.qsl[s + 1]) - p.qsl[s];
    const int64_t slen = p.seq_lens[s];
    TORCH_CHECK(qlen >= 0, "query_start_loc must be non-decreasing (sequence ", s, ")");
    TORCH_CHECK(slen >= qlen, "seq_lens[", s, "] = ", slen, " is smaller than its query length ", qlen);
    if (qlen == 0) continue;
    const int64_t nblocks = (slen + BS - 1) / BS;
    TORCH_CHECK(nblocks <= max_blocks, "sequence ", s, " needs ", nblocks, " blocks but block_tables has ", max_blocks,
                " columns");
    const int32_t* row = p.block_tables + s * p.bt_stride;
    for (int64_t b = 0; b < nblocks; ++b) {
      TORCH_CHECK(row[b] >= 0 && row[b] < NB, "block_tables[", s, ", ", b, "] = ", row[b], " is out of range [0, ",
                  NB, ")");
    }
    const int64_t ctx = slen - qlen;
    for (int64_t t0 = 0; t0 < qlen; t0 += tile_tok) {
      const int64_t nt = std::min<int64_t>(tile_tok, qlen - t0);
      // ~ rows x KV positions, plus a fixed overhead
      const int64_t cost = nt * p.group * (ctx + t0 + nt) + 64;
      for (int64_t h = 0; h < Hkv; ++h) {
        items.push_back(WorkItem{static_cast<int32_t>(s), static_cast<int32_t>(h), static_cast<int32_t>(t0),
                                 static_cast<int32_t>(nt), cost});
      }
    }
  }
  // Rows not owned by any sequence are zero-filled in a freshly allocated out.
  if (!(out_opt.has_value() && out_opt->defined()) && T > 0) {
    const int64_t lo = S ? p.qsl[0] : T;
    const int64_t hi = S ? p.qsl[S] : T;
    if (lo > 0) out.narrow(0, 0, lo).zero_();
    if (hi < T) out.narrow(0, hi, T - hi).zero_();
  }
  if (items.empty()) return out;
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });

  if (dtype == at::kFloat) {
    run_all<float>(p, items, force_generic);
  } else {
    run_all<bf16>(p, items, force_generic);
  }
  return out;
}

bool has_avx512() { return QUIRE_AVX512 != 0; }

bool has_avx512_bf16() {
#if QUIRE_AVX512 && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace quire_pa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Quire CPU paged attention";
  m.def("paged_attention", &quire_pa::paged_attention, "Paged attention over a block-table KV cache (CPU)",
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("scale"), py::arg("out") = py::none(),
        py::arg("force_generic") = false, py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &quire_pa::has_avx512);
  m.def("has_avx512_bf16", &quire_pa::has_avx512_bf16);
}
