#include "train/step.h"

#include <algorithm>
#include <cmath>

#include "ops/elementwise.h"
#include "ops/loss.h"
#include "ops/prc.h"
#include "ops/shape.h"

namespace mv::train {

namespace {

// The MoE layers of --prc-blocks (default: all).
std::vector<models::MoELayer*> prc_layers(const models::ViT& model, const TrainConfig& cfg) {
  std::vector<models::MoELayer*> out;
  const auto& want = cfg.prc_blocks;
  for (size_t i = 0; i < model.blocks.size(); ++i)
    if (model.blocks[i]->moe && (want.empty() || std::count(want.begin(), want.end(), int(i))))
      out.push_back(model.blocks[i]->moe.get());
  return out;
}

// PRC (methods.md section 4) of every MoE layer of the last forward, whose batch held view 1 of
// the first B1 images, then view 2 of all B images; pairs: (B1, T). Summed over the layers. On
// several ranks, each layer's correlation is taken over every rank's pairs.
Tensor prc_loss(const std::vector<models::MoELayer*>& layers, const Tensor& pairs, int64_t B,
                const TrainConfig& cfg, const Replicas* replicas) {
  ops::PrcOptions opt;
  opt.reference_diagonal = cfg.prc_reference_diagonal;
  opt.diag_weight = cfg.prc_diag_weight;
  opt.off_weight = cfg.prc_off_weight;
  const int64_t B1 = pairs.size(0), T = pairs.size(1);
  Tensor sum;
  for (models::MoELayer* m : layers) {
    const Tensor& probs = m->last.probs;  // (G, N, E) with G * N = (B1 + B) T, images in order
    const Tensor p = ops::reshape(probs, {B1 + B, T, probs.size(2)});
    const Tensor p1 = ops::slice(p, 0, 0, B1), p2 = ops::slice(p, 0, B1, 2 * B1);
    const Tensor l = replicas ? replicas->prc_loss(p1, p2, pairs, opt) : ops::prc_loss(p1, p2, pairs, opt);
    sum = sum.defined() ? sum + l : l;
  }
  return sum;
}

}  // namespace

int64_t prc_images(float share, int64_t B) { return std::clamp<int64_t>(std::llround(double(share) * double(B)), 1, B); }

int nonfinite_router_block(const models::ViT& model) {
  for (size_t b = 0; b < model.blocks.size(); ++b) {
    const models::MoELayer* m = model.blocks[b]->moe.get();
    if (!m || !m->last.probs.defined()) continue;
    const std::vector<float> p = m->last.probs.to_vector<float>();
    if (std::any_of(p.begin(), p.end(), [](float v) { return !std::isfinite(v); })) return int(b);
  }
  return -1;
}

StepResult train_step(models::ViT& model, models::Optimizer& opt, const std::vector<Tensor>& params,
                      const datasets::Batch& b, const TrainConfig& cfg, float lr,
                      Replicas* replicas) {
  const Device dev = model.device();
  StepResult r;
  opt.zero_grad();
  // PRC: view 1 of the first B1 images, then view 2 of all B, in one batch; the classification
  // loss on every row.
  const int64_t B = b.images.size(0), B1 = cfg.prc ? prc_images(cfg.prc_share, B) : 0;
  const Tensor images =
      (cfg.prc ? ops::concat({ops::slice(b.images, 0, 0, B1), b.images2}, 0) : b.images).to(dev);
  r.labels = (cfg.prc ? ops::concat({ops::slice(b.labels, 0, 0, B1), b.labels}, 0) : b.labels).to(dev);
  r.logits = model.forward(images);
  r.ce = ops::cross_entropy(r.logits, r.labels, cfg.label_smoothing);
  Tensor extra = model.aux_loss();  // MoE routers' weighted losses; undefined if none
  if (cfg.prc) {
    r.prc = prc_loss(prc_layers(model, cfg), ops::slice(b.pairs, 0, 0, B1).to(dev), B, cfg, replicas);
    extra = extra.defined() ? extra + r.prc : r.prc;
  }
  if (cfg.jaccard_weight > 0) {
    r.jaccard = model.jaccard_loss();
    const Tensor wj = ops::mul(r.jaccard, cfg.jaccard_weight);
    extra = extra.defined() ? extra + wj : wj;
  }
  r.loss = extra.defined() ? r.ce + extra : r.ce;
  if (replicas) {
    replicas->backward(r.loss);
    opt.step(lr, replicas->clip_scale(cfg.clip));
  } else {
    r.loss.backward();
    opt.step(lr, models::clip_scale(params, cfg.clip).scale);
  }
  return r;
}

}  // namespace mv::train
