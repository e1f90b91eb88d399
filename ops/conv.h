// Convolution as im2col + GEMM, channels-last: unfold gathers each k x k window of an image into
// one row, and a Linear layer of weight (k k C, C_out) is then the convolution (models/layers.h
// Conv2d). Channels-last keeps a convolution's output (B, Ho Wo, C_out) the next one's input
// without a transpose, and lets LayerNorm normalise over the channels as it does over a token.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// The output side of a k x k window sliding with `stride` over `size` pixels padded by `pad`.
int64_t conv_out_size(int64_t size, int k, int stride, int pad);

// x: (B, H, W, C), any layout -> (B, Ho Wo, k k C) with Ho = conv_out_size(H, ..), likewise Wo:
//   out[b, oy Wo + ox, (i k + j) C + c] = x[b, oy s + i - pad, ox s + j - pad, c]  (0 outside x)
// Backward: each element of x gets the sum of the gradients of the window entries that copied it.
// Has a CUDA kernel.
Tensor unfold(const Tensor& x, int k, int stride, int pad);

}  // namespace mv::ops
