#include "models/ema.h"

#include <algorithm>

#include "autograd/autograd.h"
#include "ops/elementwise.h"

namespace mv::models {

WeightAverage::WeightAverage(NamedTensors params, float decay)
    : params_(std::move(params)), decay_(decay) {
  MV_CHECK(decay > 0.f && decay < 1.f, "--ema-decay must be in (0, 1), got ", decay);
  for (auto& [name, p] : params_) avg_.push_back(p.clone());
}

void WeightAverage::update() {
  autograd::NoGrad ng;
  const float d = std::min(decay_, float(1 + updates_) / float(10 + updates_));
  for (size_t i = 0; i < avg_.size(); ++i) {
    const Tensor& w = params_[i].second;
    avg_[i].copy_(ops::add(avg_[i], ops::mul(ops::sub(w, avg_[i]), 1.f - d)));
  }
  ++updates_;
}

void WeightAverage::swap() {
  autograd::NoGrad ng;
  for (size_t i = 0; i < avg_.size(); ++i) {
    Tensor& w = params_[i].second;
    const Tensor held = w.clone();
    w.copy_(avg_[i]);
    avg_[i].copy_(held);
  }
}

NamedTensors WeightAverage::state() const {
  NamedTensors out;
  for (size_t i = 0; i < avg_.size(); ++i) out.emplace_back("ema." + params_[i].first, avg_[i]);
  return out;
}

}  // namespace mv::models
