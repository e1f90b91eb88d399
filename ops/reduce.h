// Reductions. Axes may be negative (counted from the end). With keepdim the reduced axes stay
// as size 1; without it they are removed. Sums accumulate in double.
#pragma once
#include <vector>

#include "engine/tensor.h"

namespace mv::ops {

// x: any shape -> () sum of all elements
Tensor sum(const Tensor& x);
// x: any shape, axes: distinct axes (empty = all) -> x's shape without axes (size 1 if keepdim)
Tensor sum(const Tensor& x, std::vector<int> axes, bool keepdim = false);
// x: any shape -> () mean of all elements
Tensor mean(const Tensor& x);
// x: any shape, axes as for sum -> x's shape without axes (size 1 if keepdim)
Tensor mean(const Tensor& x, std::vector<int> axes, bool keepdim = false);
// x: any shape, axes as for sum -> sum((x - mean)^2) / (count - correction); correction 0 is the
// population variance, 1 the unbiased sample variance
Tensor var(const Tensor& x, std::vector<int> axes, bool keepdim = false, int correction = 0);

// x: (..., n, ...) -> x's shape without `axis` (size 1 if keepdim): the largest values. NaN
// counts as largest. The gradient goes to the first maximal element (ties -> lower index).
Tensor max(const Tensor& x, int axis, bool keepdim = false);
// x: (..., n, ...) -> I64 index of the first largest element along `axis`; not differentiable
Tensor argmax(const Tensor& x, int axis, bool keepdim = false);

}  // namespace mv::ops
