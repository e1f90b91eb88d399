// Small products without packing, one register tile at a time.
//
// C is cut into column blocks of 1 to 4 AVX registers (8 to 32 columns) and each block into
// tiles of MR rows, MR chosen so that a tile holds 8 to 12 accumulators of the 16 registers. A
// tile runs the whole depth K with its accumulators in registers: per k it loads NV vectors of
// B's row k and broadcasts one element of A per row: MR * NV FMAs for MR + NV loads (12 for 7
// in the wider blocks, so the FMA units rather than the loads set the pace). Nothing is packed:
// B's rows are read where they are (the caller pads their width to a multiple of 8), A's
// elements are broadcast from any strides.
#include "ops/small_gemm.h"

#include <immintrin.h>

#include <algorithm>

namespace mv::ops {

namespace {

// One tile: C[r][0, 8 NV) = sum_k A(r, k) B[k][0, 8 NV) for the rows r < mr <= MR. Rows past mr
// repeat row mr - 1, so that the loop keeps its fixed, fully unrolled shape, and are not stored.
template <int MR, int NV>
void tile(int64_t mr, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
          float* c, int64_t ldc) {
  __m256 acc[MR][NV];
  const float* ar[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    ar[r] = a + std::min<int64_t>(r, mr - 1) * ars;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + k * ldb + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 s = _mm256_broadcast_ss(ar[r] + k * acs);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(s, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    if (r < mr)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

// Columns [0, 8 NV) of C, all M rows, in tiles of MR rows.
template <int MR, int NV>
void tile_rows(int64_t M, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
               float* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += MR)
    tile<MR, NV>(std::min<int64_t>(MR, M - m0), K, a + m0 * ars, ars, acs, b, ldb, c + m0 * ldc, ldc);
}

}  // namespace

// Column blocks of 4, 3, 2 or 1 registers, with 3, 4, 6 or 8 rows per tile.
void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
                int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N;) {
    const int64_t left = (N - n0) / 8;
    if (left >= 4) {
      tile_rows<3, 4>(M, K, a, ars, acs, b + n0, ldb, c + n0, ldc);
      n0 += 32;
    } else if (left == 3) {
      tile_rows<4, 3>(M, K, a, ars, acs, b + n0, ldb, c + n0, ldc);
      n0 += 24;
    } else if (left == 2) {
      tile_rows<6, 2>(M, K, a, ars, acs, b + n0, ldb, c + n0, ldc);
      n0 += 16;
    } else {
      tile_rows<8, 1>(M, K, a, ars, acs, b + n0, ldb, c + n0, ldc);
      n0 += 8;
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
