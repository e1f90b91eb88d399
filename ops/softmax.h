// Softmax and log-softmax along the last axis, each one fused op (max-subtracted, so large
// logits do not overflow) with a hand-written backward.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// x: (..., C) -> y: (..., C), y = exp(x - max) / sum(exp(x - max)) per row
Tensor softmax(const Tensor& x);
// x: (..., C) -> y: (..., C), y = x - max - log(sum(exp(x - max))) per row
Tensor log_softmax(const Tensor& x);

}  // namespace mv::ops
