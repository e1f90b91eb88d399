#include <cmath>

#include "ops/elementwise.h"
#include "ops/fast_math.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

TEST_CASE("binary ops: values and broadcasting") {
  Tensor a = Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor row = Tensor::from({10, 20, 30}, {3});
  Tensor col = Tensor::from({100, 200}, {2, 1});
  check_close(a + row, {11, 22, 33, 14, 25, 36});
  check_close(a - col, {-99, -98, -97, -196, -195, -194});
  check_close(a * row, {10, 40, 90, 40, 100, 180});
  check_close(row / Tensor::from({2}, {1}), {5, 10, 15});
  check_close(col * row, {1000, 2000, 3000, 2000, 4000, 6000});
  check_close(a + 1.5f, {2.5, 3.5, 4.5, 5.5, 6.5, 7.5});
  check_close(-a * 2.0f, {-2, -4, -6, -8, -10, -12});
  CHECK((col * row).shape() == Shape{2, 3});
  CHECK_THROWS_WITH_AS(a + Tensor::zeros({2}), doctest::Contains("(2, 3) and (2) do not broadcast"), Error);
}

TEST_CASE("binary ops: gradients, broadcast inputs included") {
  auto bin = [](auto f) { return [f](const std::vector<Tensor>& x) { return f(x[0], x[1]); }; };
  Tensor a = param({2, 3, 4}, 1), b = param({3, 1}, 2);
  Tensor pos = ops::add(ops::mul(param({3, 1}, 3), 0.3f).detach(), 2.0f).set_requires_grad(true);
  check_grad(bin([](auto x, auto y) { return x + y; }), {a, b});
  check_grad(bin([](auto x, auto y) { return x - y; }), {a, b});
  check_grad(bin([](auto x, auto y) { return x * y; }), {a, b});
  check_grad(bin([](auto x, auto y) { return x / y; }), {a, pos});
  check_grad(bin([](auto x, auto y) { return y * x; }), {a, param({4}, 4)});
}

TEST_CASE("unary ops: values against the C library") {
  std::vector<float> xs = {0.3f, 1.7f, 2.5f};
  Tensor x = Tensor::from(xs, {3});
  auto expect = [&](Tensor y, float (*f)(float)) {
    std::vector<float> e;
    for (float v : xs) e.push_back(f(v));
    check_close(y, e, 1e-6f, 1e-6f);
  };
  expect(ops::exp(x), [](float v) { return std::exp(v); });
  expect(ops::log(x), [](float v) { return std::log(v); });
  expect(ops::sqrt(x), [](float v) { return std::sqrt(v); });
  expect(ops::rsqrt(x), [](float v) { return 1 / std::sqrt(v); });
  expect(ops::tanh(x), [](float v) { return std::tanh(v); });
  expect(ops::pow(x, 3.f), [](float v) { return v * v * v; });
  check_close(ops::relu(Tensor::from({-1, 0.5f}, {2})), {0, 0.5f});
  // GELU reference values (x * Phi(x) for erf; the tanh approximation is within 1e-3 of it).
  Tensor g = Tensor::from({-1.f, 0.f, 1.f, 2.f}, {4});
  check_close(ops::gelu(g, ops::GeluForm::Erf), {-0.15865525f, 0.f, 0.84134475f, 1.95449974f}, 1e-6f);
  check_close(ops::gelu(g, ops::GeluForm::Tanh), {-0.15880801f, 0.f, 0.84119199f, 1.95459769f}, 1e-6f);
}

TEST_CASE("unary ops: gradients") {
  auto un = [](auto f) { return [f](const std::vector<Tensor>& x) { return f(x[0]); }; };
  Tensor x = param({3, 5}, 5);
  Tensor pos = ops::add(ops::mul(param({3, 5}, 6), 0.2f).detach(), 1.5f).set_requires_grad(true);
  check_grad(un([](auto t) { return ops::neg(t); }), {x});
  check_grad(un([](auto t) { return ops::exp(t); }), {x});
  check_grad(un([](auto t) { return ops::tanh(t); }), {x});
  check_grad(un([](auto t) { return ops::gelu(t, ops::GeluForm::Tanh); }), {x});
  check_grad(un([](auto t) { return ops::gelu(t, ops::GeluForm::Erf); }), {x});
  check_grad(un([](auto t) { return ops::log(t); }), {pos});
  check_grad(un([](auto t) { return ops::sqrt(t); }), {pos});
  check_grad(un([](auto t) { return ops::rsqrt(t); }), {pos});
  check_grad(un([](auto t) { return ops::pow(t, 2.5f); }), {pos});
  check_grad(un([](auto t) { return t * 3.0f + 1.0f; }), {x});
  // relu away from its kink at 0, where finite differences are meaningless
  Tensor away = Tensor::from({-1.0f, -0.3f, 0.4f, 2.0f}, {4}).set_requires_grad(true);
  check_grad(un([](auto t) { return ops::relu(t); }), {away});
}

