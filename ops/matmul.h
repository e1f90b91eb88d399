// Matrix products, each differentiable. The CPU kernels are Eigen's GEMM over maps of the
// tensors' memory: no copies, and an operand whose last two dims are a transposed view
// (ops::transpose) is read through a column-major map instead of being copied.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// a: (..., M, K), b: (K, N) -> (..., M, N)        shared weight: a's leading dims are rows of one GEMM
// a: (..., M, K), b: (..., K, N) -> (..., M, N)   batched: b has exactly a's leading dims
Tensor matmul(const Tensor& a, const Tensor& b);

// a: (B, M, K), b: (B, K, N) -> (B, M, N)
Tensor bmm(const Tensor& a, const Tensor& b);

// x: (..., in), w: (in, out), bias: (out,) or undefined Tensor() -> y: (..., out)
// y = x w + bias (weights stored in -> out, the flax convention).
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor());

}  // namespace mv::ops
