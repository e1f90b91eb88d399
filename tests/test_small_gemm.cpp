#include <cmath>
#include <random>
#include <vector>

#include "ops/small_gemm.h"
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

// Every column-block width (4, 3, 2 and 1 registers, alone and mixed), row counts that leave
// partial tiles, A read directly and through its transpose, and B and C with leading dims wider
// than N, against products summed in double.
TEST_CASE("small_gemm: against a double-precision product") {
  struct Case { int64_t M, N, K; bool at; };
  for (Case c : {Case{1, 8, 1, false}, Case{7, 16, 5, false}, Case{50, 56, 16, false}, Case{50, 16, 50, true},
                 Case{13, 24, 9, true}, Case{37, 40, 64, false}, Case{9, 64, 3, true}, Case{25, 8, 33, false}}) {
    CAPTURE(c.M);
    CAPTURE(c.N);
    CAPTURE(c.K);
    CAPTURE(c.at);
    const int64_t lda = (c.at ? c.M : c.K) + 3, ldb = c.N + 5, ldc = c.N + 4;
    const std::vector<float> a = uniform(size_t((c.at ? c.K : c.M) * lda), 1), b = uniform(size_t(c.K * ldb), 2);
    // A(i, k) = a[i * lda + k], or a[k * lda + i] when read through its transpose
    const int64_t ars = c.at ? 1 : lda, acs = c.at ? lda : 1;
    std::vector<float> out(size_t(c.M * ldc), 7.f);
    ops::small_gemm(c.M, c.N, c.K, a.data(), ars, acs, b.data(), ldb, out.data(), ldc);
    for (int64_t i = 0; i < c.M; ++i) {
      for (int64_t j = 0; j < c.N; ++j) {
        double ref = 0;
        for (int64_t k = 0; k < c.K; ++k) ref += double(a[size_t(i * ars + k * acs)]) * b[size_t(k * ldb + j)];
        INFO("C(" << i << ", " << j << ")");
        CHECK(std::fabs(out[size_t(i * ldc + j)] - ref) <= 1e-5 * (1 + std::fabs(ref)) * std::sqrt(double(c.K)));
      }
      for (int64_t j = c.N; j < ldc; ++j) CHECK(out[size_t(i * ldc + j)] == 7.f);  // past N: untouched
    }
  }
}

TEST_CASE("small_gemm: transpose8 moves every element to its mirror place") {
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
