// The building blocks of a ViT: Linear, Conv2d, LayerNorm, the GELU MLP and multi-head self-attention.
// Weights are stored (in, out) so that y = x W + b, the layout checkpoints keep (docs/checkpoint.md).
#pragma once
#include "engine/random.h"
#include "models/module.h"

namespace mv::models {

// Truncated normal N(0, std^2) cut at +-2 std: the ViT initialisation of weight matrices.
Tensor init_weight(const Shape& shape, Generator& g, float std = 0.02f);

class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, Generator& g, bool bias = true);
  Tensor forward(const Tensor& x) const;  // x: (..., in) -> (..., out)
  Tensor weight, bias;                    // (in, out), (out,)
};

// A k x k convolution of channels-last images: ops::unfold's window rows times a (k k in, out)
// weight. Rows are (i, j, channel), so weight row (i k + j) in + c is tap (i, j) of channel c.
class Conv2d : public Module {
 public:
  Conv2d(int64_t in, int64_t out, int k, int stride, int pad, Generator& g);
  Tensor forward(const Tensor& x) const;  // x: (B, H, W, in) -> (B, Ho, Wo, out)
  Tensor weight, bias;                    // (k k in, out), (out,)
  int k, stride, pad;
};

class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, float eps = 1e-6f);
  Tensor forward(const Tensor& x) const;  // x: (..., dim) -> (..., dim)
  Tensor weight, bias;                    // (dim,), (dim,)
  float eps;
};

// A block's token-wise feed-forward part: the dense MLP, or an MoE layer later.
class FeedForward : public Module {
 public:
  virtual Tensor forward(const Tensor& x) = 0;  // x: (B, T, D) -> (B, T, D)
};

class MLP : public FeedForward {
 public:
  MLP(int64_t dim, int64_t hidden, Generator& g);
  Tensor forward(const Tensor& x) override;  // x: (..., dim) -> fc2(gelu(fc1(x))), fused on the CPU
  std::shared_ptr<Linear> fc1, fc2;
};

class MultiHeadAttention : public Module {
 public:
  MultiHeadAttention(int64_t dim, int heads, Generator& g);
  Tensor forward(const Tensor& x) const;  // x: (B, T, D) -> (B, T, D), fused attention op
  std::shared_ptr<Linear> qkv, proj;      // D -> 3D packed [q | k | v], D -> D
  int heads;
};

}  // namespace mv::models
