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
// one use a tile of half the height when that is enough, and otherwise repeat their last row
// (computed, never stored), so that every loop keeps its fixed, fully unrolled shape.
#include "ops/tile_gemm.h"

#include <immintrin.h>

#include <algorithm>

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

// One tile: C[r][0, NV W) = (C[r] if acc) + sum_{k < K} A(r, k) B[k][0, NV W) for the rows
// r < mr <= MR. With Part, the last register covers only the columns `last` selects.
template <int MR, int NV, bool Part>
void tile(int64_t mr, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool acc, Mask last) {
  auto ld = [&](const float* p, int v) { return Part && v == NV - 1 ? load(p, last) : load(p); };
  V s[MR][NV];
  const float* ar[MR];
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    const int64_t rr = std::min<int64_t>(r, mr - 1);
    ar[r] = a + rr * ars;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) s[r][v] = acc ? ld(c + rr * ldc + W * v, v) : zero();
  }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = ld(b + k * ldb + W * v, v);
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) {
      const V x = broadcast(ar[r] + k * acs);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) s[r][v] = fma(x, bv[v], s[r][v]);
    }
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
template <int NV, bool Part>
void block(int64_t M, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
           int64_t ldc, bool acc, Mask last) {
  constexpr int MR = rows_per_tile<NV>(), HALF = MR / 2 > 0 ? MR / 2 : 1;
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, M - m0);
    if (mr <= HALF)
      tile<HALF, NV, Part>(mr, K, a + m0 * ars, ars, acs, b, ldb, c + m0 * ldc, ldc, acc, last);
    else
      tile<MR, NV, Part>(mr, K, a + m0 * ars, ars, acs, b, ldb, c + m0 * ldc, ldc, acc, last);
  }
}

// Columns [0, cols) of C with cols <= 4 W: as many registers as the columns need.
template <bool Part>
void columns(int64_t cols, int64_t M, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool acc) {
  const Mask last = mask_of(cols - (cols - 1) / W * W);
  switch ((cols + W - 1) / W) {
    case 1: return block<1, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
    case 2: return block<2, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
    case 3: return block<3, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
    default: return block<4, Part>(M, K, a, ars, acs, b, ldb, c, ldc, acc, last);
  }
}

}  // namespace

void tile_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, 0.f);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    const bool acc = accumulate || k0 > 0;
    const float* ak = a + k0 * acs;
    const float* bk = b + k0 * ldb;
    for (int64_t m0 = 0; m0 < M; m0 += kMc) {
      const int64_t mc = std::min(kMc, M - m0);
      const float* am = ak + m0 * ars;
      float* cm = c + m0 * ldc;
      for (int64_t n0 = 0; n0 < N; n0 += 4 * W) {
        const int64_t cols = std::min<int64_t>(4 * W, N - n0);
        if (cols % W == 0)
          columns<false>(cols, mc, kc, am, ars, acs, bk + n0, ldb, cm + n0, ldc, acc);
        else
          columns<true>(cols, mc, kc, am, ars, acs, bk + n0, ldb, cm + n0, ldc, acc);
      }
    }
  }
}

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
