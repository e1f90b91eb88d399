#include "autograd/autograd.h"
#include "ops/elementwise.h"
#include "tests/helpers.h"

using namespace mv;

TEST_CASE("diamond: a shared input used twice gets both gradients") {
  Tensor x = Tensor::from({2, 3}, {2}).set_requires_grad(true);
  Tensor a = x * x;      // da/dx = 2x
  Tensor b = x * 3.0f;   // db/dx = 3
  Tensor y = a + b;
  y.backward(Tensor::ones({2}));
  test::check_close(x.grad(), {2 * 2 + 3, 2 * 3 + 3});
}

TEST_CASE("gradients accumulate across backward calls until cleared") {
  Tensor x = Tensor::from({1, -2}, {2}).set_requires_grad(true);
  (x * 5.0f).backward(Tensor::ones({2}));
  (x * x).backward(Tensor::ones({2}));
  test::check_close(x.grad(), {5 + 2, 5 - 4});
  x.zero_grad();
  (x * 5.0f).backward(Tensor::ones({2}));
  test::check_close(x.grad(), {5, 5});
}

TEST_CASE("accumulating in place never writes a gradient that something else holds") {
  // add's backward hands the same gradient to both inputs: summing into one slot in place would
  // change the other.
  Tensor x = Tensor::from({1, 2}, {2}).set_requires_grad(true);
  Tensor y = Tensor::from({3, 4}, {2}).set_requires_grad(true);
  Tensor s = x + y;
  (s * 2.0f + s + x).backward(Tensor::ones({2}));  // dx = 2 + 1 + 1, dy = 2 + 1
  test::check_close(x.grad(), {4, 4});
  test::check_close(y.grad(), {3, 3});
  // A gradient the caller holds keeps its values when the next backward accumulates.
  const Tensor held = x.grad();
  (x * 5.0f).backward(Tensor::ones({2}));
  test::check_close(held, {4, 4});
  test::check_close(x.grad(), {9, 9});
  // The one handle left: the next backward adds in place, to the same values.
  const void* before = x.grad().data<float>();
  (x * 5.0f).backward(Tensor::ones({2}));
  test::check_close(x.grad(), {14, 14});
  CHECK(x.grad().data<float>() == before);
}

TEST_CASE("NoGrad builds no graph, and constants build none either") {
  Tensor x = Tensor::from({1, 2}, {2}).set_requires_grad(true);
  {
    autograd::NoGrad ng;
    Tensor y = x * x;
    CHECK(!y.requires_grad());
    CHECK(!y.grad_fn());
  }
  Tensor c = Tensor::from({1, 2}, {2});
  CHECK(!(c * c).grad_fn());
  CHECK((x * c).grad_fn());
  CHECK_THROWS_WITH_AS((c * c).backward(), doctest::Contains("does not require grad"), Error);
}

TEST_CASE("backward checks its gradient's shape") {
  Tensor x = Tensor::from({1, 2}, {2}).set_requires_grad(true);
  Tensor y = x * 2.0f;
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("one-element output"), Error);
  CHECK_THROWS_WITH_AS(y.backward(Tensor::ones({3})), doctest::Contains("does not match"), Error);
}

TEST_CASE("a deep chain runs without recursion limits") {
  Tensor x = Tensor::from({1}, {1}).set_requires_grad(true);
  Tensor y = x;
  for (int i = 0; i < 20000; ++i) y = y + 0.0f;
  y.backward();
  test::check_close(x.grad(), {1});
}

// An op with a deliberately wrong backward: gradcheck must reject it.
static Tensor square_with_bug(const Tensor& x, float factor) {
  Tensor y;
  {
    autograd::NoGrad ng;
    y = x * x;
  }
  return autograd::record("square_with_bug", y, {x}, [xd = x.detach(), factor](const Tensor& g) {
    return std::vector<Tensor>{g * xd * factor};
  });
}

TEST_CASE("gradcheck accepts a correct backward and rejects wrong ones") {
  Tensor x = test::param({3, 4}, 1);
  auto run = [](float factor) {
    return [factor](const std::vector<Tensor>& in) { return square_with_bug(in[0], factor); };
  };
  CHECK(autograd::gradcheck(run(2.0f), {x}).ok);        // d x^2 = 2x: right
  CHECK_FALSE(autograd::gradcheck(run(1.0f), {x}).ok);  // off by a factor of two
  CHECK_FALSE(autograd::gradcheck(run(-2.0f), {x}).ok); // wrong sign
  CHECK_FALSE(autograd::gradcheck(run(2.1f), {x}).ok);  // 5% off
}
