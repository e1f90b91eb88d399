// Layer normalisation over the last axis, one fused op.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// x: (..., D), gamma: (D,), beta: (D,) -> y: (..., D),
// y = (x - mean) / sqrt(var + eps) * gamma + beta with mean and (population) var per row
Tensor layernorm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps = 1e-6f);

}  // namespace mv::ops
