#include <vector>

#include "autograd/autograd.h"
#include "ops/matmul.h"
#include "ops/shape.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {

// Naive batched product in double: a (nb, M, K) and b (nb or 1, K, N), both row-major vectors.
std::vector<float> naive_mm(const std::vector<float>& a, const std::vector<float>& b, int64_t nb,
                            int64_t M, int64_t K, int64_t N, bool shared_b) {
  std::vector<float> c(size_t(nb * M * N));
  for (int64_t z = 0; z < nb; ++z)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += double(a[size_t((z * M + i) * K + k)]) * b[size_t(((shared_b ? 0 : z) * K + k) * N + j)];
        c[size_t((z * M + i) * N + j)] = float(s);
      }
  return c;
}

Tensor randt(const Shape& s, uint64_t seed) { return param(s, seed).detach(); }

auto two = [](auto f) { return [f](const std::vector<Tensor>& x) { return f(x[0], x[1]); }; };

}  // namespace

TEST_CASE("matmul: hand values") {
  Tensor a = Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor b = Tensor::from({7, 8, 9, 10, 11, 12}, {3, 2});
  check_close(ops::matmul(a, b), {58, 64, 139, 154});
  CHECK(ops::matmul(a, b).shape() == Shape{2, 2});
  // K = 0: an empty sum is zero
  check_close(ops::matmul(Tensor::zeros({2, 0}), Tensor::zeros({0, 3})), {0, 0, 0, 0, 0, 0});
}

TEST_CASE("matmul: shared weight, batched and large shapes against a naive loop") {
  // shared (K, N) weight; leading dims fold into rows
  Tensor a = randt({2, 3, 4, 5}, 1), w = randt({5, 6}, 2);
  Tensor y = ops::matmul(a, w);
  CHECK(y.shape() == Shape{2, 3, 4, 6});
  check_close(y, naive_mm(a.to_vector<float>(), w.to_vector<float>(), 6, 4, 5, 6, true), 1e-5f, 1e-5f);
  // batched, same leading dims
  Tensor b = randt({2, 3, 5, 6}, 3);
  check_close(ops::matmul(a, b), naive_mm(a.to_vector<float>(), b.to_vector<float>(), 6, 4, 5, 6, false),
              1e-5f, 1e-5f);
  // big enough for Eigen's blocked kernel and its thread split; odd sizes
  Tensor p = randt({70, 130}, 4), q = randt({130, 90}, 5);
  check_close(ops::matmul(p, q), naive_mm(p.to_vector<float>(), q.to_vector<float>(), 1, 70, 130, 90, true),
              1e-4f, 1e-4f);
  // deep and narrow (K >= 8 max(M, N), as in weight gradients): the depth split over threads, with
  // an odd K; through linear, the bias written first and the partial products added onto it
  Tensor dp = randt({13, 9001}, 10), dq = randt({9001, 24}, 11), db = randt({24}, 12);
  std::vector<float> deep = naive_mm(dp.to_vector<float>(), dq.to_vector<float>(), 1, 13, 9001, 24, true);
  check_close(ops::matmul(dp, dq), deep, 1e-3f, 1e-4f);
  for (int64_t i = 0; i < 13; ++i)
    for (int64_t j = 0; j < 24; ++j) deep[size_t(i * 24 + j)] += db.to_vector<float>()[size_t(j)];
  check_close(ops::linear(dp, dq, db), deep, 1e-3f, 1e-4f);
  // many small batches: the batch-parallel path
  Tensor s = randt({200, 8, 9}, 6), t = randt({200, 9, 10}, 7);
  check_close(ops::bmm(s, t), naive_mm(s.to_vector<float>(), t.to_vector<float>(), 200, 8, 9, 10, false),
              1e-5f, 1e-5f);
}

