#include "models/moe.h"

#include <cmath>

#include "ops/elementwise.h"
#include "ops/shape.h"

namespace mv::models {

void MoEStats::reset(int experts) { *this = MoEStats{}, load.assign(size_t(experts), 0); }

MoELayer::MoELayer(int64_t dim, const MoEConfig& c, Generator& init, Generator* noise)
    : config(c), noise_(noise) {
  MV_CHECK(c.mlp_dim > 0, "MoE layer: expert hidden width ", c.mlp_dim, " must be positive");
  router = register_module("router", make_router(c.router, dim, init));
  const int64_t E = c.router.experts, H = c.mlp_dim;
  // Each expert is initialised as a dense Linear of the same shape would be (Xavier scale).
  w1 = register_parameter("w1", init_weight({E, dim, H}, init, std::sqrt(2.f / float(dim + H))));
  b1 = register_parameter("b1", Tensor::zeros({E, H}));
  w2 = register_parameter("w2", init_weight({E, H, dim}, init, std::sqrt(2.f / float(dim + H))));
  b2 = register_parameter("b2", Tensor::zeros({E, dim}));
  stats.reset(c.router.experts);
}

Tensor MoELayer::forward(const Tensor& x) {
  MV_CHECK(x.ndim() == 3, "MoE layer: input ", x.str(), " must be (B, T, D)");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), E = config.router.experts;
  const int64_t G = config.group_per_batch ? 1 : B, N = B * T / G;
  const Tensor xg = ops::reshape(x, {G, N, D});
  router->train(training());
  last = router->route(xg, *noise_);
  const bool soft = config.router.type == "soft";
  const int64_t C = last.capacity;

  // (E, G, C, D) buffers -> (E, G*C, D): one batched matmul per expert layer for all groups.
  Tensor buf = soft ? ops::soft_dispatch(xg, last.soft_logits, E) : ops::dispatch(xg, last.assign);
  Tensor h = ops::gelu(ops::expert_matmul(ops::reshape(buf, {E, G * C, D}), w1, b1));
  Tensor y = ops::reshape(ops::expert_matmul(h, w2, b2), {E, G, C, D});
  Tensor out = soft ? ops::soft_combine(y, last.soft_logits) : ops::combine(y, last.assign, N);

  // Statistics: buffer fill per expert and what routing left out.
  ++stats.forwards;
  stats.importance_loss += last.importance_loss;
  stats.load_loss += last.load_loss;
  stats.separation_loss += last.separation_loss;
  if (soft) {
    for (auto& l : stats.load) l += G * C;
    stats.choices += G * N;
  } else {
    const bool token_choice = last.expert.defined();
    const Tensor tok = last.assign.token.to(Device::CPU);
    const int64_t* t = tok.data<int64_t>();
    std::vector<char> taken(token_choice ? 0 : size_t(G * N), 0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < G * C; ++i)
        if (int64_t n = t[e * G * C + i]; n >= 0) {
          ++stats.load[size_t(e)];
          if (!token_choice) taken[size_t(i / C * N + n)] = 1;
        }
    if (token_choice) {  // token choice: every (token, choice) that lost its slot
      const Tensor slot = last.slot.to(Device::CPU);
      const int64_t* s = slot.data<int64_t>();
      for (int64_t i = 0; i < slot.numel(); ++i) stats.dropped += s[i] < 0;
      stats.choices += slot.numel();
    } else {  // expert choice: tokens that no expert took
      for (char c : taken) stats.dropped += !c;
      stats.choices += G * N;
    }
  }
  return ops::reshape(out, {B, T, D});
}

}  // namespace mv::models
