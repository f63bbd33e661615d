// Quire CPU paged attention.
//
// One call handles a mixed batch: decode rows (query_len == 1) and prefill
// chunks (query_len > 1, with or without previously cached context).  K/V are
// read in place through the block table; nothing is gathered or copied.
//
// Work decomposition.  A work item is (sequence, kv head, tile of query
// tokens).  All query heads sharing the kv head are processed together, so
// each K/V row an item touches is loaded once and reused for all its "rows"
// (row = query token x query head of the group); a decode item has `group`
// rows, a prefill tile up to kMaxTileRows.  Items are ordered largest
// (sequence, kv head) first and pulled dynamically by the threads of ATen's
// pool (at::parallel_for), so uneven context lengths balance.  When a call
// has few items (e.g. one or two decode sequences with few kv heads), long
// decode items are additionally split along the KV axis and the partial
// softmax results merged afterwards (split-KV / "flash decoding").
//
// Inside an item the KV positions are walked in chunks of kChunk (64) with an
// online (streaming) softmax kept per row in float32: logits of the chunk, one
// max and one rescale per row and chunk, then the probability-weighted V
// accumulation with the accumulators in registers.  Logits are kept in base 2
// (the scale is multiplied by log2(e)) so the exponential is a plain exp2.
//
// Decode items (one query token; head_dim 64 or 128, group <= 8, block_size a
// multiple of 16) take a loop of their own, run_decode_avx512: the same
// arithmetic with the per-chunk bookkeeping of the general loop removed, bf16 V
// widened by one shift or mask per 16 values, and the K/V rows of the next two
// chunks (running on into the next item) requested into L2 across the current
// chunk's loops.
//
// Q.K^T: with few rows (decode), each row is dotted with 16 K rows and the 16
// partial vectors are reduced together (hsum16_transposed); with many rows
// (prefill tiles) the K chunk is transposed once and the logits are computed
// as register-blocked outer products (qk_tile).  bf16 uses VDPBF16PS (bf16
// products, fp32 accumulation) when the compiler targets AVX512-BF16; V is
// widened to fp32 (exact) and accumulated with FMA.
//
// The AVX-512 path covers head_dim = 16 * n for n in 1..8, 10, 12, 16
// (16..128, 160, 192, 256).  Any other head size, or a build without AVX-512
// (the avx2 and neon levels), takes the portable vector path (run_item_vec, on
// ATen's Vectorized<float>) when head_dim is a multiple of the vector width:
// the same chunked softmax, Q.K of decode rows as kW-row dot products reduced
// in one tree, prefill tiles as outer products on a transposed K chunk, P.V in
// register blocks of rows x head_dim slabs.  Everything else (and
// force_generic) uses the scalar loop run_item_generic, the reference.

// Registered as the PyTorch operator torch.ops.quire_pa.paged_attention_out
// (writes into a caller-provided output; the Python wrapper allocates).  Only
// the light ATen/dispatcher headers are included (torch/extension.h alone
// triples the compile time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/contiguous.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <optional>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"

#include "vec512.h"
#include "portable_vec.h"

namespace quire_pa {

using bf16 = c10::BFloat16;

constexpr int kSub = 16;         // KV positions per logit vector
constexpr int kChunk = 64;       // KV positions per softmax step (multiple of kSub)
constexpr int kMaxTileRows = 128; // max rows (tokens x group heads) per prefill item
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kSplitItemsPerThread = 4;  // split decode items below this many items per thread, into KV
                                         // ranges of at least split_min_kv positions (an argument: the
                                         // best length is measured, attention/split_calibration.py)

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
  int64_t cost;       // estimated work of this item
  int64_t unit_cost;  // estimated work of all tiles of (seq, kv_head)
  // Split-KV decode (a long single-token item cut into KV ranges so that the
  // threads stay busy when there are few items): KV range [kv_lo, kv_hi) and
  // the slot of the partial result; part < 0 means a normal, whole item.
  int64_t kv_lo = 0;
  int64_t kv_hi = 0;
  int64_t part = -1;
};

// Unnormalised partial results of split items: per row (group head) the
// running max m, the denominator l and head_dim accumulators.
struct Partials {
  float* data = nullptr;
  int64_t stride = 0;  // floats per part: group * (head_dim + 2)
};

// Positions of a work item, derived from the sequence metadata.
struct ItemGeom {
  int64_t first_row;   // global query row of the tile's first token
  int64_t pos0;        // KV position of the tile's first token
  int64_t kv_end;      // exclusive end of KV positions touched by the tile
  int64_t kv_lo, kv_hi;  // the KV positions this item reads: [0, kv_end), or a split item's range
};

inline ItemGeom geom(const Params& p, const WorkItem& w) {
  const int64_t qs = p.qsl[w.seq];
  const int64_t qlen = p.qsl[w.seq + 1] - qs;
  const int64_t ctx = static_cast<int64_t>(p.seq_lens[w.seq]) - qlen;
  ItemGeom g;
  g.first_row = qs + w.tok_begin;
  g.pos0 = ctx + w.tok_begin;
  g.kv_end = g.pos0 + w.ntok;
  g.kv_lo = w.part >= 0 ? w.kv_lo : 0;
  g.kv_hi = w.part >= 0 ? w.kv_hi : g.kv_end;
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

using quire_vec::exp2_ps;
using quire_vec::hsum16_transposed;
using quire_vec::load_f32x16;
using quire_vec::store_f32x16;

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

#if defined(__AVX512BF16__) && !defined(QUIRE_NO_DPBF16)
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

// ---- Many-row tiles (prefill): Q.K^T as an outer product ------------------
// K of a 16-token sub-block is transposed once per chunk (16x16 blocks of
// 32-bit elements: fp32 values, or bf16 pairs), then each row's 16 logits are
// accumulated with broadcast query elements - no horizontal sums, and the
// transposition is shared by all rows of the tile.
constexpr int kTileRows = 6;           // rows per register tile
constexpr int kTransposeMinRows = 6;   // use the tile path from this many active rows

// r[i] (16 x 32-bit) -> out[c] = column c, i.e. lane i of out[c] = r[i][c].
inline void transpose16x16(const __m512i* r, __m512i* out) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    const __m512 a = _mm512_castsi512_ps(r[2 * k]);
    const __m512 b = _mm512_castsi512_ps(r[2 * k + 1]);
    t[2 * k] = _mm512_unpacklo_ps(a, b);
    t[2 * k + 1] = _mm512_unpackhi_ps(a, b);
  }
#pragma GCC unroll 4
  for (int gq = 0; gq < 4; ++gq) {
    const __m512d t0 = _mm512_castps_pd(t[4 * gq]);
    const __m512d t1 = _mm512_castps_pd(t[4 * gq + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * gq + 2]);
    const __m512d t3 = _mm512_castps_pd(t[4 * gq + 3]);
    // u[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c
    u[4 * gq + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * gq + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * gq + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * gq + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    out[c] = _mm512_castps_si512(_mm512_shuffle_f32x4(x0, y0, 0x88));
    out[8 + c] = _mm512_castps_si512(_mm512_shuffle_f32x4(x0, y0, 0xDD));
    out[4 + c] = _mm512_castps_si512(_mm512_shuffle_f32x4(x1, y1, 0x88));
    out[12 + c] = _mm512_castps_si512(_mm512_shuffle_f32x4(x1, y1, 0xDD));
  }
}

// Number of 32-bit elements in a row: fp32 -> head_dim, bf16 -> head_dim / 2
// (bf16 K is transposed as pairs, the layout VDPBF16PS consumes).
template <typename T, int NV>
constexpr int kt_words() {
#if defined(__AVX512BF16__) && !defined(QUIRE_NO_DPBF16)
  return std::is_same_v<T, bf16> ? NV * 8 : NV * 16;
#else
  return NV * 16;
#endif
}

// kt[(b * KW + w) * 16 + i] = 32-bit word w of token (16 b + i).  For bf16
// without VDPBF16PS the rows are widened to fp32 (KW = head_dim).
template <typename T, int NV>
inline void transpose_k_chunk(const T* const* kp, int nsub, uint32_t* kt) {
  constexpr int KW = kt_words<T, NV>();
  for (int b = 0; b < nsub; ++b) {
    const T* const* kb = kp + b * kSub;
#pragma GCC unroll 1
    for (int w0 = 0; w0 < KW; w0 += 16) {
      // bf16 pairs with an odd number of 16-lane vectors end in half a group.
      const __mmask16 mk = static_cast<__mmask16>(KW - w0 >= 16 ? 0xFFFFu : (1u << (KW - w0)) - 1u);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if constexpr (std::is_same_v<T, float> || KW == NV * 8) {
          r[i] = _mm512_maskz_loadu_epi32(mk, reinterpret_cast<const uint32_t*>(kb[i]) + w0);
        } else {
          r[i] = _mm512_castps_si512(load_f32x16(kb[i] + w0));
        }
      }
      __m512i o[16];
      transpose16x16(r, o);
      uint32_t* dst = kt + (static_cast<int64_t>(b) * KW + w0) * 16;
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * 16, o[c]);
    }
  }
}

