// Losses, each reduced to a scalar mean.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// logits: (N, C) F32, labels: (N,) I64 in [0, C) -> () mean over rows of
// -sum_j t_j log_softmax(logits)_j with t = (1 - label_smoothing) * onehot(label) + label_smoothing / C.
// One fused op (the log-softmax is inside); gradient only for logits.
Tensor cross_entropy(const Tensor& logits, const Tensor& labels, float label_smoothing = 0.f);

// a, b: same shape -> () mean((a - b)^2)
Tensor mse(const Tensor& a, const Tensor& b);

}  // namespace mv::ops
