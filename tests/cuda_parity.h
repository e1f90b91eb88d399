// The CUDA suites' parity checks: an op on CUDA tensors against the same op on the CPU.
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/random.h"
#include "engine/tensor.h"
#include "models/vit.h"
#include "ops/elementwise.h"
#include "ops/loss.h"
#include "train/loop.h"

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
// random output gradient (or none on both devices, where f does not reach the input).
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
    if (!c[i].grad().defined()) {  // f does not reach this input (dispatch and the routing's gates)
      CHECK(!g[i].grad().defined());
      continue;
    }
    close(what + " grad of input " + std::to_string(i), g[i].grad(), c[i].grad(), tol);
  }
}

// One ViT of config c on the CPU and the same one (same seed) on the GPU, in training or eval
// mode, with a random head: the zero-initialised one would zero every other gradient.
struct VitTwins {
  models::ViT cpu, gpu;
  VitTwins(const models::ViTConfig& c, bool training) : cpu(c, 7), gpu(c, 7) {
    const Tensor hw = rnd(cpu.head->weight.shape(), 90, 0.2f);
    cpu.head->weight.copy_(hw);
    gpu.head->weight.copy_(hw);
    gpu.to(Device::CUDA);
    cpu.train(training), gpu.train(training);
  }
};

// One forward + backward of a fixed batch through both twins: the loss and every parameter's
// gradient within tol.
inline void forward_backward_parity(const std::string& what, VitTwins& t, double tol) {
  models::ViT &cpu = t.cpu, &gpu = t.gpu;
  const Tensor images = rnd({3, 1, 28, 28}, 91);
  const Tensor labels = Tensor::from_i64({2, 7, 0}, {3});
  const Tensor lc = ops::cross_entropy(cpu.forward(images), labels, 0.1f);
  const Tensor lg = ops::cross_entropy(gpu.forward(images.to(Device::CUDA)), labels.to(Device::CUDA), 0.1f);
  close(what + " loss", lg, lc, tol);
  lc.backward();
  lg.backward();
  const auto pc = cpu.named_parameters(), pg = gpu.named_parameters();
  REQUIRE(pc.size() == pg.size());
  for (size_t i = 0; i < pc.size(); ++i) {
    REQUIRE(pg[i].second.grad().defined() == pc[i].second.grad().defined());
    if (pc[i].second.grad().defined()) close(what + " grad " + pc[i].first, pg[i].second.grad(), pc[i].second.grad(), tol);
  }
}

// Trains cfg on `device` into out and returns its metrics.jsonl, one JSON object per epoch.
inline std::vector<nlohmann::json> train_metrics(train::TrainConfig cfg, const std::string& device,
                                                 const std::string& out) {
  cfg.device = device;
  train::fit(cfg, out, false, nullptr);
  std::vector<nlohmann::json> lines;
  std::ifstream f(out + "/metrics.jsonl");
  for (std::string l; std::getline(f, l);) lines.push_back(nlohmann::json::parse(l));
  return lines;
}

}  // namespace mv::test