// S[r][16 b + i] for kTileRows rows and NSB sub-blocks.  q: rows of width
// NV*16 (fp32 pre-scaled, or raw bf16), S row stride kChunk.
template <typename T, int NV, int NSB>
inline void qk_tile(const T* q, const uint32_t* kt, float* S, float post_scale) {
  constexpr int KW = kt_words<T, NV>();
  constexpr int W = NV * 16;
  __m512 acc[kTileRows][NSB];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NSB; ++b) acc[r][b] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int w = 0; w < KW; ++w) {
    __m512i k[NSB];
#pragma GCC unroll 4
    for (int b = 0; b < NSB; ++b) k[b] = _mm512_loadu_si512(kt + (static_cast<int64_t>(b) * KW + w) * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      if constexpr (KW == W) {
        float qv;
        if constexpr (std::is_same_v<T, float>) {
          qv = q[r * W + w];
        } else {
          qv = static_cast<float>(q[r * W + w]);
        }
        const __m512 qb = _mm512_set1_ps(qv);
#pragma GCC unroll 4
        for (int b = 0; b < NSB; ++b) acc[r][b] = _mm512_fmadd_ps(qb, _mm512_castsi512_ps(k[b]), acc[r][b]);
      } else {
#if defined(__AVX512BF16__) && !defined(QUIRE_NO_DPBF16)
        int32_t pair;
        std::memcpy(&pair, q + r * W + 2 * w, sizeof(pair));
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int b = 0; b < NSB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qb, (__m512bh)k[b]);
#endif
      }
    }
  }
  const __m512 ps = _mm512_set1_ps(post_scale);
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NSB; ++b) _mm512_storeu_ps(S + r * kChunk + b * kSub, _mm512_mul_ps(acc[r][b], ps));
}

template <int NV>
constexpr int max_pv_rows() {
  return NV >= 16 ? 1 : (24 / NV > 6 ? 6 : 24 / NV);
}

// Calls f(integral_constant<R>, first_row, n) for consecutive blocks of at
// most RM rows; n is the number of KV positions the block's most advanced row
// can see in this chunk (probabilities beyond a row's own limit are zero).
template <int RM, typename F>
inline void for_row_blocks(const int* nvalid, int rows, F&& f) {
  int r = 0;
  for (; r + RM <= rows; r += RM) {
    int n = 0;
    for (int i = 0; i < RM; ++i) n = std::max(n, nvalid[r + i]);
    f(std::integral_constant<int, RM>{}, r, n);
  }
  const int rem = rows - r;
  if (rem <= 0) return;
  int n = 0;
  for (int i = 0; i < rem; ++i) n = std::max(n, nvalid[r + i]);
  switch (rem) {
    case 1: f(std::integral_constant<int, 1>{}, r, n); break;
    case 2: if constexpr (RM > 2) f(std::integral_constant<int, 2>{}, r, n); break;
    case 3: if constexpr (RM > 3) f(std::integral_constant<int, 3>{}, r, n); break;
    case 4: if constexpr (RM > 4) f(std::integral_constant<int, 4>{}, r, n); break;
    case 5: if constexpr (RM > 5) f(std::integral_constant<int, 5>{}, r, n); break;
    default: break;
  }
}

struct Scratch {
  std::vector<float> qf;     // rows x head_dim, scaled fp32 query (fp32 inputs)
  std::vector<bf16> qb;      // rows x head_dim, raw bf16 query (bf16 inputs)
  std::vector<float> acc;    // rows x head_dim
  std::vector<float> P;      // rows x kChunk probabilities (fp32)
  std::vector<float> m, l, alpha, mnew, rowsum;
  std::vector<int> nvalid;
  std::vector<float> vf;     // kChunk x head_dim, V chunk converted to fp32
  std::vector<float> S;      // (rows + kTileRows) x kChunk logits (tile path)
  std::vector<uint32_t> kt;  // kChunk x head_dim words, transposed K chunk
  void ensure(int rows_in, int width) {
    // Room for a partial last register tile (its extra rows are scratch).
    const int rows = rows_in + kTileRows;
    const size_t n = static_cast<size_t>(rows) * width;
    if (acc.size() < n) {
      qf.resize(n);
      qb.resize(n);
      acc.resize(n);
    }
    const size_t cw = static_cast<size_t>(kChunk) * width;
    if (vf.size() < cw) {
      vf.resize(cw);
      kt.resize(cw);
    }
    if (m.size() < static_cast<size_t>(rows)) {
      P.resize(static_cast<size_t>(rows) * kChunk);
      S.resize(static_cast<size_t>(rows) * kChunk);
      m.resize(rows);
      l.resize(rows);
      alpha.resize(rows);
      mnew.resize(rows);
      rowsum.resize(rows);
      nvalid.resize(rows);
    }
  }
};

