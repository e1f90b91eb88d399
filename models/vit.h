// Vision Transformer (Dosovitskiy et al., 2021): patch embedding, a learned CLS token, learned
// position embeddings, pre-LayerNorm blocks x += Attn(LN(x)); x += FFN(LN(x)), a final
// LayerNorm and a linear head on the CLS token.
#pragma once
#include <map>
#include <string>

#include "models/layers.h"

namespace mv::models {

struct ViTConfig {
  int image_size = 28, channels = 1, patch = 4;
  int dim = 64, depth = 6, heads = 4, mlp_dim = 128;
  int num_classes = 10;
  int tokens() const { return (image_size / patch) * (image_size / patch) + 1; }
  void validate() const;  // throws naming the first impossible field
};

// Named presets (see README): "vit-tiny" is the default dense model for Fashion-MNIST.
ViTConfig vit_preset(const std::string& name);
std::vector<std::string> vit_preset_names();

class Block : public Module {
 public:
  Block(const ViTConfig& c, Generator& g);
  Tensor forward(const Tensor& x);  // (B, T, D) -> (B, T, D)
  std::shared_ptr<LayerNorm> ln1, ln2;
  std::shared_ptr<MultiHeadAttention> attn;
  std::shared_ptr<FeedForward> ffn;
};

class ViT : public Module {
 public:
  ViT(const ViTConfig& c, uint64_t seed);
  Tensor forward(const Tensor& images);  // (B, C, H, W) -> logits (B, num_classes)

  ViTConfig config;
  std::shared_ptr<Linear> patch_embed;  // (C*p*p, D): a stride-p convolution as a matmul
  Tensor cls, pos;                      // (1, 1, D), (1, T, D)
  std::vector<std::shared_ptr<Block>> blocks;
  std::shared_ptr<LayerNorm> norm;
  std::shared_ptr<Linear> head;
};

// (B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), patches in row-major order, each flattened (c, i, j).
Tensor patchify(const Tensor& images, int patch);

}  // namespace mv::models
