#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>

#include "autograd/autograd.h"
#include "models/router.h"
#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "tests/helpers.h"

using namespace mv;
using namespace mv::models;

namespace {

// A Route's logged loss: its value, or 0 when the router did not compute it.
double value(const Tensor& loss) { return loss.defined() ? double(loss.item()) : 0.0; }

constexpr int64_t G = 2, N = 7, D = 6, E = 4;

RouterConfig small(const std::string& type) {
  RouterConfig c;
  c.type = type;
  c.experts = int(E);
  c.k = 2;
  c.proj_dim = 5;
  c.centroids = 3;
  c.vote_dim = 3;
  c.slots = 2;
  return c;
}

std::shared_ptr<Router> make(const RouterConfig& c, uint64_t seed = 1) {
  Generator g(seed);
  return make_router(c, D, g);
}

Tensor get(const Router& r, const std::string& name) {
  for (auto& [n, p] : r.named_parameters())
    if (n == name) return p;
  FAIL("router has no parameter " << name);
  return Tensor();
}

// Fixed random values of t's shape (the same for every call with the same seed).
std::vector<float> fixed(const Tensor& t, uint64_t seed) {
  Generator g(seed);
  return randn(t.shape(), g).to_vector<float>();
}

// The scalar the gradient checks differentiate: the combine weights (soft: the soft logits) and
// the probabilities against fixed random values, plus the aux loss. As a graph (for backward)
// and as a double (for finite differences).
Tensor scalar_graph(const Route& r) {
  const Tensor& w = r.assign.weight.defined() ? r.assign.weight : r.soft_logits;
  Tensor s = ops::add(ops::sum(ops::mul(w, Tensor::from(fixed(w, 11), w.shape()))),
                      ops::sum(ops::mul(r.probs, Tensor::from(fixed(r.probs, 12), r.probs.shape()))));
  return r.aux_loss.defined() ? ops::add(s, r.aux_loss) : s;
}
double scalar_value(const Route& r) {
  double s = 0;
  for (auto [t, seed] : {std::pair{r.assign.weight.defined() ? r.assign.weight : r.soft_logits, 11},
                         std::pair{r.probs, 12}}) {
    std::vector<float> v = t.to_vector<float>(), f = fixed(t, uint64_t(seed));
    for (size_t i = 0; i < v.size(); ++i) s += double(v[i]) * f[i];
  }
  return r.aux_loss.defined() ? s + r.aux_loss.item() : s;
}

// Central differences on every element of x and of each router parameter against the autograd
// gradient of the scalar above. Each route draws its noise from a fresh Generator(noise_seed), so
// training mode with noise is deterministic too. A perturbation must leave the discrete routing
// unchanged (checked): otherwise the inputs sit too close to a tie and the test is meaningless.
void check_router_grad(Router& r, uint64_t x_seed, uint64_t noise_seed = 5) {
  Tensor x = test::param({G, N, D}, x_seed);
  auto run = [&] {
    Generator g(noise_seed);
    return r.route(x, g);
  };
  std::vector<std::pair<std::string, Tensor>> ts = r.named_parameters();
  ts.insert(ts.begin(), {"x", x});
  for (auto& [n, t] : ts) t.zero_grad();
  Route base = run();
  scalar_graph(base).backward();
  auto tokens = [](const Route& rt) {
    return rt.assign.token.defined() ? rt.assign.token.to_vector<int64_t>() : std::vector<int64_t>{};
  };
  const std::vector<int64_t> base_tokens = tokens(base);
  const float eps = 1e-3f;
  for (auto& [name, t] : ts) {
    INFO("gradient of " << r.config.type << " w.r.t. " << name);
    REQUIRE(t.grad().defined());
    std::vector<float> analytic = t.grad().to_vector<float>();
    float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      autograd::NoGrad ng;
      const float o = p[i];
      p[i] = o + eps;
      Route rp = run();
      p[i] = o - eps;
      Route rm = run();
      p[i] = o;
      REQUIRE(tokens(rp) == base_tokens);
      REQUIRE(tokens(rm) == base_tokens);
      const double numeric = (scalar_value(rp) - scalar_value(rm)) / (2.0 * eps);
      const double a = analytic[size_t(i)];
      INFO("element " << i << ": backward " << a << ", finite differences " << numeric);
      CHECK(std::fabs(a - numeric) <= 2e-3 + 2e-2 * std::fabs(numeric));
    }
  }
}

