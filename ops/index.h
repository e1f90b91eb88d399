// Indexing ops. Index tensors are I64; every index is checked before the kernel's loop runs,
// and an out-of-range one is reported with its value and the size it had to fit.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// x: (..., L, ...) with L at axis, idx: (n,) I64 in [0, L) -> (..., n, ...)
// Backward scatter-adds, so repeated indices accumulate.
Tensor index_select(const Tensor& x, int axis, const Tensor& idx);

// x: rank r, idx: I64 of rank r with idx.size(d) <= x.size(d) for d != axis -> idx's shape
// out[i][j][k] = x[i][idx[i][j][k]][k] (axis = 1; torch.gather). Backward: scatter_add.
Tensor gather(const Tensor& x, int axis, const Tensor& idx);

// x: rank r, idx: I64 of rank r, src: idx's shape, idx.size(d) <= x.size(d) for d != axis
// -> x's shape: a copy of x with out[i][idx[i][j][k]][k] += src[i][j][k] (axis = 1; torch
// scatter_add). Gradients: d x = g, d src = gather(g, axis, idx).
Tensor scatter_add(const Tensor& x, int axis, const Tensor& idx, const Tensor& src);

// idx: I64 any shape, values in [0, n) -> F32 (..., n) with a 1 at each index. No gradient.
Tensor one_hot(const Tensor& idx, int64_t n);

}  // namespace mv::ops
