#include <cmath>

#include "ops/elementwise.h"
#include "ops/norm.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {

// Naive layernorm in double.
std::vector<float> ref(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b,
                       int64_t D, double eps) {
  std::vector<float> y(x.size());
  for (size_t r = 0; r < x.size() / size_t(D); ++r) {
    double m = 0, v = 0;
    for (int64_t j = 0; j < D; ++j) m += x[r * D + j];
    m /= double(D);
    for (int64_t j = 0; j < D; ++j) v += (x[r * D + j] - m) * (x[r * D + j] - m);
    v /= double(D);
    for (int64_t j = 0; j < D; ++j)
      y[r * D + j] = float((x[r * D + j] - m) / std::sqrt(v + eps) * w[size_t(j)] + b[size_t(j)]);
  }
  return y;
}

}  // namespace

TEST_CASE("layernorm: hand-computed row") {
  // row (1, 2, 3, 4): mean 2.5, var 1.25
  Tensor x = Tensor::from({1, 2, 3, 4}, {1, 4});
  Tensor w = Tensor::from({1, 1, 2, 1}, {4}), b = Tensor::from({0, 0, 0, 10}, {4});
  const float r = 1.0f / std::sqrt(1.25f);
  check_close(ops::layernorm(x, w, b, 0.f), {-1.5f * r, -0.5f * r, 2 * 0.5f * r, 1.5f * r + 10}, 1e-6f);
}

TEST_CASE("layernorm: against a double reference") {
  const int64_t D = 19;
  Tensor x = ops::add(param({3, 5, D}, 31, 3.0f).detach(), 7.0f);  // offset mean, non-unit variance
  Tensor w = param({D}, 32), b = param({D}, 33);
  check_close(ops::layernorm(x, w, b), ref(x.to_vector<float>(), w.to_vector<float>(), b.to_vector<float>(), D, 1e-6),
              1e-5f, 1e-5f);
  check_close(ops::layernorm(x, w, b, 0.5f),
              ref(x.to_vector<float>(), w.to_vector<float>(), b.to_vector<float>(), D, 0.5), 1e-5f, 1e-5f);
  CHECK(ops::layernorm(x, w, b).shape() == x.shape());
  // Many rows: parallel forward.
  Tensor big = param({700, 64}, 34);
  Tensor wb = param({64}, 35), bb = param({64}, 36);
  check_close(ops::layernorm(big, wb, bb),
              ref(big.to_vector<float>(), wb.to_vector<float>(), bb.to_vector<float>(), 64, 1e-6), 1e-5f, 1e-5f);
}

TEST_CASE("layernorm: gradients for x, gamma and beta") {
  auto f = [](const std::vector<Tensor>& t) { return ops::layernorm(t[0], t[1], t[2], 1e-5f); };
  check_grad(f, {param({4, 6}, 37), param({6}, 38), param({6}, 39)});
  check_grad(f, {param({2, 3, 5}, 40, 2.0f), param({5}, 41), param({5}, 42)});
  // Only some inputs need a gradient.
  check_grad(f, {param({3, 4}, 43), param({4}, 44).detach(), param({4}, 45)});
  check_grad(f, {param({3, 4}, 46).detach(), param({4}, 47), param({4}, 48).detach()});
  // More rows than the 64 backward blocks (several rows per block): dgamma/dbeta against sums.
  Tensor x = param({150, 8}, 49), w = param({8}, 50), b = param({8}, 51);
  Tensor g = param({150, 8}, 52).detach();
  ops::layernorm(x, w, b).backward(g);
  std::vector<float> xv = x.to_vector<float>(), gv = g.to_vector<float>();
  std::vector<float> dw(8, 0), db(8, 0);
  std::vector<double> dwd(8, 0), dbd(8, 0);
  for (int r = 0; r < 150; ++r) {
    double m = 0, v = 0;
    for (int j = 0; j < 8; ++j) m += xv[size_t(r * 8 + j)];
    m /= 8;
    for (int j = 0; j < 8; ++j) v += (xv[size_t(r * 8 + j)] - m) * (xv[size_t(r * 8 + j)] - m);
    v /= 8;
    for (int j = 0; j < 8; ++j) {
      dwd[size_t(j)] += gv[size_t(r * 8 + j)] * (xv[size_t(r * 8 + j)] - m) / std::sqrt(v + 1e-6);
      dbd[size_t(j)] += gv[size_t(r * 8 + j)];
    }
  }
  for (int j = 0; j < 8; ++j) {
    dw[size_t(j)] = float(dwd[size_t(j)]);
    db[size_t(j)] = float(dbd[size_t(j)]);
  }
  check_close(w.grad(), dw, 1e-4f, 1e-4f);
  check_close(b.grad(), db, 1e-4f, 1e-4f);
  // dx of every row sums to zero (the output is shift-invariant in x)
  std::vector<float> dx = x.grad().to_vector<float>();
  for (int r = 0; r < 150; ++r) {
    double s = 0;
    for (int j = 0; j < 8; ++j) s += dx[size_t(r * 8 + j)];
    CHECK(std::fabs(s) < 1e-4);
  }
}

TEST_CASE("layernorm: clear errors") {
  Tensor x = Tensor::zeros({2, 4});
  CHECK_THROWS_WITH_AS(ops::layernorm(x, Tensor::ones({3}), Tensor::zeros({4})),
                       doctest::Contains("needs gamma and beta of shape (4)"), Error);
  CHECK_THROWS_WITH_AS(ops::layernorm(x, Tensor::ones({4}), Tensor::zeros({1, 4})),
                       doctest::Contains("F32 (1, 4)"), Error);
  CHECK_THROWS_WITH_AS(ops::layernorm(Tensor::scalar(1), Tensor::ones({1}), Tensor::zeros({1})),
                       doctest::Contains("non-empty last axis"), Error);
}
