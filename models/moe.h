// The MoE layer (methods.md section 3): router + dispatch + all experts in one batched matmul +
// combine. It replaces the MLP of some ViT blocks. Experts are GELU MLPs d -> h -> d whose
// weights are stored stacked, (E, d, h) and (E, h, d), so every expert runs at once on an
// (E, G*C, d) buffer (ops::expert_mlp: both layers and the GELU in one op); with token routings
// only each expert's rows in use are computed.
#pragma once
#include <memory>
#include <vector>

#include "models/layers.h"
#include "models/router.h"

namespace mv::models {

struct MoEConfig {
  RouterConfig router;
  int mlp_dim = 128;             // hidden width of each expert
  bool group_per_batch = false;  // route the whole batch as one group (default: each image)
};

// Routing statistics of forward passes, gathered until reset (the training loop logs them). The
// layer only files each forward's device tensors here; totals() reads them, once per logging
// interval rather than once per step (add_rows folds the rows every kRowsHeld forwards), so a GPU
// step rarely waits for the host.
struct MoEStats {
  struct Totals {
    std::vector<int64_t> load;  // (E,) buffer rows in use per expert (soft: its slots)
    int64_t choices = 0;        // token choices made (token choice: tokens * k; else tokens)
    int64_t dropped = 0;        // token choice: choices that found their buffer full;
                                // expert choice / attention vote: tokens no expert took; soft: 0
    double importance_loss = 0, load_loss = 0, separation_loss = 0;  // means over forwards
    int64_t forwards = 0;
  };
  Totals totals() const;
  void reset(int experts, bool token_choice);
  // Files a forward's (E,) I64 rows in use. Every kRowsHeld of them are read and summed into
  // load, so a long run without reset holds a bounded number of tensors.
  void add_rows(const Tensor& rows);
  static constexpr size_t kRowsHeld = 256;

  int experts = 0;
  bool token_choice = false;
  int64_t forwards = 0, choices = 0;
  int64_t soft_load = 0;           // soft: slots per expert, summed over forwards
  int64_t kept = 0;                // the sum of `load`
  int64_t untaken = 0;             // expert choice / attention vote: counted on the host, where
                                   // their routing runs
  std::vector<int64_t> load;       // (E,) rows in use per expert, summed so far (not yet in `rows`)
  std::vector<Tensor> rows;        // token and expert choice: forwards' (E,) I64 rows, not yet read
  Tensor importance_loss, load_loss, separation_loss;  // () sums over forwards, on the device
};

class MoELayer : public FeedForward {
 public:
  // Parameters drawn from init; routing noise (training only) from *noise, which must outlive
  // the layer (the ViT owns it and saves it in checkpoints).
  MoELayer(int64_t dim, const MoEConfig& config, Generator& init, Generator* noise);
  Tensor forward(const Tensor& x) override;  // x: (B, T, D) -> (B, T, D)
  // x: (B, T, D) -> (G, N, E) the router's clean probabilities for x, in the layer's groups,
  // without running the experts or touching `last` and `stats` (the noise-injection loss).
  Tensor router_probs(const Tensor& x);
  // Expert parallel (dist/experts.h): keeps only this rank's E / ranks experts of the stacked
  // weights (drawn in full first, so that every rank count starts from the same model). The
  // forward then sends each token row to its expert's rank and back, so every rank must run
  // forward together. Token-routed layers only (Soft MoE mixes every token into every slot).
  void split_experts(int rank, int ranks);
  // With split experts, for an evaluation on each rank alone: on gathers every rank's experts
  // (collective), so that forward runs as one process would; off returns to this rank's own.
  void hold_all_experts(bool on);

  MoEConfig config;
  std::shared_ptr<Router> router;
  Tensor w1, b1, w2, b2;  // (E, D, H), (E, H), (E, H, D), (E, D)
  Route last;             // the last forward's routing (aux loss, PRC, metrics, pictures)
  MoEStats stats;

 private:
  Generator* noise_;
  int expert_ranks_ = 1;
  struct Own {
    Tensor w1, b1, w2, b2;
    int ranks = 1;
  } own_;  // while hold_all_experts(true): this rank's experts
};

}  // namespace mv::models
