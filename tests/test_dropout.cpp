#include <cmath>

#include "engine/philox.h"
#include "ops/dropout.h"
#include "ops/elementwise.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

TEST_CASE("dropout: mask follows the Philox rule and (seed, offset)") {
  const int64_t n = 1001;  // not a multiple of 4
  const float p = 0.3f;
  Tensor x = ops::add(param({n}, 61).detach(), 3.0f);
  Generator g(42);
  g.offset = 5;
  Tensor y = ops::dropout(x, p, g);
  CHECK(g.offset == 5 + (n + 3) / 4);  // reserved ceil(n / 4) blocks
  std::vector<float> xv = x.to_vector<float>(), yv = y.to_vector<float>();
  for (int64_t i = 0; i < n; ++i) {
    const bool drop = philox::uniform(42, 5, uint64_t(i)) < p;
    INFO("element " << i);
    CHECK(yv[size_t(i)] == doctest::Approx(drop ? 0.0 : xv[size_t(i)] / (1.0 - p)).epsilon(1e-6));
  }
  // Same (seed, offset) -> same output; the next call (new offset) -> another mask.
  Generator h(42);
  h.offset = 5;
  CHECK(ops::dropout(x, p, h).to_vector<float>() == yv);
  CHECK(ops::dropout(x, p, h).to_vector<float>() != yv);
  Generator other(43);
  other.offset = 5;
  CHECK(ops::dropout(x, p, other).to_vector<float>() != yv);
}

TEST_CASE("dropout: fraction dropped is about p, kept values scaled by 1/(1-p)") {
  for (float p : {0.1f, 0.5f, 0.9f}) {
    Generator g(7);
    const int64_t n = 200000;
    std::vector<float> y = ops::dropout(Tensor::ones({n}), p, g).to_vector<float>();
    int64_t dropped = 0;
    for (float v : y) {
      if (v == 0.f)
        ++dropped;
      else
        CHECK(v == doctest::Approx(1.0 / (1.0 - p)).epsilon(1e-6));
    }
    // binomial std is sqrt(p(1-p)/n) <= 0.0012
    INFO("p " << p << " dropped " << dropped);
    CHECK(std::fabs(double(dropped) / double(n) - p) < 0.006);
  }
}

TEST_CASE("dropout: identity in eval mode and for p = 0") {
  Tensor x = param({3, 4}, 62);
  Generator g(9);
  CHECK(ops::dropout(x, 0.5f, g, false).same(x));
  CHECK(ops::dropout(x, 0.f, g).same(x));
  CHECK(g.offset == 0);  // nothing drawn
}

TEST_CASE("dropout: gradient uses the forward mask") {
  Tensor x = param({5, 7}, 63);
  Generator g(11);
  Tensor y = ops::dropout(x, 0.4f, g);
  Tensor gy = param({5, 7}, 64).detach();
  y.backward(gy);
  std::vector<float> xv = x.to_vector<float>(), yv = y.to_vector<float>(), gv = gy.to_vector<float>(),
                     dx = x.grad().to_vector<float>();
  int64_t zeros = 0;
  for (size_t i = 0; i < xv.size(); ++i) {
    const bool kept = yv[i] != 0.f;
    zeros += !kept;
    CHECK(dx[i] == doctest::Approx(kept ? gv[i] / 0.6 : 0.0).epsilon(1e-6));
  }
  CHECK(zeros > 0);
  // gradcheck with a fresh generator per call, so every evaluation sees the same mask
  check_grad([](const std::vector<Tensor>& t) {
    Generator gen(13);
    return ops::dropout(t[0], 0.25f, gen);
  }, {param({4, 9}, 65)});
}

TEST_CASE("dropout: clear errors") {
  Generator g(1);
  CHECK_THROWS_WITH_AS(ops::dropout(Tensor::ones({2}), 1.0f, g), doctest::Contains("dropout: probability 1"), Error);
  CHECK_THROWS_WITH_AS(ops::dropout(Tensor::ones({2}), -0.1f, g), doctest::Contains("outside [0, 1)"), Error);
}
