#include <vector>

#include "ops/index.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {
Tensor idx64(std::vector<int64_t> v, const Shape& s) { return Tensor::from_i64(v, s); }
Tensor randt(const Shape& s, uint64_t seed) { return param(s, seed).detach(); }
// Deterministic indices in [0, n) with repeats: (i * 7 + 3) % n.
Tensor some_indices(const Shape& s, int64_t n) {
  std::vector<int64_t> v(size_t(shape_numel(s)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = int64_t(i * 7 + 3) % n;
  return Tensor::from_i64(v, s);
}
}  // namespace

TEST_CASE("index_select: values on every axis") {
  Tensor x = randt({3, 4, 5}, 1);
  const auto xv = x.to_vector<float>();
  auto X = [&](int64_t i, int64_t j, int64_t k) { return xv[size_t((i * 4 + j) * 5 + k)]; };
  std::vector<int64_t> iv = {2, 0, 2, 1};
  for (int axis : {0, 1, 2, -1}) {
    Tensor y = ops::index_select(x, axis, idx64(iv, {4}));
    const int a = axis < 0 ? axis + 3 : axis;
    Shape s = {3, 4, 5};
    s[size_t(a)] = 4;
    REQUIRE(y.shape() == s);
    std::vector<float> e;
    for (int64_t i = 0; i < s[0]; ++i)
      for (int64_t j = 0; j < s[1]; ++j)
        for (int64_t k = 0; k < s[2]; ++k)
          e.push_back(a == 0 ? X(iv[size_t(i)], j, k) : a == 1 ? X(i, iv[size_t(j)], k) : X(i, j, iv[size_t(k)]));
    check_close(y, e, 0, 0);
  }
}

TEST_CASE("index_select: repeated indices accumulate; gradients; errors") {
  Tensor x = Tensor::zeros({4, 3}).set_requires_grad(true);
  ops::index_select(x, 0, idx64({1, 1, 3}, {3})).backward(Tensor::ones({3, 3}));
  check_close(x.grad(), {0, 0, 0, 2, 2, 2, 0, 0, 0, 1, 1, 1});
  auto sel = [](int axis, Tensor idx) {
    return [axis, idx](const std::vector<Tensor>& v) { return ops::index_select(v[0], axis, idx); };
  };
  check_grad(sel(0, some_indices({6}, 4)), {param({4, 3}, 2)});
  check_grad(sel(1, some_indices({5}, 3)), {param({2, 3, 4}, 3)});
  check_grad(sel(-1, some_indices({7}, 4)), {param({2, 3, 4}, 4)});
  // wide rows with few outer positions: column-chunked backward
  check_grad(sel(0, some_indices({9}, 5)), {param({5, 600}, 5)});
  Tensor x2 = Tensor::zeros({4, 3});
  CHECK_THROWS_WITH_AS(ops::index_select(x2, 0, idx64({0, 4}, {2})),
                       doctest::Contains("index 4 (at flat position 1) is out of range for axis 0 of size 4"), Error);
  CHECK_THROWS_WITH_AS(ops::index_select(x2, 1, idx64({-1}, {1})), doctest::Contains("index -1"), Error);
  CHECK_THROWS_WITH_AS(ops::index_select(x2, 0, Tensor::from_i32({0}, {1})), doctest::Contains("I64"), Error);
  CHECK_THROWS_WITH_AS(ops::index_select(x2, 0, idx64({0, 1}, {1, 2})), doctest::Contains("must be 1-D"), Error);
}

TEST_CASE("gather: torch semantics") {
  // out[i][j] = x[i][idx[i][j]] along axis 1; along axis 0 out[i][j] = x[idx[i][j]][j]
  Tensor x = Tensor::from({1, 2, 3, 4}, {2, 2});
  check_close(ops::gather(x, 1, idx64({0, 0, 1, 0}, {2, 2})), {1, 1, 4, 3});
  check_close(ops::gather(x, 0, idx64({1, 0, 1, 1}, {2, 2})), {3, 2, 3, 4});
  // 3-D, index smaller than x off the axis and longer along it
  Tensor y = randt({3, 4, 5}, 6);
  const auto yv = y.to_vector<float>();
  for (int axis : {0, 1, 2}) {
    Shape is = {2, 3, 4};
    is[size_t(axis)] = 6;
    const int64_t L = y.shape()[size_t(axis)];
    Tensor idx = some_indices(is, L);
    const auto iv = idx.to_vector<int64_t>();
    std::vector<float> e;
    for (int64_t i = 0; i < is[0]; ++i)
      for (int64_t j = 0; j < is[1]; ++j)
        for (int64_t k = 0; k < is[2]; ++k) {
          int64_t c[3] = {i, j, k};
          c[axis] = iv[size_t((i * is[1] + j) * is[2] + k)];
          e.push_back(yv[size_t((c[0] * 4 + c[1]) * 5 + c[2])]);
        }
    Tensor g = ops::gather(y, axis, idx);
    REQUIRE(g.shape() == is);
    check_close(g, e, 0, 0);
    check_grad([axis, idx](const std::vector<Tensor>& v) { return ops::gather(v[0], axis, idx); },
               {param({3, 4, 5}, uint64_t(7 + axis))});
  }
  CHECK_THROWS_WITH_AS(ops::gather(x, 1, idx64({0, 1}, {2})), doctest::Contains("must have the rank"), Error);
  CHECK_THROWS_WITH_AS(ops::gather(x, 1, idx64({0, 0, 0, 0, 0, 0}, {3, 2})),
                       doctest::Contains("no larger than it on every axis but 1"), Error);
  CHECK_THROWS_WITH_AS(ops::gather(x, 1, idx64({0, 2}, {1, 2})),
                       doctest::Contains("index 2 (at flat position 1) is out of range for axis 1 of size 2"), Error);
}

TEST_CASE("scatter_add: values, repeats, gradients, errors") {
  // out = x; out[i][idx[i][j]] += src[i][j]
  Tensor x = Tensor::from({1, 1, 1, 1, 1, 1}, {2, 3});
  Tensor idx = idx64({0, 0, 2, 1, 1, 1}, {2, 3});
  Tensor src = Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3});
  check_close(ops::scatter_add(x, 1, idx, src), {4, 1, 4, 1, 16, 1});
  // along axis 0 with an index shorter than x on axis 1
  check_close(ops::scatter_add(Tensor::zeros({2, 3}), 0, idx64({1, 0, 1, 1}, {2, 2}), Tensor::from({1, 2, 3, 4}, {2, 2})),
              {0, 2, 0, 4, 4, 0});
  check_grad([](const std::vector<Tensor>& v) {
    return ops::scatter_add(v[0], 1, some_indices({3, 6, 2}, 4), v[1]);
  }, {param({3, 4, 5}, 10), param({3, 6, 2}, 11)});
  check_grad([](const std::vector<Tensor>& v) {
    return ops::scatter_add(v[0], 0, some_indices({5, 300}, 3), v[1]);
  }, {param({3, 300}, 12), param({5, 300}, 13)});
  CHECK_THROWS_WITH_AS(ops::scatter_add(x, 1, idx, Tensor::zeros({2, 2})), doctest::Contains("must have the index's shape"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::scatter_add(x, 1, idx64({3}, {1, 1}), Tensor::zeros({1, 1})),
                       doctest::Contains("index 3"), Error);
}

TEST_CASE("one_hot") {
  Tensor y = ops::one_hot(idx64({2, 0, 1, 2}, {2, 2}), 3);
  CHECK(y.shape() == Shape{2, 2, 3});
  CHECK(y.dtype() == DType::F32);
  check_close(y, {0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1});
  CHECK(!y.requires_grad());
  CHECK_THROWS_WITH_AS(ops::one_hot(idx64({1, 5}, {2}), 3), doctest::Contains("index 5 (at flat position 1) is out of range for n = 3"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::one_hot(idx64({1}, {1}), 0), doctest::Contains("must be positive"), Error);
}
