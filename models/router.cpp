// The MoE routers of router.h. Each builds its scores from differentiable ops, then hands them to
// the routing ops of ops/moe.h; every auxiliary loss is an op graph too, so it trains the router.
#include "models/router.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "autograd/autograd.h"
#include "models/layers.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/softmax.h"

namespace mv::models {

namespace {

// Xavier (Glorot) scale of a (fan_in, fan_out) matrix, as Linear uses.
float xavier(int64_t fan_in, int64_t fan_out) { return std::sqrt(2.0f / float(fan_in + fan_out)); }

// v: (..., p) -> each row scaled to unit length (the 1e-12 only guards a zero row).
Tensor unit_rows(const Tensor& v) {
  return ops::mul(v, ops::rsqrt(ops::add(ops::sum(ops::mul(v, v), {-1}, true), 1e-12f)));
}

// v: (G, E) -> () the squared coefficient of variation var/mean^2 of each row (population
// variance), averaged over the rows: V-MoE's balance measure, 0 when perfectly balanced.
Tensor cv_squared(const Tensor& v) {
  Tensor m = ops::mean(v, {1});
  return ops::mean(ops::div(ops::var(v, {1}), ops::mul(m, m)));
}

// log_scale: () -> s = min(exp(log_scale), 100) as min(a, b) = b - relu(b - a), so the gradient
// stops once the cap binds (X-MoE keeps 1/tau in a safe range the same way).
Tensor capped_scale(const Tensor& log_scale) {
  constexpr float kMax = 100.f;
  return ops::add(ops::neg(ops::relu(ops::add(ops::neg(ops::exp(log_scale)), kMax))), kMax);
}

// Adds w * term to the running aux loss (nothing when w is 0).
void add_aux(Tensor& aux, const Tensor& term, float w) {
  if (w == 0.f) return;
  Tensor t = ops::mul(term, w);
  aux = aux.defined() ? ops::add(aux, t) : t;
}

// The top-k step shared by the token-choice routers. z: (G, N, E) clean logits.
Route token_choice_step(const Tensor& z, const RouterConfig& c, float noise_std, bool training,
                        Generator& g) {
  MV_CHECK(z.ndim() == 3 && z.size(2) == c.experts, "router: logits ", z.str(), " are not (G, N, ",
           c.experts, ")");
  const bool noisy = training && noise_std > 0.f;
  Tensor zn = z;
  if (noisy) zn = ops::add(z, ops::mul(randn(z.shape(), g, z.device()), noise_std));  // drawn on z's device
  Tensor gates = ops::softmax(zn);
  ops::TopKOptions opt;
  opt.k = c.k;
  opt.capacity_factor = training ? c.capacity_train : c.capacity_eval;
  opt.round_to_4 = c.round_to_4;
  opt.bpr = c.bpr;
  opt.renormalize = c.renormalize;
  ops::TopKRouting r = ops::topk_route(gates, opt);

  Route out;
  out.probs = noisy ? ops::softmax(z) : gates;
  out.assign = r.assign;
  out.expert = r.expert;
  out.slot = r.slot;
  out.capacity = r.capacity;

  // Importance: imp[g, e] = sum_n probs[g, n, e]. Computed for the logs even when unweighted
  // (then without a graph).
  {
    std::optional<autograd::NoGrad> ng;
    if (c.importance_weight == 0.f) ng.emplace();
    Tensor l_imp = cv_squared(ops::sum(out.probs, {1}));
    out.importance_loss = l_imp.detach();
    add_aux(out.aux_loss, l_imp, c.importance_weight);
  }
  // Load: with t the token's k-th largest noisy logit, P[g, n, e] = 1 - Phi((t - z) / std) =
  // Phi((z - t) / std), the chance that z plus fresh noise would still reach t. The second form
  // avoids the cancellation of 1 - Phi near 1. t is zn at the token's k-th choice, which the
  // routing already found (no second top-k: softmax keeps the order of zn, up to ties its
  // rounding may create between logits a few ulps apart); gradients reach z directly and
  // through t.
  if (noisy) {
    std::optional<autograd::NoGrad> ng;
    if (c.load_weight == 0.f) ng.emplace();
    Tensor P = ops::topk_load_probs(z, zn, r.expert, noise_std);
    Tensor l_load = cv_squared(ops::mean(P, {1}));
    out.load_loss = l_load.detach();
    add_aux(out.aux_loss, l_load, c.load_weight);
  }
  return out;
}

void check_input(const Tensor& x, int64_t dim, const char* type) {
  MV_CHECK(x.defined() && x.ndim() == 3 && x.size(2) == dim, "router ", type, ": x ",
           x.defined() ? x.str() : std::string("undefined"), " is not (G, N, ", dim, ")");
}

// V-MoE: z = x W.
class TopKRouter : public Router {
 public:
  TopKRouter(const RouterConfig& c, int64_t dim, Generator& g) : Router(c), dim_(dim) {
    weight = register_parameter("weight", init_weight({dim, c.experts}, g, xavier(dim, c.experts)));
  }
  Route route(const Tensor& x, Generator& g) override {
    check_input(x, dim_, "topk");
    const float noise = config.noise_std < 0.f ? 1.f / float(config.experts) : config.noise_std;
    return token_choice_step(ops::matmul(x, weight), config, noise, training(), g);
  }
  Tensor weight;  // (d, E)

