// Vision Transformer (Dosovitskiy et al., 2021): patch embedding, a learned CLS token, learned
// position embeddings, pre-LayerNorm blocks x += Attn(LN(x)); x += FFN(LN(x)), a final
// LayerNorm and a linear head on the CLS token (or on the mean of the patch tokens). An MoE-ViT (V-MoE, Riquelme et al., 2021)
// replaces the MLP of some blocks by an MoE layer (models/moe.h).
#pragma once
#include <functional>
#include <map>
#include <string>

#include "models/layers.h"
#include "models/moe.h"

namespace mv::models {

struct ViTConfig {
  int image_size = 28, channels = 1, patch = 4;
  int dim = 64, depth = 6, heads = 4, mlp_dim = 128;
  int num_classes = 10;
  // How images become tokens: "patch" (ViT's linear embedding of p x p patches), "conv" or
  // "conv-deep" (ConvStem below, the same token grid).
  std::string stem = "patch";
  // What the head reads: "cls" (the CLS token, as ViT) or "mean" (the mean of the patch tokens,
  // as the plain ViT baselines of Beyer et al., 2022, which train in fewer epochs; the CLS token
  // stays, an extra token that attention may use).
  std::string pool = "cls";
  // MoE: which blocks get an MoE layer. "none" (dense), "every-2" (the odd blocks 1, 3, 5, ...),
  // "last-n" (the last moe_last_n odd blocks).
  std::string moe_placement = "none";
  int moe_last_n = 2;
  MoEConfig moe{};
  bool is_moe_block(int i) const;
  // The conv stem's 3x3 convolutions in order (none for the patch embedding): in -> out
  // channels, stride, and the side of the output image.
  struct StemConv {
    int64_t in, out;
    int stride, out_side;
  };
  std::vector<StemConv> stem_convs() const;
  int tokens() const { return (image_size / patch) * (image_size / patch) + 1; }
  // Weights of the model, within a few percent (routers' small extras left out): what sizes
  // taken from flags or a checkpoint ask the memory for, before anything is allocated.
  double parameter_estimate() const;
  // Bytes of the activations a training forward of `images` images keeps for the backward,
  // within about 2x: with parameter_estimate, a check of --batch against the memory.
  double activation_bytes(double images) const;
  // Throws naming the first impossible field, or a model too large for the available memory.
  void validate() const;

 private:
  void validate_moe() const;
};

// Named presets (see README): "vit-tiny" is the default dense model for Fashion-MNIST; the
// "*-tiny" MoE presets are vit-tiny with 8 experts in every other block, one per router family.
ViTConfig vit_preset(const std::string& name);
std::vector<std::string> vit_preset_names();

class Block : public Module {
 public:
  // Block i of the model: its MLP is an MoE layer when c.is_moe_block(i).
  Block(const ViTConfig& c, int i, Generator& g, Generator* noise);
  Tensor forward(const Tensor& x);  // (B, T, D) -> (B, T, D)
  // MoE blocks: x (B, T, D), the block's input -> (G, N, E) the router probabilities of
  // x + N(0, sigma^2) noise drawn from g, after this block's attention (noise-injection loss).
  Tensor perturbed_probs(const Tensor& x, float sigma, Generator& g);
  std::shared_ptr<LayerNorm> ln1, ln2;
  std::shared_ptr<MultiHeadAttention> attn;
  std::shared_ptr<FeedForward> ffn;
  std::shared_ptr<MoELayer> moe;  // == ffn in an MoE block, else null

 private:
  Tensor attend(const Tensor& x);  // x + Attn(LN(x))
};

// A convolutional stem after "early convolutions" (Xiao et al., 2021), in place of the patch
// embedding: log2(p) 3x3 convolutions of stride 2, each halving the image's side while the
// widths double up to D, with a GELU after each but the last; "conv-deep" follows each of them
// with a 3x3 convolution of stride 1 at its width (1 -> 32 -> 32 -> 64 -> 64 channels on 28 px):
// a small CNN, which learns more per epoch than it costs. Its output grid is the p x p
// patch grid (28 px, p = 4: 28 -> 14 -> 7), so routing maps and PRC's patch pairs keep their
// meaning, but each token sees the pixels around its patch too: ViTs train in fewer epochs with
// it. No normalisation between the convolutions: a LayerNorm over a pixel's channels divides
// by their spread, which is near 0 on a blank background, and so blew pixel noise up (accuracy
// under sigma 0.2 noise fell from 86% to 47%, docs/results.md).
class ConvStem : public Module {
 public:
  ConvStem(const ViTConfig& c, Generator& g);
  Tensor forward(const Tensor& images) const;  // (B, C, H, W) -> (B, (H/p)(W/p), D)
  std::vector<std::shared_ptr<Conv2d>> convs;
};

class ViT : public Module {
 public:
  ViT(const ViTConfig& c, uint64_t seed);
  Tensor forward(const Tensor& images);  // (B, C, H, W) -> logits (B, num_classes)
  // The weighted auxiliary losses of the last forward's routers, summed (a scalar), or an
  // undefined tensor when there are none (dense model, or routers without such losses).
  Tensor aux_loss() const;
  std::vector<MoELayer*> moe_layers() const;
  // Noise-injection consistency (methods.md section 5), a training regulariser: with
  // jaccard_sigma > 0, a training forward also passes each MoE block's input plus
  // N(0, sigma^2) noise (drawn from route_noise) through that block's attention and router, and
  // jaccard_loss() returns 1 - soft Jaccard of the clean and the perturbed router probabilities,
  // averaged over tokens and MoE layers (a scalar; undefined when off).
  float jaccard_sigma = 0;
  Tensor jaccard_loss() const;
  // When set, forward passes each block's input through it first: (block index, x) -> x.
  // Evaluation tools use it to perturb hidden tokens (routing consistency under noise).
  std::function<Tensor(int, const Tensor&)> block_input_hook;

  ViTConfig config;
  std::shared_ptr<Linear> patch_embed;  // (C*p*p, D): a stride-p convolution as a matmul
  std::shared_ptr<ConvStem> stem;       // instead of patch_embed with a conv stem
  Tensor cls, pos;                      // (1, 1, D), (1, T, D)
  std::vector<std::shared_ptr<Block>> blocks;
  std::shared_ptr<LayerNorm> norm;
  std::shared_ptr<Linear> head;
  // Routing noise of the MoE layers, seeded from the model seed; checkpoints save its offset so
  // that a resumed run draws the same noise.
  std::shared_ptr<Generator> route_noise;

 private:
  std::vector<Tensor> jaccard_;  // the last forward's per-layer soft-Jaccard losses
};

}  // namespace mv::models