template <typename T, int NV>
void run_item_avx512(const Params& p, const WorkItem& w, Scratch& sc, const Partials& parts) {
  constexpr int W = NV * 16;  // row width (== head_dim)
  constexpr int RM = max_pv_rows<NV>();
  constexpr int kNSub = kChunk / kSub;
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
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());

  const bool split = w.part >= 0;
  const int64_t kv_lo = g.kv_lo, kv_hi = g.kv_hi;
  int64_t blk_idx = kv_lo / BS;
  int off = static_cast<int>(kv_lo % BS);
  // The blocks of a sequence lie anywhere in the cache, so the hardware prefetcher cannot guess
  // the next one: while a chunk is computed, the K/V rows of the next chunk are requested.
  constexpr int kRowBytes = W * static_cast<int>(sizeof(T));
  auto prefetch_chunk = [&](int64_t from) {
    const int64_t to = std::min<int64_t>(from + kChunk, kv_hi);
    for (int64_t j = from; j < to;) {
      const int64_t blk = bt[j / BS];
      const int64_t o = j % BS;
      const int64_t cnt = std::min<int64_t>(to - j, BS - o);
      const char* kr = reinterpret_cast<const char*>(kbase + blk * p.k_s_blk + o * p.k_s_tok);
      const char* vr = reinterpret_cast<const char*>(vbase + blk * p.v_s_blk + o * p.v_s_tok);
      for (int64_t c = 0; c < cnt; ++c) {
        for (int b = 0; b < kRowBytes; b += 64) {
          _mm_prefetch(kr + b, _MM_HINT_T0);
          _mm_prefetch(vr + b, _MM_HINT_T0);
        }
        kr += p.k_s_tok * sizeof(T);
        vr += p.v_s_tok * sizeof(T);
      }
      j += cnt;
    }
  };
  if (kv_lo < kv_hi) prefetch_chunk(kv_lo);
  for (int64_t j0 = kv_lo; j0 < kv_hi; j0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, kv_hi - j0));
    if (j0 + kChunk < kv_hi) prefetch_chunk(j0 + kChunk);
    // Row pointers of this chunk, walked through the block table one block
    // run at a time.
    for (int i = 0; i < n;) {
      const int64_t blk = bt[blk_idx];
      const int cnt = std::min(n - i, BS - off);
      const T* kr = kbase + blk * p.k_s_blk + off * p.k_s_tok;
      const T* vr = vbase + blk * p.v_s_blk + off * p.v_s_tok;
      for (int c = 0; c < cnt; ++c) {
        kp[i + c] = kr;
        vp[i + c] = vr;
        kr += p.k_s_tok;
        vr += p.v_s_tok;
      }
      i += cnt;
      off += cnt;
      if (off == BS) {
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
      const int64_t limit = g.pos0 + r / G + 1;  // valid KV positions: [0, limit)
      sc.nvalid[r] = static_cast<int>(std::min<int64_t>(n, limit - j0));
    }
    const bool tiled = rows - r0 >= kTransposeMinRows;
    if (tiled) {
      transpose_k_chunk<T, NV>(kp, npad / kSub, sc.kt.data());
      const T* qrows;
      if constexpr (std::is_same_v<T, float>) {
        qrows = sc.qf.data();
      } else {
        qrows = sc.qb.data();
      }
      const float post = std::is_same_v<T, float> ? 1.f : qscale;
      for (int rb = r0; rb < rows; rb += kTileRows) {
        const int last = std::min(rb + kTileRows, rows) - 1;
        const int nsb = (sc.nvalid[last] + kSub - 1) / kSub;
        const T* qr = qrows + static_cast<int64_t>(rb) * W;
        float* Sr = sc.S.data() + static_cast<int64_t>(rb) * kChunk;
        switch (nsb) {
          case 1: qk_tile<T, NV, 1>(qr, sc.kt.data(), Sr, post); break;
          case 2: qk_tile<T, NV, 2>(qr, sc.kt.data(), Sr, post); break;
          case 3: qk_tile<T, NV, 3>(qr, sc.kt.data(), Sr, post); break;
          default: qk_tile<T, NV, 4>(qr, sc.kt.data(), Sr, post); break;
        }
      }
    }
    // Softmax bookkeeping in short per-row loops (independent iterations, so
    // the out-of-order core overlaps the exp2 / reduction latencies of
    // neighbouring rows).
    // (a) logits (if not tiled), masking, new running max.
    for (int r = r0; r < rows; ++r) {
      const int nv = sc.nvalid[r];
      const int nsub = (nv + kSub - 1) / kSub;
      float* Sr = sc.S.data() + static_cast<int64_t>(r) * kChunk;
      __m512 vmax = ninf;
#pragma GCC unroll 4
      for (int b = 0; b < kNSub; ++b) {
        if (b < nsub) {
          __m512 x;
          if (tiled) {
            x = _mm512_loadu_ps(Sr + b * kSub);
          } else if constexpr (std::is_same_v<T, float>) {
            x = qk_row<NV>(sc.qf.data() + static_cast<int64_t>(r) * W, kp + b * kSub, 1.f);
          } else {
            x = qk_row<NV>(sc.qb.data() + static_cast<int64_t>(r) * W, kp + b * kSub, qscale);
          }
          const int left = nv - b * kSub;
          if (left < kSub) x = _mm512_mask_mov_ps(ninf, static_cast<__mmask16>((1u << left) - 1u), x);
          _mm512_storeu_ps(Sr + b * kSub, x);
          vmax = _mm512_max_ps(vmax, x);
        }
      }
      sc.mnew[r] = std::max(sc.m[r], _mm512_reduce_max_ps(vmax));
    }
    // (b) rescale factors for 16 rows at a time.
    for (int r = r0; r < rows; r += 16) {
      const __mmask16 mk = static_cast<__mmask16>(rows - r >= 16 ? 0xFFFFu : (1u << (rows - r)) - 1u);
      const __m512 mo = _mm512_maskz_loadu_ps(mk, sc.m.data() + r);
      const __m512 mn = _mm512_maskz_loadu_ps(mk, sc.mnew.data() + r);
      // m_old = -inf (first chunk) gives ~2^-125 (acc and l are 0 then); an
      // unchanged max gives exactly 1.
      _mm512_mask_storeu_ps(sc.alpha.data() + r, mk, exp2_ps(_mm512_sub_ps(mo, mn)));
      _mm512_mask_storeu_ps(sc.m.data() + r, mk, mn);
    }
    // (c) probabilities and their row sums.
    for (int r = r0; r < rows; ++r) {
      const int nsub = (sc.nvalid[r] + kSub - 1) / kSub;
      const float* Sr = sc.S.data() + static_cast<int64_t>(r) * kChunk;
      float* prow = sc.P.data() + static_cast<int64_t>(r) * kChunk;
      const __m512 mn = _mm512_set1_ps(sc.m[r]);
      __m512 vsum = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int b = 0; b < kNSub; ++b) {
        __m512 e = _mm512_setzero_ps();
        if (b < nsub) {
          e = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(Sr + b * kSub), mn));
          const int left = sc.nvalid[r] - b * kSub;
          if (left < kSub) e = _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << left) - 1u), e);
          vsum = _mm512_add_ps(vsum, e);
        }
        _mm512_storeu_ps(prow + b * kSub, e);
      }
      sc.rowsum[r] = _mm512_reduce_add_ps(vsum);
    }
    // (d) running denominators.
    for (int r = r0; r < rows; r += 16) {
      const __mmask16 mk = static_cast<__mmask16>(rows - r >= 16 ? 0xFFFFu : (1u << (rows - r)) - 1u);
      const __m512 l = _mm512_maskz_loadu_ps(mk, sc.l.data() + r);
      const __m512 al = _mm512_maskz_loadu_ps(mk, sc.alpha.data() + r);
      const __m512 rs = _mm512_maskz_loadu_ps(mk, sc.rowsum.data() + r);
      _mm512_mask_storeu_ps(sc.l.data() + r, mk, _mm512_fmadd_ps(l, al, rs));
    }
    float* accr = acc + static_cast<int64_t>(r0) * W;
    const float* alr = sc.alpha.data() + r0;
    const int* nvr = sc.nvalid.data() + r0;
    {
      const float* Pr = sc.P.data() + static_cast<int64_t>(r0) * kChunk;
      bool converted = false;
      if constexpr (std::is_same_v<T, bf16>) {
        if (rows - r0 > RM) {
          // Several row blocks will walk V: convert the chunk to fp32 once.
          for (int i = 0; i < n; ++i) {
            float* dst = sc.vf.data() + static_cast<int64_t>(i) * W;
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) _mm512_storeu_ps(dst + 16 * c, load_f32x16(vp[i] + 16 * c));
            vfp[i] = dst;
          }
          converted = true;
        }
      }
      for_row_blocks<RM>(nvr, rows - r0, [&](auto rc, int rr, int nn) {
        constexpr int R = decltype(rc)::value;
        float* ar = accr + static_cast<int64_t>(rr) * W;
        const float* pr = Pr + static_cast<int64_t>(rr) * kChunk;
        if (converted) {
          pv_rows<float, NV, R>(ar, W, pr, alr + rr, vfp, nn);
        } else {
          pv_rows<T, NV, R>(ar, W, pr, alr + rr, vp, nn);
        }
      });
    }
  }

  if (split) {
    float* dst = parts.data + w.part * parts.stride;
    for (int r = 0; r < rows; ++r) {
      dst[r * (W + 2)] = sc.m[r];
      dst[r * (W + 2) + 1] = sc.l[r];
      std::memcpy(dst + r * (W + 2) + 2, acc + static_cast<int64_t>(r) * W, sizeof(float) * W);
    }
    return;
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
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) store_f32x16(dst + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * c), inv));
    }
  }
}

// ---- Decode items (one query token) ----------------------------------------
// The general item loop above serves any number of rows; a decode item has only
// `group` rows, and there its per-chunk bookkeeping (pointer tables, row loops
// over scratch arrays, row blocks) cost more than the arithmetic.  This loop
// keeps the G rows' state in fixed-size arrays, walks K and V by 16-position
// sub-blocks that lie inside one cache block (block_size % 16 == 0), and in
// bf16 widens V with one shift or mask per 16 values: the accumulators then
// hold even and odd dimensions apart, and are put back in order once per item.
// The arithmetic (chunks of kChunk, the order of every sum) is that of the
// general loop, so both give the same bits.
template <typename T, int NV>
inline __m512 qk_strided(const T* q, const T* k0, int64_t stride, float post_scale) {
  const T* kp[kSub];
#pragma GCC unroll 16
  for (int i = 0; i < kSub; ++i) kp[i] = k0 + i * stride;
  return qk_row<NV>(q, kp, post_scale);
}

