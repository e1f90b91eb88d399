#include <cmath>
#include <vector>

#include "autograd/autograd.h"
#include "ops/attention.h"
#include "ops/elementwise.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {

// Naive attention in double: qkv (B, T, 3D) -> (B, T, D), straight from the definition.
std::vector<float> reference(const Tensor& qkv, int heads) {
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(2) / 3, Dh = D / heads;
  std::vector<float> x = qkv.to_vector<float>();
  auto at = [&](int64_t b, int64_t t, int64_t c) { return double(x[size_t((b * T + t) * 3 * D + c)]); };
  std::vector<float> out(size_t(B * T * D));
  const double scale = 1.0 / std::sqrt(double(Dh));
  for (int64_t b = 0; b < B; ++b)
    for (int h = 0; h < heads; ++h)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(static_cast<size_t>(T));
        double m = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          double dot = 0;
          for (int64_t k = 0; k < Dh; ++k) dot += at(b, i, h * Dh + k) * at(b, j, D + h * Dh + k);
          s[size_t(j)] = dot * scale;
          m = std::max(m, s[size_t(j)]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - m));
        for (int64_t k = 0; k < Dh; ++k) {
          double o = 0;
          for (int64_t j = 0; j < T; ++j) o += s[size_t(j)] / sum * at(b, j, 2 * D + h * Dh + k);
          out[size_t((b * T + i) * D + h * Dh + k)] = float(o);
        }
      }
  return out;
}

// Max |a - b| over two equally shaped tensors.
double max_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  std::vector<float> va = a.to_vector<float>(), vb = b.to_vector<float>();
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) m = std::max(m, double(std::fabs(va[i] - vb[i])));
  return m;
}

}  // namespace

TEST_CASE("self_attention: forward against a double-precision reference") {
  struct Case { int64_t B, T, D; int heads; };
  for (Case c : {Case{2, 5, 8, 2}, Case{1, 7, 12, 3}, Case{3, 4, 6, 1}}) {
    CAPTURE(c.T);
    CAPTURE(c.heads);
    Tensor qkv = param({c.B, c.T, 3 * c.D}, 11 + c.T).detach();
    Tensor out = ops::self_attention(qkv, c.heads);
    CHECK(out.shape() == Shape{c.B, c.T, c.D});
    check_close(out, reference(qkv, c.heads), 1e-5f, 1e-5f);
  }
}

TEST_CASE("self_attention: large scores stay finite and match the reference") {
  // Scaled by 30 the scores reach ~1e3: a softmax without the max shift would overflow exp.
  Tensor qkv = ops::mul(param({2, 7, 3 * 12}, 21), 30.0f).detach().set_requires_grad(true);
  Tensor out = ops::self_attention(qkv, 3);
  for (float v : out.to_vector<float>()) REQUIRE(std::isfinite(v));
  check_close(out, reference(qkv, 3), 1e-3f, 1e-5f);  // values ~30: 1e-3 is ~3e-5 relative
  out.backward(param(out.shape(), 22).detach());
  for (float v : qkv.grad().to_vector<float>()) REQUIRE(std::isfinite(v));
}

TEST_CASE("self_attention: gradcheck of the fused backward") {
  auto f = [](int heads) { return [heads](const std::vector<Tensor>& x) { return ops::self_attention(x[0], heads); }; };
  check_grad(f(2), {param({2, 5, 3 * 8}, 31)});
  check_grad(f(3), {param({1, 7, 3 * 12}, 32)});
}

TEST_CASE("self_attention: a non-contiguous qkv gives the same values and gradient") {
  Tensor base = param({3 * 8, 5}, 33).detach();
  Tensor view = base.view_as({1, 5, 3 * 8}, {0, 1, 5}, 0).set_requires_grad(true);  // transposed
  Tensor dense = view.contiguous().detach().set_requires_grad(true);
  REQUIRE(!view.is_contiguous());
  Tensor a = ops::self_attention(view, 2), b = ops::self_attention(dense, 2);
  CHECK(max_diff(a, b) == 0.0);
  Tensor g = param(a.shape(), 34).detach();
  a.backward(g);
  b.backward(g);
  CHECK(max_diff(view.grad(), dense.grad()) == 0.0);
}

TEST_CASE("self_attention: composite and fused agree, forward and every gradient") {
  struct Case { int64_t B, T, D; int heads; };
  // Head sizes below, at and past one 8-wide register (read in place or through padded copies),
  // and T with and without a partial register and partial row tiles.
  for (Case c : {Case{2, 5, 8, 2}, Case{1, 7, 12, 3}, Case{2, 9, 32, 4}, Case{2, 50, 64, 4}, Case{1, 13, 72, 3},
                 Case{1, 37, 64, 1}}) {
    CAPTURE(c.T);
    CAPTURE(c.heads);
    Tensor init = param({c.B, c.T, 3 * c.D}, 41 + c.T).detach();
    Tensor xf = init.clone().set_requires_grad(true), xc = init.clone().set_requires_grad(true);
    Tensor of = ops::self_attention(xf, c.heads), oc = ops::self_attention_composite(xc, c.heads);
    REQUIRE(oc.shape() == of.shape());
    CHECK(max_diff(of, oc) <= 1e-5);
    check_close(oc, reference(init, c.heads), 1e-5f, 1e-5f);  // the composite is right on its own too
    Tensor g = param(of.shape(), 42 + c.T).detach();
    of.backward(g);
    oc.backward(g);
    // dq, dk and dv are the three column blocks of the one qkv gradient
    CHECK(max_diff(xf.grad(), xc.grad()) <= 1e-5);
  }
}

TEST_CASE("self_attention: composite gradcheck and errors") {
  check_grad([](const std::vector<Tensor>& x) { return ops::self_attention_composite(x[0], 2); },
             {param({2, 5, 3 * 8}, 51)});
  CHECK_THROWS_WITH_AS(ops::self_attention_composite(Tensor::zeros({2, 5, 24}), 5),
                       doctest::Contains("self_attention_composite"), Error);
}

TEST_CASE("self_attention: bad shapes") {
  Tensor x = Tensor::zeros({2, 5, 24});
  CHECK_THROWS_WITH_AS(ops::self_attention(Tensor::zeros({5, 24}), 2), doctest::Contains("must be rank 3"), Error);
  CHECK_THROWS_WITH_AS(ops::self_attention(x, 5), doctest::Contains("not divisible by 3 * heads = 15"), Error);
  CHECK_THROWS_WITH_AS(ops::self_attention(Tensor::zeros({2, 5, 25}), 1), doctest::Contains("(2, 5, 25)"), Error);
  CHECK_THROWS_WITH_AS(ops::self_attention(x, 0), doctest::Contains("heads must be >= 1"), Error);
}
