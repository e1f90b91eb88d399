// The CUDA suites' parity checks: an op on CUDA tensors against the same op on the CPU.
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "engine/random.h"
#include "engine/tensor.h"
#include "ops/elementwise.h"

namespace mv::test {

inline Tensor rnd(const Shape& s, uint64_t seed, float scale = 1.f) {
  Generator g(seed);
  return ops::mul(randn(s, g), scale);
}

// gpu (a CUDA tensor) against cpu, elementwise within rtol |cpu| + atol_frac max|cpu|.
inline void close(const std::string& what, const Tensor& gpu, const Tensor& cpu, double tol) {
  REQUIRE(gpu.defined());
  REQUIRE(cpu.defined());
  CHECK(gpu.device() == Device::CUDA);
  REQUIRE(gpu.shape() == cpu.shape());
  if (cpu.dtype() == DType::I64) {
    CHECK(gpu.to_vector<int64_t>() == cpu.to_vector<int64_t>());
    return;
  }
  const std::vector<float> g = gpu.to_vector<float>(), c = cpu.to_vector<float>();
  double big = 0;
  for (float v : c) big = std::max(big, double(std::fabs(v)));
  size_t bad = 0, worst = 0;
  double worst_e = -1;
  for (size_t i = 0; i < c.size(); ++i) {
    const double e = std::fabs(double(g[i]) - double(c[i]));
    const double excess = std::isnan(e) ? INFINITY : e - (tol * std::fabs(c[i]) + tol * big);
    if (excess > 0) ++bad;
    if (excess > worst_e) worst_e = excess, worst = i;
  }
  std::ostringstream os;
  os << what << " " << cpu.str() << ": " << bad << " bad of " << c.size();
  if (!c.empty()) os << "; worst [" << worst << "] gpu " << g[worst] << " cpu " << c[worst];
  INFO(os.str());
  CHECK(bad == 0);
}

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

// f on CPU leaves and on CUDA copies: outputs, then every F32 input's gradient for the same
// random output gradient.
inline void parity(const std::string& what, const Fn& f, const std::vector<Tensor>& inputs, double tol = 1e-5) {
  std::vector<Tensor> c, g;
  for (const Tensor& t : inputs) {
    Tensor tc = t.clone(), tg = t.to(Device::CUDA);
    if (t.dtype() == DType::F32) {
      tc.set_requires_grad(true);
      tg.set_requires_grad(true);
    }
    c.push_back(tc);
    g.push_back(tg);
  }
  const Tensor yc = f(c), yg = f(g);
  close(what + " forward", yg, yc, tol);
  if (yc.dtype() != DType::F32 || !yc.requires_grad()) return;
  const Tensor dy = rnd(yc.shape(), 99);
  yc.backward(dy);
  yg.backward(dy.to(Device::CUDA));
  for (size_t i = 0; i < c.size(); ++i) {
    if (!c[i].requires_grad()) continue;
    close(what + " grad of input " + std::to_string(i), g[i].grad(), c[i].grad(), tol);
  }
}

}  // namespace mv::test