void check_rows_sum_to_one(const Tensor& probs) {
  std::vector<float> p = probs.to_vector<float>();
  const int64_t e = probs.size(-1);
  for (size_t r = 0; r < p.size() / size_t(e); ++r) {
    double s = 0;
    for (int64_t j = 0; j < e; ++j) s += p[r * size_t(e) + size_t(j)];
    CHECK(s == doctest::Approx(1.0).epsilon(1e-5));
  }
}

// x (G, N, d) times w (d, m), in double.
std::vector<double> matmul_d(const std::vector<float>& x, const std::vector<float>& w, int64_t rows,
                             int64_t d, int64_t m) {
  std::vector<double> out(size_t(rows * m), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < d; ++i) out[size_t(r * m + j)] += double(x[size_t(r * d + i)]) * w[size_t(i * m + j)];
  return out;
}

// Checks that expert e holds, in rows g*C .. g*C + C - 1, exactly the C tokens of group g with
// the largest score[g, n, e] (distinct; every row used), with the given combine weights.
void check_expert_choice(const Route& r, const std::vector<double>& score, const std::vector<double>& weight) {
  const int64_t C = r.capacity, R = G * C;
  REQUIRE(r.assign.token.shape() == Shape{E, R});
  CHECK(r.assign.rows.to_vector<int64_t>() == std::vector<int64_t>(size_t(E), R));
  std::vector<int64_t> tok = r.assign.token.to_vector<int64_t>();
  std::vector<float> w = r.assign.weight.to_vector<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t g = 0; g < G; ++g) {
      std::vector<int64_t> order(N);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return score[size_t((g * N + a) * E + e)] > score[size_t((g * N + b) * E + e)];
      });
      std::set<int64_t> want(order.begin(), order.begin() + C), got;
      for (int64_t c = 0; c < C; ++c) {
        const size_t s = size_t(e * R + g * C + c);
        const int64_t n = tok[s] - g * N;  // tokens are flat, g*N + n
        REQUIRE(n >= 0);
        REQUIRE(n < N);
        got.insert(n);
        CHECK(w[s] == doctest::Approx(weight[size_t((g * N + n) * E + e)]).epsilon(1e-4));
      }
      CHECK(got.size() == size_t(C));  // exactly C distinct tokens
      CHECK(got == want);
    }
}

}  // namespace

TEST_CASE("routers: types, parameter names and shapes") {
  CHECK(router_types() == std::vector<std::string>{"topk", "expert_choice", "soft", "cosine",
                                                   "perturbed_cosine", "multi_centroid", "attention_vote"});
  std::map<std::string, std::map<std::string, Shape>> want = {
      {"topk", {{"weight", {D, E}}}},
      {"expert_choice", {{"weight", {D, E}}}},
      {"soft", {{"slots", {D, E * 2}}, {"scale", {}}}},
      {"cosine", {{"proj", {D, 5}}, {"experts", {E, 5}}, {"log_scale", {}}}},
      {"perturbed_cosine", {{"proj", {D, 5}}, {"experts", {E, 5}}, {"log_scale", {}}}},
      {"multi_centroid", {{"proj", {D, 5}}, {"centroids", {E, 3, 5}}, {"log_scale", {}}}},
      {"attention_vote", {{"query", {E, D, 3}}, {"key", {E, D, 3}}}},
  };
  for (const std::string& type : router_types()) {
    INFO(type);
    std::map<std::string, Shape> got;
    for (auto& [n, p] : make(small(type))->named_parameters()) got[n] = p.shape();
    CHECK(got == want.at(type));
    CHECK(small(type).token_choice() == (type == "topk" || type == "cosine" ||
                                          type == "perturbed_cosine" || type == "multi_centroid"));
  }
  RouterConfig c = small("attention_vote");
  c.global_query = true;
  CHECK(get(*make(c), "query").shape() == Shape{D, 3});
  // X-MoE's initial temperature 0.07; Soft MoE's scale 1.
  CHECK(get(*make(small("cosine")), "log_scale").item() == doctest::Approx(std::log(1 / 0.07)));
  CHECK(get(*make(small("soft")), "scale").item() == 1.f);
}

