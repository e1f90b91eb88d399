#include "models/vit.h"

#include "ops/elementwise.h"
#include "ops/prc.h"
#include "ops/reduce.h"
#include "ops/shape.h"

namespace mv::models {

Block::Block(const ViTConfig& c, int i, Generator& g, Generator* noise) {
  ln1 = register_module("ln1", std::make_shared<LayerNorm>(c.dim));
  attn = register_module("attn", std::make_shared<MultiHeadAttention>(c.dim, c.heads, g));
  ln2 = register_module("ln2", std::make_shared<LayerNorm>(c.dim));
  if (c.is_moe_block(i))
    ffn = moe = register_module("moe", std::make_shared<MoELayer>(c.dim, c.moe, g, noise));
  else
    ffn = register_module<FeedForward>("mlp", std::make_shared<MLP>(c.dim, c.mlp_dim, g));
}

Tensor Block::attend(const Tensor& x) { return x + attn->forward(ln1->forward(x)); }

Tensor Block::forward(const Tensor& x) {
  Tensor h = attend(x);
  return h + ffn->forward(ln2->forward(h));
}

Tensor Block::perturbed_probs(const Tensor& x, float sigma, Generator& g) {
  MV_CHECK(moe, "Block::perturbed_probs: the block has no MoE layer");
  const Tensor eps = ops::mul(randn(x.shape(), g, x.device()), sigma);  // no graph needed
  return moe->router_probs(ln2->forward(attend(x + eps)));
}

ConvStem::ConvStem(const ViTConfig& c, Generator& g) {
  for (const ViTConfig::StemConv& s : c.stem_convs())
    convs.push_back(register_module("convs." + std::to_string(convs.size()),
                                    std::make_shared<Conv2d>(s.in, s.out, 3, s.stride, 1, g)));
}

Tensor ConvStem::forward(const Tensor& images) const {
  Tensor x = ops::permute(images, {0, 2, 3, 1});  // channels-last (B, H, W, C)
  for (size_t i = 0; i < convs.size(); ++i) {
    if (i > 0) x = ops::gelu(x);
    x = convs[i]->forward(x);
  }
  return ops::reshape(x, {x.size(0), x.size(1) * x.size(2), x.size(3)});
}

ViT::ViT(const ViTConfig& c, uint64_t seed)
    : config(c), route_noise(std::make_shared<Generator>(seed ^ 0x9E3779B97F4A7C15ull)) {
  c.validate();
  Generator g(seed);
  if (c.stem != "patch")
    stem = register_module("stem", std::make_shared<ConvStem>(c, g));
  else
    patch_embed = register_module(
        "patch_embed", std::make_shared<Linear>(int64_t(c.channels) * c.patch * c.patch, c.dim, g));
  cls = register_parameter("cls", Tensor::zeros({1, 1, c.dim}));
  pos = register_parameter("pos", init_weight({1, c.tokens(), c.dim}, g));
  for (int i = 0; i < c.depth; ++i)
    blocks.push_back(register_module("blocks." + std::to_string(i),
                                     std::make_shared<Block>(c, i, g, route_noise.get())));
  norm = register_module("norm", std::make_shared<LayerNorm>(c.dim));
  head = register_module("head", std::make_shared<Linear>(c.dim, c.num_classes, g));
  head->weight.fill_(0.f);  // zero head: the first loss is exactly log(classes), as in big_vision
}

Tensor ViT::forward(const Tensor& images) {
  const ViTConfig& c = config;
  MV_CHECK(images.ndim() == 4 && images.size(1) == c.channels && images.size(2) == c.image_size &&
               images.size(3) == c.image_size,
           "ViT: images ", images.str(), " do not match the model's (B, ", c.channels, ", ",
           c.image_size, ", ", c.image_size, ")");
  const int64_t B = images.size(0);
  Tensor x = stem ? stem->forward(images) : patch_embed->forward(ops::patchify(images, c.patch));  // (B, N, D)
  Tensor cls_b = ops::add(Tensor::zeros({B, 1, int64_t(c.dim)}, DType::F32, cls.device()), cls);
  x = ops::concat({cls_b, x}, 1) + pos;                               // (B, T, D)
  jaccard_.clear();
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Tensor in = block_input_hook ? block_input_hook(int(i), x) : x;
    x = blocks[i]->forward(in);
    if (training() && jaccard_sigma > 0 && blocks[i]->moe) {  // after the clean routing
      const Tensor perturbed = blocks[i]->perturbed_probs(in, jaccard_sigma, *route_noise);
      jaccard_.push_back(ops::soft_jaccard_loss(blocks[i]->moe->last.probs, perturbed));
    }
  }
  x = norm->forward(x);
  const Tensor pooled = c.pool == "mean" ? ops::mean(ops::slice(x, 1, 1, x.size(1)), {1})
                                         : ops::reshape(ops::slice(x, 1, 0, 1), {B, int64_t(c.dim)});
  return head->forward(pooled);
}

Tensor ViT::aux_loss() const {
  Tensor sum;
  for (MoELayer* m : moe_layers())
    if (m->last.aux_loss.defined()) sum = sum.defined() ? sum + m->last.aux_loss : m->last.aux_loss;
  return sum;
}

Tensor ViT::jaccard_loss() const {
  if (jaccard_.empty()) return {};
  Tensor sum = jaccard_[0];
  for (size_t i = 1; i < jaccard_.size(); ++i) sum = sum + jaccard_[i];
  return ops::mul(sum, 1.f / float(jaccard_.size()));
}

std::vector<MoELayer*> ViT::moe_layers() const {
  std::vector<MoELayer*> out;
  for (auto& b : blocks)
    if (b->moe) out.push_back(b->moe.get());
  return out;
}

}  // namespace mv::models
