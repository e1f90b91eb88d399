// Multi-head self-attention without a mask (ViT), differentiable.
//
// qkv packs the three projections along the last axis: [q | k | v], each of width D = heads * Dh;
// head h reads columns h*Dh .. (h+1)*Dh-1 of each part. The output concatenates the heads the
// same way. Per (batch, head): out = softmax(q k^T / sqrt(Dh)) v.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

// The fused op: one kernel per (batch, head) for forward, and a hand-written backward from the
// saved probabilities (on the GPU: flash-attention kernels that rebuild them from the row
// log-sum-exp instead).
// qkv: (B, T, 3*D), D = heads * Dh -> out: (B, T, D)
Tensor self_attention(const Tensor& qkv, int heads);

// The same math built from reshape/permute/slice/matmul/softmax/mul; the reference the fused
// op is tested against, and the baseline it is benchmarked against.
// qkv: (B, T, 3*D), D = heads * Dh -> out: (B, T, D)
Tensor self_attention_composite(const Tensor& qkv, int heads);

}  // namespace mv::ops