TEST_CASE("routers: end-to-end gradients, eval mode") {
  for (const std::string& type : router_types()) {
    RouterConfig c = small(type);
    c.importance_weight = 1.f;  // make the aux loss weigh in the checked scalar
    auto r = make(c, 2);
    r->train(false);
    check_router_grad(*r, 3);
  }
  RouterConfig c = small("attention_vote");
  c.global_query = true;
  auto r = make(c, 2);
  r->train(false);
  check_router_grad(*r, 3);
}

TEST_CASE("routers: end-to-end gradients in training, noise and all aux losses on") {
  for (const char* type : {"topk", "cosine", "perturbed_cosine", "multi_centroid"}) {
    RouterConfig c = small(type);
    c.importance_weight = 1.f;
    c.load_weight = 1.f;
    c.separation_weight = 1.f;
    c.noise_std = 0.3f;
    c.capacity_train = 0.75f;  // C = 3 of 7*2/4 = 3.5 choices per expert: some are dropped
    auto r = make(c, 4);
    check_router_grad(*r, 6);
    Generator g(5);
    Route rt = r->route(test::param({G, N, D}, 6), g);
    CHECK(value(rt.load_loss) > 0);
    CHECK(value(rt.importance_loss) > 0);
    CHECK((value(rt.separation_loss) != 0) == (std::string(type) == "multi_centroid"));
    const std::vector<int64_t> slots = rt.slot.to_vector<int64_t>();
    CHECK(std::count(slots.begin(), slots.end(), -1) > 0);
  }
}

TEST_CASE("token-choice routers: packed buffers, rows[e] = the kept choices of expert e") {
  for (const char* type : {"topk", "cosine", "perturbed_cosine", "multi_centroid"}) {
    INFO(type);
    RouterConfig c = small(type);
    c.noise_std = 0.3f;
    c.capacity_train = 0.75f;  // C = 3 of 3.5 choices per expert and group: some dropped
    auto r = make(c, 26);
    Generator g(27);
    Route rt = r->route(test::param({G, N, D}, 28), g);
    const int64_t C = rt.capacity, R = G * C;
    REQUIRE(C == 3);
    REQUIRE(rt.assign.token.shape() == Shape{E, R});
    const auto ex = rt.expert.to_vector<int64_t>(), sl = rt.slot.to_vector<int64_t>();
    const auto tok = rt.assign.token.to_vector<int64_t>(), rows = rt.assign.rows.to_vector<int64_t>();
    const auto w = rt.assign.weight.to_vector<float>();
    std::vector<int64_t> kept(size_t(E), 0);
    int64_t dropped = 0;
    for (int64_t t = 0; t < G * N; ++t)
      for (int64_t j = 0; j < c.k; ++j) {
        const int64_t e = ex[size_t(t * c.k + j)], s = sl[size_t(t * c.k + j)];
        if (s < 0) {
          ++dropped;
          continue;
        }
        ++kept[size_t(e)];
        REQUIRE(s < rows[size_t(e)]);
        CHECK(tok[size_t(e * R + s)] == t);
      }
    CHECK(dropped > 0);
    for (int64_t e = 0; e < E; ++e) {
      CHECK(rows[size_t(e)] == kept[size_t(e)]);
      for (int64_t q = rows[size_t(e)]; q < R; ++q) {  // unused rows: no token, no weight
        CHECK(tok[size_t(e * R + q)] == -1);
        CHECK(w[size_t(e * R + q)] == 0.f);
      }
    }
  }
}

