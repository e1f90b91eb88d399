// MoE routers (methods.md section 2): each one maps a group of token vectors to a routing, i.e.
// which buffer row of which expert each token fills and with what combine weight.
//
//   topk              V-MoE noisy top-k token choice, capacity, BPR, importance and load losses
//   expert_choice     each expert takes its top-C tokens (Zhou et al.)
//   soft              Soft MoE: every slot a softmax mix of all tokens (Puigcerver et al.)
//   cosine            X-MoE: cosine similarity in a small projection, learnable temperature
//   perturbed_cosine  cosine with perturbed norms, h.e / ((|e| + tau1)(|h| + tau2))
//   multi_centroid    several centroids per expert, score = best cosine (seeds/003)
//   attention_vote    per-expert attention; the votes a token receives rank it (seeds/003)
//
// The token-choice routers (topk, cosine, perturbed_cosine, multi_centroid) share the top-k
// step and its auxiliary losses; only their logits differ.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "engine/random.h"
#include "models/module.h"
#include "ops/moe.h"

namespace mv::models {

struct RouterConfig {
  std::string type = "topk";
  int experts = 8;
  int k = 2;                       // token-choice routers
  float capacity_train = 1.05f;    // capacity factor c while training (V-MoE default); 0: none,
                                   // dropless (every choice kept: C = N)
  float capacity_eval = 1.5f;      // ... and in evaluation
  bool round_to_4 = false, bpr = false, renormalize = false;
  float noise_std = -1.f;          // training noise on logits; < 0 means 1/E (V-MoE) for topk
                                   // and none for the cosine family (X-MoE), 0 none
  float importance_weight = 0.005f, load_weight = 0.005f;  // V-MoE auxiliary losses (0: off)
  float ec_capacity = 2.f;         // expert_choice and attention_vote: C = N c / E
  int slots = 1;                   // soft: slots per expert
  float soft_scale = 1.f;          // soft: initial value of the learnable logit scale (method: 1)
  int proj_dim = 16;               // cosine family: projection dimension
  float tau1 = 0.1f, tau2 = 0.1f;  // perturbed_cosine
  int centroids = 2;               // multi_centroid: centroids per expert
  float separation_weight = 0.f;   // multi_centroid: centroid separation loss (0: off)
  int vote_dim = 16;               // attention_vote: query/key width
  bool global_query = false;       // attention_vote: one query projection shared by experts

  bool token_choice() const;  // topk, cosine, perturbed_cosine, multi_centroid
  void validate() const;      // throws naming the first impossible field
};
std::vector<std::string> router_types();

// What a router decided for x: (G, N, d).
struct Route {
  Tensor probs;           // (G, N, E) clean router probabilities: softmax over experts of the
                          // noise-free scores (PRC and routing metrics read them)
  ops::Assignment assign;  // packed routing, (E, G*C) buffer rows (ops/moe.h); undefined for soft
  Tensor soft_logits;      // (G, N, E*slots) soft only
  Tensor expert, slot;     // (G, N, k) token-choice routers only: choices and their rows in the
                           // expert's packed buffer (-1: dropped)
  int64_t capacity = 0;    // C (most tokens an expert takes per group; soft: slots per expert)
  Tensor aux_loss;         // scalar, the weighted sum of the router's auxiliary losses, or
                           // undefined when it has none
  Tensor importance_loss, load_loss, separation_loss;  // () unweighted, for logs, without a
                                                       // graph; undefined when not computed
};

class Router : public Module {
 public:
  explicit Router(const RouterConfig& c) : config(c) {}
  // x: (G, N, d), LayerNorm'ed tokens. g draws the training noise (only while training()).
  virtual Route route(const Tensor& x, Generator& g) = 0;
  RouterConfig config;
};

// Makes the router config.type for tokens of width dim; parameters drawn from g.
std::shared_ptr<Router> make_router(const RouterConfig& config, int64_t dim, Generator& g);

}  // namespace mv::models
