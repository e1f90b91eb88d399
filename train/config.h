// The configuration of a training run: every setting, its validation, and its JSON form, which
// each checkpoint saves so that --resume (and eval, viz) rebuild exactly the run's model.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/vit.h"

namespace mv::train {

// Everything a run is made of. Saved in each checkpoint so that --resume continues it exactly.
struct TrainConfig {
  std::string dataset = "fashion-mnist", data_dir;
  std::string model = "vit-tiny";
  models::ViTConfig vit = models::vit_preset("vit-tiny");  // the preset with any overrides applied
  int epochs = 10, batch = 128, eval_batch = 500;
  // Evaluations also classify each test image's mirror image and average the two logits
  // (test-time augmentation; the training's flips make the mirror image a familiar view).
  bool eval_flip = false;
  std::string optimizer = "adamw";  // adamw | sgd
  float lr = 1e-3f, weight_decay = 0.05f, momentum = 0.9f;
  std::string schedule = "cosine";  // cosine | linear (after a linear warmup)
  float warmup_epochs = 1.f;
  float label_smoothing = 0.1f;
  float clip = 1.f;                 // global gradient-norm clip; 0 disables
  std::string augment = "crop-flip";  // none | crop | crop-flip (pad-2 random crop, h-flip)
  uint64_t seed = 0;
  int64_t limit_train = 0, limit_test = 0;  // use only the first N images (0: all)
  std::string device = "cpu";       // cpu | cuda (the model, batches and optimizer state)
  bool tf32 = false;                // CUDA GEMMs on TF32 tensor cores (ops::set_allow_tf32)
  bool bf16 = false;                // CPU products on bfloat16 inputs (ops::set_matmul_bf16)
  // Pairwise Router Consistency (methods.md section 4): two views of each image (replacing
  // `augment`), cross-entropy on both, ops::prc_loss on every MoE layer's clean probabilities.
  bool prc = false;
  float prc_diag_weight = 0.005f, prc_off_weight = 0.05f;
  bool prc_reference_diagonal = false;  // the reference code's per-position diagonal term
  std::vector<int> prc_blocks;          // the MoE blocks that get the PRC loss (empty: all)
  bool prc_cls_pair = false;            // also pair the two views' CLS tokens
  // The share of each batch's images that also get view 1 (the smaller crop), and with it PRC's
  // pairs; the others train on view 2 alone. Below 1 it saves most of a second view's cost.
  float prc_share = 1.f;
  // The views' crop areas, fractions {lo, hi} of the image; empty: datasets::TwoViewConfig's
  // defaults for the image size.
  std::vector<float> prc_area1, prc_area2;
  // The noise-injection consistency loss (methods.md section 5; ViT::jaccard_loss): weight
  // (0: off) and the sigma of the Gaussian noise added to each MoE block's token input.
  float jaccard_weight = 0.f, jaccard_sigma = 0.5f;
  // An average of the weights (models/ema.h), which the epochs' evaluations and the checkpoint's
  // users (eval, viz) take instead of the last weights.
  bool ema = false;
  float ema_decay = 0.999f;
  // A limit on the run's wall time, training and evaluation (0: none). After each epoch fit
  // sets `schedule_steps` to as many steps as fit in it (steps_for_budget, train/loop.h), and
  // `epochs` to the epochs they start, so the learning-rate schedule ends in time, the last
  // epoch early where the steps end inside it; a run that still reaches the limit stops there
  // with a checkpoint.
  float time_budget_minutes = 0.f;
  // The schedule's length in steps when a time budget set it; 0: `epochs` whole epochs.
  int64_t schedule_steps = 0;

  // Throws naming the flag that is out of range, or the flags whose sizes exceed the memory.
  void validate() const;
  // Bytes a training step needs at least (weights, optimizer state, activations).
  double training_bytes() const;
  std::string to_json() const;
  static TrainConfig from_json(const std::string& json);
};

}  // namespace mv::train