TEST_CASE("topk: clean probabilities, reproducible noise") {
  RouterConfig c = small("topk");
  c.noise_std = 1.f;
  Tensor x = test::param({G, N, D}, 7);
  auto a = make(c, 3), b = make(c, 3);
  Generator ga(9), gb(9);
  Route ra = a->route(x, ga), rb = b->route(x, gb);
  CHECK(ga.offset > 0);  // the noise was drawn from g
  check_rows_sum_to_one(ra.probs);
  CHECK(ra.expert.shape() == Shape{G, N, 2});
  CHECK(ra.expert.to_vector<int64_t>() == rb.expert.to_vector<int64_t>());
  CHECK(ra.slot.to_vector<int64_t>() == rb.slot.to_vector<int64_t>());
  CHECK(ra.assign.token.to_vector<int64_t>() == rb.assign.token.to_vector<int64_t>());
  // Without noise the choices differ; the clean probabilities do not.
  c.noise_std = 0.f;
  auto quiet = make(c, 3);
  Generator gq(9);
  Route rq = quiet->route(x, gq);
  CHECK(gq.offset == 0);
  CHECK(rq.expert.to_vector<int64_t>() != ra.expert.to_vector<int64_t>());
  test::check_close(ra.probs, rq.probs.to_vector<float>(), 1e-6f);
  CHECK(value(rq.load_loss) == 0);  // no noise, no load loss
  // Evaluation draws no noise either, and uses the evaluation capacity.
  a->train(false);
  Generator ge(9);
  Route re = a->route(x, ge);
  CHECK(ge.offset == 0);
  CHECK(re.expert.to_vector<int64_t>() == rq.expert.to_vector<int64_t>());
  CHECK(re.capacity == 6);  // ceil(7 * 2 * 1.5 / 4)
  CHECK(rq.capacity == 4);  // ceil(7 * 2 * 1.05 / 4)
}

TEST_CASE("topk: importance and load losses against a double-precision reference") {
  RouterConfig c = small("topk");
  c.k = 2;
  c.noise_std = 0.5f;
  c.importance_weight = 0.3f;
  c.load_weight = 0.7f;
  auto r = make(c, 8);
  Tensor x = test::param({G, N, D}, 9);
  Generator g(21);
  Route rt = r->route(x, g);
  // Reference: the same noise draw, randn((G, N, E)) from a fresh Generator(21).
  Generator g2(21);
  std::vector<float> noise = randn({G, N, E}, g2).to_vector<float>();
  std::vector<double> z = matmul_d(x.to_vector<float>(), get(*r, "weight").to_vector<float>(), G * N, D, E);
  auto cv2 = [](const std::vector<double>& v) {
    double m = 0, s = 0;
    for (double a : v) m += a / double(v.size());
    for (double a : v) s += (a - m) * (a - m) / double(v.size());
    return s / (m * m);
  };
  double imp_loss = 0, load_loss = 0;
  std::vector<int64_t> first = rt.expert.to_vector<int64_t>();
  for (int64_t gi = 0; gi < G; ++gi) {
    std::vector<double> imp(E, 0.0), load(E, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const double* zr = &z[size_t((gi * N + n) * E)];
      double mx = *std::max_element(zr, zr + E), den = 0;
      for (int64_t e = 0; e < E; ++e) den += std::exp(zr[e] - mx);
      std::vector<double> noisy(E);
      for (int64_t e = 0; e < E; ++e) {
        imp[size_t(e)] += std::exp(zr[e] - mx) / den;
        noisy[size_t(e)] = zr[e] + 0.5 * noise[size_t((gi * N + n) * E + e)];
      }
      std::vector<double> sorted = noisy;
      std::sort(sorted.rbegin(), sorted.rend());
      const double t = sorted[1];  // the k-th (2nd) largest noisy logit
      for (int64_t e = 0; e < E; ++e)
        load[size_t(e)] += (1 - 0.5 * std::erfc(-((t - zr[e]) / 0.5) / std::sqrt(2.0))) / double(N);
      // The first choice is the largest noisy logit: the noise really was applied this way.
      CHECK(first[size_t((gi * N + n) * 2)] ==
            std::max_element(noisy.begin(), noisy.end()) - noisy.begin());
    }
    imp_loss += cv2(imp) / double(G);
    load_loss += cv2(load) / double(G);
  }
  CHECK(value(rt.importance_loss) == doctest::Approx(imp_loss).epsilon(1e-4));
  CHECK(value(rt.load_loss) == doctest::Approx(load_loss).epsilon(1e-4));
  REQUIRE(rt.aux_loss.defined());
  CHECK(rt.aux_loss.item() == doctest::Approx(0.3 * imp_loss + 0.7 * load_loss).epsilon(1e-4));
  // Weights 0: no aux loss at all, the unweighted values are still reported.
  c.importance_weight = c.load_weight = 0.f;
  Generator g3(21);
  Route r0 = make(c, 8)->route(x, g3);
  CHECK_FALSE(r0.aux_loss.defined());
  CHECK(value(r0.importance_loss) == doctest::Approx(imp_loss).epsilon(1e-4));
  CHECK(value(r0.load_loss) == doctest::Approx(load_loss).epsilon(1e-4));
}

