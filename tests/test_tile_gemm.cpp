#include <cmath>
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
// masked partial register for any N), row counts that leave partial and half-height tiles, more
// rows than one chunk and more depth than one slice, A read directly and through its transpose,
// B and C with leading dims wider than N, overwriting and accumulating: against products summed
// in double.
TEST_CASE("tile_gemm: against a double-precision product") {
  struct Case { int64_t M, N, K; bool at; };
  for (Case c : {Case{1, 8, 1, false}, Case{7, 16, 5, false}, Case{50, 56, 16, false}, Case{50, 16, 50, true},
                 Case{13, 24, 9, true}, Case{37, 40, 64, false}, Case{9, 64, 3, true}, Case{25, 8, 33, false},
                 Case{3, 1, 7, false}, Case{50, 50, 16, false}, Case{11, 10, 64, true}, Case{200, 72, 20, false},
                 Case{20, 200, 600, true}, Case{97, 130, 257, false}, Case{6, 129, 2, false}}) {
    for (bool accumulate : {false, true}) {
      CAPTURE(c.M);
      CAPTURE(c.N);
      CAPTURE(c.K);
      CAPTURE(c.at);
      CAPTURE(accumulate);
      const int64_t lda = (c.at ? c.M : c.K) + 3, ldb = c.N + 5, ldc = c.N + 4;
      const std::vector<float> a = uniform(size_t((c.at ? c.K : c.M) * lda), 1), b = uniform(size_t(c.K * ldb), 2);
      // A(i, k) = a[i * lda + k], or a[k * lda + i] when read through its transpose
      const int64_t ars = c.at ? 1 : lda, acs = c.at ? lda : 1;
      const std::vector<float> start = uniform(size_t(c.M * ldc), 3);
      std::vector<float> out = start;
      ops::tile_gemm(c.M, c.N, c.K, a.data(), ars, acs, b.data(), ldb, out.data(), ldc, accumulate);
      for (int64_t i = 0; i < c.M; ++i) {
        for (int64_t j = 0; j < c.N; ++j) {
          double ref = accumulate ? start[size_t(i * ldc + j)] : 0.0;
          for (int64_t k = 0; k < c.K; ++k) ref += double(a[size_t(i * ars + k * acs)]) * b[size_t(k * ldb + j)];
          INFO("C(" << i << ", " << j << ")");
          CHECK(std::fabs(out[size_t(i * ldc + j)] - ref) <= 1e-5 * (1 + std::fabs(ref)) * std::sqrt(double(c.K)));
        }
        for (int64_t j = c.N; j < ldc; ++j) CHECK(out[size_t(i * ldc + j)] == start[size_t(i * ldc + j)]);  // untouched
      }
    }
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
