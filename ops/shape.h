// Shape ops, each differentiable. reshape (of a contiguous tensor), transpose, permute and slice
// return views that share storage; concat and stack copy. Negative axes count from the end.
// Backward passes return contiguous gradients.
#pragma once
#include <vector>

#include "engine/tensor.h"

namespace mv::ops {

// x: any shape, numel(shape) == numel(x) (one entry may be -1: inferred) -> shape
// A view when x is contiguous, else a copy.
Tensor reshape(const Tensor& x, const Shape& shape);

// x: (..., d0, ..., d1, ...) -> the same with dims d0 and d1 swapped (a view)
Tensor transpose(const Tensor& x, int d0, int d1);

// x: (s_0, ..., s_{n-1}), dims a permutation of 0..n-1 -> (s_dims[0], ..., s_dims[n-1]) (a view)
Tensor permute(const Tensor& x, const std::vector<int>& dims);

// x: (..., L, ...) with L at `axis` -> (..., end - start, ...) (a view, step 1).
// start and end may be negative (counted from L); 0 <= start <= end <= L after that.
Tensor slice(const Tensor& x, int axis, int64_t start, int64_t end);

// xs[i]: equal shapes except along axis -> sizes along axis summed
Tensor concat(const std::vector<Tensor>& xs, int axis);

// xs[i]: all the same shape S -> S with a new dim of size xs.size() inserted at axis
// (axis in [-(rank+1), rank])
Tensor stack(const std::vector<Tensor>& xs, int axis);

// images: (B, C, H, W), H and W multiples of p -> (B, (H/p)(W/p), C p p), ViT's patches:
//   out[b, gy (W/p) + gx, (c p + i) p + j] = images[b, c, gy p + i, gx p + j]
// (patches in row-major order, each flattened (c, i, j)). A permutation of the elements, so the
// backward is the inverse permutation of the gradient. Has a CUDA kernel.
Tensor patchify(const Tensor& images, int p);

}  // namespace mv::ops
