#include "models/moe.h"

#include <algorithm>
#include <cmath>

#include "dist/experts.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/shape.h"

namespace mv::models {

void MoEStats::reset(int e, bool tc) {
  *this = MoEStats{};
  experts = e, token_choice = tc;
  load.assign(size_t(e), 0);
}

// Adds each tensor's (E,) values to sum; returns their total.
static int64_t add_up(const std::vector<Tensor>& rows, std::vector<int64_t>& sum) {
  int64_t total = 0;
  for (const Tensor& r : rows) {
    const std::vector<int64_t> v = r.to_vector<int64_t>();
    for (size_t e = 0; e < v.size(); ++e) sum[e] += v[e], total += v[e];
  }
  return total;
}

void MoEStats::add_rows(const Tensor& r) {
  rows.push_back(r);
  if (rows.size() < kRowsHeld) return;
  kept += add_up(rows, load);
  rows.clear();
}

// Adds a forward's loss (undefined: not computed) to a running sum, both () on one device.
static void accumulate(Tensor& sum, const Tensor& loss) {
  if (loss.defined()) sum = sum.defined() ? add_same_shape(sum, loss) : loss;
}

MoEStats::Totals MoEStats::totals() const {
  Totals t;
  t.load = load;
  for (int64_t& l : t.load) l += soft_load;
  const int64_t all_kept = kept + add_up(rows, t.load);
  t.choices = choices;
  // Token choice: a kept choice fills exactly one row, so the rest were dropped.
  t.dropped = token_choice ? choices - all_kept : untaken;
  const double f = double(std::max<int64_t>(forwards, 1));
  auto mean = [f](const Tensor& s) { return s.defined() ? double(s.item()) / f : 0.0; };
  t.importance_loss = mean(importance_loss), t.load_loss = mean(load_loss);
  t.separation_loss = mean(separation_loss);
  t.forwards = forwards;
  return t;
}

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
  stats.reset(c.router.experts, c.router.token_choice());
}

void MoELayer::split_experts(int rank, int ranks) {
  const int E = config.router.experts;
  MV_CHECK(config.router.type != "soft", "--expert-parallel: the Soft MoE router mixes every "
           "token into every expert's slots, which expert parallelism does not split; use a "
           "token-routed router (topk, expert_choice, the cosine family, attention_vote)");
  MV_CHECK(ranks >= 1 && E % ranks == 0, "--expert-parallel ", ranks, ": the ", E, " experts "
           "of an MoE layer do not split evenly over ", ranks, " ranks");
  MV_CHECK(expert_ranks_ == 1, "MoE layer: experts already split");
  const int64_t El = E / ranks, lo = El * rank;
  auto own = [&](const char* name, Tensor& t) {
    t = replace_parameter(name, ops::slice(t.detach(), 0, lo, lo + El).clone());
  };
  own("w1", w1), own("b1", b1), own("w2", w2), own("b2", b2);
  expert_ranks_ = ranks;
}

void MoELayer::hold_all_experts(bool on) {
  if (on) {
    if (expert_ranks_ == 1) return;
    own_ = {w1, b1, w2, b2, expert_ranks_};
    w1 = dist::gather_experts(w1.detach()), b1 = dist::gather_experts(b1.detach());
    w2 = dist::gather_experts(w2.detach()), b2 = dist::gather_experts(b2.detach());
    expert_ranks_ = 1;
  } else if (own_.ranks > 1) {
    w1 = own_.w1, b1 = own_.b1, w2 = own_.w2, b2 = own_.b2;
    expert_ranks_ = own_.ranks;
    own_ = {};
  }
}

// x: (B, T, D) -> (G, N, D), one group per image or the whole batch as one.
static Tensor groups(const Tensor& x, const MoEConfig& c) {
  MV_CHECK(x.ndim() == 3, "MoE layer: input ", x.str(), " must be (B, T, D)");
  const int64_t B = x.size(0), G = c.group_per_batch ? 1 : B;
  return ops::reshape(x, {G, B * x.size(1) / G, x.size(2)});
}

Tensor MoELayer::router_probs(const Tensor& x) {
  router->train(training());
  const ops::Fp32Products fp32;  // routing in float32, as V-MoE
  return router->route(groups(x, config), *noise_).probs;
}

Tensor MoELayer::forward(const Tensor& x) {
  const Tensor xg = groups(x, config);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), E = config.router.experts;
  const int64_t G = xg.size(0), N = xg.size(1);
  router->train(training());
  {
    const ops::Fp32Products fp32;  // routing in float32, as V-MoE
    last = router->route(xg, *noise_);
  }
  const bool soft = config.router.type == "soft";
  const int64_t C = last.capacity;

  // Buffers (E, G*C, D): one batched matmul per expert layer runs all experts on all groups.
  // Token routings are packed (ops/moe.h): only the rows in use are multiplied, and moe_mlp
  // gathers them from the tokens itself (dispatch, experts and combine in one op).
  Tensor out;
  if (soft) {
    Tensor buf = ops::reshape(ops::soft_dispatch(xg, last.soft_logits, E), {E, G * C, D});
    Tensor y = ops::reshape(ops::expert_mlp(buf, w1, b1, w2, b2), {E, G, C, D});
    out = ops::soft_combine(y, last.soft_logits);
  } else if (expert_ranks_ > 1) {
    const dist::AtExperts at = dist::send_to_experts(ops::dispatch(xg, last.assign), last.assign.rows);
    const Tensor y = ops::expert_mlp(at.buf, w1, b1, w2, b2, at.rows);
    out = ops::combine(dist::return_to_tokens(y, at.route), last.assign);
  } else {
    out = ops::moe_mlp(xg, last.assign, w1, b1, w2, b2);
  }

  // Statistics: filed as they are, read by MoEStats::totals().
  ++stats.forwards;
  accumulate(stats.importance_loss, last.importance_loss);
  accumulate(stats.load_loss, last.load_loss);
  accumulate(stats.separation_loss, last.separation_loss);
  if (soft) {
    stats.soft_load += G * C;
    stats.choices += G * N;
  } else if (last.expert.defined()) {  // token choice
    stats.add_rows(last.assign.rows);
    stats.choices += last.expert.numel();
  } else {  // expert choice and attention vote: tokens that no expert took (read on the host)
    stats.add_rows(last.assign.rows);
    const Tensor tr = last.assign.token_rows.to(Device::CPU).contiguous();
    const int64_t* p = tr.data<int64_t>();
    const int64_t K = tr.size(2);
    for (int64_t t = 0; t < G * N; ++t)
      stats.untaken += std::all_of(p + t * K, p + (t + 1) * K, [](int64_t r) { return r < 0; });
    stats.choices += G * N;
  }
  return ops::reshape(out, {B, T, D});
}

}  // namespace mv::models
