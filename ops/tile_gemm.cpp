// Products without packing, one register tile at a time.
//
// C is cut into column blocks of up to 4 vector registers (W floats each: 16 with AVX-512, 8 with
// AVX2) and each block into tiles of MR rows, MR chosen so that a tile holds most of the vector
// registers as accumulators. A tile runs a depth slice with its accumulators in registers: per k
// it loads NV vectors of B's row k and broadcasts one element of A per row, MR * NV FMAs for
// MR + NV loads (24 for 10 in the widest AVX-512 block), so the FMA units rather than the loads
// set the pace. Nothing is packed: B's rows are read where they are, A's elements are broadcast
// from any strides, so A may be a transposed view (the weight gradients' x^T).
//
// Cache blocking: the depth goes in slices of kKc and the rows in chunks of kMc, so that a chunk
// of A and the slice of B that its tiles sweep stay in L1/L2; C accumulates across the slices.
// A block narrower than 4 W columns uses as many registers as it needs, and its last register
// is loaded and stored under a mask when N is not a multiple of W. Row tiles past the last full
// one use a tile of a quarter or half the height when that is enough, and otherwise repeat their
// last row (computed, never stored), so that every loop keeps its fixed, fully unrolled shape.
//
// bfloat16 (AVX-512 BF16): vdpbf16ps multiplies 16 pairs of bfloat16s by 16 pairs and adds both
// products of each lane to an FP32 accumulator, twice the FMA's rate. The tile is the same with
// the depth counted in pairs: it broadcasts A(r, 2j), A(r, 2j+1) packed in 32 bits and loads B's
// rows 2j and 2j+1 interleaved. So each depth slice of B and each chunk of A is first rounded and
// packed that way (per call, into per-thread buffers), a cost of a few instructions per element
// that a product pays back when each element meets many of the other side's (the layers' widths).
#include "ops/tile_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/error.h"

