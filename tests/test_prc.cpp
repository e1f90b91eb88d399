#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/prc.h"
#include "ops/softmax.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;

namespace {

// Router-like probabilities: softmax of N(0, scale^2) logits, a leaf that requires grad.
Tensor probs(const Shape& shape, uint64_t seed, float scale = 1.5f) {
  Generator g(seed);
  Tensor z = randn(shape, g);
  float* pz = z.data<float>();
  for (int64_t i = 0; i < z.numel(); ++i) pz[i] *= scale;
  return ops::softmax(z).detach().set_requires_grad(true);
}

// Naive double C = (E / M) sum over valid pairs of p_n q_n^T, and M.
std::vector<double> naive_c(const Tensor& p, const Tensor& q, const Tensor& pairs, int64_t& M) {
  const int64_t B = p.size(0), T = p.size(1), E = p.size(2);
  std::vector<float> vp = p.to_vector<float>(), vq = q.to_vector<float>();
  std::vector<int64_t> pr = pairs.to_vector<int64_t>();
  std::vector<double> C(size_t(E * E), 0.0);
  M = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = pr[size_t(b * T + t)];
      if (s < 0) continue;
      ++M;
      for (int64_t i = 0; i < E; ++i)
        for (int64_t j = 0; j < E; ++j)
          C[size_t(i * E + j)] += double(vp[size_t((b * T + t) * E + i)]) * vq[size_t((b * T + s) * E + j)];
    }
  for (double& c : C) c = M ? c * double(E) / double(M) : 0.0;
  return C;
}

// Naive {L_diag, L_off}; the reference diagonal D[t,e] = (E / M) sum_b p[b,t,e] q[b,pairs[b,t],e],
// mean over all T x E cells.
std::pair<double, double> naive_terms(const Tensor& p, const Tensor& q, const Tensor& pairs,
                                      bool reference) {
  const int64_t B = p.size(0), T = p.size(1), E = p.size(2);
  int64_t M;
  std::vector<double> C = naive_c(p, q, pairs, M);
  if (M == 0) return {0.0, 0.0};
  double off = 0, diag = 0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j)
      if (i != j) off += C[size_t(i * E + j)] * C[size_t(i * E + j)];
  off /= double(E * (E - 1));
  if (!reference) {
    for (int64_t i = 0; i < E; ++i) diag += std::pow(C[size_t(i * E + i)] - 1, 2);
    return {diag / double(E), off};
  }
  std::vector<float> vp = p.to_vector<float>(), vq = q.to_vector<float>();
  std::vector<int64_t> pr = pairs.to_vector<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double d = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t s = pr[size_t(b * T + t)];
        if (s >= 0) d += double(vp[size_t((b * T + t) * E + e)]) * vq[size_t((b * T + s) * E + e)];
      }
      d *= double(E) / double(M);
      diag += (d - 1) * (d - 1);
    }
  return {diag / double(T * E), off};
}

// B = 2 images, T = 5 tokens, E = 4. View-1 token t < 4 pairs with view-2 token 3 - t (a
// reversal, so an index mix-up shows); token 4 is unpaired and holds junk probabilities that
// must not count. p_row(b, t) and q_row(b, t) give the rows of the view-1 token t and of its
// partner.
struct Case {
  Tensor p, q, pairs;
};
Case sanity_case(const std::function<std::vector<float>(int64_t, int64_t)>& p_row,
                 const std::function<std::vector<float>(int64_t, int64_t)>& q_row) {
  const int64_t B = 2, T = 5, E = 4;
  std::vector<float> vp(size_t(B * T * E)), vq(size_t(B * T * E));
  std::vector<int64_t> pr(size_t(B * T));
  const std::vector<float> junk_p = {0.7f, 0.1f, 0.1f, 0.1f}, junk_q = {0.1f, 0.2f, 0.3f, 0.4f};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const bool paired = t < 4;
      const int64_t s = paired ? 3 - t : 4;  // view-2 token 4 is nobody's partner
      pr[size_t(b * T + t)] = paired ? s : -1;
      std::vector<float> rp = paired ? p_row(b, t) : junk_p, rq = paired ? q_row(b, t) : junk_q;
      for (int64_t e = 0; e < E; ++e) {
        vp[size_t((b * T + t) * E + e)] = rp[size_t(e)];
        vq[size_t((b * T + s) * E + e)] = rq[size_t(e)];
      }
    }
  return {Tensor::from(vp, {B, T, E}), Tensor::from(vq, {B, T, E}), Tensor::from_i64(pr, {B, T})};
}

