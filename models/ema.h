// An exponential moving average of a model's weights (Polyak averaging), which usually
// evaluates better than the last weights of a run, most of all when a short schedule ends at a
// still-large learning rate. After each optimizer step, every average moves toward its weight:
//   ema <- ema + (1 - d_t) (w - ema),   d_t = min(decay, (1 + t) / (10 + t))
// where t counts the updates: the warm-up of d_t keeps the first average from being dominated by
// the random initial weights (as TensorFlow's ExponentialMovingAverage with num_updates).
#pragma once
#include "models/optim.h"

namespace mv::models {

class WeightAverage {
 public:
  // Starts at the parameters' current values, on their devices.
  WeightAverage(NamedTensors params, float decay);
  void update();
  // Swaps the averages into the parameters and back (evaluation of the averaged model).
  void swap();
  // The averages as "ema.<name>", for checkpoints.
  NamedTensors state() const;
  int64_t updates() const { return updates_; }
  void set_updates(int64_t t) { updates_ = t; }

 private:
  NamedTensors params_;
  std::vector<Tensor> avg_;
  float decay_;
  int64_t updates_ = 0;
};

}  // namespace mv::models
