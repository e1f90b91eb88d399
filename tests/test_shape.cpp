#include <vector>

#include "ops/elementwise.h"
#include "ops/shape.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {
auto one = [](auto f) { return [f](const std::vector<Tensor>& x) { return f(x[0]); }; };
// 0, 1, 2, ... as floats
Tensor iota(const Shape& s) {
  std::vector<float> v(size_t(shape_numel(s)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i);
  return Tensor::from(v, s);
}
}  // namespace

TEST_CASE("reshape: views, -1, copies of strided input") {
  Tensor x = iota({2, 3, 4});
  Tensor y = ops::reshape(x, {4, -1});
  CHECK(y.shape() == Shape{4, 6});
  CHECK(y.raw() == x.raw());  // a view
  check_close(ops::reshape(x, {-1}), x.to_vector<float>());
  // a transposed (strided) input is copied in the transposed order
  Tensor t = ops::transpose(iota({2, 3}), 0, 1);  // [[0,3],[1,4],[2,5]]
  Tensor r = ops::reshape(t, {6});
  CHECK(r.raw() != t.raw());
  check_close(r, {0, 3, 1, 4, 2, 5});
  CHECK(ops::reshape(Tensor::scalar(3.f), {1, 1}).shape() == Shape{1, 1});
  CHECK_THROWS_WITH_AS(ops::reshape(x, {-1, -1}), doctest::Contains("more than one -1"), Error);
  CHECK_THROWS_WITH_AS(ops::reshape(x, {5, -1}), doctest::Contains("cannot reshape F32 (2, 3, 4) cpu to (5, -1)"), Error);
  CHECK_THROWS_WITH_AS(ops::reshape(x, {2, 3}), doctest::Contains("(24 elements) to (2, 3) (6 elements)"), Error);
  check_grad(one([](auto a) { return ops::reshape(a, {3, -1}); }), {param({2, 3, 2}, 1)});
  check_grad(one([](auto a) { return ops::reshape(ops::transpose(a, 0, 2), {-1, 4}); }), {param({2, 3, 4}, 2)});
}

TEST_CASE("transpose and permute: values, views, gradients") {
  Tensor x = iota({2, 3, 4});
  Tensor t = ops::transpose(x, 0, -1);  // (4, 3, 2): t[k][j][i] = x[i][j][k] = 12 i + 4 j + k
  CHECK(t.shape() == Shape{4, 3, 2});
  CHECK(t.raw() == x.raw());
  std::vector<float> e;
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 3; ++j)
      for (int i = 0; i < 2; ++i) e.push_back(float(12 * i + 4 * j + k));
  check_close(t, e);
  Tensor p = ops::permute(x, {1, -1, 0});  // (3, 4, 2): p[j][k][i] = x[i][j][k]
  CHECK(p.shape() == Shape{3, 4, 2});
  e.clear();
  for (int j = 0; j < 3; ++j)
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < 2; ++i) e.push_back(float(12 * i + 4 * j + k));
  check_close(p, e);
  check_grad(one([](auto a) { return ops::transpose(a, 1, 2); }), {param({2, 3, 4}, 3)});
  check_grad(one([](auto a) { return ops::permute(a, {2, 0, 1}) * ops::permute(a, {2, 0, 1}); }),
             {param({2, 3, 4}, 4)});
  // backward hands back a contiguous gradient of the input's shape
  Tensor a = param({2, 3, 4}, 5);
  ops::permute(a, {2, 0, 1}).backward(iota({4, 2, 3}));
  CHECK(a.grad().is_contiguous());
  check_close(a.grad(), ops::permute(iota({4, 2, 3}), {1, 2, 0}).to_vector<float>());
  CHECK_THROWS_WITH_AS(ops::permute(x, {0, 1}), doctest::Contains("do not match the rank"), Error);
  CHECK_THROWS_WITH_AS(ops::permute(x, {0, 1, -3}), doctest::Contains("repeat axis 0"), Error);
  CHECK_THROWS_WITH_AS(ops::transpose(x, 0, 3), doctest::Contains("axis 3 is out of range for rank 3"), Error);
}

TEST_CASE("slice: views, negative bounds, gradient pads with zeros") {
  Tensor x = iota({3, 4});
  Tensor s = ops::slice(x, 1, 1, 3);
  CHECK(s.shape() == Shape{3, 2});
  check_close(s, {1, 2, 5, 6, 9, 10});
  check_close(ops::slice(x, 0, -2, 3), {4, 5, 6, 7, 8, 9, 10, 11});
  check_close(ops::slice(x, -1, 3, 4), {3, 7, 11});
  CHECK(ops::slice(x, 0, 1, 1).numel() == 0);
  Tensor a = Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3}).set_requires_grad(true);
  ops::slice(a, 1, 1, 3).backward(Tensor::from({10, 20, 30, 40}, {2, 2}));
  check_close(a.grad(), {0, 10, 20, 0, 30, 40});
  check_grad(one([](auto v) { return ops::slice(v, 1, 1, 3); }), {param({2, 4, 3}, 6)});
  check_grad(one([](auto v) { return ops::slice(ops::transpose(v, 0, 2), 0, 1, 2); }), {param({2, 4, 3}, 7)});
  CHECK_THROWS_WITH_AS(ops::slice(x, 1, 2, 5), doctest::Contains("range [2, 5) is out of bounds for axis 1 of size 4"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::slice(x, 1, 3, 2), doctest::Contains("out of bounds"), Error);
}