std::vector<float> onehot(int64_t e) {
  std::vector<float> v(4, 0.f);
  v[size_t(e % 4)] = 1.f;
  return v;
}

void check_terms(const std::pair<double, double>& got, double diag, double off, double tol = 1e-6) {
  INFO("L_diag " << got.first << " (expected " << diag << "), L_off " << got.second
                 << " (expected " << off << ")");
  CHECK(std::fabs(got.first - diag) <= tol);
  CHECK(std::fabs(got.second - off) <= tol);
}

}  // namespace

TEST_CASE("prc_loss: the four sanity values of methods.md (E = 4, paper diagonal)") {
  // Consistent, one-hot, balanced: each expert gets M/E = 2 pairs and C = I.
  Case c1 = sanity_case([](int64_t b, int64_t t) { return onehot(t + b); },
                        [](int64_t b, int64_t t) { return onehot(t + b); });
  check_close(ops::prc_matrix(c1.p, c1.q, c1.pairs),
              {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1}, 1e-6f);
  check_close(ops::prc_loss(c1.p, c1.q, c1.pairs), {0.f}, 1e-7f);
  check_terms(ops::prc_terms(c1.p, c1.q, c1.pairs), 0, 0);
  // All on one expert: C_00 = E = 4 -> L_diag = (9 + 1 + 1 + 1) / 4 = 3, 0.005 * 3 = 0.015.
  Case c2 = sanity_case([](int64_t, int64_t) { return onehot(0); },
                        [](int64_t, int64_t) { return onehot(0); });
  check_close(ops::prc_loss(c2.p, c2.q, c2.pairs), {0.015f}, 1e-7f, 1e-6f);
  check_terms(ops::prc_terms(c2.p, c2.q, c2.pairs), 3, 0);
  // Balanced but inconsistent (the partner always picks the next expert): C is a permutation
  // matrix with zero diagonal -> L_diag = 1, L_off = 4 / 12; 0.005 + 0.05 / 3 = 0.021667.
  Case c3 = sanity_case([](int64_t b, int64_t t) { return onehot(t + b); },
                        [](int64_t b, int64_t t) { return onehot(t + b + 1); });
  check_close(ops::prc_loss(c3.p, c3.q, c3.pairs), {float(0.005 + 0.05 / 3)}, 1e-7f, 1e-6f);
  check_terms(ops::prc_terms(c3.p, c3.q, c3.pairs), 1, 1.0 / 3);
  // Uniform: C = 1/4 everywhere -> L_diag = 0.5625, L_off = 0.0625; 0.0059375.
  const std::vector<float> u = {0.25f, 0.25f, 0.25f, 0.25f};
  Case c4 = sanity_case([&](int64_t, int64_t) { return u; }, [&](int64_t, int64_t) { return u; });
  check_close(ops::prc_loss(c4.p, c4.q, c4.pairs), {0.0059375f}, 1e-7f, 1e-6f);
  check_terms(ops::prc_terms(c4.p, c4.q, c4.pairs), 0.5625, 0.0625);
  // Weights apply to the right terms.
  check_close(ops::prc_loss(c3.p, c3.q, c3.pairs, {false, 2.f, 0.f}), {2.f}, 1e-6f);
  check_close(ops::prc_loss(c3.p, c3.q, c3.pairs, {false, 0.f, 3.f}), {1.f}, 1e-6f);
}

// Random probabilities; pairs with -1 entries and view-2 tokens shared by several view-1 tokens.
static Tensor random_pairs() {
  return Tensor::from_i64({3, -1, 0, 6, 3, 2, -1,    //
                           -1, -1, -1, -1, -1, -1, -1,  // an image with no pair at all
                           0, 1, 2, 4, 4, -1, 5},
                          {3, 7});
}

