#include "models/layers.h"

#include <cmath>

#include "ops/attention.h"
#include "ops/conv.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/norm.h"
#include "ops/shape.h"

namespace mv::models {

Tensor init_weight(const Shape& shape, Generator& g, float std) {
  return trunc_normal(shape, std, -2.f, 2.f, g);
}

Linear::Linear(int64_t in, int64_t out, Generator& g, bool has_bias) {
  // Xavier (Glorot) scale, as the ViT reference code initialises its dense layers.
  weight = register_parameter("weight", init_weight({in, out}, g, std::sqrt(2.0f / float(in + out))));
  if (has_bias) bias = register_parameter("bias", Tensor::zeros({out}));
}

Tensor Linear::forward(const Tensor& x) const { return ops::linear(x, weight, bias); }

Conv2d::Conv2d(int64_t in, int64_t out, int k_, int stride_, int pad_, Generator& g)
    : k(k_), stride(stride_), pad(pad_) {
  const int64_t fan_in = int64_t(k) * k * in;
  weight = register_parameter("weight", init_weight({fan_in, out}, g, std::sqrt(2.0f / float(fan_in + out))));
  bias = register_parameter("bias", Tensor::zeros({out}));
}

Tensor Conv2d::forward(const Tensor& x) const {
  MV_CHECK(x.ndim() == 4 && x.size(3) * k * k == weight.size(0), "Conv2d: x ", x.str(), " must be (B, H, W, ",
           weight.size(0) / (k * k), ")");
  const int64_t ho = ops::conv_out_size(x.size(1), k, stride, pad), wo = ops::conv_out_size(x.size(2), k, stride, pad);
  return ops::reshape(ops::linear(ops::unfold(x, k, stride, pad), weight, bias), {x.size(0), ho, wo, weight.size(1)});
}

LayerNorm::LayerNorm(int64_t dim, float eps_) : eps(eps_) {
  weight = register_parameter("weight", Tensor::ones({dim}));
  bias = register_parameter("bias", Tensor::zeros({dim}));
}

Tensor LayerNorm::forward(const Tensor& x) const { return ops::layernorm(x, weight, bias, eps); }

MLP::MLP(int64_t dim, int64_t hidden, Generator& g) {
  fc1 = register_module("fc1", std::make_shared<Linear>(dim, hidden, g));
  fc2 = register_module("fc2", std::make_shared<Linear>(hidden, dim, g));
}

// On the CPU the two layers and the GELU run as one op, the one-expert case of ops::expert_mlp:
// its 256-row blocks stay in cache from the first product to the second, and GELU's derivative is
// kept from the forward rather than recomputed. Same math and the same GELU bits as the
// composite below, which serves the GPU.
Tensor MLP::forward(const Tensor& x) {
  if (x.device() != Device::CPU) return fc2->forward(ops::gelu(fc1->forward(x)));
  const int64_t d = fc1->weight.size(0), h = fc1->weight.size(1), o = fc2->weight.size(1);
  MV_CHECK(x.ndim() >= 1 && x.size(-1) == d, "MLP: x ", x.str(), " must be (..., ", d, ")");
  const Tensor y = ops::expert_mlp(ops::reshape(x, {1, x.numel() / d, d}), ops::reshape(fc1->weight, {1, d, h}),
                                   ops::reshape(fc1->bias, {1, h}), ops::reshape(fc2->weight, {1, h, o}),
                                   ops::reshape(fc2->bias, {1, o}));
  Shape out = x.shape();
  out.back() = o;
  return ops::reshape(y, out);
}

MultiHeadAttention::MultiHeadAttention(int64_t dim, int heads_, Generator& g) : heads(heads_) {
  MV_CHECK(heads > 0 && dim % heads == 0, "MultiHeadAttention: width ", dim,
           " is not divisible by ", heads, " heads");
  qkv = register_module("qkv", std::make_shared<Linear>(dim, 3 * dim, g));
  proj = register_module("proj", std::make_shared<Linear>(dim, dim, g));
}

Tensor MultiHeadAttention::forward(const Tensor& x) const {
  return proj->forward(ops::self_attention(qkv->forward(x), heads));
}

}  // namespace mv::models
