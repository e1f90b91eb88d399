// Inverted dropout with a counter-based (Philox) mask, reproducible from (seed, offset).
#pragma once
#include "engine/random.h"
#include "engine/tensor.h"

namespace mv::ops {

// x: any shape -> same shape. Element i is dropped when philox::uniform(seed, offset, i) < p,
// with offset = g.take(ceil(numel / 4)); kept elements are scaled by 1 / (1 - p). Returns x itself
// when !training or p == 0 (and then draws nothing). p must lie in [0, 1). The backward pass
// regenerates the same mask from (seed, offset) instead of storing it.
Tensor dropout(const Tensor& x, float p, Generator& g, bool training = true);

}  // namespace mv::ops
