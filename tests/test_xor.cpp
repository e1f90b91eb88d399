// End-to-end check that ops and autograd train something: a 2-8-1 MLP learns XOR by plain
// gradient descent written here.
#include "autograd/autograd.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "tests/helpers.h"

using namespace mv;
using test::param;

TEST_CASE("a 2-8-1 tanh MLP learns XOR with gradient descent") {
  Tensor x = Tensor::from({0, 0, 0, 1, 1, 0, 1, 1}, {4, 2});
  Tensor y = Tensor::from({0, 1, 1, 0}, {4, 1});
  Tensor w1 = param({2, 8}, 91), w2 = param({8, 1}, 92, 0.5f);
  Tensor b1 = Tensor::zeros({8}).set_requires_grad(true), b2 = Tensor::zeros({1}).set_requires_grad(true);
  std::vector<Tensor> params = {w1, b1, w2, b2};
  auto forward = [&] { return ops::linear(ops::tanh(ops::linear(x, w1, b1)), w2, b2); };
  const float lr = 0.2f;
  float first = 0, last = 0;
  for (int step = 0; step < 2000; ++step) {
    Tensor loss = ops::mse(forward(), y);
    if (step == 0) first = loss.item();
    last = loss.item();
    loss.backward();
    autograd::NoGrad ng;
    for (Tensor& p : params) {
      p.copy_(ops::sub(p, ops::mul(p.grad(), lr)));
      p.zero_grad();
    }
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.01f);
  std::vector<float> out;
  {
    autograd::NoGrad ng;
    out = forward().to_vector<float>();
  }
  CHECK(out[0] < 0.5f);
  CHECK(out[1] > 0.5f);
  CHECK(out[2] > 0.5f);
  CHECK(out[3] < 0.5f);
}