TEST_CASE("expert_choice: each expert takes exactly its top-C tokens by softmax score") {
  RouterConfig c = small("expert_choice");
  c.ec_capacity = 2.f;
  auto r = make(c, 10);
  Tensor x = test::param({G, N, D}, 11);
  Generator g(0);
  Route rt = r->route(x, g);
  CHECK(rt.capacity == 4);  // ceil(7 * 2 / 4)
  CHECK_FALSE(rt.aux_loss.defined());
  CHECK_FALSE(rt.expert.defined());
  std::vector<double> s = matmul_d(x.to_vector<float>(), get(*r, "weight").to_vector<float>(), G * N, D, E);
  for (int64_t t = 0; t < G * N; ++t) {
    double mx = *std::max_element(&s[size_t(t * E)], &s[size_t(t * E + E)]), den = 0;
    for (int64_t e = 0; e < E; ++e) den += std::exp(s[size_t(t * E + e)] - mx);
    for (int64_t e = 0; e < E; ++e) s[size_t(t * E + e)] = std::exp(s[size_t(t * E + e)] - mx) / den;
  }
  std::vector<float> probs(s.begin(), s.end());
  test::check_close(rt.probs, probs, 1e-6f, 1e-5f);
  check_expert_choice(rt, s, s);
}

TEST_CASE("attention_vote: votes against a reference, each expert takes exactly C tokens") {
  for (bool global : {false, true}) {
    INFO("global_query " << global);
    RouterConfig c = small("attention_vote");
    c.global_query = global;
    c.ec_capacity = 1.5f;
    auto r = make(c, 12);
    Tensor x = test::param({G, N, D}, 13);
    Generator g(0);
    Route rt = r->route(x, g);
    CHECK(rt.capacity == 3);  // ceil(7 * 1.5 / 4)
    const int64_t a = 3;
    std::vector<float> xv = x.to_vector<float>(), wq = get(*r, "query").to_vector<float>(),
                       wk = get(*r, "key").to_vector<float>();
    std::vector<double> votes(size_t(G * N * E), 0.0);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> qe(wq.begin() + (global ? 0 : e * D * a), wq.begin() + (global ? 0 : e * D * a) + D * a);
      std::vector<float> ke(wk.begin() + e * D * a, wk.begin() + (e + 1) * D * a);
      std::vector<double> q = matmul_d(xv, qe, G * N, D, a), k = matmul_d(xv, ke, G * N, D, a);
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t m = 0; m < N; ++m) {
          std::vector<double> s(N);
          for (int64_t n = 0; n < N; ++n) {
            for (int64_t j = 0; j < a; ++j) s[size_t(n)] += q[size_t((gi * N + m) * a + j)] * k[size_t((gi * N + n) * a + j)];
            s[size_t(n)] /= std::sqrt(double(a));
          }
          const double mx = *std::max_element(s.begin(), s.end());
          double den = 0;
          for (double v : s) den += std::exp(v - mx);
          for (int64_t n = 0; n < N; ++n) votes[size_t((gi * N + n) * E + e)] += std::exp(s[size_t(n)] - mx) / den / double(N);
        }
    }
    std::vector<double> probs(votes.size());
    for (int64_t t = 0; t < G * N; ++t) {
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += votes[size_t(t * E + e)];
      for (int64_t e = 0; e < E; ++e) probs[size_t(t * E + e)] = votes[size_t(t * E + e)] / sum;
    }
    test::check_close(rt.probs, std::vector<float>(probs.begin(), probs.end()), 1e-6f, 1e-5f);
    check_rows_sum_to_one(rt.probs);
    check_expert_choice(rt, votes, probs);
  }
}

