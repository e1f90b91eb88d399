#include <cmath>
#include <limits>

#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {

// Naive reference: sums (or sums of squared deviations from the mean) over the axes marked in
// `red`, in double, indexing every element by its multi-index. Result in keepdim row-major order.
std::vector<double> ref_reduce(const std::vector<float>& x, const Shape& s, const std::vector<bool>& red,
                               bool variance = false) {
  Shape k = s;
  int64_t count = 1;
  for (size_t d = 0; d < s.size(); ++d)
    if (red[d]) {
      k[d] = 1;
      count *= s[d];
    }
  const int64_t n = shape_numel(s);
  auto out_index = [&](int64_t i) {
    int64_t o = 0, stride = 1;
    for (int d = int(s.size()) - 1; d >= 0; --d) {
      int64_t c = i % s[size_t(d)];
      i /= s[size_t(d)];
      if (!red[size_t(d)]) o += c * stride;
      stride *= k[size_t(d)];
    }
    return o;
  };
  std::vector<double> sum(size_t(shape_numel(k)), 0.0);
  for (int64_t i = 0; i < n; ++i) sum[size_t(out_index(i))] += x[size_t(i)];
  if (!variance) return sum;
  std::vector<double> ss(sum.size(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t o = out_index(i);
    double d = x[size_t(i)] - sum[size_t(o)] / double(count);
    ss[size_t(o)] += d * d;
  }
  return ss;
}

void check_vs(const Tensor& t, const std::vector<double>& ref, double scale, float tol = 1e-5f) {
  std::vector<float> e;
  for (double v : ref) e.push_back(float(v * scale));
  check_close(t, e, tol, tol);
}

}  // namespace

TEST_CASE("sum and mean: hand-computed values and shapes") {
  Tensor x = Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3});
  CHECK(ops::sum(x).shape() == Shape{});
  check_close(ops::sum(x), {21});
  check_close(ops::mean(x), {3.5f});
  check_close(ops::sum(x, {0}), {5, 7, 9});
  check_close(ops::sum(x, {1}), {6, 15});
  check_close(ops::sum(x, {-1}, true), {6, 15});
  CHECK(ops::sum(x, {-1}, true).shape() == Shape{2, 1});
  CHECK(ops::sum(x, {0}).shape() == Shape{3});
  check_close(ops::mean(x, {0}), {2.5f, 3.5f, 4.5f});
  check_close(ops::mean(x, {1}, true), {2, 5});
  CHECK(ops::sum(x, {0, 1}, true).shape() == Shape{1, 1});
  check_close(ops::sum(x, {}), {21});  // empty axes = all
  check_close(ops::sum(Tensor::scalar(2.5f)), {2.5f});
}

TEST_CASE("sum, mean and var against a naive reference, any axis set") {
  const Shape s = {3, 4, 5, 2};
  Tensor x = param(s, 11);
  std::vector<float> xv = x.to_vector<float>();
  const std::vector<std::vector<int>> sets = {{0}, {1}, {2}, {3}, {-1}, {0, 2}, {1, 3}, {0, 3},
                                              {1, 2}, {0, 1, 3}, {0, 1, 2, 3}};
  for (const auto& axes : sets) {
    std::vector<bool> red(4, false);
    int64_t count = 1;
    for (int a : axes) {
      red[size_t((a + 4) % 4)] = true;
      count *= s[size_t((a + 4) % 4)];
    }
    INFO("axes " << axes.size() << " first " << axes[0]);
    check_vs(ops::sum(x, axes), ref_reduce(xv, s, red), 1.0, 1e-5f);
    check_vs(ops::mean(x, axes, true), ref_reduce(xv, s, red), 1.0 / double(count), 1e-5f);
    std::vector<double> ss = ref_reduce(xv, s, red, true);
    check_vs(ops::var(x, axes), ss, 1.0 / double(count), 1e-5f);
    check_vs(ops::var(x, axes, true, 1), ss, 1.0 / double(count - 1), 1e-5f);
    // keepdim shape: reduced axes are 1
    Shape k = ops::sum(x, axes, true).shape();
    for (size_t d = 0; d < 4; ++d) CHECK(k[d] == (red[d] ? 1 : s[d]));
  }
  check_close(ops::var(Tensor::from({1, 2, 3, 4}, {4}), {0}), {1.25f});
  check_close(ops::var(Tensor::from({1, 2, 3, 4}, {4}), {0}, false, 1), {5.0f / 3.0f});
}

TEST_CASE("sum over long axes (parallel chunked path) matches a double reference") {
  // All elements, and a column sum with few columns: both take the chunked path.
  Tensor big = param({100003}, 12);
  std::vector<float> v = big.to_vector<float>();
  double s = 0;
  for (float f : v) s += f;
  check_close(ops::sum(big), {float(s)}, 1e-3f, 1e-6f);
  Tensor cols = param({40001, 3}, 13);
  check_vs(ops::sum(cols, {0}), ref_reduce(cols.to_vector<float>(), {40001, 3}, {true, false}), 1.0,
           1e-3f);
  // var of values with a large common offset: two-pass, no cancellation
  Tensor off = ops::add(param({1000}, 14).detach(), 1e4f);
  std::vector<float> ov = off.to_vector<float>();
  double m = 0, q = 0;
  for (float f : ov) m += f;
  m /= 1000;
  for (float f : ov) q += (f - m) * (f - m);
  check_close(ops::var(off, {0}), {float(q / 1000)}, 1e-3f, 1e-3f);
}