template <typename T, int NV, int G>
void run_decode_avx512(const Params& p, const WorkItem& w, const Partials& parts, const WorkItem* next, bool warm) {
  constexpr int W = NV * 16;
  constexpr int RB = G < 24 / NV ? G : 24 / NV;  // rows whose accumulators share the registers
  constexpr bool kPairs = std::is_same_v<T, bf16>;  // V widened as even/odd halves
  static_assert(NV % 2 == 0, "bf16 V is widened 32 values (two vectors) at a time");
  constexpr int kNSub = kChunk / kSub;
  const ItemGeom g = geom(p, w);
  const float qscale = p.scale * kLog2e;
  const float post = std::is_same_v<T, float> ? 1.f : qscale;

  alignas(64) T q[G][W];
  alignas(64) float acc[G][W];
  alignas(64) float S[G][kChunk];
  alignas(64) float P[G][kChunk];
  float m[G], l[G], alpha[G];
  const T* qbase = reinterpret_cast<const T*>(p.q) + g.first_row * p.q_s_tok;
  for (int gi = 0; gi < G; ++gi) {
    const T* src = qbase + (static_cast<int64_t>(w.kv_head) * G + gi) * p.q_s_head;
    if constexpr (std::is_same_v<T, float>) {
      for (int d = 0; d < W; ++d) q[gi][d] = src[d] * qscale;
    } else {
      std::memcpy(q[gi], src, sizeof(T) * W);
    }
    std::memset(acc[gi], 0, sizeof(acc[gi]));
    m[gi] = -std::numeric_limits<float>::infinity();
    l[gi] = 0.f;
  }

  const int64_t BS = p.block_size;
  const int64_t ks = p.k_s_tok, vs = p.v_s_tok;
  const bool split = w.part >= 0;
  const int64_t kv_lo = g.kv_lo, kv_hi = g.kv_hi;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());

  // The K/V rows of later chunks are requested into L2 while this chunk is computed: blocks lie
  // anywhere in the cache, so the hardware prefetcher cannot guess them. Each chunk is requested
  // twice: kAhead (2) chunks early, one row per V row used in the P.V loop, and again one chunk
  // early during the logits, which makes good the requests the core dropped or that were evicted
  // in between. Chunks are counted in a stream that runs on into the next item, so the hand-over
  // between items does not wait either; an item that follows another decode item on the same
  // worker (``warm``) finds its first chunks requested. Measured on 41 sequences x ~220
  // positions x 30 layers of fp32 K/V in DRAM (30 GB/s): one chunk early into L1 ran at
  // 13.6 GB/s, into L2 at ~22, twice as here at 25-29.
  constexpr int kAhead = 2;
  constexpr int kRowBytes = W * static_cast<int>(sizeof(T));
  struct SubBlocks {
    const T* k[kNSub];
    const T* v[kNSub];
    int n = 0;  // valid positions
  };
  auto locate = [&](const WorkItem& it, int64_t j0, int64_t hi, SubBlocks& sb) {
    const int32_t* table = p.block_tables + static_cast<int64_t>(it.seq) * p.bt_stride;
    const T* kb0 = reinterpret_cast<const T*>(p.k) + static_cast<int64_t>(it.kv_head) * p.k_s_head;
    const T* vb0 = reinterpret_cast<const T*>(p.v) + static_cast<int64_t>(it.kv_head) * p.v_s_head;
    sb.n = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kChunk, hi - j0)));
    for (int b = 0; b * kSub < sb.n; ++b) {
      const int64_t pos = j0 + b * kSub;
      const int64_t blk = table[pos / BS];
      sb.k[b] = kb0 + blk * p.k_s_blk + (pos % BS) * ks;
      sb.v[b] = vb0 + blk * p.v_s_blk + (pos % BS) * vs;
    }
  };
  const int64_t nchunks = (kv_hi - kv_lo + kChunk - 1) / kChunk;
  const bool next_decode = next != nullptr && next->ntok == 1;
  const ItemGeom ng = next_decode ? geom(p, *next) : ItemGeom{};
  // Chunk s of the stream: this item's chunk s, then the next decode item's chunks.
  auto locate_stream = [&](int64_t s, SubBlocks& sb) {
    sb.n = 0;
    if (s < nchunks) {
      locate(w, kv_lo + s * kChunk, kv_hi, sb);
    } else if (next_decode) {
      locate(*next, ng.kv_lo + (s - nchunks) * kChunk, ng.kv_hi, sb);
    }
  };
  auto prefetch_rows = [&](const T* first, int64_t stride, int count) {
    for (int i = 0; i < count; ++i) {
      const char* r = reinterpret_cast<const char*>(first + i * stride);
      for (int b = 0; b < kRowBytes; b += 64) _mm_prefetch(r + b, _MM_HINT_T1);
    }
  };
  SubBlocks cur, ahead;
  if (!warm) {
    for (int s = 0; s < kAhead; ++s) {
      locate_stream(s, ahead);
      for (int b = 0; b * kSub < ahead.n; ++b) {
        prefetch_rows(ahead.k[b], ks, std::min(kSub, ahead.n - b * kSub));
        prefetch_rows(ahead.v[b], vs, std::min(kSub, ahead.n - b * kSub));
      }
    }
  }

  if (nchunks > 0) locate(w, kv_lo, kv_hi, cur);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int n = cur.n;
    const int nsub = (n + kSub - 1) / kSub;
    locate_stream(c + kAhead, ahead);
    const int nsub_ahead = (ahead.n + kSub - 1) / kSub;
    SubBlocks near;
    locate_stream(c + 1, near);
    const int nsub_near = (near.n + kSub - 1) / kSub;
    const T* const* kb = cur.k;
    const T* const* vb = cur.v;
    // Logits, masking (a short last sub-block reads rows of its own block past
    // the sequence end, whatever they hold, and masks them), running max.
    float mnew[G];
    for (int gi = 0; gi < G; ++gi) {
      __m512 vmax = ninf;
      for (int b = 0; b < nsub; ++b) {
        if (gi == 0 && b < nsub_near) {
          prefetch_rows(near.k[b], ks, std::min(kSub, near.n - b * kSub));
          prefetch_rows(near.v[b], vs, std::min(kSub, near.n - b * kSub));
        }
        __m512 x = qk_strided<T, NV>(q[gi], kb[b], ks, post);
        const int left = n - b * kSub;
        if (left < kSub) x = _mm512_mask_mov_ps(ninf, static_cast<__mmask16>((1u << left) - 1u), x);
        _mm512_store_ps(S[gi] + b * kSub, x);
        vmax = _mm512_max_ps(vmax, x);
      }
      mnew[gi] = std::max(m[gi], _mm512_reduce_max_ps(vmax));
    }
    // Probabilities, rescale factors, denominators.
    for (int gi = 0; gi < G; ++gi) {
      // m = -inf (first chunk) gives ~2^-125 (acc and l are 0 then); an unchanged max gives 1.
      alpha[gi] = _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(m[gi] - mnew[gi])));
      m[gi] = mnew[gi];
      const __m512 mn = _mm512_set1_ps(mnew[gi]);
      __m512 vsum = _mm512_setzero_ps();
      for (int b = 0; b < nsub; ++b) {
        __m512 e = exp2_ps(_mm512_sub_ps(_mm512_load_ps(S[gi] + b * kSub), mn));
        const int left = n - b * kSub;
        if (left < kSub) e = _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << left) - 1u), e);
        vsum = _mm512_add_ps(vsum, e);
        _mm512_store_ps(P[gi] + b * kSub, e);
      }
      l[gi] = std::fma(l[gi], alpha[gi], _mm512_reduce_add_ps(vsum));
    }
    // acc = acc * alpha + P V, RB rows at a time with their accumulators in registers.
#pragma GCC unroll 1
    for (int r0 = 0; r0 < G; r0 += RB) {
      constexpr int R = RB;
      const int rows = std::min(R, G - r0);
      __m512 a[R][NV];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        const __m512 al = _mm512_set1_ps(alpha[r0 + r]);
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) a[r][c] = _mm512_mul_ps(_mm512_load_ps(acc[r0 + r] + 16 * c), al);
      }
      for (int b = 0; b < nsub; ++b) {
        const int cnt = std::min(kSub, n - b * kSub);
        const T* vr = vb[b];
        const int ahead_here = r0 == 0 && b < nsub_ahead ? std::min(cnt, ahead.n - b * kSub) : 0;
        for (int i = 0; i < cnt; ++i, vr += vs) {
          if (i < ahead_here) {  // one K and one V row of the chunk kAhead on per row used here
            prefetch_rows(ahead.k[b] + i * ks, ks, 1);
            prefetch_rows(ahead.v[b] + i * vs, vs, 1);
          }
          __m512 vv[NV];
          if constexpr (kPairs) {
            // 32 bf16 (16 pairs) -> the even dimensions (low halves shifted up) and the odd ones.
#pragma GCC unroll 8
            for (int c = 0; c < NV / 2; ++c) {
              const __m512i u = _mm512_loadu_si512(vr + 32 * c);
              vv[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
              vv[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
            }
          } else {
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) vv[c] = load_f32x16(vr + 16 * c);
          }
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            if (r >= rows) break;
            const __m512 pr = _mm512_set1_ps(P[r0 + r][b * kSub + i]);
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
          }
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) _mm512_store_ps(acc[r0 + r] + 16 * c, a[r][c]);
      }
    }
    for (int i = n; i < ahead.n; ++i) {  // a short chunk: the rest of the one ahead
      prefetch_rows(ahead.k[i / kSub] + (i % kSub) * ks, ks, 1);
      prefetch_rows(ahead.v[i / kSub] + (i % kSub) * vs, vs, 1);
    }
    cur = near;  // this item's next chunk (when there is one), located for the requests above
  }

  if constexpr (kPairs) {
    // Back to dimension order: vectors (2c, 2c+1) hold dims 32c + 2k and 32c + 2k + 1 in lane k.
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int gi = 0; gi < G; ++gi) {
      for (int c = 0; c < NV / 2; ++c) {
        const __m512 ev = _mm512_load_ps(acc[gi] + 32 * c);
        const __m512 od = _mm512_load_ps(acc[gi] + 32 * c + 16);
        _mm512_store_ps(acc[gi] + 32 * c, _mm512_permutex2var_ps(ev, lo_idx, od));
        _mm512_store_ps(acc[gi] + 32 * c + 16, _mm512_permutex2var_ps(ev, hi_idx, od));
      }
    }
  }
  if (split) {
    float* dst = parts.data + w.part * parts.stride;
    for (int gi = 0; gi < G; ++gi) {
      dst[gi * (W + 2)] = m[gi];
      dst[gi * (W + 2) + 1] = l[gi];
      std::memcpy(dst + gi * (W + 2) + 2, acc[gi], sizeof(float) * W);
    }
    return;
  }
  T* obase = reinterpret_cast<T*>(p.out) + g.first_row * p.o_s_tok;
  for (int gi = 0; gi < G; ++gi) {
    T* dst = obase + (static_cast<int64_t>(w.kv_head) * G + gi) * p.o_s_head;
    const __m512 inv = _mm512_set1_ps(1.f / l[gi]);
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) store_f32x16(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc[gi] + 16 * c), inv));
  }
}