TEST_CASE("prc_matrix and prc_terms: against naive double loops, both diagonal forms") {
  Tensor p = probs({3, 7, 5}, 11), q = probs({3, 7, 5}, 12), pairs = random_pairs();
  int64_t M;
  std::vector<double> C = naive_c(p, q, pairs, M);
  REQUIRE(M == 11);
  std::vector<float> cf(C.begin(), C.end());
  check_close(ops::prc_matrix(p, q, pairs), cf, 1e-6f, 1e-5f);
  for (bool ref : {false, true}) {
    INFO("reference_diagonal = " << ref);
    std::pair<double, double> want = naive_terms(p, q, pairs, ref);
    check_terms(ops::prc_terms(p, q, pairs, {ref}), want.first, want.second, 1e-6);
    check_close(ops::prc_loss(p, q, pairs, {ref}),
                {float(0.005 * want.first + 0.05 * want.second)}, 1e-8f, 1e-5f);
    check_close(ops::prc_loss(p, q, pairs, {ref, 0.7f, 1.3f}),
                {float(0.7 * want.first + 1.3 * want.second)}, 1e-7f, 1e-5f);
  }
  // The two forms really differ here (the reference form divides per-position sums by all M).
  CHECK(std::fabs(naive_terms(p, q, pairs, true).first - naive_terms(p, q, pairs, false).first) > 0.1);
  // Non-contiguous inputs give the same values.
  Tensor pt = probs({3, 5, 7}, 13);  // viewed (3, 7, 5) through swapped strides
  Tensor pv = pt.detach().view_as({3, 7, 5}, {35, 1, 7}, 0);
  REQUIRE(!pv.is_contiguous());
  check_terms(ops::prc_terms(pv, q, pairs, {true}), naive_terms(pv.contiguous(), q, pairs, true).first,
              naive_terms(pv.contiguous(), q, pairs, true).second, 1e-6);
}

TEST_CASE("prc_loss: gradients to p and q, both diagonal forms") {
  Tensor pairs = random_pairs();
  // Large weights so gradients are O(0.1..1) and a wrong term fails the tolerance. The loss is
  // quadratic in each single entry, so central differences have no truncation error and a large
  // step is exact; it keeps float rounding of the O(10) loss value (|L| 6e-8 / eps) small.
  for (bool ref : {false, true}) {
    INFO("reference_diagonal = " << ref);
    const ops::PrcOptions opt{ref, ref ? 50.f : 5.f, 20.f};
    auto f = [&](const std::vector<Tensor>& t) { return ops::prc_loss(t[0], t[1], pairs, opt); };
    check_grad(f, {probs({3, 7, 5}, 21), probs({3, 7, 5}, 22)}, {0.1f, 1e-4, 1e-3});
  }
  // Unpaired view-1 tokens and view-2 tokens nobody points to get exactly zero gradient; a
  // gradient to q alone matches the one computed together with p.
  Tensor p = probs({3, 7, 5}, 23), q = probs({3, 7, 5}, 24);
  ops::prc_loss(p, q, pairs, {true, 1.f, 1.f}).backward();
  std::vector<float> gp = p.grad().to_vector<float>(), gq = q.grad().to_vector<float>();
  std::vector<int64_t> pr = pairs.to_vector<int64_t>();
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t t = 0; t < 7; ++t) {
      bool referenced = false;
      for (int64_t u = 0; u < 7; ++u) referenced |= pr[size_t(b * 7 + u)] == t;
      for (int64_t e = 0; e < 5; ++e) {
        if (pr[size_t(b * 7 + t)] < 0) CHECK(gp[size_t((b * 7 + t) * 5 + e)] == 0.f);
        if (!referenced) CHECK(gq[size_t((b * 7 + t) * 5 + e)] == 0.f);
      }
    }
  Tensor q2 = q.detach().clone().set_requires_grad(true);
  ops::prc_loss(p.detach(), q2, pairs, {true, 1.f, 1.f}).backward();
  check_close(q2.grad(), gq, 1e-7f, 1e-6f);
}

TEST_CASE("prc_loss and soft_jaccard_loss: model-sized inputs, any thread count, same bits") {
  // Big enough (B T E^2 work) for the parallel loops to split; values against the naive loops,
  // values and gradients identical for 1 and 4 threads.
  const int64_t B = 16, T = 65, E = 8;
  std::vector<int64_t> pr(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) pr[size_t(i)] = i % 5 == 0 ? -1 : (i * 7 + 3) % T;
  Tensor pairs = Tensor::from_i64(pr, {B, T});
  Tensor p = probs({B, T, E}, 81), q = probs({B, T, E}, 82);
  const int saved = num_threads();
  std::vector<std::vector<float>> runs;
  for (int threads : {1, 4}) {
    set_num_threads(threads);
    for (bool ref : {false, true}) {
      p.zero_grad();
      q.zero_grad();
      Tensor l = ops::prc_loss(p, q, pairs, {ref, 1.f, 1.f});
      std::pair<double, double> want = naive_terms(p, q, pairs, ref);
      check_close(l, {float(want.first + want.second)}, 1e-7f, 1e-5f);
      l.backward();
      runs.push_back(l.to_vector<float>());
      runs.push_back(p.grad().to_vector<float>());
      runs.push_back(q.grad().to_vector<float>());
    }
    Tensor s = p.detach().clone().set_requires_grad(true);
    Tensor j = ops::soft_jaccard_loss(s, q.detach());
    j.backward();
    runs.push_back(j.to_vector<float>());
    runs.push_back(s.grad().to_vector<float>());
  }
  set_num_threads(saved);
  const size_t half = runs.size() / 2;
  for (size_t r = 0; r < half; ++r) CHECK(runs[r] == runs[half + r]);
}

