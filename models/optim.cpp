#include "models/optim.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/elementwise.h"
#include "ops/fast_math.h"
#include "ops/reduce.h"
#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
#endif

namespace mv::models {

using ops::lane_sum;

bool decays(const std::string& name, const Tensor& p) {
  const std::string last = name.substr(name.rfind('.') + 1);
  return p.ndim() >= 2 && last != "pos" && last != "cls";
}

void Optimizer::zero_grad() {
  for (auto& [n, p] : params_) p.zero_grad();
}

Device Optimizer::params_device(const char* who) const {
  if (params_.empty()) return Device::CPU;
  const auto& [first, p0] = params_.front();
  for (const auto& [name, p] : params_)
    MV_CHECK(p.device() == p0.device(), who, ": parameters '", first, "' and '", name,
             "' live on different devices");
  return p0.device();
}

void Optimizer::follow(std::vector<Tensor>& buffers, Device d) {
  for (Tensor& b : buffers)
    if (b.device() != d) b = b.to(d);
}

AdamW::AdamW(NamedTensors params, float wd, float b1, float b2, float eps)
    : Optimizer(std::move(params)), wd_(wd), b1_(b1), b2_(b2), eps_(eps) {
  for (auto& [n, p] : params_) {
    m_.push_back(Tensor::zeros(p.shape(), DType::F32, p.device()));
    v_.push_back(Tensor::zeros(p.shape(), DType::F32, p.device()));
  }
}

// p -= lr * wd * p (decoupled decay); m, v moving averages of g and g^2;
// p -= lr * m_hat / (sqrt(v_hat) + eps), with the bias corrections of Adam.
// On CUDA the same update (same formula, the decay mask of decays()) is one multi-tensor launch.
void AdamW::step(float lr, float gs) {
  ++steps_;
  const Device dev = params_device("AdamW");
  follow(m_, dev);
  follow(v_, dev);
  if (dev == Device::CUDA) {
#ifdef MOEVIT_CUDA
    std::vector<Tensor> P, G, M, V;
    std::vector<float> wds;
    for (size_t k = 0; k < params_.size(); ++k) {
      auto& [name, p] = params_[k];
      Tensor g = p.grad();
      if (!g.defined()) continue;
      P.push_back(p), G.push_back(g.contiguous()), M.push_back(m_[k]), V.push_back(v_[k]);
      wds.push_back(decays(name, p) ? wd_ : 0.f);
    }
    cuda::adamw_step(P, G, M, V, lr, b1_, b2_, eps_, wds, steps_, gs);
    return;
#endif
  }
  const float c1 = 1.f - std::pow(b1_, float(steps_)), c2 = 1.f - std::pow(b2_, float(steps_));
  // Locals copied into the loop's closure, not members or references: a store through the float
  // pointers could otherwise alias them, and the compiler would reload them after every store
  // instead of vectorising the loop.
  const float b1 = b1_, b2 = b2_, eps = eps_;
  for (size_t k = 0; k < params_.size(); ++k) {
    auto& [name, p] = params_[k];
    Tensor g = p.grad();
    if (!g.defined()) continue;
    g = g.contiguous();
    const float decay = decays(name, p) ? lr * wd_ : 0.f;
    float *pp = p.data<float>(), *pm = m_[k].data<float>(), *pv = v_[k].data<float>();
    const float* pg = g.data<float>();
    parallel_for(p.numel(), 8, [=](int64_t s, int64_t e) {  // by value: see above
      for (int64_t i = s; i < e; ++i) {
        const float gi = pg[i] * gs;
        pm[i] = b1 * pm[i] + (1.f - b1) * gi;
        pv[i] = b2 * pv[i] + (1.f - b2) * gi * gi;
        pp[i] -= decay * pp[i] + lr * (pm[i] / c1) / (std::sqrt(pv[i] / c2) + eps);
      }
    });
  }
}

NamedTensors AdamW::state() const {
  NamedTensors s;
  for (size_t k = 0; k < params_.size(); ++k) {
    s.emplace_back("adamw.m." + params_[k].first, m_[k]);
    s.emplace_back("adamw.v." + params_[k].first, v_[k]);
  }
  return s;
}

SGD::SGD(NamedTensors params, float momentum, float wd)
    : Optimizer(std::move(params)), momentum_(momentum), wd_(wd) {
  for (auto& [n, p] : params_) buf_.push_back(Tensor::zeros(p.shape(), DType::F32, p.device()));
}

// g += wd * p (coupled L2, as torch.optim.SGD); b = momentum * b + g; p -= lr * b.
// On CUDA the same update, one kernel per parameter tensor (cuda::sgd_step).
void SGD::step(float lr, float gs) {
  ++steps_;
  const Device dev = params_device("SGD");
  follow(buf_, dev);
  for (size_t k = 0; k < params_.size(); ++k) {
    auto& [name, p] = params_[k];
    Tensor g = p.grad();
    if (!g.defined()) continue;
    g = g.contiguous();
    const float wd = decays(name, p) ? wd_ : 0.f;
    if (dev == Device::CUDA) {
#ifdef MOEVIT_CUDA
      cuda::sgd_step(p, g, buf_[k], lr, momentum_, wd, gs);
#endif
      continue;
    }
    float *pp = p.data<float>(), *pb = buf_[k].data<float>();
    const float* pg = g.data<float>();
    for (int64_t i = 0, n = p.numel(); i < n; ++i) {
      pb[i] = momentum_ * pb[i] + pg[i] * gs + wd * pp[i];
      pp[i] -= lr * pb[i];
    }
  }
}

NamedTensors SGD::state() const {
  NamedTensors s;
  for (size_t k = 0; k < params_.size(); ++k) s.emplace_back("sgd.momentum." + params_[k].first, buf_[k]);
  return s;
}

// CUDA gradients: sum of squares on the device, one host read for all of them.
ClipResult clip_scale(const std::vector<Tensor>& params, float max_norm) {
  autograd::NoGrad no_grad;
  double sq = 0;
  Tensor dev_sq;
  for (const Tensor& p : params) {
    const Tensor g = p.grad();
    if (!g.defined()) continue;
    if (g.device() == Device::CUDA) {
      const Tensor s = ops::sum(ops::mul(g, g));
      dev_sq = dev_sq.defined() ? ops::add(dev_sq, s) : s;
      continue;
    }
    const Tensor gc = g.contiguous();
    const float* pg = gc.data<float>();
    // Float lanes over blocks of 4096 (vectorised), the blocks summed in double.
    for (int64_t b = 0; b < gc.numel(); b += 4096)
      sq += lane_sum(std::min<int64_t>(4096, gc.numel() - b), [&](int64_t i) { return pg[b + i] * pg[b + i]; });
  }
  if (dev_sq.defined()) sq += double(dev_sq.item());
  const float norm = float(std::sqrt(sq));
  const float scale = (max_norm > 0 && norm > max_norm) ? max_norm / (norm + 1e-6f) : 1.f;
  return {norm, scale};
}

float lr_at(int64_t step, int64_t total, int64_t warmup, float base, Schedule kind) {
  if (step < warmup) return base * float(step + 1) / float(warmup);
  const float t = total > warmup ? float(step - warmup) / float(total - warmup) : 1.f;
  const float u = std::min(std::max(t, 0.f), 1.f);
  return kind == Schedule::Cosine ? base * 0.5f * (1.f + std::cos(3.14159265f * u)) : base * (1.f - u);
}

}  // namespace mv::models