// Runs a decode item through run_decode_avx512 when its shape has an
// instantiation (head_dim 64 or 128, group 1-8, block_size a multiple of 16,
// split ranges starting on a chunk); returns false otherwise.
template <typename T>
bool run_decode_dispatch(const Params& p, const WorkItem& w, int nv, const Partials& parts, const WorkItem* next,
                         bool warm) {
  if (w.ntok != 1 || p.block_size % kSub != 0 || (w.part >= 0 && w.kv_lo % kChunk != 0)) return false;
  switch (nv * 16 + p.group) {
#define QUIRE_DECODE_CASE(NV_, G_) \
  case NV_ * 16 + G_:              \
    run_decode_avx512<T, NV_, G_>(p, w, parts, next, warm); \
    return true;
    QUIRE_DECODE_CASE(4, 1) QUIRE_DECODE_CASE(4, 2) QUIRE_DECODE_CASE(4, 3) QUIRE_DECODE_CASE(4, 4)
    QUIRE_DECODE_CASE(4, 5) QUIRE_DECODE_CASE(4, 6) QUIRE_DECODE_CASE(4, 7) QUIRE_DECODE_CASE(4, 8)
    QUIRE_DECODE_CASE(8, 1) QUIRE_DECODE_CASE(8, 2) QUIRE_DECODE_CASE(8, 3) QUIRE_DECODE_CASE(8, 4)
    QUIRE_DECODE_CASE(8, 5) QUIRE_DECODE_CASE(8, 6) QUIRE_DECODE_CASE(8, 7) QUIRE_DECODE_CASE(8, 8)
#undef QUIRE_DECODE_CASE
    default:
      return false;
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

#if QUIRE_VEC
// ---------------------------------------------------------------------------
// Portable vector path: ATen's Vectorized<float> (8 lanes on AVX2, 16 on
// AVX-512, 4 on NEON), for every head_dim that is a multiple of the vector
// width when the AVX-512 path does not apply.  Same chunked base-2 online
// softmax as above, in float32; bf16 K/V are widened on load.
// ---------------------------------------------------------------------------
namespace pv = quire_pvec;

constexpr int kVW = pv::kW;
// Register budgets: AVX2 has 16 vector registers, AVX-512 and NEON 32.
constexpr int kVRegs = kVW == 8 ? 16 : 32;
constexpr int kQkSlab = kVRegs == 16 ? 4 : 8;   // q vectors held while dotting kW K rows
constexpr int kPvCols = kVRegs == 16 ? 3 : 4;   // head_dim vectors per P.V accumulator slab
constexpr int kPvRows = kVRegs == 16 ? 3 : 6;   // rows per P.V register block
constexpr int kTileR = kVRegs == 16 ? 4 : 6;    // rows per Q.K tile register block
constexpr int kTileNB = kVRegs == 16 ? 3 : 4;    // position vectors per Q.K tile register block
constexpr int kVecTileMinRows = 8;              // prefill items from this many rows transpose K

// Logits of one row against kW K rows: kp[i] . q for i < kW, each row's products accumulated
// over head_dim in a vector, the kW vectors reduced together.  q: fp32, scaled by scale*log2e.
template <typename T>
inline pv::Vec qk_dot(const float* q, const T* const* kp, int nvec) {
  pv::Vec a[kVW];
#pragma GCC unroll 16
  for (int i = 0; i < kVW; ++i) a[i] = pv::Vec(0.f);
  for (int c0 = 0; c0 < nvec; c0 += kQkSlab) {
    const int cnt = std::min(kQkSlab, nvec - c0);
    pv::Vec qv[kQkSlab];
#pragma GCC unroll 8
    for (int c = 0; c < kQkSlab; ++c) qv[c] = c < cnt ? pv::load(q + (c0 + c) * kVW) : pv::Vec(0.f);
#pragma GCC unroll 16
    for (int i = 0; i < kVW; ++i) {
      const T* k = kp[i] + c0 * kVW;
#pragma GCC unroll 8
      for (int c = 0; c < kQkSlab; ++c) {
        if (c < cnt) a[i] = at::vec::fmadd(qv[c], pv::load(k + c * kVW), a[i]);
      }
    }
  }
  return pv::hsum_transposed(a);
}

// S[r][b * kW + lane] for R rows and NB position vectors from the transposed K chunk
// (kt[d * kChunk + position]): broadcast query elements times K^T rows, no horizontal sums.
template <int R, int NB>
inline void qk_tile_vec(const float* q, int64_t q_stride, const float* kt, int D, float* S) {
  pv::Vec acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[r][b] = pv::Vec(0.f);
#pragma GCC unroll 2
  for (int d = 0; d < D; ++d) {
    pv::Vec k[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) k[b] = pv::Vec::loadu(kt + static_cast<int64_t>(d) * kChunk + b * kVW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const pv::Vec qb(q[r * q_stride + d]);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(qb, k[b], acc[r][b]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[r][b].store(S + r * kChunk + b * kVW);
}

template <int R>
inline void qk_tile_vec_nb(int nb, const float* q, int64_t q_stride, const float* kt, int D, float* S) {
  static_assert(kTileNB >= 3 && kTileNB <= 4, "nb is dispatched for 1..4");
  if (nb >= kTileNB) {
    qk_tile_vec<R, kTileNB>(q, q_stride, kt, D, S);
    return;
  }
  switch (nb) {
    case 1: qk_tile_vec<R, 1>(q, q_stride, kt, D, S); break;
    case 2: qk_tile_vec<R, 2>(q, q_stride, kt, D, S); break;
    default: qk_tile_vec<R, 3>(q, q_stride, kt, D, S); break;
  }
}

// acc[r] = acc[r] * alpha[r] + sum_i P[r][i] V[i] on the CV head_dim vectors from c0 of R rows,
// the R x CV accumulators in registers across the chunk's positions.
template <typename T, int R, int CV>
inline void pv_block_vec(float* acc, int64_t acc_stride, const float* P, const float* alpha, const T* const* vp,
                         int n, int c0) {
  pv::Vec a[R][CV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const pv::Vec al(alpha[r]);
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) a[r][c] = pv::load(acc + r * acc_stride + (c0 + c) * kVW) * al;
  }
  for (int i = 0; i < n; ++i) {
    const T* v = vp[i] + c0 * kVW;
    pv::Vec vv[CV];
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) vv[c] = pv::load(v + c * kVW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const pv::Vec pr(P[r * kChunk + i]);
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) a[r][c] = at::vec::fmadd(pr, vv[c], a[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) pv::store(acc + r * acc_stride + (c0 + c) * kVW, a[r][c]);
}

// All head_dim slabs of one row block.
template <typename T, int R>
inline void pv_rows_vec(float* acc, int64_t acc_stride, const float* P, const float* alpha, const T* const* vp,
                        int n, int nvec) {
  for (int c0 = 0; c0 < nvec; c0 += kPvCols) {
    switch (std::min(kPvCols, nvec - c0)) {
      case 1: pv_block_vec<T, R, 1>(acc, acc_stride, P, alpha, vp, n, c0); break;
      case 2: pv_block_vec<T, R, 2>(acc, acc_stride, P, alpha, vp, n, c0); break;
      case 3: pv_block_vec<T, R, 3>(acc, acc_stride, P, alpha, vp, n, c0); break;
      default: pv_block_vec<T, R, kPvCols>(acc, acc_stride, P, alpha, vp, n, c0); break;
    }
  }
}

// Calls f(integral_constant<R>, first_row) for consecutive blocks of at most RM (<= 6) rows.
template <int RM, typename F>
inline void for_vec_row_blocks(int rows, F&& f) {
  int r = 0;
  for (; r + RM <= rows; r += RM) f(std::integral_constant<int, RM>{}, r);
  switch (rows - r) {
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    case 2: if constexpr (RM > 2) f(std::integral_constant<int, 2>{}, r); break;
    case 3: if constexpr (RM > 3) f(std::integral_constant<int, 3>{}, r); break;
    case 4: if constexpr (RM > 4) f(std::integral_constant<int, 4>{}, r); break;
    case 5: if constexpr (RM > 5) f(std::integral_constant<int, 5>{}, r); break;
    default: break;
  }
}

struct VecScratch {
  std::vector<float> q;      // rows x head_dim, query scaled by scale*log2e
  std::vector<float> acc;    // rows x head_dim
  std::vector<float> S, P;   // rows x kChunk logits / probabilities
  std::vector<float> m, l, mnew, alpha;
  std::vector<int> nvalid;
  std::vector<float> kf;     // kChunk x head_dim, the K chunk in fp32 rows (tile path)
  std::vector<float> kt;     // head_dim x kChunk, the K chunk transposed (tile path)
  std::vector<float> vf;     // kChunk x head_dim, the V chunk in fp32 (bf16, many row blocks)
  void ensure(int rows, int width) {
    const size_t n = static_cast<size_t>(rows) * width;
    if (acc.size() < n) {
      q.resize(n);
      acc.resize(n);
    }
    const size_t cw = static_cast<size_t>(kChunk) * width;
    if (kf.size() < cw) {
      kf.resize(cw);
      kt.resize(cw);
      vf.resize(cw);
    }
    // Rows rounded up to whole vectors for the per-row bookkeeping done kW rows at a time.
    const size_t rr = static_cast<size_t>((rows + kVW - 1) / kVW * kVW);
    if (m.size() < rr) {
      S.resize(rr * kChunk);
      P.resize(rr * kChunk);
      m.resize(rr);
      l.resize(rr);
      mnew.resize(rr);
      alpha.resize(rr);
      nvalid.resize(rr);
    }
  }
};

inline bool vec_head_dim(int head_dim) { return head_dim > 0 && head_dim % kVW == 0; }

template <typename T>
void run_item_vec(const Params& p, const WorkItem& w, VecScratch& sc, const Partials& parts, const WorkItem* next,
                  bool warm) {
  const int D = p.head_dim;
  const int nvec = D / kVW;
  const int G = p.group;
  const int rows = w.ntok * G;
  const ItemGeom g = geom(p, w);
  sc.ensure(rows, D);
  const float qscale = p.scale * kLog2e;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // Query rows (row r = t * G + gi), scaled once so that the logits come out in base 2.
  const T* qbase = reinterpret_cast<const T*>(p.q);
  float* acc = sc.acc.data();
  for (int t = 0; t < w.ntok; ++t) {
    for (int gi = 0; gi < G; ++gi) {
      const int r = t * G + gi;
      const T* src = qbase + (g.first_row + t) * p.q_s_tok + (static_cast<int64_t>(w.kv_head) * G + gi) * p.q_s_head;
      float* dst = sc.q.data() + static_cast<int64_t>(r) * D;
      for (int c = 0; c < nvec; ++c) pv::store(dst + c * kVW, pv::load(src + c * kVW) * pv::Vec(qscale));
      std::memset(acc + static_cast<int64_t>(r) * D, 0, sizeof(float) * D);
      sc.m[r] = kNegInf;
      sc.l[r] = 0.f;
    }
  }

  const int BS = p.block_size;
  const float* vfp[kChunk];
  const int64_t kv_lo = g.kv_lo, kv_hi = g.kv_hi;
  const bool tiles = w.ntok > 1 && rows >= kVecTileMinRows;

  // The KV positions an item reads, as a stream of chunks that runs on into the next decode
  // item of this worker, so that its first rows are requested while this one finishes.
  struct Span {
    const int32_t* bt;
    const T* k;
    const T* v;
    int64_t lo, hi;
  };
  auto span_of = [&](const WorkItem& it) {
    const ItemGeom ig = geom(p, it);
    return Span{p.block_tables + static_cast<int64_t>(it.seq) * p.bt_stride,
                reinterpret_cast<const T*>(p.k) + static_cast<int64_t>(it.kv_head) * p.k_s_head,
                reinterpret_cast<const T*>(p.v) + static_cast<int64_t>(it.kv_head) * p.v_s_head, ig.kv_lo, ig.kv_hi};
  };
  const Span self = span_of(w);
  const Span after = next != nullptr && next->ntok == 1 ? span_of(*next) : Span{nullptr, nullptr, nullptr, 0, 0};
  const int64_t nchunks = (kv_hi - kv_lo + kChunk - 1) / kChunk;

  // Row pointers of a chunk, one block run at a time; padded to whole vectors with the last
  // row (its logits are masked).
  struct ChunkRows {
    const T* k[kChunk];
    const T* v[kChunk];
    int n = 0;  // valid positions
  };
  auto locate = [&](const Span& sp, int64_t j0, ChunkRows& c) {
    const int n = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kChunk, sp.hi - j0)));
    c.n = n;
    for (int i = 0; i < n;) {
      const int64_t pos = j0 + i;
      const int64_t blk = sp.bt[pos / BS];
      const int off = static_cast<int>(pos % BS);
      const int cnt = std::min(n - i, BS - off);
      const T* kr = sp.k + blk * p.k_s_blk + off * p.k_s_tok;
      const T* vr = sp.v + blk * p.v_s_blk + off * p.v_s_tok;
      for (int e = 0; e < cnt; ++e) {
        c.k[i + e] = kr;
        c.v[i + e] = vr;
        kr += p.k_s_tok;
        vr += p.v_s_tok;
      }
      i += cnt;
    }
    for (int i = n; i < (n + kVW - 1) / kVW * kVW; ++i) {
      c.k[i] = c.k[n - 1];
      c.v[i] = c.v[n - 1];
    }
  };
  auto locate_stream = [&](int64_t s, ChunkRows& c) {
    if (s < nchunks) {
      locate(self, kv_lo + s * kChunk, c);
    } else {
      locate(after, after.lo + (s - nchunks) * kChunk, c);
    }
  };
  // The blocks of a sequence lie anywhere in the cache, so the hardware prefetcher cannot follow
  // them: the K/V rows of the chunk kPfAhead on are requested into L2 while this one is computed,
  // a few rows per Q.K sub-block (a burst of a whole chunk's requests stalls the loads behind it).
  const int row_bytes = D * static_cast<int>(sizeof(T));
  auto prefetch_rows = [&](const ChunkRows& c, int lo, int hi) {
    hi = std::min(hi, c.n);
    for (int i = lo; i < hi; ++i) {
      const char* kr = reinterpret_cast<const char*>(c.k[i]);
      const char* vr = reinterpret_cast<const char*>(c.v[i]);
      for (int b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kr + b, 0, 2);
        __builtin_prefetch(vr + b, 0, 2);
      }
    }
  };
  constexpr int kPfAhead = 2;
  ChunkRows ring[kPfAhead + 1];
  for (int a = 0; a < kPfAhead; ++a) {
    locate_stream(a, ring[a]);
    if (!warm || a >= nchunks) prefetch_rows(ring[a], 0, kChunk);  // warm: the previous item requested them
  }

  for (int64_t j0 = kv_lo, ci = 0; j0 < kv_hi; j0 += kChunk, ++ci) {
    const ChunkRows& cur = ring[ci % (kPfAhead + 1)];
    ChunkRows& ahead = ring[(ci + kPfAhead) % (kPfAhead + 1)];
    locate_stream(ci + kPfAhead, ahead);
    // The next chunk's rows are requested a second time, which makes good requests the core
    // dropped while its queues were full.
    const ChunkRows& near = ring[(ci + 1) % (kPfAhead + 1)];
    const T* const* kp = cur.k;
    const T* const* vp = cur.v;
    const int n = cur.n;
    const int npad = (n + kVW - 1) / kVW * kVW;
    // Causal limits: rows whose position is < j0 see nothing of this chunk.
    const int t_first = static_cast<int>(std::max<int64_t>(0, j0 - g.pos0));
    const int r0 = t_first * G;
    for (int r = r0; r < rows; ++r) {
      const int64_t limit = g.pos0 + r / G + 1;  // valid KV positions: [0, limit)
      sc.nvalid[r] = static_cast<int>(std::min<int64_t>(n, limit - j0));
    }

    // (a) Logits in S.
    if (tiles && rows - r0 >= kVecTileMinRows) {
      // K chunk to fp32 rows, then transposed (kW x kW blocks), shared by all rows of the tile.
      prefetch_rows(ahead, 0, kChunk);  // ample arithmetic per chunk to hide the burst
      float* kf = sc.kf.data();
      float* kt = sc.kt.data();
      for (int i = 0; i < npad; ++i) {
        for (int c = 0; c < nvec; ++c) pv::store(kf + static_cast<int64_t>(i) * D + c * kVW, pv::load(kp[i] + c * kVW));
      }
      for (int i0 = 0; i0 < npad; i0 += kVW) {
        for (int d0 = 0; d0 < D; d0 += kVW) {
          at::vec::transpose_mxn<float, kVW, kVW>(kf + static_cast<int64_t>(i0) * D + d0, D,
                                                  kt + static_cast<int64_t>(d0) * kChunk + i0, kChunk);
        }
      }
      for (int rb = r0; rb < rows; rb += kTileR) {
        const int R = std::min(kTileR, rows - rb);
        const int nsv = (sc.nvalid[rb + R - 1] + kVW - 1) / kVW;  // the last row sees the most
        const float* qr = sc.q.data() + static_cast<int64_t>(rb) * D;
        float* Sr = sc.S.data() + static_cast<int64_t>(rb) * kChunk;
        for (int b0 = 0; b0 < nsv; b0 += kTileNB) {
          const int nb = std::min(kTileNB, nsv - b0);
          const float* ktb = kt + b0 * kVW;
          float* Sb = Sr + b0 * kVW;
          switch (R) {
            case 1: qk_tile_vec_nb<1>(nb, qr, D, ktb, D, Sb); break;
            case 2: qk_tile_vec_nb<2>(nb, qr, D, ktb, D, Sb); break;
            case 3: qk_tile_vec_nb<3>(nb, qr, D, ktb, D, Sb); break;
            case 4: if constexpr (kTileR >= 4) qk_tile_vec_nb<4>(nb, qr, D, ktb, D, Sb); break;
            case 5: if constexpr (kTileR >= 5) qk_tile_vec_nb<5>(nb, qr, D, ktb, D, Sb); break;
            default: if constexpr (kTileR >= 6) qk_tile_vec_nb<6>(nb, qr, D, ktb, D, Sb); break;
          }
        }
      }
    } else {
      // Few rows (decode: the group's query heads): each kW-row K block is dotted with every
      // row while it is in L1, so each K row is read from memory once for the whole group.
      const int nsb = npad / kVW;
      for (int b = 0; b < nsb; ++b) {
        prefetch_rows(ahead, b * kVW, (b + 1) * kVW);
        prefetch_rows(near, b * kVW, (b + 1) * kVW);
        for (int r = r0; r < rows; ++r) {
          if (b * kVW >= sc.nvalid[r]) continue;
          qk_dot<T>(sc.q.data() + static_cast<int64_t>(r) * D, kp + b * kVW, nvec)
              .store(sc.S.data() + static_cast<int64_t>(r) * kChunk + b * kVW);
        }
      }
      prefetch_rows(ahead, npad, kChunk);  // a short chunk: the rest of the ones ahead
      prefetch_rows(near, npad, kChunk);
    }
    // (b) Masking and the new running max per row.
    for (int r = r0; r < rows; ++r) {
      const int nv = sc.nvalid[r];
      float* Sr = sc.S.data() + static_cast<int64_t>(r) * kChunk;
      pv::Vec vmax(kNegInf);
      for (int b = 0; b * kVW < nv; ++b) {
        const pv::Vec x = pv::keep_first(pv::Vec::loadu(Sr + b * kVW), nv - b * kVW, pv::Vec(kNegInf));
        vmax = at::vec::maximum(vmax, x);
      }
      sc.mnew[r] = std::max(sc.m[r], pv::max(vmax));
    }
    // (c) Rescale factors, kW rows at a time.  m = -inf (first chunk) gives ~2^-125 (acc and l
    // are 0 then); an unchanged max gives exactly 1.
    for (int r = r0; r < rows; r += kVW) {
      const int cnt = std::min(kVW, rows - r);
      const pv::Vec mo = pv::load(sc.m.data() + r, cnt);
      const pv::Vec mn = pv::load(sc.mnew.data() + r, cnt);
      pv::store(sc.alpha.data() + r, pv::exp2(mo - mn), cnt);
      pv::store(sc.m.data() + r, mn, cnt);
    }
    // (d) Probabilities (zero past each row's limit, up to the chunk end) and denominators.
    for (int r = r0; r < rows; ++r) {
      const int nv = sc.nvalid[r];
      const float* Sr = sc.S.data() + static_cast<int64_t>(r) * kChunk;
      float* Pr = sc.P.data() + static_cast<int64_t>(r) * kChunk;
      const pv::Vec mn(sc.m[r]);
      pv::Vec vsum(0.f);
      for (int b = 0; b < npad / kVW; ++b) {
        pv::Vec e(0.f);
        if (b * kVW < nv) {
          e = pv::keep_first(pv::exp2(pv::Vec::loadu(Sr + b * kVW) - mn), nv - b * kVW, pv::Vec(0.f));
          vsum = vsum + e;
        }
        e.store(Pr + b * kVW);
      }
      sc.l[r] = sc.l[r] * sc.alpha[r] + pv::sum(vsum);
    }
    // (e) acc = acc * alpha + P V, in register blocks of rows x head_dim slabs.  A row block reads
    // the chunk's positions up to its most advanced row (later ones have P = 0).
    const int prow = rows - r0;
    const int nblocks = (prow + kPvRows - 1) / kPvRows;
    bool converted = false;
    if constexpr (std::is_same_v<T, bf16>) {
      if (nblocks > 2) {
        // Several row blocks walk V: widen the chunk to fp32 once.
        for (int i = 0; i < n; ++i) {
          float* dst = sc.vf.data() + static_cast<int64_t>(i) * D;
          for (int c = 0; c < nvec; ++c) pv::store(dst + c * kVW, pv::load(vp[i] + c * kVW));
          vfp[i] = dst;
        }
        converted = true;
      }
    }
    for_vec_row_blocks<kPvRows>(prow, [&](auto rc, int rr) {
      constexpr int R = decltype(rc)::value;
      const int r = r0 + rr;
      const int nn = sc.nvalid[r + R - 1];
      float* ar = acc + static_cast<int64_t>(r) * D;
      const float* Pr = sc.P.data() + static_cast<int64_t>(r) * kChunk;
      if (converted) {
        pv_rows_vec<float, R>(ar, D, Pr, sc.alpha.data() + r, vfp, nn, nvec);
      } else {
        pv_rows_vec<T, R>(ar, D, Pr, sc.alpha.data() + r, vp, nn, nvec);
      }
    });
  }

  if (w.part >= 0) {
    float* dst = parts.data + w.part * parts.stride;
    for (int r = 0; r < rows; ++r) {
      dst[r * (D + 2)] = sc.m[r];
      dst[r * (D + 2) + 1] = sc.l[r];
      std::memcpy(dst + r * (D + 2) + 2, acc + static_cast<int64_t>(r) * D, sizeof(float) * D);
    }
    return;
  }
  T* obase = reinterpret_cast<T*>(p.out);
  for (int t = 0; t < w.ntok; ++t) {
    for (int gi = 0; gi < G; ++gi) {
      const int r = t * G + gi;
      T* dst = obase + (g.first_row + t) * p.o_s_tok + (static_cast<int64_t>(w.kv_head) * G + gi) * p.o_s_head;
      const float* a = acc + static_cast<int64_t>(r) * D;
      const pv::Vec inv(1.f / sc.l[r]);
      for (int c = 0; c < nvec; ++c) pv::store(dst + c * kVW, pv::load(a + c * kVW) * inv, kVW);
    }
  }
}
#endif  // QUIRE_VEC

// Whether the portable vector path takes a call the AVX-512 path does not cover.
inline bool use_vec_path(int head_dim) {
#if QUIRE_VEC
  return vec_head_dim(head_dim);
#else
  (void)head_dim;
  return false;
#endif
}

template <typename T>
void run_all(const Params& p, const std::vector<WorkItem>& items, int nv, bool vec, const Partials& parts) {
  // Threads claim runs of items. With enough decode sequences to go round, the whole (unsplit)
  // decode items of one sequence form one run: its kv heads are interleaved in each cache block,
  // so one core walking all of them reads every block once, in order, where cores taking
  // alternate heads would each pull the whole block through their caches.
  const int64_t nthreads = std::max(1, at::get_num_threads());
  int64_t decode_seqs = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const WorkItem& w = items[i];
    decode_seqs += w.part < 0 && w.ntok == 1 && w.kv_head == 0;
  }
  const bool group_heads = decode_seqs >= 4 * nthreads;
  std::vector<int64_t> runs;
  runs.reserve(items.size() + 1);
  for (size_t i = 0; i < items.size(); ++i) {
    const WorkItem& w = items[i];
    const bool joins = group_heads && i > 0 && w.part < 0 && w.ntok == 1 && items[i - 1].part < 0 &&
                       items[i - 1].ntok == 1 && items[i - 1].seq == w.seq;
    if (!joins) runs.push_back(static_cast<int64_t>(i));
  }
  runs.push_back(static_cast<int64_t>(items.size()));
  std::atomic<int64_t> next{0};
  const int64_t nruns = static_cast<int64_t>(runs.size()) - 1;
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(nthreads, nruns));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
#if QUIRE_AVX512
    Scratch sc;