TEST_CASE("soft: logits of normalised tokens and slots times the scale; probs per expert") {
  RouterConfig c = small("soft");  // 2 slots per expert
  c.soft_scale = 4.f;  // the initial scale, 1 in the method (checked with the other inits)
  auto r = make(c, 14);
  CHECK(get(*r, "scale").item() == 4.f);
  get(*r, "scale").fill_(-2.5f);  // the scale multiplies the logits, sign included
  Tensor x = test::param({G, N, D}, 15);
  Generator g(0);
  Route rt = r->route(x, g);
  CHECK(rt.capacity == 2);
  CHECK_FALSE(rt.assign.token.defined());
  REQUIRE(rt.soft_logits.shape() == Shape{G, N, E * 2});
  std::vector<float> xv = x.to_vector<float>(), sv = get(*r, "slots").to_vector<float>();
  const int64_t S = E * 2;
  std::vector<float> want;
  std::vector<float> probs;
  for (int64_t t = 0; t < G * N; ++t) {
    double xn = 1e-6;
    for (int64_t i = 0; i < D; ++i) xn += double(xv[size_t(t * D + i)]) * xv[size_t(t * D + i)];
    std::vector<double> l(S);
    for (int64_t s = 0; s < S; ++s) {
      double sn = 1e-6, dot = 0;
      for (int64_t i = 0; i < D; ++i) {
        sn += double(sv[size_t(i * S + s)]) * sv[size_t(i * S + s)];
        dot += double(xv[size_t(t * D + i)]) * sv[size_t(i * S + s)];
      }
      l[size_t(s)] = -2.5 * dot / std::sqrt(xn * sn);
      want.push_back(float(l[size_t(s)]));
    }
    const double mx = *std::max_element(l.begin(), l.end());
    double den = 0;
    for (double v : l) den += std::exp(v - mx);
    for (int64_t e = 0; e < E; ++e)
      probs.push_back(float((std::exp(l[size_t(2 * e)] - mx) + std::exp(l[size_t(2 * e + 1)] - mx)) / den));
  }
  test::check_close(rt.soft_logits, want, 1e-5f, 1e-5f);
  test::check_close(rt.probs, probs, 1e-6f, 1e-5f);
  check_rows_sum_to_one(rt.probs);
  // The soft logits are linear in the scale.
  get(*r, "scale").fill_(1.f);
  std::vector<float> unit = r->route(x, g).soft_logits.to_vector<float>();
  for (float& v : want) v /= -2.5f;
  test::check_close(Tensor::from(unit, {G, N, E * 2}), want, 1e-5f, 1e-5f);
}

