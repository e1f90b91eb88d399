// Register-tiled matrix products with no operand packing, for the products a training step is
// made of: tall and narrow (thousands of token rows, layer widths of 8 to a few hundred) or small
// (attention's per-head T x Dh blocks). A general GEMM copies ("packs") its operands into
// blocked buffers first, which costs as much as the arithmetic when one side is this narrow.
// AVX-512 when the build targets it (-Dcpu=native on such a machine), AVX2 + FMA otherwise.
#pragma once
#include <cstdint>

namespace mv::ops {

// C (M, N) = A (M, K) B (K, N), or C += A B when accumulate; any sizes. With bf16, A and B are
// rounded to bfloat16 (8-bit mantissa) and the products summed in FP32, twice the FP32 rate with
// AVX-512 BF16 (tile_gemm_has_bf16(); an error in a build without it).
// A is read in place through strides, A(i, k) = a[i * ars + k * acs], so it may be a transposed
// view; B and C are row-major with leading dims ldb and ldc. Columns of C past N are untouched.
void tile_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate = false, bool bf16 = false);

// bfloat16 operands packed once, for products that keep or reuse them (AVX-512 BF16 builds; an
// error in others). pack_bf16_pairs: dst[j * ldd + n] = B(2j, n) and B(2j + 1, n) rounded to
// bfloat16 (to nearest even) in one 32-bit word, the first in the low half, zero past row K - 1;
// j < ceil(K / 2), n < N. B is row-major with leading dim ldb.
void pack_bf16_pairs(int64_t K, int64_t N, const float* b, int64_t ldb, uint32_t* dst, int64_t ldd);

// C (M, N) = A B, or C += A B when accumulate, on operands packed in pairs of depth: B as
// pack_bf16_pairs writes it (row stride ldb), A's pair (A(i, 2j), A(i, 2j + 1)) at
// a[i * ars + j * acs] (so pack_bf16_pairs of A^T is A with strides 1 and its ldd); K2 pairs.
void tile_gemm_pairs(int64_t M, int64_t N, int64_t K2, const uint32_t* a, int64_t ars, int64_t acs,
                     const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate = false);

// Whether this build has the bfloat16 products (AVX-512 BF16: AMD Zen 4, Intel Cooper Lake and
// later). Inline: the configuration's checks use it without linking the kernels.
constexpr bool tile_gemm_has_bf16() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// dst (8, 8) = src (8, 8)^T, row strides ls (src) and ld (dst).
void transpose8(const float* src, int64_t ls, float* dst, int64_t ld);

}  // namespace mv::ops