#endif
#if QUIRE_VEC
    VecScratch vsc;
#endif
    std::vector<float> gbuf;
    // A worker claims its next run before it starts the current one, so the last decode item of
    // a run can request the first K/V rows of the next while it computes.
    [[maybe_unused]] bool warm = false;  // the previous item was a decode item, which requested this one's first rows
    int64_t r = next.fetch_add(1, std::memory_order_relaxed);
    while (r < nruns) {
      const int64_t after = next.fetch_add(1, std::memory_order_relaxed);
      for (int64_t i = runs[r]; i < runs[r + 1]; ++i) {
        const WorkItem& w = items[i];
        const int64_t j = i + 1 < runs[r + 1] ? i + 1 : (after < nruns ? runs[after] : -1);
        [[maybe_unused]] const WorkItem* next = j >= 0 ? &items[j] : nullptr;
#if QUIRE_AVX512
        warm = nv != 0 && run_decode_dispatch<T>(p, w, nv, parts, next, warm);
        if (warm) continue;
#endif
        switch (nv) {
#if QUIRE_AVX512
          case 1: run_item_avx512<T, 1>(p, w, sc, parts); break;
          case 2: run_item_avx512<T, 2>(p, w, sc, parts); break;
          case 3: run_item_avx512<T, 3>(p, w, sc, parts); break;
          case 4: run_item_avx512<T, 4>(p, w, sc, parts); break;
          case 5: run_item_avx512<T, 5>(p, w, sc, parts); break;
          case 6: run_item_avx512<T, 6>(p, w, sc, parts); break;
          case 7: run_item_avx512<T, 7>(p, w, sc, parts); break;
          case 8: run_item_avx512<T, 8>(p, w, sc, parts); break;
          case 10: run_item_avx512<T, 10>(p, w, sc, parts); break;
          case 12: run_item_avx512<T, 12>(p, w, sc, parts); break;
          case 16: run_item_avx512<T, 16>(p, w, sc, parts); break;
#endif
          default:
#if QUIRE_VEC
            if (vec) {
              run_item_vec<T>(p, w, vsc, parts, next, warm);
              warm = w.ntok == 1 && next != nullptr && next->ntok == 1;  // it requested the next one's first rows
              break;
            }
#endif
            run_item_generic<T>(p, w, gbuf);
            break;
        }
      }
      r = after;
    }
  });
}

