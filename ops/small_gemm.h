// Register-tiled products for matrices of a few dozen rows and columns (the per-head products of
// attention: T ~ 50, Dh ~ 16), where a general GEMM's per-call blocking and operand packing
// weigh heavily. AVX2 + FMA, which the build's -march=x86-64-v3 guarantees.
#pragma once
#include <cstdint>

namespace mv::ops {

// C (M, N) = A (M, K) B (K, N), overwriting C.
// A is read in place through strides, A(i, k) = a[i * ars + k * acs], so it may be a transposed
// view; B and C are row-major with leading dims ldb and ldc. N must be a multiple of 8.
void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
                int64_t ldb, float* c, int64_t ldc);

// dst (8, 8) = src (8, 8)^T, row strides ls (src) and ld (dst).
void transpose8(const float* src, int64_t ls, float* dst, int64_t ld);

}  // namespace mv::ops
