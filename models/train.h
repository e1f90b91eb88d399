// The training loop and what the executables share: choosing a data set by name, evaluating a
// model, and training one epoch after another with checkpoints and metrics.
#pragma once
#include <cstdio>
#include <string>
#include <vector>

#include "datasets/dataset.h"
#include "datasets/transforms.h"
#include "models/vit.h"

namespace mv::models {

// "fashion-mnist" (default folder: Debian's package), "mnist", "cifar10", "cifar100", or
// "synthetic" (28 px, 1 channel, for smoke runs). An empty dir picks the data set's default.
datasets::Dataset load_dataset(const std::string& name, const std::string& dir, bool train);
datasets::Normalize normalization(const std::string& name);

struct EvalResult {
  double loss = 0, accuracy = 0;
  int64_t n = 0;
  std::vector<int64_t> confusion;  // classes x classes, row = true label, column = prediction
  Tensor logits;                   // (n, classes), filled when keep_logits
};

// Accuracy and mean cross-entropy of `model` on `data`, in batches, without a graph. Batches go
// to the device the model's parameters live on.
EvalResult evaluate(ViT& model, const datasets::Dataset& data, const std::string& dataset,
                    int batch, bool keep_logits = false);

// Everything a run is made of. Saved in each checkpoint so that --resume continues it exactly.
struct TrainConfig {
  std::string dataset = "fashion-mnist", data_dir;
  std::string model = "vit-tiny";
  ViTConfig vit = vit_preset("vit-tiny");  // the preset with any overrides applied
  int epochs = 10, batch = 128, eval_batch = 500;
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
  // Pairwise Router Consistency (methods.md section 4): two views of each image (replacing
  // `augment`), cross-entropy on both, ops::prc_loss on every MoE layer's clean probabilities.
  bool prc = false;
  float prc_diag_weight = 0.005f, prc_off_weight = 0.05f;
  bool prc_reference_diagonal = false;  // the reference code's per-position diagonal term
  std::vector<int> prc_blocks;          // the MoE blocks that get the PRC loss (empty: all)
  bool prc_cls_pair = false;            // also pair the two views' CLS tokens
  // The noise-injection consistency loss (methods.md section 5; ViT::jaccard_loss): weight
  // (0: off) and the sigma of the Gaussian noise added to each MoE block's token input.
  float jaccard_weight = 0.f, jaccard_sigma = 0.5f;

  void validate() const;  // throws naming the flag that is out of range
  std::string to_json() const;
  static TrainConfig from_json(const std::string& json);
};

struct TrainResult {
  int epochs_done = 0;
  double test_accuracy = 0, test_loss = 0, train_loss = 0;
  double train_seconds = 0;      // training steps of all epochs, those before a resume included
  double images_per_second = 0;  // of the last epoch
};

// Trains cfg in out_dir: out_dir/checkpoint.safetensors after every epoch (atomic), one JSON line
// per epoch in out_dir/metrics.jsonl, progress on `log` (a bar on a terminal, else log lines;
// null for silence). With resume, continues the run saved in out_dir from its last epoch, with
// the configuration saved there. stop_after > 0 ends the call after that many epochs of the run
// (as an interruption would; resume continues). A non-finite loss stops with an error naming the
// step; the last checkpoint stays as it was.
TrainResult train(const TrainConfig& cfg, const std::string& out_dir, bool resume, FILE* log,
                  int stop_after = 0);

// A short human-readable duration: "1m23s", "45.2s".
std::string format_seconds(double s);

}  // namespace mv::models