// Combine the partial results of split decode items: out = sum_i 2^(m_i - M)
// acc_i / sum_i 2^(m_i - M) l_i (M = max_i m_i); m is in the base-2 domain.
template <typename T>
void merge_parts(const Params& p, const std::vector<WorkItem>& items, const Partials& parts) {
  const int G = p.group;
  const int D = p.head_dim;
  std::vector<float> accum(D);
  for (size_t i = 0; i < items.size();) {
    const WorkItem& w0 = items[i];
    if (w0.part < 0) {
      ++i;
      continue;
    }
    size_t j = i;  // the parts of one (seq, kv head) are adjacent
    while (j < items.size() && items[j].part >= 0 && items[j].seq == w0.seq && items[j].kv_head == w0.kv_head) ++j;
    const int64_t row = p.qsl[w0.seq];  // decode: one query row
    for (int gi = 0; gi < G; ++gi) {
      float M = -std::numeric_limits<float>::infinity();
      for (size_t k = i; k < j; ++k) M = std::max(M, parts.data[items[k].part * parts.stride + gi * (D + 2)]);
      float L = 0.f;
      std::fill(accum.begin(), accum.end(), 0.f);
      for (size_t k = i; k < j; ++k) {
        const float* src = parts.data + items[k].part * parts.stride + gi * (D + 2);
        const float f = std::exp2(src[0] - M);
        L += f * src[1];
        for (int d = 0; d < D; ++d) accum[d] += f * src[2 + d];
      }
      const int64_t head = static_cast<int64_t>(w0.kv_head) * G + gi;
      T* dst = reinterpret_cast<T*>(p.out) + row * p.o_s_tok + head * p.o_s_head;
      const float inv = 1.f / L;
      for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(accum[d] * inv);
    }
    i = j;
  }
}