namespace mv::ops {

namespace {

#ifdef __AVX512F__
constexpr int W = 16, kRegs = 32;
using V = __m512;
using Mask = __mmask16;
Mask mask_of(int64_t n) { return Mask((1u << std::min<int64_t>(n, W)) - 1); }
V load(const float* p) { return _mm512_loadu_ps(p); }
V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
void store(float* p, V v) { _mm512_storeu_ps(p, v); }
void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
V broadcast(const float* p) { return _mm512_set1_ps(*p); }
V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
V zero() { return _mm512_setzero_ps(); }
#else
constexpr int W = 8, kRegs = 16;
using V = __m256;
using Mask = __m256i;
Mask mask_of(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, W))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
V load(const float* p) { return _mm256_loadu_ps(p); }
V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
void store(float* p, V v) { _mm256_storeu_ps(p, v); }
void store(float* p, V v, Mask m) { _mm256_maskstore_ps(p, m, v); }
V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
V zero() { return _mm256_setzero_ps(); }
#endif

// Rows per tile for a block of NV registers: MR * NV accumulators, NV registers for B's row and
// one for the broadcast fit in the register file (AVX-512: 24, 24, 24, 16 accumulators; AVX2: 12).
template <int NV>
constexpr int rows_per_tile() {
  constexpr int acc = kRegs == 32 ? (NV == 1 ? 16 : 24) : 12;
  return acc / NV;
}

constexpr int64_t kKc = 256;  // depth slice: a 96 x 256 chunk of A is 96 KB, B's slice 64 KB per block
constexpr int64_t kMc = 96;   // rows per chunk, a multiple of every tile height

// How a tile multiplies: F32 broadcasts one float of A and FMAs it with B's floats; BF16 (AVX-512
// BF16) broadcasts a pair of A's bfloat16s, A(r, 2j) and A(r, 2j+1), packed in 32 bits, and
// multiplies it with B's pairs of rows 2j and 2j+1 packed alike (vdpbf16ps: both products summed
// into the FP32 accumulator), so one instruction covers two steps of depth.
struct F32 {
  using E = float;  // an element of A and B as the tile reads them
  using BV = V;
  static BV load_b(const E* p) { return load(p); }
  static BV load_b(const E* p, Mask m) { return load(p, m); }
  static V madd(const E* a, BV b, V c) { return fma(broadcast(a), b, c); }
};
#ifdef __AVX512BF16__
struct BF16 {
  using E = uint32_t;
  using BV = __m512bh;
  static BV load_b(const E* p) { return BV(_mm512_loadu_si512(p)); }
  static BV load_b(const E* p, Mask m) { return BV(_mm512_maskz_loadu_epi32(m, p)); }
  static V madd(const E* a, BV b, V c) { return _mm512_dpbf16_ps(c, BV(_mm512_set1_epi32(int(*a))), b); }
};
#endif

// One tile: C[r][0, NV W) = (C[r] if acc) + sum_{k < K} A(r, k) B[k][0, NV W) for the rows
// r < mr <= MR. With Part, the last register covers only the columns `last` selects.
template <class Op, int MR, int NV, bool Part>
void tile(int64_t mr, int64_t K, const typename Op::E* a, int64_t ars, int64_t acs, const typename Op::E* b,
          int64_t ldb, float* c, int64_t ldc, bool acc, Mask last) {
  using E = typename Op::E;
  V s[MR][NV];
  const E* ar[MR];
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    const int64_t rr = std::min<int64_t>(r, mr - 1);
    ar[r] = a + rr * ars;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      s[r][v] = !acc ? zero() : Part && v == NV - 1 ? load(c + rr * ldc + W * v, last) : load(c + rr * ldc + W * v);
  }
  for (int64_t k = 0; k < K; ++k) {
    typename Op::BV bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = Part && v == NV - 1 ? Op::load_b(b + k * ldb + W * v, last) : Op::load_b(b + k * ldb + W * v);
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) s[r][v] = Op::madd(ar[r] + k * acs, bv[v], s[r][v]);
  }
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r)
    if (r < mr)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (Part && v == NV - 1)
          store(c + r * ldc + W * v, s[r][v], last);
        else
          store(c + r * ldc + W * v, s[r][v]);
      }
}

// Columns [0, NV W) of C (the last register partial with Part), rows [0, M), depth [0, K).
template <class Op, int NV, bool Part>
void block(int64_t M, int64_t K, const typename Op::E* a, int64_t ars, int64_t acs, const typename Op::E* b,
           int64_t ldb, float* c, int64_t ldc, bool acc, Mask last) {
  constexpr int MR = rows_per_tile<NV>(), HALF = std::max(MR / 2, 1), QUARTER = std::max(MR / 4, 1);
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, M - m0);
    if (mr <= QUARTER)
      tile<Op, QUARTER, NV, Part>(mr, K, a + m0 * ars, ars, acs, b, ldb, c + m0 * ldc, ldc, acc, last);
    else if (mr <= HALF)
      tile<Op, HALF, NV, Part>(mr, K, a + m0 * ars, ars, acs, b, ldb, c + m0 * ldc, ldc, acc, last);
    else
      tile<Op, MR, NV, Part>(mr, K, a + m0 * ars, ars, acs, b, ldb, c + m0 * ldc, ldc, acc, last);
  }
}

// Columns [0, cols) of C with cols <= 4 W: as many registers as the columns need.
template <class Op, bool Part>
void columns(int64_t cols, int64_t M, int64_t K, const typename Op::E* a, int64_t ars, int64_t acs,
             const typename Op::E* b, int64_t ldb, float* c, int64_t ldc, bool acc) {
  const Mask last = mask_of(cols - (cols - 1) / W * W);
  switch ((cols + W - 1) / W) {
    case 1: return block<Op, 1, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
    case 2: return block<Op, 2, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
    case 3: return block<Op, 3, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
    default: return block<Op, 4, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
  }
}