TEST_CASE("prc_loss: zero valid pairs give zero loss and zero gradients") {
  Tensor none = Tensor::from_i64({-1, -1, -1, -1, -1, -1}, {2, 3});
  for (bool ref : {false, true}) {
    Tensor p = probs({2, 3, 4}, 31), q = probs({2, 3, 4}, 32);
    Tensor l = ops::prc_loss(p, q, none, {ref, 1.f, 1.f});
    check_close(l, {0.f}, 0.f);
    l.backward();
    check_close(p.grad(), std::vector<float>(24, 0.f), 0.f);
    check_close(q.grad(), std::vector<float>(24, 0.f), 0.f);
    check_terms(ops::prc_terms(p, q, none, {ref}), 0, 0, 0);
  }
  check_close(ops::prc_matrix(probs({2, 3, 4}, 33), probs({2, 3, 4}, 34), none),
              std::vector<float>(16, 0.f), 0.f);
}

TEST_CASE("prc_loss: clear errors") {
  Tensor p = Tensor::full({2, 5, 4}, 0.25f), q = Tensor::full({2, 5, 4}, 0.25f);
  Tensor pairs = Tensor::from_i64({0, 1, 2, 3, 4, -1, -1, -1, -1, -1}, {2, 5});
  CHECK_THROWS_WITH_AS(ops::prc_loss(Tensor::zeros({10, 4}), q, pairs),
                       doctest::Contains("prc_loss: p F32 (10, 4) cpu must be (B, T, E)"), Error);
  CHECK_THROWS_WITH_AS(ops::prc_loss(p, Tensor::zeros({2, 5, 3}), pairs),
                       doctest::Contains("must have p's shape (2, 5, 4)"), Error);
  CHECK_THROWS_WITH_AS(ops::prc_loss(p, q, Tensor::from_i64({0, 1, 2, 3, 4}, {1, 5})),
                       doctest::Contains("must be (B, T) = (2, 5)"), Error);
  CHECK_THROWS_WITH_AS(ops::prc_loss(p, q, Tensor::zeros({2, 5})),
                       doctest::Contains("pairs must be an I64"), Error);
  CHECK_THROWS_WITH_AS(ops::prc_loss(Tensor::zeros({2, 5, 4}, DType::I64), q, pairs),
                       doctest::Contains("prc_loss: expected an F32 tensor"), Error);
  CHECK_THROWS_WITH_AS(
      ops::prc_loss(p, q, Tensor::from_i64({0, 1, 2, 3, 4, -1, -1, 5, -1, -1}, {2, 5})),
      doctest::Contains("pairs[1, 2] = 5 is outside [-1, 5)"), Error);
  CHECK_THROWS_WITH_AS(
      ops::prc_terms(p, q, Tensor::from_i64({0, -2, 2, 3, 4, -1, -1, 1, -1, -1}, {2, 5})),
      doctest::Contains("prc_terms: pairs[0, 1] = -2 is outside [-1, 5)"), Error);
  CHECK_THROWS_WITH_AS(ops::prc_matrix(p, q, Tensor()),
                       doctest::Contains("prc_matrix: pairs must be an I64 CPU tensor, got undefined"),
                       Error);
}

// ---- soft Jaccard --------------------------------------------------------------------------------

TEST_CASE("soft_jaccard_loss: hand values and a naive double reference") {
  // Token 0: min-sum 0.5, max-sum 1.5 -> J = 1/3, loss 2/3. Token 1 identical -> 0. Mean 1/3.
  Tensor s = Tensor::from({0.5f, 0.5f, 0.2f, 0.8f}, {2, 1, 2});
  Tensor s2 = Tensor::from({1.0f, 0.0f, 0.2f, 0.8f}, {2, 1, 2});
  Tensor l = ops::soft_jaccard_loss(s, s2);
  CHECK(l.shape() == Shape{});
  check_close(l, {1.f / 3}, 1e-7f);
  check_close(ops::soft_jaccard_loss(s2, s), {1.f / 3}, 1e-7f);  // symmetric

  Tensor a = probs({3, 4, 6}, 41), b = probs({3, 4, 6}, 42);
  std::vector<float> va = a.to_vector<float>(), vb = b.to_vector<float>();
  double total = 0;
  for (int64_t n = 0; n < 12; ++n) {
    double mn = 0, mx = 0;
    for (int64_t i = 0; i < 6; ++i) {
      mn += std::min(va[size_t(n * 6 + i)], vb[size_t(n * 6 + i)]);
      mx += std::max(va[size_t(n * 6 + i)], vb[size_t(n * 6 + i)]);
    }
    total += 1 - mn / mx;
  }
  check_close(ops::soft_jaccard_loss(a, b), {float(total / 12)}, 1e-7f, 1e-6f);
}

