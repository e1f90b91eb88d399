#include "models/optim.h"

#include <algorithm>
#include <cmath>

#include "autograd/autograd.h"
#include "ops/optim.h"

namespace mv::models {

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

// The update of ops::adamw_step (decoupled decay, bias-corrected moments), on every parameter
// that has a gradient, with the decay mask of decays().
void AdamW::step(float lr, float gs) {
  ++steps_;
  const Device dev = params_device("AdamW");
  follow(m_, dev);
  follow(v_, dev);
  std::vector<Tensor> P, G, M, V;
  std::vector<float> wds;
  for (size_t k = 0; k < params_.size(); ++k) {
    auto& [name, p] = params_[k];
    Tensor g = p.grad();
    if (!g.defined()) continue;
    P.push_back(p), G.push_back(g.contiguous()), M.push_back(m_[k]), V.push_back(v_[k]);
    wds.push_back(decays(name, p) ? wd_ : 0.f);
  }
  ops::adamw_step(P, G, M, V, lr, b1_, b2_, eps_, wds, steps_, gs);
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

// The update of ops::sgd_step (coupled L2, as torch.optim.SGD), one parameter at a time.
void SGD::step(float lr, float gs) {
  ++steps_;
  follow(buf_, params_device("SGD"));
  for (size_t k = 0; k < params_.size(); ++k) {
    auto& [name, p] = params_[k];
    const Tensor g = p.grad();
    if (g.defined()) ops::sgd_step(p, g.contiguous(), buf_[k], lr, momentum_, decays(name, p) ? wd_ : 0.f, gs);
  }
}

NamedTensors SGD::state() const {
  NamedTensors s;
  for (size_t k = 0; k < params_.size(); ++k) s.emplace_back("sgd.momentum." + params_[k].first, buf_[k]);
  return s;
}

double gradient_squares(const std::vector<Tensor>& params) {
  autograd::NoGrad no_grad;
  std::vector<Tensor> grads;
  for (const Tensor& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  return ops::sum_of_squares(grads);
}

ClipResult clip_scale_of_squares(double squares, float max_norm) {
  const float norm = float(std::sqrt(squares));
  const float scale = (max_norm > 0 && norm > max_norm) ? max_norm / (norm + 1e-6f) : 1.f;
  return {norm, scale};
}

ClipResult clip_scale(const std::vector<Tensor>& params, float max_norm) {
  return clip_scale_of_squares(gradient_squares(params), max_norm);
}

float lr_at(int64_t step, int64_t total, int64_t warmup, float base, Schedule kind) {
  if (step < warmup) return base * float(step + 1) / float(warmup);
  const float t = total > warmup ? float(step - warmup) / float(total - warmup) : 1.f;
  const float u = std::min(std::max(t, 0.f), 1.f);
  return kind == Schedule::Cosine ? base * 0.5f * (1.f + std::cos(3.14159265f * u)) : base * (1.f - u);
}

}  // namespace mv::models
