// One optimisation step, the one train::fit runs for every batch and bench/train_step times.
#pragma once
#include <vector>

#include "datasets/loader.h"
#include "models/optim.h"
#include "models/vit.h"
#include "train/config.h"
#include "train/parallel.h"

namespace mv::train {

// What a step computed, on the model's device. The tensors keep their graph, which goes when the
// caller drops them; reading a value (item()) waits for the step to finish on a GPU.
struct StepResult {
  Tensor logits;   // (N, classes): N = B, or B1 + B with PRC (view 1 of the first B1 images,
                   // then view 2 of every image; B1 = prc_images(cfg.prc_share, B))
  Tensor labels;   // (N,) I64
  Tensor ce;       // (): the classification loss, with cfg.label_smoothing (what the logs show)
  Tensor prc;      // (): the PRC loss, weighted and summed over layers; undefined without PRC
  Tensor jaccard;  // (): the noise-injection loss, unweighted; undefined when its weight is 0
  Tensor loss;     // (): what backward ran on: ce + (routers' auxiliary losses + prc
                   //     + cfg.jaccard_weight * jaccard), the terms present
};

// With PRC, the images of a batch of B that get both views: share * B rounded, at least 1.
int64_t prc_images(float share, int64_t B);

// After a step whose loss is not finite: the first MoE block (in order) whose router gave
// non-finite probabilities in the last forward, or -1 if none did (the loss went wrong
// elsewhere). Reads the probabilities back from the device, so it is for that failure only.
int nonfinite_router_block(const models::ViT& model);

// One step on batch b (images (B, C, H, W) and labels (B,) on the CPU; with cfg.prc also
// images2 and pairs (B, T) of Loader's two-view mode): forward (with PRC the views in one
// batch), the loss above, zeroed gradients, backward, the global-norm clip at cfg.clip, and
// opt's update at learning rate lr. params: model.parameters(), whose gradients the clip reads.
// replicas: on several ranks (train/parallel.h), the backward that shares the gradients and
// the global norm for the clip; null for one process.
StepResult train_step(models::ViT& model, models::Optimizer& opt, const std::vector<Tensor>& params,
                      const datasets::Batch& b, const TrainConfig& cfg, float lr,
                      Replicas* replicas = nullptr);

}  // namespace mv::train