TEST_CASE("soft_jaccard_loss: identical inputs give 0 with zero gradient (the tie rule)") {
  Tensor s = probs({2, 3, 5}, 51);
  Tensor s2 = s.detach().clone().set_requires_grad(true);
  Tensor l = ops::soft_jaccard_loss(s, s2);
  check_close(l, {0.f}, 0.f);
  l.backward();
  check_close(s.grad(), std::vector<float>(30, 0.f), 1e-7f);
  check_close(s2.grad(), std::vector<float>(30, 0.f), 1e-7f);
  // One tie among other entries: A = 0.9, U = 1.1. dJ/ds = 1/U where s is the min, -A/U^2 where
  // it is the max, their average at the tie; loss = 1 - J so gradients are the negatives.
  Tensor a = Tensor::from({0.5f, 0.3f, 0.2f}, {1, 3}).set_requires_grad(true);
  Tensor b = Tensor::from({0.5f, 0.2f, 0.3f}, {1, 3}).set_requires_grad(true);
  ops::soft_jaccard_loss(a, b).backward();
  const float in_min = float(-1 / 1.1), in_max = float(0.9 / (1.1 * 1.1)),
              tie = 0.5f * (in_min + in_max);
  check_close(a.grad(), {tie, in_max, in_min}, 1e-6f);
  check_close(b.grad(), {tie, in_min, in_max}, 1e-6f);
}

TEST_CASE("soft_jaccard_loss: gradients to s and s2") {
  const float eps = 1e-3f;
  // Inputs whose entries differ by more than 3 eps, so finite differences never cross a min/max
  // switch: the first seed (deterministic) that gives such a pair.
  auto min_gap = [](const Tensor& a, const Tensor& b) {
    std::vector<float> va = a.to_vector<float>(), vb = b.to_vector<float>();
    float gap = 1;
    for (size_t i = 0; i < va.size(); ++i) gap = std::min(gap, std::fabs(va[i] - vb[i]));
    return gap;
  };
  Tensor s, s2;
  for (uint64_t seed = 600; seed < 700; seed += 2) {
    s = probs({2, 3, 5}, seed);
    s2 = probs({2, 3, 5}, seed + 1);
    if (min_gap(s, s2) > 3 * eps) break;
  }
  REQUIRE(min_gap(s, s2) > 3 * eps);
  check_grad([](const std::vector<Tensor>& t) { return ops::soft_jaccard_loss(t[0], t[1]); },
             {s, s2}, {eps, 1e-4, 1e-3});
  // Through a softmax of logits, as in the model (a logit step of eps moves a probability by at
  // most eps / 4, so the same gap keeps clear of ties).
  Tensor z, w;
  for (uint64_t seed = 700; seed < 800; seed += 2) {
    Generator g(seed);
    z = randn({4, 6}, g).set_requires_grad(true);
    w = probs({4, 6}, seed + 1);
    if (min_gap(ops::softmax(z), w) > 3 * eps) break;
  }
  REQUIRE(min_gap(ops::softmax(z), w) > 3 * eps);
  check_grad(
      [](const std::vector<Tensor>& t) { return ops::soft_jaccard_loss(ops::softmax(t[0]), t[1]); },
      {z, w}, {eps, 1e-4, 1e-3});
}

TEST_CASE("soft_jaccard_loss: clear errors") {
  CHECK_THROWS_WITH_AS(ops::soft_jaccard_loss(Tensor::zeros({2, 4}), Tensor::zeros({2, 3})),
                       doctest::Contains("soft_jaccard_loss: s2 F32 (2, 3) cpu must have s's shape (2, 4)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::soft_jaccard_loss(Tensor::zeros({2, 0}), Tensor::zeros({2, 0})),
                       doctest::Contains("must be (..., E) and non-empty"), Error);
  CHECK_THROWS_WITH_AS(ops::soft_jaccard_loss(Tensor::zeros({2, 4}, DType::I64), Tensor::zeros({2, 4})),
                       doctest::Contains("soft_jaccard_loss: expected an F32 tensor"), Error);
}