 private:
  int64_t dim_;
};

// The cosine family projects tokens to h = x W_p first. X-MoE trains without noise, so here a
// negative noise_std means none (an explicit positive one is still honoured). The learnable
// scale s = 1/tau starts at 1/0.07 (tau = 0.07, X-MoE's initial temperature).
class ProjectedRouter : public Router {
 public:
  ProjectedRouter(const RouterConfig& c, int64_t dim, Generator& g) : Router(c), dim_(dim) {
    proj = register_parameter("proj", init_weight({dim, c.proj_dim}, g, xavier(dim, c.proj_dim)));
  }
  Route route(const Tensor& x, Generator& g) override {
    check_input(x, dim_, config.type.c_str());
    Tensor sep;
    Tensor z = ops::mul(scores(ops::matmul(x, proj), sep), capped_scale(log_scale));
    Route out = token_choice_step(z, config, std::max(config.noise_std, 0.f), training(), g);
    if (sep.defined()) {
      out.separation_loss = sep.detach();
      add_aux(out.aux_loss, sep, config.separation_weight);
    }
    return out;
  }
  Tensor proj, log_scale;  // (d, p), ()

 protected:
  void init_scale() { log_scale = register_parameter("log_scale", Tensor::scalar(std::log(1.f / 0.07f))); }
  // h: (G, N, p) -> unscaled scores (G, N, E); may set sep, an unweighted extra loss.
  virtual Tensor scores(const Tensor& h, Tensor& sep) = 0;

 private:
  int64_t dim_;
};

// X-MoE: z = s cos(h, e_i).
// perturbed_cosine: z = s (h . e_i) / ((|e_i| + tau1)(|h| + tau2)).
class CosineRouter : public ProjectedRouter {
 public:
  CosineRouter(const RouterConfig& c, int64_t dim, Generator& g, bool perturbed)
      : ProjectedRouter(c, dim, g), perturbed_(perturbed) {
    experts = register_parameter(
        "experts", init_weight({c.experts, c.proj_dim}, g, xavier(c.experts, c.proj_dim)));
    init_scale();
  }
  Tensor experts;  // (E, p)

 protected:
  Tensor scores(const Tensor& h, Tensor&) override {
    if (!perturbed_)
      return ops::matmul(unit_rows(h), ops::transpose(unit_rows(experts), 0, 1));
    Tensor dot = ops::matmul(h, ops::transpose(experts, 0, 1));                       // (G, N, E)
    Tensor hn = ops::sqrt(ops::add(ops::sum(ops::mul(h, h), {-1}, true), 1e-12f));      // (G, N, 1)
    Tensor en = ops::sqrt(ops::add(ops::sum(ops::mul(experts, experts), {-1}), 1e-12f));  // (E,)
    return ops::div(dot, ops::mul(ops::add(en, config.tau1), ops::add(hn, config.tau2)));
  }