TEST_CASE("sum, mean, var: gradients") {
  auto un = [](auto f) { return [f](const std::vector<Tensor>& x) { return f(x[0]); }; };
  Tensor x = param({3, 4, 5}, 15);
  check_grad(un([](auto t) { return ops::sum(t); }), {x});
  check_grad(un([](auto t) { return ops::mean(t); }), {x});
  check_grad(un([](auto t) { return ops::sum(t, {0, 2}); }), {x});
  check_grad(un([](auto t) { return ops::sum(t, {1}, true); }), {x});
  check_grad(un([](auto t) { return ops::mean(t, {-1}); }), {x});
  check_grad(un([](auto t) { return ops::mean(t, {0, 1}, true); }), {x});
  check_grad(un([](auto t) { return ops::var(t, {-1}); }), {x});
  check_grad(un([](auto t) { return ops::var(t, {0, 2}, true, 1); }), {x});
  check_grad(un([](auto t) { return ops::var(t, {1}); }), {x});
  // mean's backward spreads g / count over every element
  Tensor y = Tensor::from({1, 2, 3, 4}, {2, 2}).set_requires_grad(true);
  ops::mean(y, {1}).backward(Tensor::from({2, 4}, {2}));
  check_close(y.grad(), {1, 1, 2, 2});
}

TEST_CASE("max and argmax: values, ties to the lower index, NaN") {
  Tensor x = Tensor::from({1, 7, 7, 2,   //
                           5, 3, 5, 0,   //
                           -1, -4, -2, -3},
                          {3, 4});
  check_close(ops::max(x, 1), {7, 5, -1});
  CHECK(ops::argmax(x, 1).to_vector<int64_t>() == std::vector<int64_t>{1, 0, 0});
  CHECK(ops::argmax(x, -1).dtype() == DType::I64);
  check_close(ops::max(x, 0), {5, 7, 7, 2});
  CHECK(ops::argmax(x, 0).to_vector<int64_t>() == std::vector<int64_t>{1, 0, 0, 0});
  CHECK(ops::max(x, 0, true).shape() == Shape{1, 4});
  CHECK(ops::argmax(x, 1, true).shape() == Shape{3, 1});
  // middle axis of a 3-d tensor against a naive loop
  Tensor y = param({2, 5, 3}, 16);
  std::vector<float> yv = y.to_vector<float>();
  std::vector<float> ev;
  std::vector<int64_t> ei;
  for (int a = 0; a < 2; ++a)
    for (int c = 0; c < 3; ++c) {
      int best = 0;
      for (int b = 1; b < 5; ++b)
        if (yv[size_t((a * 5 + b) * 3 + c)] > yv[size_t((a * 5 + best) * 3 + c)]) best = b;
      ev.push_back(yv[size_t((a * 5 + best) * 3 + c)]);
      ei.push_back(best);
    }
  check_close(ops::max(y, 1), ev);
  CHECK(ops::argmax(y, 1).to_vector<int64_t>() == ei);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(ops::argmax(Tensor::from({1, nan, 3, nan}, {4}), 0).to_vector<int64_t>() ==
        std::vector<int64_t>{1});
}

TEST_CASE("max: gradient goes to the first maximal element") {
  Tensor x = param({4, 6}, 17);  // random normals: no ties
  check_grad([](const std::vector<Tensor>& t) { return ops::max(t[0], 1); }, {x});
  check_grad([](const std::vector<Tensor>& t) { return ops::max(t[0], 0, true); }, {x});
  check_grad([](const std::vector<Tensor>& t) { return ops::max(t[0], 1); }, {param({2, 3, 4}, 18)});
  Tensor tie = Tensor::from({3, 1, 3, 2, 2, 0}, {2, 3}).set_requires_grad(true);
  ops::max(tie, 1).backward(Tensor::from({10, 20}, {2}));
  check_close(tie.grad(), {10, 0, 0, 20, 0, 0});
}

TEST_CASE("reductions: clear errors") {
  Tensor x = Tensor::zeros({2, 3});
  CHECK_THROWS_WITH_AS(ops::sum(x, {2}), doctest::Contains("sum: axis 2 is out of range for rank 2"), Error);
  CHECK_THROWS_WITH_AS(ops::mean(x, {1, -1}), doctest::Contains("listed twice"), Error);
  CHECK_THROWS_WITH_AS(ops::var(Tensor::zeros({2, 1}), {1}, false, 1),
                       doctest::Contains("correction 1"), Error);
  CHECK_THROWS_WITH_AS(ops::max(x, -3), doctest::Contains("max: axis -3 is out of range"), Error);
  CHECK_THROWS_WITH_AS(ops::argmax(Tensor::zeros({2, 0}), 1), doctest::Contains("is empty"), Error);
  CHECK_THROWS_WITH_AS(ops::max(Tensor::scalar(1), 0), doctest::Contains("at least one axis"), Error);
  CHECK_THROWS_WITH_AS(ops::sum(Tensor::zeros({2}, DType::I64)), doctest::Contains("expected an F32"), Error);
}
