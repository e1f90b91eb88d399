// Top-k and argsort along the last axis.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

struct TopK {
  Tensor values;   // (..., k) F32, sorted descending; differentiable
  Tensor indices;  // (..., k) I64 positions in the last axis of x
};

// x: (..., n) -> values, indices: (..., k), 1 <= k <= n. Equal values come out lower index
// first; NaN counts as largest. The gradient of values goes back to the chosen positions.
TopK topk(const Tensor& x, int k);

// x: (..., n) -> I64 (..., n): the permutation that sorts each row (ascending, or descending),
// stable: equal values keep their index order. NaN sorts as largest.
Tensor argsort(const Tensor& x, bool descending = false);

}  // namespace mv::ops