// All column blocks of C's rows [0, M) over depth [0, K) (in the tile's steps: pairs for BF16).
template <class Op>
void row_chunk(int64_t M, int64_t N, int64_t K, const typename Op::E* a, int64_t ars, int64_t acs,
               const typename Op::E* b, int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int64_t n0 = 0; n0 < N; n0 += 4 * W) {
    const int64_t cols = std::min<int64_t>(4 * W, N - n0);
    if (cols % W == 0)
      columns<Op, false>(cols, M, K, a, ars, acs, b + n0, ldb, c + n0, ldc, acc);
    else
      columns<Op, true>(cols, M, K, a, ars, acs, b + n0, ldb, c + n0, ldc, acc);
  }
}

// C (M, N) = 0: an empty sum.
void fill_zero(int64_t M, int64_t N, float* c, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.f);
}

}  // namespace

#ifdef __AVX512BF16__
namespace {
// One float to bfloat16 as the vector conversion rounds it (to nearest even; a NaN stays a NaN).
uint32_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
}  // namespace

// One conversion turns 16 columns of rows 2j and 2j+1 into 32 bfloat16s, row 2j's then row
// 2j+1's, and one word permutation interleaves them into pairs.
void pack_bf16_pairs(int64_t K, int64_t N, const float* b, int64_t ldb, uint32_t* dst, int64_t ldd) {
  alignas(64) uint16_t order[32];  // word k of a pair vector comes from word k / 2 of row k % 2
  for (int k = 0; k < 32; ++k) order[k] = uint16_t(k / 2 + (k % 2) * 16);
  const __m512i interleave = _mm512_load_si512(order);
  const int64_t N16 = N / W * W;
  const Mask tail = mask_of(N - N16);
  for (int64_t j = 0; 2 * j < K; ++j) {
    const float* r0 = b + 2 * j * ldb;
    const float* r1 = r0 + ldb;
    uint32_t* d = dst + j * ldd;
    auto pairs = [&](V x0, V x1) { return _mm512_permutexvar_epi16(interleave, __m512i(_mm512_cvtne2ps_pbh(x1, x0))); };
    if (2 * j + 1 == K) {  // the last row alone, paired with zeros
      for (int64_t n = 0; n < N16; n += W) _mm512_storeu_si512(d + n, pairs(load(r0 + n), zero()));
      if (N16 < N) _mm512_mask_storeu_epi32(d + N16, tail, pairs(load(r0 + N16, tail), zero()));
      continue;
    }
    for (int64_t n = 0; n < N16; n += W) _mm512_storeu_si512(d + n, pairs(load(r0 + n), load(r1 + n)));
    if (N16 < N) _mm512_mask_storeu_epi32(d + N16, tail, pairs(load(r0 + N16, tail), load(r1 + N16, tail)));
  }
}

namespace {
// The pairs of A (M x K, A(i, k) at a[i * ars + k * acs]) for the tile, in the layout that reads
// A best: row-major (j fastest, strides kc2 and 1) for a row-major A, pair-major (i fastest,
// strides 1 and M) for a transposed one, where the pairs are those of B's layout above.
// Returns the strides of dst's pairs (rows, depth).
std::pair<int64_t, int64_t> pack_pairs_a(int64_t M, int64_t K, const float* a, int64_t ars, int64_t acs,
                                         uint32_t* dst) {
  const int64_t K2 = (K + 1) / 2;
  if (ars == 1 && acs != 1) {  // the columns of A are rows in memory: pack them like B
    pack_bf16_pairs(K, M, a, acs, dst, M);
    return {1, M};
  }
  for (int64_t i = 0; i < M; ++i) {
    const float* ai = a + i * ars;
    uint32_t* di = dst + i * K2;
    if (acs == 1) {  // two registers of floats make one of 16 pairs
      int64_t k = 0;
      for (; k + 2 * W <= K; k += 2 * W) _mm512_storeu_si512(di + k / 2, __m512i(_mm512_cvtne2ps_pbh(load(ai + k + W), load(ai + k))));
      if (k < K) {
        const __m512 x0 = load(ai + k, mask_of(K - k)), x1 = load(ai + k + W, mask_of(std::max<int64_t>(K - k - W, 0)));
        _mm512_mask_storeu_epi32(di + k / 2, mask_of((K - k + 1) / 2), __m512i(_mm512_cvtne2ps_pbh(x1, x0)));
      }
    } else {
      for (int64_t j = 0; j < K2; ++j)
        di[j] = bf16_bits(ai[2 * j * acs]) | (2 * j + 1 < K ? bf16_bits(ai[(2 * j + 1) * acs]) << 16 : 0u);
    }
  }
  return {K2, 1};
}
}  // namespace
#endif

