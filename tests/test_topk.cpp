#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "ops/topk.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {
// Distinct values 0.1 apart in random order: finite differences (eps 0.01) never reorder them.
Tensor spaced(const Shape& s, uint64_t seed) {
  Generator g(seed);
  std::vector<int64_t> perm = randperm(shape_numel(s), g).to_vector<int64_t>();
  std::vector<float> v;
  for (int64_t i : perm) v.push_back(0.1f * float(i) - 1.0f);
  return Tensor::from(v, s).set_requires_grad(true);
}
}  // namespace

TEST_CASE("topk: values sorted descending, ties to the lower index") {
  Tensor x = Tensor::from({1, 5, 3, 5, 2,   //
                           0, 0, 0, -1, 0},
                          {2, 5});
  ops::TopK t = ops::topk(x, 3);
  CHECK(t.values.shape() == Shape{2, 3});
  CHECK(t.indices.dtype() == DType::I64);
  check_close(t.values, {5, 5, 3, 0, 0, 0});
  CHECK(t.indices.to_vector<int64_t>() == std::vector<int64_t>{1, 3, 2, 0, 1, 2});
  CHECK(ops::topk(x, 5).indices.to_vector<int64_t>() == std::vector<int64_t>{1, 3, 2, 4, 0, 0, 1, 2, 4, 3});
  CHECK(ops::topk(x, 1).indices.to_vector<int64_t>() == std::vector<int64_t>{1, 0});
}

TEST_CASE("topk: random rows against a full sort") {
  Tensor x = param({3, 4, 17}, 81);
  std::vector<float> xv = x.to_vector<float>();
  ops::TopK t = ops::topk(x, 6);
  std::vector<float> ev;
  std::vector<int64_t> ei;
  for (int r = 0; r < 12; ++r) {
    std::vector<int64_t> o(17);
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int64_t a, int64_t b) {
      return xv[size_t(r * 17 + a)] > xv[size_t(r * 17 + b)];
    });
    for (int j = 0; j < 6; ++j) {
      ei.push_back(o[size_t(j)]);
      ev.push_back(xv[size_t(r * 17 + o[size_t(j)])]);
    }
  }
  check_close(t.values, ev, 0, 0);
  CHECK(t.indices.to_vector<int64_t>() == ei);
}

TEST_CASE("topk: gradient scattered to the chosen positions") {
  Tensor x = Tensor::from({0.1f, 0.9f, 0.5f, 0.7f}, {1, 4}).set_requires_grad(true);
  ops::topk(x, 2).values.backward(Tensor::from({10, 20}, {1, 2}));
  check_close(x.grad(), {0, 10, 0, 20});
  // well-separated values: finite differences do not change the selection
  check_grad([](const std::vector<Tensor>& t) { return ops::topk(t[0], 3).values; }, {spaced({4, 8}, 82)});
  check_grad([](const std::vector<Tensor>& t) { return ops::topk(t[0], 1).values; }, {spaced({2, 3, 5}, 83)});
}

TEST_CASE("argsort: stable in both directions") {
  Tensor x = Tensor::from({3, 1, 2, 1, 3, 0}, {6});
  CHECK(ops::argsort(x).to_vector<int64_t>() == std::vector<int64_t>{5, 1, 3, 2, 0, 4});
  CHECK(ops::argsort(x, true).to_vector<int64_t>() == std::vector<int64_t>{0, 4, 2, 1, 3, 5});
  // all equal: the identity permutation
  CHECK(ops::argsort(Tensor::zeros({1, 7})).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6});
  CHECK(ops::argsort(Tensor::zeros({1, 7}), true).to_vector<int64_t>() ==
        std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6});
  // rows with many ties against std::stable_sort
  Generator g(84);
  Tensor r = rand({5, 40}, g);
  float* p = r.data<float>();
  for (int i = 0; i < 200; ++i) p[i] = std::floor(p[i] * 4);  // values 0..3
  std::vector<float> rv = r.to_vector<float>();
  std::vector<int64_t> asc, desc;
  for (int row = 0; row < 5; ++row) {
    std::vector<int64_t> o(40);
    std::iota(o.begin(), o.end(), 0);
    auto v = [&](int64_t i) { return rv[size_t(row * 40 + i)]; };
    std::stable_sort(o.begin(), o.end(), [&](int64_t a, int64_t b) { return v(a) < v(b); });
    asc.insert(asc.end(), o.begin(), o.end());
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int64_t a, int64_t b) { return v(a) > v(b); });
    desc.insert(desc.end(), o.begin(), o.end());
  }
  CHECK(ops::argsort(r).to_vector<int64_t>() == asc);
  CHECK(ops::argsort(r, true).to_vector<int64_t>() == desc);
  // NaN sorts as largest
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Tensor n = Tensor::from({2, nan, 1}, {3});
  CHECK(ops::argsort(n).to_vector<int64_t>() == std::vector<int64_t>{2, 0, 1});
  CHECK(ops::topk(n, 1).indices.to_vector<int64_t>() == std::vector<int64_t>{1});
}

TEST_CASE("topk and argsort: clear errors") {
  Tensor x = Tensor::zeros({2, 4});
  CHECK_THROWS_WITH_AS(ops::topk(x, 5), doctest::Contains("topk: k = 5 is outside [1, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::topk(x, 0), doctest::Contains("k = 0 is outside"), Error);
  CHECK_THROWS_WITH_AS(ops::topk(Tensor::scalar(1), 1), doctest::Contains("at least one axis"), Error);
  CHECK_THROWS_WITH_AS(ops::argsort(Tensor::zeros({3}, DType::I64)), doctest::Contains("expected an F32"), Error);
}