TEST_CASE("matmul: transposed-view and strided inputs") {
  Tensor pa = randt({3, 5, 4}, 8), pb = randt({3, 6, 5}, 9);
  Tensor at = ops::transpose(pa, -1, -2), bt = ops::transpose(pb, 1, 2);  // (3, 4, 5), (3, 5, 6)
  CHECK(!at.is_contiguous());
  const auto av = at.to_vector<float>(), bv = bt.to_vector<float>();
  check_close(ops::matmul(at, bt), naive_mm(av, bv, 3, 4, 5, 6, false), 1e-5f, 1e-5f);
  check_close(ops::matmul(at, bt.contiguous()), naive_mm(av, bv, 3, 4, 5, 6, false), 1e-5f, 1e-5f);
  // shared transposed weight (weight tying)
  Tensor e = randt({6, 5}, 10);
  check_close(ops::matmul(at, ops::transpose(e, 0, 1)),
              naive_mm(av, ops::transpose(e, 0, 1).to_vector<float>(), 3, 4, 5, 6, true), 1e-5f, 1e-5f);
  // batch dims permuted (rows do not fold into one matrix) with a shared weight
  Tensor pc = randt({4, 3, 5}, 11);
  Tensor c = ops::transpose(pc, 0, 1);  // (3, 4, 5), row-major matrices at strided offsets
  Tensor w = randt({5, 6}, 12);
  check_close(ops::matmul(c, w), naive_mm(c.to_vector<float>(), w.to_vector<float>(), 3, 4, 5, 6, true),
              1e-5f, 1e-5f);
  // a column slice: rows with a leading dimension larger than the width
  Tensor wide = randt({4, 9}, 13);
  Tensor sl = ops::slice(wide, 1, 2, 7);  // (4, 5)
  check_close(ops::matmul(sl, w), naive_mm(sl.to_vector<float>(), w.to_vector<float>(), 1, 4, 5, 6, true),
              1e-5f, 1e-5f);
}

TEST_CASE("matmul: gradients") {
  check_grad(two([](auto a, auto b) { return ops::matmul(a, b); }), {param({3, 4}, 1), param({4, 5}, 2)});
  // broadcast (shared) weight: dB sums over every row of every batch
  check_grad(two([](auto a, auto b) { return ops::matmul(a, b); }), {param({2, 3, 4}, 3), param({4, 5}, 4)});
  check_grad(two([](auto a, auto b) { return ops::matmul(a, b); }),
             {param({2, 3, 3, 4}, 5), param({2, 3, 4, 2}, 6)});
  check_grad(two([](auto a, auto b) { return ops::bmm(a, b); }), {param({3, 2, 4}, 7), param({3, 4, 5}, 8)});
  // transposed views in, including a shared transposed weight and permuted batch dims
  check_grad(two([](auto a, auto b) { return ops::matmul(ops::transpose(a, 1, 2), ops::transpose(b, -1, -2)); }),
             {param({2, 4, 3}, 9), param({2, 5, 4}, 10)});
  check_grad(two([](auto a, auto b) { return ops::matmul(ops::transpose(a, -1, -2), ops::transpose(b, 0, 1)); }),
             {param({2, 4, 3}, 11), param({5, 4}, 12)});
  check_grad(two([](auto a, auto b) { return ops::matmul(ops::transpose(a, 0, 1), b); }),
             {param({3, 2, 4}, 13), param({4, 5}, 14)});
  // only one side needs a gradient
  Tensor fixed = randt({4, 5}, 15);
  check_grad([&](const std::vector<Tensor>& x) { return ops::matmul(x[0], fixed); }, {param({3, 4}, 16)});
}