TEST_CASE("where and masked_fill") {
  Tensor m = Tensor::from({1, 0, 1}, {3});
  Tensor a = Tensor::from({1, 2, 3}, {3}), b = Tensor::from({-1, -2, -3}, {3});
  check_close(ops::where(m, a, b), {1, -2, 3});
  check_close(ops::masked_fill(a, m, -9), {-9, 2, -9});
  check_grad([&](const std::vector<Tensor>& x) { return ops::where(m, x[0], x[1]); },
             {param({2, 3}, 7), param({3}, 8)});
  check_grad([&](const std::vector<Tensor>& x) { return ops::masked_fill(x[0], m, 0.5f); },
             {param({2, 3}, 9)});
  Tensor x = Tensor::from({1, 2, 3}, {3}).set_requires_grad(true);
  ops::masked_fill(x, m, 5).backward(Tensor::ones({3}));
  check_close(x.grad(), {0, 1, 0});
}

TEST_CASE("fast exp and tanh stay close to libm over their whole range") {
  double worst_exp = 0, worst_tanh = 0;
  for (float x = -87.f; x <= 88.f; x += 0.00731f) {
    const double e = std::exp(double(x));
    worst_exp = std::max(worst_exp, std::fabs(ops::fast_exp(x) - e) / e);
    worst_tanh = std::max(worst_tanh, std::fabs(ops::fast_tanh(x) - std::tanh(double(x))));
  }
  CHECK(worst_exp < 1e-6);
  CHECK(worst_tanh < 3e-7);
  CHECK(ops::fast_tanh(100.f) == 1.f);
  CHECK(ops::fast_tanh(-100.f) == -1.f);
}

TEST_CASE("fast normal CDF and density against double-precision erfc and exp, tails included") {
  // Relative error of the lower tail (where Phi is small) and absolute error of the upper half.
  double worst_lower = 0, worst_upper = 0, worst_pdf = 0;
  for (float v = -12.9f; v <= 12.9f; v += 0.000731f) {
    const double cdf = 0.5 * std::erfc(-double(v) / std::sqrt(2.0));
    const double pdf = std::exp(-0.5 * double(v) * double(v)) / std::sqrt(2.0 * M_PI);
    const double got = ops::fast_normal_cdf(v);
    if (v <= 0.f)
      worst_lower = std::max(worst_lower, std::fabs(got - cdf) / cdf);
    else
      worst_upper = std::max(worst_upper, std::fabs(got - cdf));
    worst_pdf = std::max(worst_pdf, std::fabs(ops::fast_normal_pdf(v) - pdf) / pdf);
  }
  INFO("lower tail " << worst_lower << ", upper half " << worst_upper << ", density " << worst_pdf);
  CHECK(worst_lower < 6e-7);
  CHECK(worst_upper < 2e-7);
  CHECK(worst_pdf < 6e-6);  // v*v rounded once: its error times v^2/2 = 83 at the far end
  // Flat beyond |v| = 12.9, where Phi(-|v|) is below float's smallest normal number.
  for (float v : {13.f, 20.f, 1e30f, INFINITY}) {
    CHECK(ops::fast_normal_cdf(-v) == 0.f);
    CHECK(ops::fast_normal_cdf(v) == 1.f);
    CHECK(ops::fast_normal_pdf(v) == 0.f);
  }
  CHECK(ops::fast_normal_cdf(0.f) == doctest::Approx(0.5).epsilon(1e-7));
}

TEST_CASE("normal_cdf: values against erfc, the far tail, and the gradient") {
  std::vector<float> xs = {-8.f, -3.f, -1.f, -0.25f, 0.f, 0.5f, 1.f, 2.5f, 6.f};
  std::vector<float> e;
  for (float v : xs) e.push_back(float(0.5 * std::erfc(-double(v) / std::sqrt(2.0))));
  Tensor y = ops::normal_cdf(Tensor::from(xs, {3, 3}));
  CHECK(y.shape() == Shape{3, 3});
  check_close(y, e, 1e-7f, 1e-5f);  // relative: Phi(-8) = 6.2e-16 must not collapse to 0
  check_close(ops::normal_cdf(Tensor::from({0.f, 1.f, -3.f}, {3})),
              {0.5f, 0.8413447460685429f, 0.0013498980316301f}, 1e-7f, 1e-5f);
  check_grad([](const std::vector<Tensor>& x) { return ops::normal_cdf(x[0]); }, {param({3, 5}, 10)});
  // The gradient is the normal density: phi(0) = 1/sqrt(2 pi), phi(2) = e^-2 / sqrt(2 pi).
  Tensor x = Tensor::from({0.f, 2.f}, {2}).set_requires_grad(true);
  ops::normal_cdf(x).backward(Tensor::from({1.f, 3.f}, {2}));
  check_close(x.grad(), {0.3989422804f, 3.f * 0.0539909665f}, 1e-7f, 1e-5f);
  CHECK_THROWS_WITH_AS(ops::normal_cdf(Tensor::arange(3)), doctest::Contains("normal_cdf: expected an F32 tensor"), Error);
}