TEST_CASE("perturbed_cosine with tau1 = tau2 = 0 is the cosine router") {
  RouterConfig c = small("cosine"), pc = small("perturbed_cosine");
  pc.tau1 = pc.tau2 = 0.f;
  auto cos = make(c, 16), pert = make(pc, 17);
  for (const char* name : {"proj", "experts", "log_scale"}) get(*pert, name).copy_(get(*cos, name).detach());
  Tensor x = test::param({G, N, D}, 18);
  Generator g(0);
  Route a = cos->route(x, g), b = pert->route(x, g);
  test::check_close(b.probs, a.probs.to_vector<float>(), 1e-5f, 1e-4f);
  CHECK(a.expert.to_vector<int64_t>() == b.expert.to_vector<int64_t>());
  test::check_close(b.assign.weight, a.assign.weight.to_vector<float>(), 1e-5f, 1e-4f);
  // ... and with the default tau = 0.1 it is not.
  auto pert01 = make(small("perturbed_cosine"), 17);
  for (const char* name : {"proj", "experts", "log_scale"}) get(*pert01, name).copy_(get(*cos, name).detach());
  std::vector<float> p01 = pert01->route(x, g).probs.to_vector<float>(), pa = a.probs.to_vector<float>();
  double diff = 0;
  for (size_t i = 0; i < pa.size(); ++i) diff = std::max(diff, double(std::fabs(p01[i] - pa[i])));
  CHECK(diff > 1e-3);
}

TEST_CASE("multi_centroid with one centroid is the cosine router") {
  RouterConfig c = small("cosine"), mc = small("multi_centroid");
  mc.centroids = 1;
  mc.separation_weight = 1.f;  // no pairs with one centroid: no separation loss
  auto cos = make(c, 19), multi = make(mc, 20);
  get(*multi, "proj").copy_(get(*cos, "proj").detach());
  get(*multi, "log_scale").copy_(get(*cos, "log_scale").detach());
  get(*multi, "centroids").copy_(Tensor::from(get(*cos, "experts").to_vector<float>(), {E, 1, 5}));
  Tensor x = test::param({G, N, D}, 21);
  Generator g(0);
  Route a = cos->route(x, g), b = multi->route(x, g);
  test::check_close(b.probs, a.probs.to_vector<float>(), 1e-6f, 1e-5f);
  CHECK(a.expert.to_vector<int64_t>() == b.expert.to_vector<int64_t>());
  test::check_close(b.assign.weight, a.assign.weight.to_vector<float>(), 1e-6f, 1e-5f);
  CHECK(value(b.separation_loss) == 0);
}

TEST_CASE("multi_centroid: the separation loss is the mean cosine of an expert's centroid pairs") {
  RouterConfig c = small("multi_centroid");  // 3 centroids: 3 pairs per expert
  c.separation_weight = 0.5f;
  c.importance_weight = 0.f;
  auto r = make(c, 22);
  r->train(false);
  Generator g(0);
  Route rt = r->route(test::param({G, N, D}, 23), g);
  std::vector<float> cv = get(*r, "centroids").to_vector<float>();
  const int64_t M = 3, p = 5;
  double want = 0;
  auto at = [&](int64_t e, int64_t m, int64_t j) { return double(cv[size_t((e * M + m) * p + j)]); };
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = i + 1; j < M; ++j) {
        double dot = 0, ni = 0, nj = 0;
        for (int64_t t = 0; t < p; ++t) {
          dot += at(e, i, t) * at(e, j, t);
          ni += at(e, i, t) * at(e, i, t);
          nj += at(e, j, t) * at(e, j, t);
        }
        want += dot / std::sqrt(ni * nj) / double(E * 3);
      }
  CHECK(value(rt.separation_loss) == doctest::Approx(want).epsilon(1e-5));
  REQUIRE(rt.aux_loss.defined());
  CHECK(rt.aux_loss.item() == doctest::Approx(0.5 * want).epsilon(1e-5));
}

