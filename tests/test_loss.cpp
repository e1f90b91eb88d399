#include <cmath>

#include "ops/elementwise.h"
#include "ops/loss.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

TEST_CASE("cross_entropy: hand-computed values") {
  // Row 0: logits (0, 0) -> loss log 2. Row 1: (0, log 3), label 1 -> p = 3/4, loss -log(3/4).
  Tensor logits = Tensor::from({0, 0, 0, std::log(3.0f)}, {2, 2});
  Tensor labels = Tensor::from_i64({0, 1}, {2});
  Tensor l = ops::cross_entropy(logits, labels);
  CHECK(l.shape() == Shape{});
  check_close(l, {float((std::log(2.0) - std::log(0.75)) / 2)}, 1e-6f);
  // Label smoothing 0.2, C = 2: target of row 1 is (0.1, 0.9).
  // row 0: -(0.1 + 0.9) log(1/2) = log 2; row 1: -(0.1 log(1/4) + 0.9 log(3/4))
  const double row1 = -(0.1 * std::log(0.25) + 0.9 * std::log(0.75));
  check_close(ops::cross_entropy(logits, labels, 0.2f), {float((std::log(2.0) + row1) / 2)}, 1e-6f);
  // Large logits stay finite: loss of the right class ~ 0, of the wrong one ~ 1000.
  Tensor big = Tensor::from({1000, 0, 0, 1000}, {2, 2});
  check_close(ops::cross_entropy(big, Tensor::from_i64({0, 0}, {2})), {500}, 1e-3f);
}

TEST_CASE("cross_entropy: against a double reference, with and without smoothing") {
  const int64_t N = 6, C = 11;
  Tensor logits = param({N, C}, 71, 3.0f);
  std::vector<int64_t> lab = {0, 10, 3, 3, 7, 1};
  Tensor labels = Tensor::from_i64(lab, {N});
  std::vector<float> x = logits.to_vector<float>();
  for (float ls : {0.f, 0.1f}) {
    double total = 0;
    for (int64_t n = 0; n < N; ++n) {
      double m = -INFINITY, s = 0;
      for (int64_t j = 0; j < C; ++j) m = std::max(m, double(x[size_t(n * C + j)]));
      for (int64_t j = 0; j < C; ++j) s += std::exp(x[size_t(n * C + j)] - m);
      for (int64_t j = 0; j < C; ++j) {
        double t = ls / double(C) + (j == lab[size_t(n)] ? 1.0 - ls : 0.0);
        total -= t * (x[size_t(n * C + j)] - m - std::log(s));
      }
    }
    check_close(ops::cross_entropy(logits, labels, ls), {float(total / N)}, 1e-5f, 1e-5f);
  }
}

TEST_CASE("cross_entropy: gradients") {
  Tensor labels = Tensor::from_i64({2, 0, 4, 1}, {4});
  auto f = [&](float ls) {
    return [&labels, ls](const std::vector<Tensor>& t) { return ops::cross_entropy(t[0], labels, ls); };
  };
  check_grad(f(0.f), {param({4, 5}, 72)});
  check_grad(f(0.3f), {param({4, 5}, 73, 2.0f)});
  // backward = (softmax - onehot) / N: for uniform logits, (1/C - onehot) / N
  Tensor z = Tensor::zeros({2, 4}).set_requires_grad(true);
  ops::cross_entropy(z, Tensor::from_i64({1, 3}, {2})).backward();
  check_close(z.grad(), {0.125f, -0.375f, 0.125f, 0.125f, 0.125f, 0.125f, 0.125f, -0.375f});
}

TEST_CASE("cross_entropy: clear errors") {
  Tensor logits = Tensor::zeros({3, 4});
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, Tensor::from_i64({0, 4, 1}, {3})),
                       doctest::Contains("label 4 in row 1 is outside [0, 4)"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, Tensor::from_i64({0, 1, -1}, {3})),
                       doctest::Contains("label -1 in row 2"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, Tensor::from_i64({0, 1}, {2})),
                       doctest::Contains("must be (N,) = (3)"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, Tensor::from({0, 1, 2}, {3})),
                       doctest::Contains("labels must be an I64"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(Tensor::zeros({12}), Tensor::from_i64({0}, {1})),
                       doctest::Contains("must be (N, C)"), Error);
}

TEST_CASE("mse: values, gradients, errors") {
  Tensor a = Tensor::from({1, 2, 3, 4}, {2, 2}), b = Tensor::from({0, 2, 5, 1}, {2, 2});
  check_close(ops::mse(a, b), {(1 + 0 + 4 + 9) / 4.0f});
  check_grad([](const std::vector<Tensor>& t) { return ops::mse(t[0], t[1]); },
             {param({3, 5}, 74), param({3, 5}, 75)});
  check_grad([&](const std::vector<Tensor>& t) { return ops::mse(t[0], b); }, {param({2, 2}, 76)});
  // a long input takes several fixed-size chunks
  Tensor x = param({50000}, 77).detach();
  std::vector<float> xv = x.to_vector<float>();
  double s = 0;
  for (float v : xv) s += double(v) * v;
  check_close(ops::mse(x, Tensor::zeros({50000})), {float(s / 50000)}, 1e-6f, 1e-5f);
  CHECK_THROWS_WITH_AS(ops::mse(a, Tensor::zeros({4})), doctest::Contains("mse: shapes (2, 2) and (4) differ"),
                       Error);
}