void tile_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate, bool bf16) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) fill_zero(M, N, c, ldc);
    return;
  }
#ifdef __AVX512BF16__
  if (bf16) {
    // B's depth slice is packed once, A's chunk once per slice; the tiles then run on the pairs.
    thread_local std::vector<uint32_t> bp, ap;
    bp.resize(size_t(kKc / 2 * N));
    ap.resize(size_t(kKc / 2 * kMc));
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0), kc2 = (kc + 1) / 2;
      pack_bf16_pairs(kc, N, b + k0 * ldb, ldb, bp.data(), N);
      for (int64_t m0 = 0; m0 < M; m0 += kMc) {
        const int64_t mc = std::min(kMc, M - m0);
        const auto [prs, pcs] = pack_pairs_a(mc, kc, a + k0 * acs + m0 * ars, ars, acs, ap.data());
        row_chunk<BF16>(mc, N, kc2, ap.data(), prs, pcs, bp.data(), N, c + m0 * ldc, ldc, accumulate || k0 > 0);
      }
    }
    return;
  }
#else
  MV_CHECK(!bf16, "tile_gemm: bfloat16 products need a build for a CPU with AVX-512 BF16");
#endif
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t m0 = 0; m0 < M; m0 += kMc)
      row_chunk<F32>(std::min(kMc, M - m0), N, kc, a + k0 * acs + m0 * ars, ars, acs, b + k0 * ldb, ldb,
                     c + m0 * ldc, ldc, accumulate || k0 > 0);
  }
}

#ifdef __AVX512BF16__
void tile_gemm_pairs(int64_t M, int64_t N, int64_t K2, const uint32_t* a, int64_t ars, int64_t acs,
                     const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K2 <= 0) {
    if (!accumulate) fill_zero(M, N, c, ldc);
    return;
  }
  for (int64_t j0 = 0; j0 < K2; j0 += kKc / 2) {
    const int64_t kc2 = std::min(kKc / 2, K2 - j0);
    for (int64_t m0 = 0; m0 < M; m0 += kMc)
      row_chunk<BF16>(std::min(kMc, M - m0), N, kc2, a + j0 * acs + m0 * ars, ars, acs, b + j0 * ldb, ldb,
                      c + m0 * ldc, ldc, accumulate || j0 > 0);
  }
}
#else
void pack_bf16_pairs(int64_t, int64_t, const float*, int64_t, uint32_t*, int64_t) {
  MV_CHECK(false, "pack_bf16_pairs: bfloat16 operands need a build for a CPU with AVX-512 BF16");
}
void tile_gemm_pairs(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*,
                     int64_t, bool) {
  MV_CHECK(false, "tile_gemm_pairs: bfloat16 products need a build for a CPU with AVX-512 BF16");
}
#endif

// Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves swapped across.
void transpose8(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);      // a0 b0 c0 d0 | a4 ..
      r[i + j + 2] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);  // a1 b1 c1 d1 | a5 ..
    }
  // r[0] = col 0|4 of rows 0-3, r[2] = col 1|5, r[1] = col 2|6, r[3] = col 3|7; r[4..7] rows 4-7
  const int order[4] = {0, 2, 1, 3};
  for (int c = 0; c < 4; ++c) {
    const __m256 lo = r[order[c]], hi = r[4 + order[c]];
    _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

}  // namespace mv::ops