 private:
  bool perturbed_;
};

// seeds/003: every expert owns M centroids; z_e = s max_m cos(h, c_em).
class MultiCentroidRouter : public ProjectedRouter {
 public:
  MultiCentroidRouter(const RouterConfig& c, int64_t dim, Generator& g) : ProjectedRouter(c, dim, g) {
    centroids = register_parameter("centroids", init_weight({c.experts, c.centroids, c.proj_dim}, g,
                                                            xavier(c.experts, c.proj_dim)));
    init_scale();
  }
  Tensor centroids;  // (E, M, p)

 protected:
  Tensor scores(const Tensor& h, Tensor& sep) override {
    const int64_t E = config.experts, M = config.centroids, p = config.proj_dim;
    Tensor cn = unit_rows(centroids);  // (E, M, p)
    Tensor cos = ops::matmul(unit_rows(h), ops::transpose(ops::reshape(cn, {E * M, p}), 0, 1));
    Tensor z = ops::max(ops::reshape(cos, {h.size(0), h.size(1), E, M}), -1);
    // Separation: the mean cosine over each expert's distinct centroid pairs (i != j counts each
    // pair twice, which leaves the mean unchanged); minimising it pushes centroids apart.
    if (config.separation_weight > 0.f && M > 1) {
      Tensor gram = ops::bmm(cn, ops::transpose(cn, 1, 2));  // (E, M, M)
      std::vector<float> off(size_t(M * M), 1.f);
      for (int64_t i = 0; i < M; ++i) off[size_t(i * M + i)] = 0.f;
      Tensor mask = Tensor::from(off, {M, M}).to(gram.device());
      sep = ops::mul(ops::sum(ops::mul(gram, mask)), 1.f / float(E * M * (M - 1)));
    }
    return z;
  }
};

// Zhou et al.: S = softmax(x W) over experts; expert e takes its top-C tokens by S[:, :, e].
class ExpertChoiceRouter : public Router {
 public:
  ExpertChoiceRouter(const RouterConfig& c, int64_t dim, Generator& g) : Router(c), dim_(dim) {
    weight = register_parameter("weight", init_weight({dim, c.experts}, g, xavier(dim, c.experts)));
  }
  Route route(const Tensor& x, Generator&) override {
    check_input(x, dim_, "expert_choice");
    Route out;
    out.probs = ops::softmax(ops::matmul(x, weight));
    out.capacity = ops::topk_capacity(x.size(1), 1, config.ec_capacity, config.experts, config.round_to_4);
    out.assign = ops::expert_choice_route(out.probs, out.capacity);
    return out;
  }
  Tensor weight;  // (d, E)

 private:
  int64_t dim_;
};

// Soft MoE: soft_logits = Xn (scale Phin), both normalised over d. The learnable scale
// (init config.soft_scale, 1 in the method) multiplies the slots, the smaller of the two in
// practice (d * E * p entries against N * d per group: 8 slots against 65 tokens in
// V-MoE-S/32); either way the logits scale by it.
class SoftRouter : public Router {
 public:
  SoftRouter(const RouterConfig& c, int64_t dim, Generator& g) : Router(c), dim_(dim) {
    slots = register_parameter(
        "slots", init_weight({dim, int64_t(c.experts) * c.slots}, g, 1.f / std::sqrt(float(dim))));
    scale = register_parameter("scale", Tensor::scalar(c.soft_scale));
  }
  Route route(const Tensor& x, Generator&) override {
    check_input(x, dim_, "soft");
    const int64_t G = x.size(0), N = x.size(1), E = config.experts, p = config.slots;
    Tensor xn = ops::mul(x, ops::rsqrt(ops::add(ops::sum(ops::mul(x, x), {-1}, true), 1e-6f)));
    Tensor sn = ops::mul(slots, ops::rsqrt(ops::add(ops::sum(ops::mul(slots, slots), {0}, true), 1e-6f)));
    Route out;
    out.soft_logits = ops::matmul(xn, ops::mul(sn, scale));  // (G, N, E*p)
    out.capacity = p;
    // A token's combine weights are a softmax over all E*p slots; per expert, its p slots summed.
    out.probs = ops::sum(ops::reshape(ops::softmax(out.soft_logits), {G, N, E, p}), {-1});
    return out;
  }
  Tensor slots, scale;  // (d, E*p), ()