TEST_CASE("cosine family: no noise by default, the scale is capped at 100") {
  RouterConfig c = small("cosine");  // noise_std = -1: none for the cosine family
  auto r = make(c, 24);
  Tensor x = test::param({G, N, D}, 25);
  Generator g(3);
  Route train = r->route(x, g);
  CHECK(g.offset == 0);
  CHECK(value(train.load_loss) == 0);
  // Above the cap, exp(log_scale) no longer matters and log_scale gets no gradient.
  Tensor ls = get(*r, "log_scale");
  ls.fill_(std::log(1000.f));
  Route a = r->route(x, g);
  ls.fill_(std::log(500.f));
  Route b = r->route(x, g);
  test::check_close(a.probs, b.probs.to_vector<float>(), 0, 0);
  ls.zero_grad();
  ops::sum(ops::mul(b.probs, Tensor::from(fixed(b.probs, 3), b.probs.shape()))).backward();
  REQUIRE(ls.grad().defined());
  CHECK(ls.grad().item() == 0.f);
  ls.fill_(std::log(100.f) - 0.1f);  // just below: the scale is live
  Route c2 = r->route(x, g);
  std::vector<float> pa = a.probs.to_vector<float>(), pc = c2.probs.to_vector<float>();
  CHECK(pa != pc);
}

TEST_CASE("routers: impossible configs fail naming the field") {
  RouterConfig c = small("topk");
  c.k = 3;
  c.experts = 2;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: k (--k) = 3 is larger than experts = 2"), Error);
  Generator g(0);
  CHECK_THROWS_WITH_AS(make_router(c, D, g), doctest::Contains("k (--k) = 3 is larger than experts = 2"), Error);
  c = small("expert_choice");
  c.k = 9;  // k does not matter to expert choice
  CHECK_NOTHROW(c.validate());
  c = small("topk");
  c.k = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: k (--k) = 0"), Error);
  c = small("topk");
  c.capacity_train = -0.5f;  // (0 is dropless)
  CHECK_THROWS_WITH_AS(make_router(c, D, g), doctest::Contains("router: capacity_train (--capacity) = -0.5"), Error);
  c = small("topk");
  c.capacity_eval = -1.f;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: capacity_eval (--eval-capacity) = -1"), Error);
  c = small("expert_choice");
  c.ec_capacity = 0.f;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: ec_capacity (--ec-capacity) = 0"), Error);
  c = small("soft");
  c.slots = 0;
  CHECK_THROWS_WITH_AS(make_router(c, D, g), doctest::Contains("router: slots (--slots) = 0"), Error);
  c = small("soft");
  c.soft_scale = 0.f;
  CHECK_THROWS_WITH_AS(make_router(c, D, g), doctest::Contains("router: soft_scale (--soft-scale) = 0"), Error);
  c = small("soft");
  c.experts = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: experts (--experts) = 0"), Error);
  c = small("cosine");
  c.proj_dim = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: proj_dim (--proj-dim) = 0"), Error);
  c = small("multi_centroid");
  c.centroids = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: centroids (--centroids) = 0"), Error);
  c = small("attention_vote");
  c.vote_dim = 0;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: vote_dim (--vote-dim) = 0"), Error);
  c = small("perturbed_cosine");
  c.tau2 = -0.5f;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("router: tau2 = -0.5"), Error);
  c = small("topk_choice");
  CHECK_THROWS_WITH_AS(make_router(c, D, g),
                       doctest::Contains("router: unknown type 'topk_choice' (known: topk, expert_choice, "
                                         "soft, cosine, perturbed_cosine, multi_centroid, attention_vote)"),
                       Error);
  // A token width that does not match the router's fails clearly.
  auto r = make(small("topk"));
  CHECK_THROWS_WITH_AS(r->route(Tensor::zeros({G, N, D + 1}), g), doctest::Contains("is not (G, N, 6)"), Error);
}
