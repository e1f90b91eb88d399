#include "models/layers.h"

#include <cmath>

#include "ops/attention.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/norm.h"

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

LayerNorm::LayerNorm(int64_t dim, float eps_) : eps(eps_) {
  weight = register_parameter("weight", Tensor::ones({dim}));
  bias = register_parameter("bias", Tensor::zeros({dim}));
}

Tensor LayerNorm::forward(const Tensor& x) const { return ops::layernorm(x, weight, bias, eps); }

MLP::MLP(int64_t dim, int64_t hidden, Generator& g) {
  fc1 = register_module("fc1", std::make_shared<Linear>(dim, hidden, g));
  fc2 = register_module("fc2", std::make_shared<Linear>(hidden, dim, g));
}

Tensor MLP::forward(const Tensor& x) { return fc2->forward(ops::gelu(fc1->forward(x))); }

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
