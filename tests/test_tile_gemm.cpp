#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "ops/tile_gemm.h"
#include "tests/helpers.h"

using namespace mv;

namespace {

std::vector<float> uniform(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = u(gen);
  return v;
}

}  // namespace

// Every column-block width (1 to 4 registers, alone and after full blocks, whole or ending in a
// masked partial register for any N), row counts that leave partial, half- and quarter-height
// tiles, more rows than one chunk and more depth than one slice, A read directly, through its transpose and
// through strides that are neither 1 (every other element of a transposed layout),
// B and C with leading dims wider than N, overwriting and accumulating: against products summed
// in double. With bf16, against the same product of the inputs rounded to bfloat16.
TEST_CASE("tile_gemm: against a double-precision product") {
  const bool has_bf16 = ops::tile_gemm_has_bf16();
  if (!has_bf16) MESSAGE("tile_gemm: this build has no AVX-512 BF16; the bfloat16 products are not tested");
  enum Layout { kRows, kTransposed, kStrided };
  struct Case { int64_t M, N, K; Layout at; };
  constexpr Layout R = kRows, T = kTransposed, S = kStrided;
  for (Case c : {Case{1, 8, 1, R}, Case{7, 16, 5, R}, Case{50, 56, 16, R}, Case{50, 16, 50, T}, Case{13, 24, 9, T},
                 Case{37, 40, 64, R}, Case{9, 64, 3, T}, Case{25, 8, 33, R}, Case{3, 1, 7, R}, Case{50, 50, 16, R},
                 Case{11, 10, 64, T}, Case{200, 72, 20, R}, Case{20, 200, 600, T}, Case{97, 130, 257, R},
                 Case{6, 129, 2, R}, Case{9, 40, 7, S}, Case{30, 17, 300, S}})
    for (bool bf16 : {false, true})
    for (bool accumulate : {false, true}) {
      if (bf16 && !has_bf16) continue;
      CAPTURE(bf16);
      CAPTURE(c.M);
      CAPTURE(c.N);
      CAPTURE(c.K);
      CAPTURE(c.at);
      CAPTURE(accumulate);
      const int64_t lda = (c.at == R ? c.K : c.at == T ? c.M : 2 * c.M) + 3, ldb = c.N + 5, ldc = c.N + 4;
      const std::vector<float> a = uniform(size_t((c.at == R ? c.M : c.K) * lda), 1), b = uniform(size_t(c.K * ldb), 2);
      // A(i, k) = a[i * lda + k], or a[k * lda + i] through its transpose, or a[k * lda + 2 i]
      const int64_t ars = c.at == R ? lda : c.at == T ? 1 : 2, acs = c.at == R ? 1 : lda;
      const std::vector<float> start = uniform(size_t(c.M * ldc), 3);
      std::vector<float> out = start;
      ops::tile_gemm(c.M, c.N, c.K, a.data(), ars, acs, b.data(), ldb, out.data(), ldc, accumulate, bf16);
      auto in = [&](float x) { return bf16 ? test::round_bf16(x) : x; };
      for (int64_t i = 0; i < c.M; ++i) {
        for (int64_t j = 0; j < c.N; ++j) {
          double ref = accumulate ? start[size_t(i * ldc + j)] : 0.0;
          for (int64_t k = 0; k < c.K; ++k) ref += double(in(a[size_t(i * ars + k * acs)])) * in(b[size_t(k * ldb + j)]);
          INFO("C(" << i << ", " << j << ")");
          CHECK(std::fabs(out[size_t(i * ldc + j)] - ref) <= 1e-5 * (1 + std::fabs(ref)) * std::sqrt(double(c.K)));
        }
        for (int64_t j = c.N; j < ldc; ++j) CHECK(out[size_t(i * ldc + j)] == start[size_t(i * ldc + j)]);  // untouched
      }
    }
}

// Operands packed once: pack_bf16_pairs of B, and of A^T (which tile_gemm_pairs reads as A through
// the strides 1 and its row stride), give the product tile_gemm computes from the floats, bit for
// bit: the same rounding and the same order of sums. Odd depths pair the last row with zeros,
// and a depth over one slice (256) is cut where tile_gemm cuts it.
TEST_CASE("tile_gemm_pairs: packed bfloat16 operands give tile_gemm's bfloat16 product") {
  if (!ops::tile_gemm_has_bf16()) {
    MESSAGE("tile_gemm_pairs: this build has no AVX-512 BF16; not tested");
    return;
  }
  struct Case { int64_t M, N, K; };
  for (Case c : {Case{50, 16, 50}, Case{7, 33, 9}, Case{130, 20, 301}, Case{1, 1, 1}})
    for (bool accumulate : {false, true}) {
      CAPTURE(c.M);
      CAPTURE(c.N);
      CAPTURE(c.K);
      CAPTURE(accumulate);
      const int64_t lda = c.M + 1, ldb = c.N + 2, ldp = c.M + 3, K2 = (c.K + 1) / 2;
      const std::vector<float> at = uniform(size_t(c.K * lda), 4), b = uniform(size_t(c.K * ldb), 5);
      const std::vector<float> start = uniform(size_t(c.M * c.N), 6);
      std::vector<float> want = start, got = start;
      ops::tile_gemm(c.M, c.N, c.K, at.data(), 1, lda, b.data(), ldb, want.data(), c.N, accumulate, true);
      std::vector<uint32_t> ap(size_t(K2 * ldp)), bp(size_t(K2 * c.N));
      ops::pack_bf16_pairs(c.K, c.M, at.data(), lda, ap.data(), ldp);
      ops::pack_bf16_pairs(c.K, c.N, b.data(), ldb, bp.data(), c.N);
      ops::tile_gemm_pairs(c.M, c.N, K2, ap.data(), 1, ldp, bp.data(), c.N, got.data(), c.N, accumulate);
      CHECK(got == want);
    }
}

TEST_CASE("tile_gemm: an empty depth writes zeros, or leaves C as it is when accumulating") {
  std::vector<float> out(6, 5.f);
  ops::tile_gemm(2, 3, 0, nullptr, 1, 1, nullptr, 3, out.data(), 3, true);
  CHECK(out == std::vector<float>(6, 5.f));
  ops::tile_gemm(2, 3, 0, nullptr, 1, 1, nullptr, 3, out.data(), 3);
  CHECK(out == std::vector<float>(6, 0.f));
}

TEST_CASE("tile_gemm: transpose8 moves every element to its mirror place") {
  const int64_t ls = 11, ld = 13;
  std::vector<float> src(size_t(8 * ls)), dst(size_t(8 * ld), -1.f);
  for (size_t i = 0; i < src.size(); ++i) src[i] = float(i);
  ops::transpose8(src.data(), ls, dst.data(), ld);
  for (int64_t r = 0; r < 8; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      INFO("dst(" << r << ", " << c << ")");
      CHECK(dst[size_t(r * ld + c)] == (c < 8 ? src[size_t(c * ls + r)] : -1.f));
    }
}