void check_inner_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables_in,
                           const at::Tensor& query_start_loc_in, const at::Tensor& seq_lens_in,
                           double scale, const at::Tensor& out, int64_t split_min_kv, bool force_generic,
                           bool zero_uncovered) {
  TORCH_CHECK(split_min_kv >= 0, "split_min_kv must be >= 0 (0: never split), got ", split_min_kv);
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

  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype, "out must be a CPU tensor of the query dtype");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the shape of query");
  check_inner_contiguous(out, "out");

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
  // Query tokens per prefill item: large tiles share each K/V chunk (and its
  // transposition) among more rows, but keep >= 4 items per thread.
  int64_t total_units = 0;  // sum over sequences of query_len x kv heads
  for (int64_t s = 0; s < S; ++s) total_units += std::max<int64_t>(0, p.qsl[s + 1] - p.qsl[s]) * Hkv;
  const int64_t min_items = 4 * static_cast<int64_t>(std::max(1, at::get_num_threads()));
  const int tile_tok = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(std::max(1, kMaxTileRows / p.group), total_units / min_items)));
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
    auto tile_cost = [&](int64_t t0, int64_t nt) {
      return nt * p.group * (ctx + t0 + nt) + 64;  // ~ rows x KV positions + overhead
    };
    int64_t unit_cost = 0;
    for (int64_t t0 = 0; t0 < qlen; t0 += tile_tok) unit_cost += tile_cost(t0, std::min<int64_t>(tile_tok, qlen - t0));
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t t0 = 0; t0 < qlen; t0 += tile_tok) {
        const int64_t nt = std::min<int64_t>(tile_tok, qlen - t0);
        items.push_back(WorkItem{static_cast<int32_t>(s), static_cast<int32_t>(h), static_cast<int32_t>(t0),
                                 static_cast<int32_t>(nt), tile_cost(t0, nt), unit_cost});
      }
    }
  }
  // Rows not owned by any sequence (before qsl[0] / from qsl[S] on).
  if (zero_uncovered && T > 0) {
    const int64_t lo = S ? p.qsl[0] : T;
    const int64_t hi = S ? p.qsl[S] : T;
    const size_t row_bytes = static_cast<size_t>(D) * out.element_size();
    for (int64_t t = 0; t < T; ++t) {
      if (t >= lo && t < hi) continue;
      for (int64_t h = 0; h < Hq; ++h) {
        std::memset(p.out + (t * p.o_s_tok + h * p.o_s_head) * out.element_size(), 0, row_bytes);
      }
    }
  }
  if (items.empty()) return;
  // Largest (sequence, kv head) units first for load balance (the threads
  // pull items dynamically); the tiles of one unit stay adjacent so that the
  // threads working on them share that unit's K/V while it is in cache.
  std::sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) {
    if (a.unit_cost != b.unit_cost) return a.unit_cost > b.unit_cost;
    if (a.seq != b.seq) return a.seq < b.seq;
    if (a.kv_head != b.kv_head) return a.kv_head < b.kv_head;
    return a.cost > b.cost;
  });

  const int nv = force_generic ? 0 : avx512_nv(p.head_dim);
  const bool vec = !force_generic && nv == 0 && use_vec_path(p.head_dim);
  const int64_t nthreads = std::max(1, at::get_num_threads());
  std::vector<float> part_buf;
  Partials parts;
  if ((nv != 0 || vec) && nthreads > 1 && split_min_kv > 0 &&
      static_cast<int64_t>(items.size()) < kSplitItemsPerThread * nthreads) {
    // Few items (e.g. a handful of decode sequences with few kv heads): cut
    // long decode items into KV ranges of >= split_min_kv positions so every thread gets work.
    const int64_t target = split_min_kv;
    std::vector<WorkItem> split_items;
    int64_t nparts = 0;
    for (const WorkItem& w : items) {
      const int64_t kv_len = geom(p, w).kv_end;
      const int64_t pieces = w.ntok == 1 ? std::min<int64_t>(kv_len / target, 64) : 1;
      if (pieces < 2) {
        split_items.push_back(w);
        continue;
      }
      // Ranges start on a chunk boundary (the chunks of an unsplit item).
      const int64_t len = ((kv_len + pieces - 1) / pieces + kChunk - 1) / kChunk * kChunk;
      for (int64_t lo = 0; lo < kv_len; lo += len) {
        WorkItem q = w;
        q.kv_lo = lo;
        q.kv_hi = std::min(kv_len, lo + len);
        q.cost = (q.kv_hi - q.kv_lo) * p.group + 64;
        q.part = nparts++;
        split_items.push_back(q);
      }
    }
    if (nparts > 0) {
      items.swap(split_items);
      parts.stride = static_cast<int64_t>(p.group) * (p.head_dim + 2);
      part_buf.resize(static_cast<size_t>(nparts * parts.stride));
      parts.data = part_buf.data();
    }
  }

  if (dtype == at::kFloat) {
    run_all<float>(p, items, nv, vec, parts);
    if (parts.data) merge_parts<float>(p, items, parts);
  } else {
    run_all<bf16>(p, items, nv, vec, parts);
    if (parts.data) merge_parts<bf16>(p, items, parts);
  }
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

#ifndef QUIRE_PA_NAMESPACE
#define QUIRE_PA_NAMESPACE quire_pa
#endif

TORCH_LIBRARY(QUIRE_PA_NAMESPACE, m) {
  m.def(
      "paged_attention_out(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor query_start_loc, Tensor seq_lens, float scale, Tensor(a!) out, int split_min_kv, "
      "bool force_generic=False, bool zero_uncovered=False) -> ()",
      &quire_pa::paged_attention);
  m.def("has_avx512() -> bool", &quire_pa::has_avx512);
  m.def("has_avx512_bf16() -> bool", &quire_pa::has_avx512_bf16);
}
