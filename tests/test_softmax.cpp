#include <cmath>

#include "ops/elementwise.h"
#include "ops/softmax.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {

// Reference softmax / log-softmax of rows of length C, in double via a shifted log-sum-exp.
std::vector<float> ref(const std::vector<float>& x, int64_t C, bool log_form) {
  std::vector<float> out(x.size());
  for (size_t r = 0; r < x.size() / size_t(C); ++r) {
    double m = -INFINITY;
    for (int64_t j = 0; j < C; ++j) m = std::max(m, double(x[r * C + j]));
    double s = 0;
    for (int64_t j = 0; j < C; ++j) s += std::exp(double(x[r * C + j]) - m);
    for (int64_t j = 0; j < C; ++j) {
      double l = double(x[r * C + j]) - m - std::log(s);
      out[r * C + j] = float(log_form ? l : std::exp(l));
    }
  }
  return out;
}

}  // namespace

TEST_CASE("softmax and log_softmax: hand-computed values") {
  Tensor x = Tensor::from({0, std::log(3.0f), 1, 1}, {2, 2});
  check_close(ops::softmax(x), {0.25f, 0.75f, 0.5f, 0.5f}, 1e-6f);
  check_close(ops::log_softmax(x), {std::log(0.25f), std::log(0.75f), std::log(0.5f), std::log(0.5f)},
              1e-6f);
  check_close(ops::softmax(Tensor::from({5}, {1})), {1});
}

TEST_CASE("softmax with large outliers does not overflow") {
  // exp(1000) overflows float and double: a kernel without the max shift gives inf/nan.
  Tensor x = Tensor::from({1000, 0, -5, 999,   //
                           -1000, -1000, -999, -1001,  //
                           1000, 1000, 1000, 1000},
                          {3, 4});
  std::vector<float> xv = x.to_vector<float>();
  check_close(ops::softmax(x), ref(xv, 4, false), 1e-6f, 1e-5f);
  check_close(ops::log_softmax(x), ref(xv, 4, true), 1e-4f, 1e-6f);
  std::vector<float> y = ops::softmax(x).to_vector<float>();
  CHECK(y[0] == doctest::Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  CHECK(y[8] == doctest::Approx(0.25));
  // log_softmax stays finite where softmax underflows to 0
  std::vector<float> l = ops::log_softmax(x).to_vector<float>();
  CHECK(l[1] == doctest::Approx(-1000.0 - std::log1p(std::exp(-1.0))).epsilon(1e-6));
}

TEST_CASE("softmax: random rows against a double reference, rows sum to 1") {
  Tensor x = ops::mul(param({2, 3, 37}, 21).detach(), 4.0f);  // odd row length
  std::vector<float> xv = x.to_vector<float>();
  check_close(ops::softmax(x), ref(xv, 37, false), 1e-6f, 1e-5f);
  check_close(ops::log_softmax(x), ref(xv, 37, true), 1e-5f, 1e-5f);
  std::vector<float> y = ops::softmax(x).to_vector<float>();
  for (int r = 0; r < 6; ++r) {
    double s = 0;
    for (int j = 0; j < 37; ++j) s += y[size_t(r * 37 + j)];
    CHECK(s == doctest::Approx(1.0).epsilon(1e-5));
  }
  // Many rows: takes the parallel path.
  Tensor big = param({512, 129}, 22);
  check_close(ops::softmax(big), ref(big.to_vector<float>(), 129, false), 1e-6f, 1e-5f);
}

TEST_CASE("softmax and log_softmax: gradients") {
  auto un = [](auto f) { return [f](const std::vector<Tensor>& x) { return f(x[0]); }; };
  check_grad(un([](auto t) { return ops::softmax(t); }), {param({3, 7}, 23)});
  check_grad(un([](auto t) { return ops::log_softmax(t); }), {param({3, 7}, 24)});
  check_grad(un([](auto t) { return ops::softmax(t); }), {param({2, 2, 5}, 25, 2.0f)});
  check_grad(un([](auto t) { return ops::log_softmax(t); }), {param({2, 2, 5}, 26, 2.0f)});
  // Large logits: the backward is finite and correct too.
  Tensor big = ops::add(param({2, 4}, 27).detach(), 1000.f).set_requires_grad(true);
  check_grad(un([](auto t) { return ops::softmax(t); }), {big});
  check_grad(un([](auto t) { return ops::log_softmax(t); }), {big});
}

TEST_CASE("softmax: clear errors") {
  CHECK_THROWS_WITH_AS(ops::softmax(Tensor::scalar(1)), doctest::Contains("softmax: needs at least one axis"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::log_softmax(Tensor::zeros({2}, DType::I32)), doctest::Contains("expected an F32"),
                       Error);
}