TEST_CASE("matmul: shape errors") {
  Tensor a = Tensor::zeros({2, 3});
  CHECK_THROWS_WITH_AS(ops::matmul(a, Tensor::zeros({4, 5})), doctest::Contains("inner sizes differ"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(Tensor::zeros({3}), a), doctest::Contains("at least 2 dims"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(Tensor::zeros({2, 2, 3}), Tensor::zeros({3, 3, 4})),
                       doctest::Contains("batch dims"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(Tensor::zeros({2, 2, 2, 3}), Tensor::zeros({2, 3, 4})),
                       doctest::Contains("must be (K, N) or have a's rank"), Error);
  CHECK_THROWS_WITH_AS(ops::bmm(a, Tensor::zeros({3, 2})), doctest::Contains("bmm: expected (B, M, K)"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(Tensor::zeros({2, 3}, DType::I64), Tensor::zeros({3, 2})),
                       doctest::Contains("expected an F32 tensor"), Error);
}

TEST_CASE("linear: values with and without bias") {
  Tensor x = randt({2, 3, 5}, 20), w = randt({5, 4}, 21), bias = randt({4}, 22);
  std::vector<float> ref = naive_mm(x.to_vector<float>(), w.to_vector<float>(), 1, 6, 5, 4, true);
  Tensor y0 = ops::linear(x, w);
  CHECK(y0.shape() == Shape{2, 3, 4});
  check_close(y0, ref, 1e-5f, 1e-5f);
  const auto bv = bias.to_vector<float>();
  for (size_t i = 0; i < ref.size(); ++i) ref[i] += bv[i % 4];
  check_close(ops::linear(x, w, bias), ref, 1e-5f, 1e-5f);
  // a 1-D x is one row
  check_close(ops::linear(Tensor::from({1, 2}, {2}), Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3}),
                          Tensor::from({1, 1, 1}, {3})),
              {10, 13, 16});
  // transposed (tied) weight and a transposed input
  Tensor xt = ops::transpose(randt({5, 6}, 23), 0, 1);  // (6, 5)
  Tensor wt = ops::transpose(randt({4, 5}, 24), 0, 1);  // (5, 4)
  check_close(ops::linear(xt, wt), naive_mm(xt.to_vector<float>(), wt.to_vector<float>(), 1, 6, 5, 4, true),
              1e-5f, 1e-5f);
}

TEST_CASE("linear: gradients") {
  auto lin3 = [](const std::vector<Tensor>& x) { return ops::linear(x[0], x[1], x[2]); };
  auto lin2 = [](const std::vector<Tensor>& x) { return ops::linear(x[0], x[1]); };
  check_grad(lin3, {param({2, 3, 5}, 30), param({5, 4}, 31), param({4}, 32)});
  check_grad(lin2, {param({2, 3, 5}, 33), param({5, 4}, 34)});
  check_grad(lin3, {param({5}, 35), param({5, 2}, 36), param({2}, 37)});
  // many rows: column sums over blocks of rows
  check_grad(lin3, {param({150, 3}, 38), param({3, 2}, 39), param({2}, 40)});
  // transposed weight; bias alone needing a gradient
  check_grad([](const std::vector<Tensor>& x) { return ops::linear(x[0], ops::transpose(x[1], 0, 1), x[2]); },
             {param({3, 5}, 41), param({4, 5}, 42), param({4}, 43)});
  Tensor xf = randt({3, 5}, 44), wf = randt({5, 4}, 45);
  check_grad([&](const std::vector<Tensor>& x) { return ops::linear(xf, wf, x[0]); }, {param({4}, 46)});
  // bias gradient is the column sum of dy
  Tensor b = Tensor::zeros({2}).set_requires_grad(true);
  ops::linear(Tensor::ones({3, 4}), Tensor::ones({4, 2}), b).backward(Tensor::from({1, 2, 3, 4, 5, 6}, {3, 2}));
  check_close(b.grad(), {9, 12});
}

TEST_CASE("linear: shape errors") {
  Tensor x = Tensor::zeros({2, 5});
  CHECK_THROWS_WITH_AS(ops::linear(x, Tensor::zeros({4, 3})), doctest::Contains("has 5 features"), Error);
  CHECK_THROWS_WITH_AS(ops::linear(x, Tensor::zeros({5, 3}), Tensor::zeros({4})),
                       doctest::Contains("bias F32 (4) cpu must be (3)"), Error);
  CHECK_THROWS_WITH_AS(ops::linear(x, Tensor::zeros({5})), doctest::Contains("w (in, out)"), Error);
}

TEST_CASE("matmul: no graph under NoGrad") {
  Tensor a = param({2, 3}, 50), b = param({3, 2}, 51);
  autograd::NoGrad ng;
  CHECK(!ops::matmul(a, b).requires_grad());
  CHECK(!ops::linear(a, b).requires_grad());
}