TEST_CASE("concat and stack") {
  Tensor a = iota({2, 2}), b = ops::add(iota({2, 3}), 10.f);
  Tensor c = ops::concat({a, b}, -1);
  CHECK(c.shape() == Shape{2, 5});
  check_close(c, {0, 1, 10, 11, 12, 2, 3, 13, 14, 15});
  check_close(ops::concat({a, ops::transpose(a, 0, 1)}, 0), {0, 1, 2, 3, 0, 2, 1, 3});
  Tensor s = ops::stack({a, ops::add(a, 10.f)}, 0);
  CHECK(s.shape() == Shape{2, 2, 2});
  check_close(s, {0, 1, 2, 3, 10, 11, 12, 13});
  Tensor s2 = ops::stack({a, ops::add(a, 10.f)}, -1);  // (2, 2, 2): s2[i][j][k]
  check_close(s2, {0, 10, 1, 11, 2, 12, 3, 13});
  // I64 tensors concatenate too
  CHECK(ops::concat({Tensor::arange(2), Tensor::arange(3)}, 0).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 0, 1, 2});
  auto cat3 = [](const std::vector<Tensor>& x) { return ops::concat({x[0], x[1], x[2]}, 1); };
  check_grad(cat3, {param({2, 1, 3}, 8), param({2, 4, 3}, 9), param({2, 2, 3}, 10)});
  check_grad([](const std::vector<Tensor>& x) { return ops::stack({x[0], x[1]}, 1); },
             {param({3, 2}, 11), param({3, 2}, 12)});
  // only the second input needs a gradient
  Tensor fixed = iota({2, 2});
  check_grad([&](const std::vector<Tensor>& x) { return ops::concat({fixed, x[0]}, 0); }, {param({1, 2}, 13)});
  CHECK_THROWS_WITH_AS(ops::concat({a, Tensor::zeros({3, 3})}, 1),
                       doctest::Contains("tensor 1 is F32 (3, 3) cpu but tensor 0 is F32 (2, 2) cpu"), Error);
  CHECK_THROWS_WITH_AS(ops::concat({}, 0), doctest::Contains("no tensors"), Error);
  CHECK_THROWS_WITH_AS(ops::stack({a, b}, 0), doctest::Contains("all must be the same"), Error);
  CHECK_THROWS_WITH_AS(ops::stack({a, a}, 3), doctest::Contains("out of range for rank 3"), Error);
}

TEST_CASE("patchify: hand-checked layout, the reshape/permute composite, gradient, errors") {
  // (1, 1, 4, 4) with p = 2: patch (gy, gx) is row 2 gy + gx, its features (i, j) row-major.
  Tensor x = iota({1, 1, 4, 4});  // row r, column c holds 4 r + c
  Tensor p = ops::patchify(x, 2);
  CHECK(p.shape() == Shape{1, 4, 4});
  check_close(p, {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15});
  // Several images and channels, non-square, against the composite of shape ops (and through a
  // transposed, strided input).
  Tensor y = iota({2, 3, 6, 4});
  Tensor ref = ops::reshape(ops::permute(ops::reshape(y, {2, 3, 3, 2, 2, 2}), {0, 2, 4, 1, 3, 5}), {2, 6, 12});
  check_close(ops::patchify(y, 2), ref.to_vector<float>(), 0.f, 0.f);
  Tensor yt = ops::transpose(iota({2, 3, 4, 6}), 2, 3);
  Tensor ref_t = ops::reshape(ops::permute(ops::reshape(yt, {2, 3, 3, 2, 2, 2}), {0, 2, 4, 1, 3, 5}), {2, 6, 12});
  check_close(ops::patchify(yt, 2), ref_t.to_vector<float>(), 0.f, 0.f);
  check_grad([](const std::vector<Tensor>& t) { return ops::patchify(t[0], 2); }, {param({2, 2, 4, 6}, 5)});
  CHECK_THROWS_WITH_AS(ops::patchify(iota({1, 1, 6, 4}), 4), doctest::Contains("multiples of the patch size 4"), Error);
  CHECK_THROWS_WITH_AS(ops::patchify(iota({1, 6, 4}), 2), doctest::Contains("must be (B, C, H, W)"), Error);
  CHECK_THROWS_WITH_AS(ops::patchify(iota({1, 1, 4, 4}), 0), doctest::Contains("patch size 0"), Error);
}
