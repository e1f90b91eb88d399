// Training over the ranks of mpirun (dist/): data parallel, each rank stepping on its share of
// every global batch, and expert parallel (--expert-parallel), each MoE layer's experts split
// over the ranks. One process is the case of one rank, with nothing of this in its way.
//
// What each rank holds and does:
//   - the same model from the same seed; with split experts (--expert-parallel m) only its
//     E / m experts of each layer, the world cut into expert groups of m consecutive ranks;
//   - rows [r B / n, (r + 1) B / n) of each global batch (datasets::Loader::set_share), and its
//     share of the routing noise (Generator::part), so that n ranks train as one process on the
//     whole batch would, up to the order of float additions;
//   - after backward, the mean over ranks of the shared parameters' gradients (dist/grad_sync.h);
//     a split expert's gradient already holds its group's tokens: it is averaged over the groups'
//     copies of that expert, then divided by m;
//   - PRC's cross-correlation summed over ranks before its loss (Replicas::prc_loss);
//   - its share of the test set; the figures are summed over ranks;
//   - rank 0 alone prints, and writes metrics.jsonl and the checkpoint (the whole model).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "dist/grad_sync.h"
#include "models/vit.h"
#include "ops/prc.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/evaluate.h"

namespace mv::train {

struct Ranks {
  int rank = 0, size = 1;
  int expert_parallel = 1;  // ranks of an expert group, which split the experts (1: none); the
                            // groups are consecutive ranks, size / expert_parallel of them
  bool many() const { return size > 1; }
  bool split_experts() const { return expert_parallel > 1; }
};

// This process's place in the world of dist::init, with --expert-parallel n.
Ranks world_ranks(int expert_parallel);

// Throws, naming the flag, unless cfg can train on these ranks: the batch splits evenly, the
// experts split evenly, the model is on the CPU, groups are images; and unless every rank was
// given the same run (`run`: a description of the flags, compared with rank 0's).
void check_ranks(const TrainConfig& cfg, const Ranks& r, const std::string& run);

// Cuts a freshly made model to this rank's part (noise shares, experts) before the optimizer
// takes its parameters. Returns the parameters split over ranks (empty without split experts).
SplitParameters split_model(models::ViT& model, const Ranks& r);

// A training step's backward on several ranks, with the gradient reduction inside.
class Replicas {
 public:
  Replicas(models::ViT& model, const Ranks& r);
  // loss.backward(), every shared gradient then the mean over ranks, every split expert's the
  // mean over expert groups of its group's sum, divided by the group's size (each rank's loss is
  // a mean over its share).
  void backward(const Tensor& loss);
  // The clip scale of the global gradient norm (split experts' squares summed over ranks).
  float clip_scale(float max_norm) const;
  // ops::prc_loss with its cross-correlation C taken over every rank's pairs, as one process
  // taking the whole batch: the ranks' C, weighted by their pair counts, are summed (an E x E
  // all-reduce) before the loss, and each rank's gradient is its share of the total's.
  Tensor prc_loss(const Tensor& p, const Tensor& q, const Tensor& pairs,
                  const ops::PrcOptions& opt) const;

 private:
  Ranks ranks_;
  std::vector<Tensor> shared_, own_;
  dist::GradientSync sync_, own_sync_;  // over the world; over the replicas of this rank's experts
};

// evaluate() over the ranks: each takes its share of `data` (with split experts, every rank
// first gathers all experts, so that its share needs no other rank), and the losses, counts and
// confusion matrices are summed in rank order. Every rank gets the whole set's result.
EvalResult evaluate_on_ranks(models::ViT& model, const datasets::Dataset& data,
                             const std::string& dataset, const EvalOptions& o, const Ranks& r);

// One number agreed on by every rank: the largest of each rank's `v` (stop signals, deadlines,
// rank 0's count of epochs: all ranks must leave a loop at the same step).
double agree_max(double v, const Ranks& r);

}  // namespace mv::train