 private:
  int64_t dim_;
};

// seeds/003: expert e attends over the group with its own queries and keys; a token's vote is the
// attention it receives, averaged over the queries. Expert e takes its top-C tokens by vote.
class AttentionVoteRouter : public Router {
 public:
  AttentionVoteRouter(const RouterConfig& c, int64_t dim, Generator& g) : Router(c), dim_(dim) {
    const int64_t E = c.experts, a = c.vote_dim;
    const float std = xavier(dim, a);
    query = register_parameter("query", c.global_query ? init_weight({dim, a}, g, std)
                                                       : init_weight({E, dim, a}, g, std));
    key = register_parameter("key", init_weight({E, dim, a}, g, std));
  }
  Route route(const Tensor& x, Generator&) override {
    check_input(x, dim_, "attention_vote");
    const int64_t G = x.size(0), N = x.size(1), E = config.experts, a = config.vote_dim;
    // x (G, N, d) times all experts' projections at once, (d, E*a), then split per expert:
    // (G, N, E*a) -> (G, E, N, a).
    auto per_expert = [&](const Tensor& w) {
      Tensor w2 = ops::reshape(ops::permute(w, {1, 0, 2}), {dim_, E * a});
      return ops::permute(ops::reshape(ops::matmul(x, w2), {G, N, E, a}), {0, 2, 1, 3});
    };
    Tensor k = per_expert(key);
    Tensor s;  // (G*E, N queries, N keys)
    if (config.global_query) {
      // One query set for all experts: one (N, a) x (a, E*N) product per group.
      Tensor q = ops::matmul(x, query);                                           // (G, N, a)
      Tensor kt = ops::transpose(ops::reshape(k, {G, E * N, a}), 1, 2);          // (G, a, E*N)
      s = ops::reshape(ops::permute(ops::reshape(ops::bmm(q, kt), {G, N, E, N}), {0, 2, 1, 3}),
                       {G * E, N, N});
    } else {
      Tensor q = ops::reshape(per_expert(query), {G * E, N, a});
      s = ops::bmm(q, ops::transpose(ops::reshape(k, {G * E, N, a}), 1, 2));
    }
    Tensor attn = ops::softmax(ops::mul(s, 1.f / std::sqrt(float(a))));  // over keys
    Tensor votes = ops::reshape(ops::permute(ops::reshape(ops::mean(attn, {1}), {G, E, N}), {0, 2, 1}),
                                {G, N, E});
    Route out;
    out.probs = ops::div(votes, ops::sum(votes, {-1}, true));
    out.capacity = ops::topk_capacity(N, 1, config.ec_capacity, E, config.round_to_4);
    out.assign = ops::expert_choice_route(votes, out.capacity, out.probs);
    return out;
  }
  Tensor query, key;  // (E, d, a) or (d, a) with global_query; (E, d, a)

 private:
  int64_t dim_;
};

}  // namespace

std::shared_ptr<Router> make_router(const RouterConfig& c, int64_t dim, Generator& g) {
  c.validate();
  MV_CHECK(dim >= 1, "router: token width ", dim, ", expected at least 1");
  if (c.type == "topk") return std::make_shared<TopKRouter>(c, dim, g);
  if (c.type == "cosine") return std::make_shared<CosineRouter>(c, dim, g, false);
  if (c.type == "perturbed_cosine") return std::make_shared<CosineRouter>(c, dim, g, true);
  if (c.type == "multi_centroid") return std::make_shared<MultiCentroidRouter>(c, dim, g);
  if (c.type == "expert_choice") return std::make_shared<ExpertChoiceRouter>(c, dim, g);
  if (c.type == "soft") return std::make_shared<SoftRouter>(c, dim, g);
  return std::make_shared<AttentionVoteRouter>(c, dim, g);
}

}  // namespace mv::models
