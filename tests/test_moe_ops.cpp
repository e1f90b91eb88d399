// Sparse MoE ops (ops/moe.h): routing against hand-worked cases and naive references, routing
// invariants of the packed layout on random gates, dispatch/combine and the expert matmul against
// loops, the load-loss probabilities, gradients, and errors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/elementwise.h"
#include "ops/moe.h"
#include "ops/reduce.h"
#include "ops/shape.h"
#include "ops/softmax.h"
#include "ops/topk.h"
#include "tests/helpers.h"

using namespace mv;
using test::check_close;
using test::check_grad;
using test::param;

namespace {

std::vector<int64_t> ints(const Tensor& t) { return t.to_vector<int64_t>(); }

// gates[g, n, e] for one group, rows given by hand.
Tensor hand_gates() {
  return Tensor::from({0.3f, 0.5f, 0.2f,     // t0: e1 then e0
                       0.2f, 0.45f, 0.35f,   // t1: e1 then e2
                       0.6f, 0.1f, 0.3f,     // t2: e0 then e2
                       0.7f, 0.2f, 0.1f},    // t3: e0 then e1
                      {1, 4, 3});
}

ops::TopKOptions opts(int k, float c, bool bpr = false, bool renorm = false) {
  ops::TopKOptions o;
  o.k = k;
  o.capacity_factor = c;
  o.bpr = bpr;
  o.renormalize = renorm;
  return o;
}

// Gates whose entries in a row differ by >= 0.1 and whose rows' maxima differ by >= 0.03, so a
// finite-difference step of 0.01 changes no routing decision (no top-k or BPR order flips).
Tensor separated_gates(int64_t G, int64_t N, int64_t E) {
  std::vector<float> v;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t e = 0; e < E; ++e) v.push_back(0.1f * float(1 + (e + 3 * n + g) % E) + 0.03f * float(n));
  return Tensor::from(v, {G, N, E}).set_requires_grad(true);
}

// The routing order of the brief: larger value first, ties to the lower index.
std::vector<int64_t> naive_order(const std::vector<float>& v) {
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), int64_t(0));
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return v[size_t(a)] > v[size_t(b)]; });
  return idx;
}

// Checks the Assignment's two index tables against each other: rows[e] leading rows in use
// (tokens in [0, G*N)), -1 and weight 0 after them, and token_rows listing exactly the rows
// that hold each token.
void check_tables(const ops::Assignment& a) {
  const int64_t E = a.token.size(0), R = a.token.size(1), GN = a.G * a.N;
  REQUIRE(R == a.G * a.C);
  REQUIRE(a.rows.shape() == Shape{E});
  REQUIRE(a.token_rows.ndim() == 3);
  REQUIRE(a.token_rows.size(0) == a.G);
  REQUIRE(a.token_rows.size(1) == a.N);
  const auto tok = ints(a.token), rows = ints(a.rows), tr = ints(a.token_rows);
  const auto w = a.weight.to_vector<float>();
  const int64_t K = a.token_rows.size(2);
  std::vector<std::vector<int64_t>> want(static_cast<size_t>(GN)), got(static_cast<size_t>(GN));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = tok[size_t(e * R + r)];
      if (r < rows[size_t(e)]) {
        REQUIRE(t >= 0);
        REQUIRE(t < GN);
        want[size_t(t)].push_back(e * R + r);
      } else {
        CHECK(t == -1);
        CHECK(w[size_t(e * R + r)] == 0.f);
      }
    }
  for (int64_t t = 0; t < GN; ++t) {
    for (int64_t j = 0; j < K; ++j)
      if (tr[size_t(t * K + j)] >= 0) got[size_t(t)].push_back(tr[size_t(t * K + j)]);
    std::sort(got[size_t(t)].begin(), got[size_t(t)].end());
    CHECK(got[size_t(t)] == want[size_t(t)]);
  }
}

}  // namespace

TEST_CASE("topk_capacity: ceil(N k c / E), rounded to 4, capped at N, at least 1") {
  CHECK(ops::topk_capacity(50, 2, 1.05f, 8, false) == 14);  // ceil(13.125)
  CHECK(ops::topk_capacity(50, 2, 1.05f, 8, true) == 16);
  CHECK(ops::topk_capacity(16, 2, 1.0f, 8, false) == 4);    // exact: no round-up
  CHECK(ops::topk_capacity(10, 1, 1.1f, 11, false) == 1);   // 1.1f is 1.10000002: still exactly 1
  CHECK(ops::topk_capacity(10, 2, 4.0f, 2, false) == 10);   // 40 capped at N
  CHECK(ops::topk_capacity(10, 1, 1.0f, 1, true) == 10);    // 12 after rounding, capped at N
  CHECK(ops::topk_capacity(3, 1, 0.1f, 8, false) == 1);
  CHECK(ops::topk_capacity(0, 1, 1.0f, 4, false) == 1);
  CHECK(ops::topk_capacity(50, 2, 0.f, 8, true) == 50);  // dropless: room for every token
  CHECK_THROWS_WITH_AS(ops::topk_capacity(50, 2, -1.f, 8, false), doctest::Contains("must be > 0 (or 0: dropless)"),
                       Error);
}

TEST_CASE("topk_route dropless (capacity factor 0): every choice kept, the routing of an ample capacity") {
  const int64_t G = 3, N = 17, E = 5;
  Generator gen(4);
  const Tensor gates = ops::softmax(randn({G, N, E}, gen));
  for (bool bpr : {false, true}) {
    const ops::TopKRouting d = ops::topk_route(gates, opts(2, 0.f, bpr));
    CHECK(d.capacity == N);
    const std::vector<int64_t> slot = d.slot.to_vector<int64_t>();
    CHECK(std::none_of(slot.begin(), slot.end(), [](int64_t s) { return s < 0; }));
    // The same as a factor large enough for C = N: c = E / k.
    const ops::TopKRouting a = ops::topk_route(gates, opts(2, float(E) / 2.f, bpr));
    CHECK(a.capacity == N);
    CHECK(d.slot.to_vector<int64_t>() == a.slot.to_vector<int64_t>());
    CHECK(d.assign.token.to_vector<int64_t>() == a.assign.token.to_vector<int64_t>());
    CHECK(d.assign.weight.to_vector<float>() == a.assign.weight.to_vector<float>());
  }
}

TEST_CASE("topk_route: a hand-worked routing, sequence order and BPR") {
  Tensor gates = hand_gates();  // one group: the packed rows are the group's slots
  SUBCASE("C = 2, sequence order") {
    // rank 0: t0->e1 s0, t1->e1 s1, t2->e0 s0, t3->e0 s1 (later tokens' rank-0 choices fill e0),
    // rank 1: t0->e0 full (dropped), t1->e2 s0, t2->e2 s1, t3->e1 full (dropped).
    ops::TopKRouting r = ops::topk_route(gates, opts(2, 0.75f));
    CHECK(r.capacity == 2);
    CHECK(r.assign.token.shape() == Shape{3, 2});
    CHECK((r.assign.G == 1 && r.assign.N == 4 && r.assign.C == 2));
    CHECK(ints(r.expert) == std::vector<int64_t>{1, 0, 1, 2, 0, 2, 0, 1});
    CHECK(ints(r.slot) == std::vector<int64_t>{0, -1, 1, 0, 0, 1, 1, -1});
    CHECK(ints(r.assign.token) == std::vector<int64_t>{2, 3, 0, 1, 1, 2});
    CHECK(ints(r.assign.rows) == std::vector<int64_t>{2, 2, 2});
    // token_rows: choice r's row e*R + slot, -1 when dropped
    CHECK(ints(r.assign.token_rows) == std::vector<int64_t>{2, -1, 3, 4, 0, 5, 1, -1});
    check_close(r.assign.weight, {0.6f, 0.7f, 0.5f, 0.45f, 0.35f, 0.3f});
    check_tables(r.assign);
    // renormalize divides by the sum of both chosen gates, dropped one included
    ops::TopKRouting rn = ops::topk_route(gates, opts(2, 0.75f, false, true));
    CHECK(ints(rn.assign.token) == ints(r.assign.token));
    check_close(rn.assign.weight, {0.6f / 0.9f, 0.7f / 0.9f, 0.5f / 0.8f, 0.45f / 0.8f, 0.35f / 0.8f, 0.3f / 0.9f});
  }
  SUBCASE("C = 2, BPR: tokens by best gate, t3 t2 t0 t1") {
    ops::TopKRouting r = ops::topk_route(gates, opts(2, 0.75f, true));
    CHECK(ints(r.slot) == std::vector<int64_t>{0, -1, 1, 1, 1, 0, 0, -1});
    CHECK(ints(r.assign.token) == std::vector<int64_t>{3, 2, 0, 1, 2, 1});
    check_close(r.assign.weight, {0.7f, 0.6f, 0.5f, 0.45f, 0.3f, 0.35f});
    check_tables(r.assign);
  }
  SUBCASE("C = 1: BPR keeps other tokens") {
    ops::TopKRouting seq = ops::topk_route(gates, opts(2, 0.375f));
    CHECK(seq.capacity == 1);
    CHECK(ints(seq.assign.token) == std::vector<int64_t>{2, 0, 1});
    CHECK(ints(seq.slot) == std::vector<int64_t>{0, -1, -1, 0, 0, -1, -1, -1});
    ops::TopKRouting bpr = ops::topk_route(gates, opts(2, 0.375f, true));
    CHECK(ints(bpr.assign.token) == std::vector<int64_t>{3, 0, 2});
    CHECK(ints(bpr.slot) == std::vector<int64_t>{0, -1, -1, -1, -1, 0, 0, -1});
    check_close(bpr.assign.weight, {0.7f, 0.5f, 0.3f});
  }
  SUBCASE("ties go to the lower expert; an unused row is -1 with weight 0") {
    Tensor t = Tensor::from({0.4f, 0.4f, 0.2f, 0.1f, 0.45f, 0.45f}, {1, 2, 3});
    ops::TopKRouting r = ops::topk_route(t, opts(1, 3.0f));
    CHECK(r.capacity == 2);
    CHECK(ints(r.expert) == std::vector<int64_t>{0, 1});
    CHECK(ints(r.assign.token) == std::vector<int64_t>{0, -1, 1, -1, -1, -1});
    CHECK(ints(r.assign.rows) == std::vector<int64_t>{1, 1, 0});
    check_close(r.assign.weight, {0.4f, 0, 0.45f, 0, 0, 0});
  }
}

TEST_CASE("topk_route: two groups packed, group after group, without the first group's holes") {
  // Group 0 by hand (C = 2, sequence order): rank 0 t0->e2, t1->e2, t2->e1, t3->e1; rank 1
  // t0->e0, t1->e1 (full), t2->e2 (full), t3->e2 (full): e0 keeps only one token of group 0.
  // Group 1 is hand_gates(): e0 [t2 t3], e1 [t0 t1], e2 [t1 t2] (the case above).
  std::vector<float> v = {0.3f, 0.1f, 0.6f,  0.2f, 0.3f, 0.5f,  0.1f, 0.5f, 0.4f,  0.1f, 0.7f, 0.2f};
  const std::vector<float> h = hand_gates().to_vector<float>();
  v.insert(v.end(), h.begin(), h.end());
  ops::TopKRouting r = ops::topk_route(Tensor::from(v, {2, 4, 3}), opts(2, 0.75f));
  REQUIRE(r.capacity == 2);
  REQUIRE(r.assign.token.shape() == Shape{3, 4});  // R = G*C = 4 rows per expert
  // e0: g0t0, then group 1's t2 t3 right after it (flat tokens 4 + n), one unused row.
  CHECK(ints(r.assign.token) == std::vector<int64_t>{0, 6, 7, -1,  2, 3, 4, 5,  0, 1, 5, 6});
  CHECK(ints(r.assign.rows) == std::vector<int64_t>{3, 4, 4});
  check_close(r.assign.weight, {0.3f, 0.6f, 0.7f, 0,  0.5f, 0.7f, 0.5f, 0.45f,  0.6f, 0.5f, 0.35f, 0.3f});
  CHECK(ints(r.expert) == std::vector<int64_t>{2, 0, 2, 1, 1, 2, 1, 2,  1, 0, 1, 2, 0, 2, 0, 1});
  CHECK(ints(r.slot) == std::vector<int64_t>{0, 0, 1, -1, 0, -1, 1, -1,  2, -1, 3, 2, 1, 3, 2, -1});
  CHECK(ints(r.assign.token_rows) == std::vector<int64_t>{8, 0, 9, -1, 4, -1, 5, -1,  6, -1, 7, 10, 1, 11, 2, -1});
  check_tables(r.assign);
}

TEST_CASE("topk_route: invariants on random gates") {
  const int64_t G = 3, N = 17, E = 5;
  const int k = 2;
  int64_t drops_seen = 0;
  for (uint64_t seed : {1u, 2u, 3u}) {
    Generator gen(seed);
    Tensor gates = ops::softmax(randn({G, N, E}, gen));
    const std::vector<float> gv = gates.to_vector<float>();
    for (float c : {0.5f, 1.0f, 1.25f, 2.5f}) {
      for (bool bpr : {false, true}) {
        CAPTURE(seed);
        CAPTURE(c);
        CAPTURE(bpr);
        ops::TopKRouting r = ops::topk_route(gates, opts(k, c, bpr));
        const int64_t C = r.capacity, R = G * C;
        CHECK(C == ops::topk_capacity(N, k, c, E, false));
        REQUIRE(r.assign.token.shape() == Shape{E, R});
        REQUIRE(r.assign.token_rows.shape() == Shape{G, N, k});
        REQUIRE(r.expert.shape() == Shape{G, N, k});
        check_tables(r.assign);
        const auto ex = ints(r.expert), sl = ints(r.slot), tok = ints(r.assign.token);
        const auto rows = ints(r.assign.rows), trows = ints(r.assign.token_rows);
        const auto w = r.assign.weight.to_vector<float>();
        int64_t kept = 0;
        std::vector<int64_t> kept_of(size_t(E), 0);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t n = 0; n < N; ++n) {
            // the k best experts, by a full sort
            std::vector<float> row(gv.begin() + (g * N + n) * E, gv.begin() + (g * N + n + 1) * E);
            const auto best = naive_order(row);
            for (int j = 0; j < k; ++j) {
              const int64_t t = (g * N + n) * k + j, e = ex[size_t(t)];
              CHECK(e == best[size_t(j)]);
              if (sl[size_t(t)] < 0) {
                CHECK(trows[size_t(t)] == -1);
                continue;
              }
              ++kept;
              ++kept_of[size_t(e)];
              const int64_t i = e * R + sl[size_t(t)];
              CHECK(tok[size_t(i)] == g * N + n);
              CHECK(w[size_t(i)] == row[size_t(e)]);
              CHECK(trows[size_t(t)] == i);
            }
          }
        // rows[e] is the number of e's kept choices (check_tables: they lead, the rest unused)
        for (int64_t e = 0; e < E; ++e) CHECK(rows[size_t(e)] == kept_of[size_t(e)]);
        for (int64_t e = 0; e < E; ++e) {
          // rows go group by group: base[g] = rows of the groups before g; at most C per group
          std::vector<int64_t> base(size_t(G + 1), 0);
          for (int64_t q = 0; q < rows[size_t(e)]; ++q) ++base[size_t(tok[size_t(e * R + q)] / N + 1)];
          for (int64_t g = 0; g < G; ++g) {
            CHECK(base[size_t(g + 1)] <= C);
            base[size_t(g + 1)] += base[size_t(g)];
          }
          for (int64_t q = 1; q < rows[size_t(e)]; ++q)
            CHECK(tok[size_t(e * R + q)] / N >= tok[size_t(e * R + q - 1)] / N);
          for (int64_t g = 0; g < G; ++g) {
            // rank-0 pickers of e in priority order; the first min(C, count) are kept, at the
            // group's first rows in that order, and a rank-1 choice of e is kept only if every
            // rank-0 choice of e was
            std::vector<int64_t> pick0;
            bool rank1_kept = false;
            for (int64_t n = 0; n < N; ++n) {
              if (ex[size_t((g * N + n) * k)] == e) pick0.push_back(n);
              if (ex[size_t((g * N + n) * k + 1)] == e && sl[size_t((g * N + n) * k + 1)] >= 0) rank1_kept = true;
            }
            if (bpr)
              std::stable_sort(pick0.begin(), pick0.end(), [&](int64_t a, int64_t b) {
                return *std::max_element(gv.begin() + (g * N + a) * E, gv.begin() + (g * N + a + 1) * E) >
                       *std::max_element(gv.begin() + (g * N + b) * E, gv.begin() + (g * N + b + 1) * E);
              });
            for (size_t q = 0; q < pick0.size(); ++q) {
              const int64_t s = sl[size_t((g * N + pick0[q]) * k)];
              CHECK(s == (int64_t(q) < C ? base[size_t(g)] + int64_t(q) : -1));
              if (rank1_kept) CHECK(s >= 0);
            }
          }
        }
        const int64_t dropped = G * N * k - kept;
        drops_seen += dropped;
        if (c == 2.5f) CHECK(dropped == 0);  // c = E / k: room for every choice
      }
    }
  }
  CHECK(drops_seen > 0);  // the low capacities did exercise dropping
}

TEST_CASE("expert_choice_route: each expert takes its top-C tokens, every row used") {
  const int64_t G = 2, N = 11, E = 3, C = 4, R = G * C;
  Generator gen(5);
  Tensor raw = randn({G, N, E}, gen);
  std::vector<float> sv = raw.to_vector<float>();
  for (float& v : sv) v = std::round(v * 2) / 2;  // coarse values: many ties
  Tensor scores = Tensor::from(sv, {G, N, E});
  Tensor wts = param({G, N, E}, 6);
  const std::vector<float> wv = wts.to_vector<float>();
  ops::Assignment a = ops::expert_choice_route(scores, C);
  ops::Assignment b = ops::expert_choice_route(scores, C, wts);
  REQUIRE(a.token.shape() == Shape{E, R});
  CHECK((a.G == G && a.N == N && a.C == C));
  CHECK(ints(a.rows) == std::vector<int64_t>(size_t(E), R));
  check_tables(a);
  const auto ta = ints(a.token), tb = ints(b.token);
  const auto wa = a.weight.to_vector<float>(), wb = b.weight.to_vector<float>();
  CHECK(ta == tb);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> col;
      for (int64_t n = 0; n < N; ++n) col.push_back(sv[size_t((g * N + n) * E + e)]);
      const auto order = naive_order(col);
      for (int64_t c = 0; c < C; ++c) {
        const size_t i = size_t(e * R + g * C + c);  // row g*C + c: group g's c-th best
        const int64_t n = order[size_t(c)];
        CHECK(ta[i] == g * N + n);
        CHECK(wa[i] == sv[size_t((g * N + n) * E + e)]);
        CHECK(wb[i] == wv[size_t((g * N + n) * E + e)]);
      }
    }
}

TEST_CASE("expert_choice_route: negative scores, signed zeros and NaN") {
  // order: NaN (as largest), 0 and -0 (equal: lower token first), -0.5, -1, -2
  Tensor s = Tensor::from({-1.f, -0.5f, 0.f, -0.f, -2.f, NAN}, {1, 6, 1});
  ops::Assignment a = ops::expert_choice_route(s, 5);
  CHECK(ints(a.token) == std::vector<int64_t>{5, 2, 3, 1, 0});
  Tensor t = Tensor::from({-0.f, 0.f, -3.f}, {1, 3, 1});
  CHECK(ints(ops::expert_choice_route(t, 3).token) == std::vector<int64_t>{0, 1, 2});
  // shifting every score down keeps the routing
  Tensor u = Tensor::from({-3.f, -2.5f, -2.f, -2.f, -4.f, -1.75f}, {1, 6, 1});
  CHECK(ints(ops::expert_choice_route(u, 4).token) == std::vector<int64_t>{5, 2, 3, 1});
}

TEST_CASE("make_assignment: rows and token_rows from a token table") {
  // E = 2, G = 2, C = 2 (R = 4), N = 3: flat tokens in [0, 6)
  Tensor tok = Tensor::from_i64({1, 4, -1, -1,  3, 0, 1, -1}, {2, 4});
  ops::Assignment a = ops::make_assignment(tok, Tensor(), 2, 3, 2);
  CHECK(ints(a.rows) == std::vector<int64_t>{2, 3});
  REQUIRE(a.token_rows.shape() == Shape{2, 3, 2});  // token 1 fills two rows
  CHECK(ints(a.token_rows) == std::vector<int64_t>{5, -1,  0, 6,  -1, -1,  4, -1,  1, -1,  -1, -1});
  CHECK_FALSE(a.weight.defined());
  CHECK_THROWS_WITH_AS(ops::make_assignment(Tensor::from_i64({1, -1, 2, -1}, {1, 4}), Tensor(), 2, 3, 2),
                       doctest::Contains("make_assignment: expert 0 uses row 2 after its unused row 1"), Error);
  CHECK_THROWS_WITH_AS(ops::make_assignment(Tensor::from_i64({6, -1, -1, -1}, {1, 4}), Tensor(), 2, 3, 2),
                       doctest::Contains("make_assignment: row (0, 0) holds token 6, outside [-1, 6)"), Error);
  CHECK_THROWS_WITH_AS(ops::make_assignment(tok, Tensor(), 2, 3, 3),
                       doctest::Contains("must have G*C = 6 rows per expert"), Error);
  CHECK_THROWS_WITH_AS(ops::make_assignment(tok, Tensor::zeros({2, 3}), 2, 3, 2),
                       doctest::Contains("make_assignment: weights F32 (2, 3) cpu do not match"), Error);
}

TEST_CASE("dispatch and combine, forward and backward, against naive loops") {
  struct Case {
    int64_t G, N, E, d;
    float c;
  };
  // The second case has one group and wide rows.
  for (Case cs : {Case{2, 9, 4, 6, 1.0f}, Case{1, 20, 4, 81, 1.25f}}) {
    const int64_t G = cs.G, N = cs.N, E = cs.E, d = cs.d;
    CAPTURE(G);
    Generator gen(11);
    Tensor gates = ops::softmax(randn({G, N, E}, gen));
    ops::TopKRouting r = ops::topk_route(gates, opts(2, cs.c));
    const int64_t R = G * r.capacity, ER = E * R;
    const auto tok = ints(r.assign.token);
    const auto w = r.assign.weight.to_vector<float>();
    REQUIRE(std::count(tok.begin(), tok.end(), -1) > 0);  // more rows than kept choices: some unused
    Tensor x = randn({G, N, d}, gen).set_requires_grad(true);
    const auto xv = x.to_vector<float>();
    Tensor buf = ops::dispatch(x, r.assign);
    REQUIRE(buf.shape() == Shape{E, R, d});
    std::vector<float> expect(size_t(ER * d), 0.f);  // unused rows: zeros
    for (int64_t i = 0; i < ER; ++i)
      for (int64_t j = 0; j < d && tok[size_t(i)] >= 0; ++j) expect[size_t(i * d + j)] = xv[size_t(tok[size_t(i)] * d + j)];
    check_close(buf, expect, 0, 0);
    // dispatch backward: each token row sums the gradients of its rows
    Tensor gb = randn({E, R, d}, gen);
    const auto gbv = gb.to_vector<float>();
    buf.backward(gb);
    std::vector<double> gx(size_t(G * N * d), 0.0);
    for (int64_t i = 0; i < ER; ++i)
      for (int64_t j = 0; j < d && tok[size_t(i)] >= 0; ++j) gx[size_t(tok[size_t(i)] * d + j)] += gbv[size_t(i * d + j)];
    check_close(x.grad(), std::vector<float>(gx.begin(), gx.end()), 1e-6f, 1e-5f);

    // combine: y has random values in the unused rows too; they must not be read
    Tensor y = randn({E, R, d}, gen).set_requires_grad(true);
    Tensor wt = r.assign.weight.detach().clone().set_requires_grad(true);
    ops::Assignment aw = r.assign;
    aw.weight = wt;
    const auto yv = y.to_vector<float>();
    std::vector<double> out(size_t(G * N * d), 0.0);
    for (int64_t i = 0; i < ER; ++i)
      for (int64_t j = 0; j < d && tok[size_t(i)] >= 0; ++j)
        out[size_t(tok[size_t(i)] * d + j)] += double(w[size_t(i)]) * yv[size_t(i * d + j)];
    Tensor comb = ops::combine(y, aw);
    REQUIRE(comb.shape() == Shape{G, N, d});
    check_close(comb, std::vector<float>(out.begin(), out.end()), 1e-6f, 1e-5f);
    // combine backward: dy = w g_out[token], dw = g_out[token] . y; unused rows get 0
    Tensor go = randn({G, N, d}, gen);
    const auto gov = go.to_vector<float>();
    comb.backward(go);
    std::vector<float> dy(size_t(ER * d), 0.f), dw(size_t(ER), 0.f);
    for (int64_t i = 0; i < ER; ++i) {
      const int64_t t = tok[size_t(i)];
      double s = 0;
      for (int64_t j = 0; j < d && t >= 0; ++j) {
        dy[size_t(i * d + j)] = w[size_t(i)] * gov[size_t(t * d + j)];
        s += double(gov[size_t(t * d + j)]) * yv[size_t(i * d + j)];
      }
      dw[size_t(i)] = float(s);
    }
    check_close(y.grad(), dy, 1e-6f, 1e-5f);
    check_close(wt.grad(), dw, 1e-5f, 1e-5f);

    // Weights 1 and nothing dropped: every token comes back k times.
    ops::TopKRouting full = ops::topk_route(gates, opts(2, 2.0f));
    const auto full_slots = ints(full.slot);
    REQUIRE(std::count(full_slots.begin(), full_slots.end(), -1) == 0);
    std::vector<float> ones;
    for (int64_t t : ints(full.assign.token)) ones.push_back(t >= 0 ? 1.f : 0.f);
    ops::Assignment a1 = ops::make_assignment(full.assign.token, Tensor::from(ones, full.assign.token.shape()), G, N,
                                              full.capacity);
    CHECK(ints(a1.rows) == ints(full.assign.rows));
    Tensor back = ops::combine(ops::dispatch(x.detach(), a1), a1);
    std::vector<float> twice;
    for (float v : xv) twice.push_back(2 * v);
    check_close(back, twice);
  }
}

TEST_CASE("expert_matmul with rows: the rows in use against loops, zeros elsewhere") {
  // Large enough to run on several threads, with shares that split an expert's rows.
  const int64_t E = 4, M = 64, d = 16, h = 24;
  const std::vector<int64_t> rows = {64, 37, 0, 9};
  Tensor rows_t = Tensor::from_i64(rows, {E});
  Tensor x = param({E, M, d}, 61), w = param({E, d, h}, 62), b = param({E, h}, 63);
  Tensor out = ops::expert_matmul(x, w, b, rows_t);
  REQUIRE(out.shape() == Shape{E, M, h});
  const auto xv = x.to_vector<float>(), wv = w.to_vector<float>(), bv = b.to_vector<float>();
  std::vector<float> expect(size_t(E * M * h), 0.f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < rows[size_t(e)]; ++m)
      for (int64_t j = 0; j < h; ++j) {
        double s = bv[size_t(e * h + j)];
        for (int64_t i = 0; i < d; ++i) s += double(xv[size_t((e * M + m) * d + i)]) * wv[size_t((e * d + i) * h + j)];
        expect[size_t((e * M + m) * h + j)] = float(s);
      }
  check_close(out, expect, 1e-5f, 1e-5f);
  // the rows past rows[e] are exactly zero, and the rows in use match the full product
  const auto ov = out.to_vector<float>(), fv = ops::expert_matmul(x.detach(), w.detach(), b.detach()).to_vector<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < h; ++j) {
        const size_t i = size_t((e * M + m) * h + j);
        if (m < rows[size_t(e)])
          CHECK(std::fabs(ov[i] - fv[i]) <= 1e-5f * (1 + std::fabs(fv[i])));
        else
          CHECK(ov[i] == 0.f);
      }
  // Backward with a gradient that is nonzero on unused rows too: they must add nothing.
  Tensor g = randn({E, M, h});
  const auto gv = g.to_vector<float>();
  out.backward(g);
  std::vector<float> dx(size_t(E * M * d), 0.f), dw(size_t(E * d * h), 0.f), db(size_t(E * h), 0.f);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m = 0; m < rows[size_t(e)]; ++m)
      for (int64_t i = 0; i < d; ++i) {
        double s = 0;
        for (int64_t j = 0; j < h; ++j) s += double(gv[size_t((e * M + m) * h + j)]) * wv[size_t((e * d + i) * h + j)];
        dx[size_t((e * M + m) * d + i)] = float(s);
      }
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < h; ++j) {
        double s = 0;
        for (int64_t m = 0; m < rows[size_t(e)]; ++m)
          s += double(xv[size_t((e * M + m) * d + i)]) * gv[size_t((e * M + m) * h + j)];
        dw[size_t((e * d + i) * h + j)] = float(s);
      }
    for (int64_t j = 0; j < h; ++j) {
      double s = 0;
      for (int64_t m = 0; m < rows[size_t(e)]; ++m) s += gv[size_t((e * M + m) * h + j)];
      db[size_t(e * h + j)] = float(s);
    }
  }
  check_close(x.grad(), dx, 1e-5f, 1e-5f);
  check_close(w.grad(), dw, 1e-4f, 1e-5f);
  check_close(b.grad(), db, 1e-5f, 1e-5f);
  // rows undefined: every row, as rows = M
  Tensor all = Tensor::from_i64(std::vector<int64_t>(size_t(E), M), {E});
  check_close(ops::expert_matmul(x.detach(), w.detach(), b.detach(), all), fv, 0, 0);
}

TEST_CASE("expert_mlp: forward and backward against double loops, and the composed ops") {
  // Rows that span several 64-row blocks and thread shares, an empty expert and a short one.
  const int64_t E = 4, M = 160, d = 16, H = 24, O = 12;
  const std::vector<int64_t> rows = {150, 37, 0, 9};
  Tensor rows_t = Tensor::from_i64(rows, {E});
  Tensor x = param({E, M, d}, 71), w1 = param({E, d, H}, 72, 0.4f), b1 = param({E, H}, 73);
  Tensor w2 = param({E, H, O}, 74, 0.4f), b2 = param({E, O}, 75);
  Tensor out = ops::expert_mlp(x, w1, b1, w2, b2, rows_t);
  REQUIRE(out.shape() == Shape{E, M, O});
  const auto xv = x.to_vector<float>(), w1v = w1.to_vector<float>(), b1v = b1.to_vector<float>();
  const auto w2v = w2.to_vector<float>(), b2v = b2.to_vector<float>();
  // Reference in double: a = x w1 + b1, h = gelu(a) (tanh form, std::tanh), y = h w2 + b2.
  const double c = std::sqrt(2.0 / M_PI), k = 0.044715;
  std::vector<double> av(size_t(E * M * H), 0.0), hv(size_t(E * M * H), 0.0);
  std::vector<float> expect(size_t(E * M * O), 0.f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < rows[size_t(e)]; ++m) {
      for (int64_t j = 0; j < H; ++j) {
        double s = b1v[size_t(e * H + j)];
        for (int64_t i = 0; i < d; ++i) s += double(xv[size_t((e * M + m) * d + i)]) * w1v[size_t((e * d + i) * H + j)];
        av[size_t((e * M + m) * H + j)] = s;
        hv[size_t((e * M + m) * H + j)] = 0.5 * s * (1 + std::tanh(c * (s + k * s * s * s)));
      }
      for (int64_t o = 0; o < O; ++o) {
        double s = b2v[size_t(e * O + o)];
        for (int64_t j = 0; j < H; ++j) s += hv[size_t((e * M + m) * H + j)] * w2v[size_t((e * H + j) * O + o)];
        expect[size_t((e * M + m) * O + o)] = float(s);
      }
    }
  check_close(out, expect, 2e-5f, 2e-5f);  // rows past rows[e] are exactly 0 in `expect`
  // The composed ops give the same values up to the order of the adds (they add the bias before
  // the products, the fused op after: a few ulp of the partial sums, which reach 1 here); without
  // a graph too.
  const Tensor composed = ops::expert_matmul(ops::gelu(ops::expert_matmul(x.detach(), w1.detach(), b1.detach(), rows_t)),
                                             w2.detach(), b2.detach(), rows_t);
  check_close(out, composed.to_vector<float>(), 4e-6f, 1e-6f);
  {
    autograd::NoGrad ng;
    check_close(ops::expert_mlp(x, w1, b1, w2, b2, rows_t), out.to_vector<float>(), 0, 0);
  }
  // Backward with a gradient that is nonzero on unused rows too: they must add nothing.
  Tensor g = randn({E, M, O});
  const auto gv = g.to_vector<float>();
  out.backward(g);
  std::vector<float> dx(size_t(E * M * d), 0.f), dw1(size_t(E * d * H), 0.f), db1(size_t(E * H), 0.f);
  std::vector<float> dw2(size_t(E * H * O), 0.f), db2(size_t(E * O), 0.f);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = rows[size_t(e)];
    std::vector<double> da(size_t(n * H));
    for (int64_t m = 0; m < n; ++m)
      for (int64_t j = 0; j < H; ++j) {
        double dh = 0;
        for (int64_t o = 0; o < O; ++o) dh += double(gv[size_t((e * M + m) * O + o)]) * w2v[size_t((e * H + j) * O + o)];
        const double a = av[size_t((e * M + m) * H + j)], t = std::tanh(c * (a + k * a * a * a));
        da[size_t(m * H + j)] = dh * (0.5 * (1 + t) + 0.5 * a * (1 - t * t) * c * (1 + 3 * k * a * a));
      }
    for (int64_t m = 0; m < n; ++m)
      for (int64_t i = 0; i < d; ++i) {
        double s = 0;
        for (int64_t j = 0; j < H; ++j) s += da[size_t(m * H + j)] * w1v[size_t((e * d + i) * H + j)];
        dx[size_t((e * M + m) * d + i)] = float(s);
      }
    for (int64_t j = 0; j < H; ++j) {
      double sb = 0;
      for (int64_t m = 0; m < n; ++m) sb += da[size_t(m * H + j)];
      db1[size_t(e * H + j)] = float(sb);
      for (int64_t i = 0; i < d; ++i) {
        double s = 0;
        for (int64_t m = 0; m < n; ++m) s += double(xv[size_t((e * M + m) * d + i)]) * da[size_t(m * H + j)];
        dw1[size_t((e * d + i) * H + j)] = float(s);
      }
      for (int64_t o = 0; o < O; ++o) {
        double s = 0;
        for (int64_t m = 0; m < n; ++m) s += hv[size_t((e * M + m) * H + j)] * gv[size_t((e * M + m) * O + o)];
        dw2[size_t((e * H + j) * O + o)] = float(s);
      }
    }
    for (int64_t o = 0; o < O; ++o) {
      double s = 0;
      for (int64_t m = 0; m < n; ++m) s += gv[size_t((e * M + m) * O + o)];
      db2[size_t(e * O + o)] = float(s);
    }
  }
  check_close(x.grad(), dx, 2e-5f, 2e-5f);
  check_close(w1.grad(), dw1, 2e-4f, 2e-5f);
  check_close(b1.grad(), db1, 2e-5f, 2e-5f);
  check_close(w2.grad(), dw2, 2e-4f, 2e-5f);
  check_close(b2.grad(), db2, 2e-5f, 2e-5f);
}

TEST_CASE("moe_mlp: the composed dispatch, expert_mlp and combine, bit for bit, forward and backward") {
  // Experts with several 256-row blocks, pieces split over 1, 2 and 3 threads, dropped choices;
  // token choice (K = k rows per token) and expert choice (K = E).
  const int64_t G = 20, N = 50, E = 3, d = 8, H = 12, O = 8;
  Tensor gates = ops::softmax(param({G, N, E}, 91).detach());
  const ops::TopKRouting tc = ops::topk_route(gates, opts(2, 0.9f));
  const ops::Assignment ec = ops::expert_choice_route(gates, 23);
  REQUIRE(ints(tc.assign.rows)[0] > 2 * 256);
  const auto sl = ints(tc.slot);
  REQUIRE(std::count(sl.begin(), sl.end(), -1) > 0);
  const int saved = num_threads();
  for (const ops::Assignment* a0 : {&tc.assign, &ec})
    for (int threads : {1, 2, 3}) {
      CAPTURE(threads);
      set_num_threads(threads);
      ops::Assignment a = *a0;
      a.weight = a0->weight.detach().set_requires_grad(true);
      Tensor x = param({G, N, d}, 92), w1 = param({E, d, H}, 93, 0.4f), b1 = param({E, H}, 94);
      Tensor w2 = param({E, H, O}, 95, 0.4f), b2 = param({E, O}, 96);
      const std::vector<Tensor> in = {x, a.weight, w1, b1, w2, b2};
      const Tensor gout = param({G, N, O}, 97).detach();
      auto run = [&](bool fused) {
        for (Tensor t : in) t.zero_grad();
        Tensor out = fused ? ops::moe_mlp(x, a, w1, b1, w2, b2)
                           : ops::combine(ops::expert_mlp(ops::dispatch(x, a), w1, b1, w2, b2, a.rows), a);
        ops::sum(ops::mul(out, gout)).backward();
        std::vector<std::vector<float>> r = {out.to_vector<float>()};
        for (const Tensor& t : in) r.push_back(t.grad().to_vector<float>());
        return r;
      };
      const auto fused = run(true), composed = run(false);
      for (size_t i = 0; i < fused.size(); ++i) {
        INFO("output 0, gradients of x, weight, w1, b1, w2, b2 1 to 6: " << i);
        CHECK(std::memcmp(fused[i].data(), composed[i].data(), fused[i].size() * sizeof(float)) == 0);
      }
      autograd::NoGrad ng;  // the forward without a graph (no GELU derivative kept): the same values
      const std::vector<float> plain = ops::moe_mlp(x, a, w1, b1, w2, b2).to_vector<float>();
      CHECK(std::memcmp(plain.data(), fused[0].data(), plain.size() * sizeof(float)) == 0);
    }
  set_num_threads(saved);
}

TEST_CASE("topk_load_probs: against a double reference, the composed ops, and saturation") {
  const int64_t G = 2, N = 5, E = 4;
  const int k = 2;
  const float sd = 0.5f;
  Tensor z = param({G, N, E}, 71), zn = param({G, N, E}, 72);
  ops::TopKRouting r = ops::topk_route(ops::softmax(zn.detach()), opts(k, 1.f));
  Tensor P = ops::topk_load_probs(z, zn, r.expert, sd);
  REQUIRE(P.shape() == Shape{G, N, E});
  const auto zv = z.to_vector<float>(), znv = zn.to_vector<float>();
  std::vector<float> want;
  for (int64_t t = 0; t < G * N; ++t) {
    std::vector<float> row(znv.begin() + t * E, znv.begin() + (t + 1) * E);
    std::sort(row.rbegin(), row.rend());
    const double th = row[size_t(k - 1)];  // the k-th largest noisy logit
    for (int64_t e = 0; e < E; ++e) want.push_back(float(0.5 * std::erfc(-((zv[size_t(t * E + e)] - th) / sd) / std::sqrt(2.0))));
  }
  check_close(P, want, 1e-6f, 1e-5f);
  // the same floats as the ops it replaces, normal_cdf((z - topk(zn).values[k-1]) / sd)
  Tensor t = ops::slice(ops::topk(zn, k).values, -1, k - 1, k);
  Tensor Pc = ops::normal_cdf(ops::mul(ops::sub(z, t), 1.f / sd));
  check_close(P, Pc.to_vector<float>(), 0, 0);
  Tensor gr = randn({G, N, E});
  ops::sum(ops::mul(P, gr)).backward();
  const auto gz = z.grad().to_vector<float>(), gzn = zn.grad().to_vector<float>();
  z.zero_grad();
  zn.zero_grad();
  ops::sum(ops::mul(Pc, gr)).backward();
  check_close(z.grad(), gz, 1e-6f, 1e-5f);
  check_close(zn.grad(), gzn, 1e-6f, 1e-5f);
  check_grad([&](const std::vector<Tensor>& v) { return ops::topk_load_probs(v[0], v[1], r.expert, sd); }, {z, zn});
  // |z - t| / sd >= 15: exactly 0 or 1, no gradient
  Tensor zs = Tensor::from({-8.f, 8.f, 0.1f}, {1, 1, 3}).set_requires_grad(true);
  Tensor zns = Tensor::from({0.f, 0.5f, 0.2f}, {1, 1, 3}).set_requires_grad(true);
  Tensor ex = Tensor::from_i64({1, 2}, {1, 1, 2});  // t = zns[2] = 0.2
  Tensor Ps = ops::topk_load_probs(zs, zns, ex, 0.5f);
  const auto pv = Ps.to_vector<float>();
  CHECK(pv[0] == 0.f);
  CHECK(pv[1] == 1.f);
  CHECK(pv[2] == doctest::Approx(0.5 * std::erfc(0.2 / std::sqrt(2.0))).epsilon(1e-6));
  ops::sum(Ps).backward();
  const auto gs = zs.grad().to_vector<float>(), gns = zns.grad().to_vector<float>();
  CHECK(gs[0] == 0.f);
  CHECK(gs[1] == 0.f);
  CHECK(gs[2] > 0.f);
  CHECK(gns == std::vector<float>{0.f, 0.f, -gs[2]});
}

TEST_CASE("sparse MoE ops: gradients") {
  const int64_t G = 2, N = 6, E = 4, d = 5;
  Tensor gates = separated_gates(G, N, E);
  SUBCASE("dispatch and combine") {
    ops::TopKRouting r = ops::topk_route(gates.detach(), opts(2, 0.75f));
    const ops::Assignment a = r.assign;
    const int64_t R = G * r.capacity;
    check_grad([&](const std::vector<Tensor>& v) { return ops::dispatch(v[0], a); }, {param({G, N, d}, 21)});
    check_grad([&](const std::vector<Tensor>& v) {
      ops::Assignment b = a;
      b.weight = v[1];
      return ops::combine(v[0], b);
    }, {param({E, R, d}, 22), param({E, R}, 23)});
  }
  SUBCASE("topk_route weights w.r.t. the gates") {
    for (bool bpr : {false, true})
      for (bool renorm : {false, true}) {
        CAPTURE(bpr);
        CAPTURE(renorm);
        const ops::TopKOptions o = opts(2, 0.75f, bpr, renorm);
        const auto sl = ints(ops::topk_route(gates, o).slot);
        REQUIRE(std::count(sl.begin(), sl.end(), -1) > 0);  // a dropped choice (its gate is in the sum)
        check_grad([&](const std::vector<Tensor>& v) { return ops::topk_route(v[0], o).assign.weight; }, {gates});
        // end to end: the combine-weight gradient reaches the gates (C = 3: R = 6 rows)
        check_grad([&](const std::vector<Tensor>& v) { return ops::combine(v[1], ops::topk_route(v[0], o).assign); },
                   {gates, param({E, G * 3, d}, 24)});
      }
  }
  SUBCASE("expert_choice_route weights") {
    const int64_t M = 11;
    std::vector<float> sv;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t n = 0; n < M; ++n)
        for (int64_t e = 0; e < E; ++e) sv.push_back(0.1f * float((7 * n + 3 * e + 5 * g) % M));  // distinct per column
    Tensor scores = Tensor::from(sv, {G, M, E}).set_requires_grad(true);
    check_grad([&](const std::vector<Tensor>& v) { return ops::expert_choice_route(v[0], 3).weight; }, {scores});
    check_grad([&](const std::vector<Tensor>& v) { return ops::expert_choice_route(scores.detach(), 3, v[0]).weight; },
               {param({G, M, E}, 25)});
  }
  SUBCASE("expert_matmul") {
    check_grad([](const std::vector<Tensor>& v) { return ops::expert_matmul(v[0], v[1], v[2]); },
               {param({3, 4, 5}, 26), param({3, 5, 2}, 27), param({3, 2}, 28)});
    check_grad([](const std::vector<Tensor>& v) { return ops::expert_matmul(v[0], v[1]); },
               {param({3, 4, 5}, 29), param({3, 5, 2}, 30)});
    const Tensor rows = Tensor::from_i64({4, 1, 0}, {3});
    check_grad([&](const std::vector<Tensor>& v) { return ops::expert_matmul(v[0], v[1], v[2], rows); },
               {param({3, 4, 5}, 35), param({3, 5, 2}, 36), param({3, 2}, 37)});
  }
  SUBCASE("expert_mlp") {
    const Tensor rows = Tensor::from_i64({4, 1, 0}, {3});
    check_grad([&](const std::vector<Tensor>& v) { return ops::expert_mlp(v[0], v[1], v[2], v[3], v[4], rows); },
               {param({3, 4, 5}, 81), param({3, 5, 6}, 82), param({3, 6}, 83), param({3, 6, 2}, 84),
                param({3, 2}, 85)});
    check_grad([](const std::vector<Tensor>& v) { return ops::expert_mlp(v[0], v[1], Tensor(), v[2], Tensor()); },
               {param({2, 3, 4}, 86), param({2, 4, 5}, 87), param({2, 5, 3}, 88)});
  }
  SUBCASE("moe_mlp") {
    ops::TopKRouting r = ops::topk_route(gates.detach(), opts(2, 0.75f));
    const ops::Assignment a = r.assign;
    const int64_t R = G * r.capacity;
    check_grad([&](const std::vector<Tensor>& v) {
      ops::Assignment b = a;
      b.weight = v[1];
      return ops::moe_mlp(v[0], b, v[2], v[3], v[4], v[5]);
    }, {param({G, N, d}, 41), param({E, R}, 42), param({E, d, 6}, 43), param({E, 6}, 44), param({E, 6, 3}, 45),
        param({E, 3}, 46)});
    check_grad([&](const std::vector<Tensor>& v) { return ops::moe_mlp(v[0], a, v[1], Tensor(), v[2], Tensor()); },
               {param({G, N, d}, 47), param({E, d, 4}, 48), param({E, 4, d}, 49)});
  }
  SUBCASE("soft_dispatch and soft_combine") {
    check_grad([](const std::vector<Tensor>& v) { return ops::soft_dispatch(v[0], v[1], 3); },
               {param({2, 5, 3}, 31), param({2, 5, 6}, 32)});
    check_grad([](const std::vector<Tensor>& v) { return ops::soft_combine(v[0], v[1]); },
               {param({3, 2, 2, 4}, 33), param({2, 5, 6}, 34)});
  }
}

TEST_CASE("soft MoE: dispatch weights sum to 1 over tokens, combine weights over slots") {
  const int64_t G = 2, N = 5, E = 3, p = 2, S = E * p;
  Tensor logits = param({G, N, S}, 41, 2.0f).detach();
  const auto lv = logits.to_vector<float>();
  // x = identity rows: slot (e, g, j) then holds its weights over the N tokens
  std::vector<float> eye;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < N; ++j) eye.push_back(n == j ? 1.f : 0.f);
  Tensor slots = ops::soft_dispatch(Tensor::from(eye, {G, N, N}), logits, E);
  REQUIRE(slots.shape() == Shape{E, G, p, N});
  std::vector<float> expect;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < p; ++j) {
        double z = 0;
        for (int64_t n = 0; n < N; ++n) z += std::exp(double(lv[size_t((g * N + n) * S + e * p + j)]));
        for (int64_t n = 0; n < N; ++n) expect.push_back(float(std::exp(double(lv[size_t((g * N + n) * S + e * p + j)])) / z));
      }
  check_close(slots, expect, 1e-6f);
  const auto slv = slots.contiguous().to_vector<float>();
  for (int64_t r = 0; r < E * G * p; ++r)
    CHECK(std::accumulate(slv.begin() + r * N, slv.begin() + (r + 1) * N, 0.0) == doctest::Approx(1.0).epsilon(1e-6));
  // y[e, g, j] = one-hot(e p + j): token n's output is its weights over the slots
  std::vector<float> onehot;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < p; ++j)
        for (int64_t s = 0; s < S; ++s) onehot.push_back(s == e * p + j ? 1.f : 0.f);
  Tensor out = ops::soft_combine(Tensor::from(onehot, {E, G, p, S}), logits);
  REQUIRE(out.shape() == Shape{G, N, S});
  std::vector<float> cw;
  for (int64_t r = 0; r < G * N; ++r) {
    double z = 0;
    for (int64_t s = 0; s < S; ++s) z += std::exp(double(lv[size_t(r * S + s)]));
    for (int64_t s = 0; s < S; ++s) cw.push_back(float(std::exp(double(lv[size_t(r * S + s)])) / z));
  }
  check_close(out, cw, 1e-6f);
  const auto ov = out.to_vector<float>();
  for (int64_t r = 0; r < G * N; ++r)
    CHECK(std::accumulate(ov.begin() + r * S, ov.begin() + (r + 1) * S, 0.0) == doctest::Approx(1.0).epsilon(1e-6));
}

TEST_CASE("one expert, k = 1, ample capacity: the MoE path is x w + b") {
  const int64_t G = 2, N = 7, d = 4, h = 3;
  Tensor gates = Tensor::full({G, N, 1}, 0.7f);
  ops::TopKRouting r = ops::topk_route(gates, opts(1, 1.0f));
  REQUIRE(r.capacity == N);
  CHECK(ints(r.assign.rows) == std::vector<int64_t>{G * N});
  ops::Assignment a = ops::make_assignment(r.assign.token, Tensor::ones({1, G * N}), G, N, N);
  Tensor x = param({G, N, d}, 51), w = param({1, d, h}, 52), b = param({1, h}, 53);
  Tensor y = ops::expert_matmul(ops::dispatch(x, a), w, b, a.rows);
  Tensor out = ops::combine(y, a);
  const auto xv = x.to_vector<float>(), wv = w.to_vector<float>(), bv = b.to_vector<float>();
  std::vector<float> expect;
  for (int64_t t = 0; t < G * N; ++t)
    for (int64_t j = 0; j < h; ++j) {
      double s = bv[size_t(j)];
      for (int64_t i = 0; i < d; ++i) s += double(xv[size_t(t * d + i)]) * wv[size_t(i * h + j)];
      expect.push_back(float(s));
    }
  check_close(out, expect, 1e-5f, 1e-5f);
}

TEST_CASE("sparse MoE ops: errors name the op, the shapes and the values") {
  Tensor gates = hand_gates();  // (1, 4, 3)
  Tensor two = Tensor::full({1, 4, 2}, 0.5f);
  CHECK_THROWS_WITH_AS(ops::topk_route(two, opts(3, 1.f)),
                       doctest::Contains("topk_route: k = 3 is larger than the 2 experts"), Error);
  CHECK_THROWS_WITH_AS(ops::topk_route(gates, opts(0, 1.f)), doctest::Contains("k = 0 must be at least 1"), Error);
  CHECK_THROWS_WITH_AS(ops::topk_route(gates, opts(1, -0.5f)), doctest::Contains("capacity factor -0.5 must be > 0"),
                       Error);  // (0 is dropless)
  CHECK_THROWS_WITH_AS(ops::topk_capacity(10, 1, -1.f, 4, false),
                       doctest::Contains("topk_capacity: capacity factor -1 must be > 0"), Error);
  CHECK_THROWS_WITH_AS(ops::topk_route(Tensor::full({4, 3}, 0.3f), opts(1, 1.f)),
                       doctest::Contains("topk_route: gates must be (G, N, E), got F32 (4, 3)"), Error);

  CHECK_THROWS_WITH_AS(ops::expert_choice_route(gates, 5),
                       doctest::Contains("expert_choice_route: capacity 5 is outside [1, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_choice_route(gates, 0), doctest::Contains("capacity 0 is outside [1, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_choice_route(gates, 2, Tensor::zeros({1, 4, 2})),
                       doctest::Contains("expert_choice_route: weights F32 (1, 4, 2) cpu must match scores"), Error);

  ops::TopKRouting r = ops::topk_route(gates, opts(2, 0.75f));  // (E, R) = (3, 2), G = 1, N = 4
  CHECK_THROWS_WITH_AS(ops::dispatch(Tensor::zeros({2, 4, 5}), r.assign),
                       doctest::Contains("dispatch: x F32 (2, 4, 5) cpu does not match the assignment's (G, N) = (1, 4)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::dispatch(Tensor::zeros({4, 5}), r.assign),
                       doctest::Contains("dispatch: x must be (G, N, d)"), Error);
  ops::Assignment bad = r.assign;
  bad.token = r.assign.weight;
  CHECK_THROWS_WITH_AS(ops::dispatch(Tensor::zeros({1, 4, 5}), bad),
                       doctest::Contains("dispatch: assignment tokens must be an I64 (E, R)"), Error);
  bad = r.assign;
  bad.N = 3;  // token 3 no longer exists
  CHECK_THROWS_WITH_AS(ops::dispatch(Tensor::zeros({1, 3, 5}), bad),
                       doctest::Contains("assignment token_rows must be I64 (1, 3, K)"), Error);
  bad = r.assign;
  bad.rows = Tensor::from_i64({1, 2, 2}, {3});  // e0's second row holds a token past its rows
  CHECK_THROWS_WITH_AS(ops::dispatch(Tensor::zeros({1, 4, 5}), bad),
                       doctest::Contains("dispatch: row (0, 1) holds token 3 but expert 0 uses only 1 rows"), Error);
  bad = r.assign;
  bad.token_rows = Tensor::from_i64({2, -1, 3, 4, 0, 5, 0, -1}, {1, 4, 2});  // t3 claims t2's row 0
  CHECK_THROWS_WITH_AS(ops::combine(Tensor::zeros({3, 2, 5}), bad),
                       doctest::Contains("combine: token_rows of token 3 lists row 0, which does not hold that token"),
                       Error);
  bad = r.assign;
  bad.C = 3;
  CHECK_THROWS_WITH_AS(ops::dispatch(Tensor::zeros({1, 4, 5}), bad),
                       doctest::Contains("do not have R = G*C = 1*3 rows per expert"), Error);
  CHECK_THROWS_WITH_AS(ops::combine(Tensor::zeros({3, 3, 5}), r.assign),
                       doctest::Contains("combine: y F32 (3, 3, 5) cpu does not match the assignment I64 (3, 2) cpu: expected (3, 2, d)"),
                       Error);
  bad = r.assign;
  bad.weight = Tensor::zeros({3, 3});
  CHECK_THROWS_WITH_AS(ops::combine(Tensor::zeros({3, 2, 5}), bad),
                       doctest::Contains("combine: assignment weights F32 (3, 3) cpu do not match"), Error);

  CHECK_THROWS_WITH_AS(ops::moe_mlp(Tensor::zeros({2, 4, 5}), r.assign, Tensor::zeros({3, 5, 2}), Tensor(),
                                    Tensor::zeros({3, 2, 5}), Tensor()),
                       doctest::Contains("moe_mlp: x F32 (2, 4, 5) cpu does not match the assignment's (G, N) = (1, 4)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::moe_mlp(Tensor::zeros({1, 4, 5}), r.assign, Tensor::zeros({3, 4, 2}), Tensor(),
                                    Tensor::zeros({3, 2, 5}), Tensor()),
                       doctest::Contains("moe_mlp: w1 F32 (3, 4, 2) cpu must be (3, 5, h)"), Error);
  bad = r.assign;
  bad.weight = Tensor();
  CHECK_THROWS_WITH_AS(ops::moe_mlp(Tensor::zeros({1, 4, 5}), bad, Tensor::zeros({3, 5, 2}), Tensor(),
                                    Tensor::zeros({3, 2, 5}), Tensor()),
                       doctest::Contains("moe_mlp: the assignment has no weights"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_mlp(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 6, 2}), Tensor(),
                                       Tensor::zeros({3, 2, 5}), Tensor()),
                       doctest::Contains("expert_mlp: w1 F32 (3, 6, 2) cpu must be (3, 5, h)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_mlp(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor(),
                                       Tensor::zeros({3, 3, 5}), Tensor()),
                       doctest::Contains("expert_mlp: w2 F32 (3, 3, 5) cpu must be (3, 2, o)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_mlp(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor::zeros({3, 5}),
                                       Tensor::zeros({3, 2, 5}), Tensor()),
                       doctest::Contains("expert_mlp: b1 F32 (3, 5) cpu must be (3, 2)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_mlp(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor(),
                                       Tensor::zeros({3, 2, 5}), Tensor::zeros({3, 2})),
                       doctest::Contains("expert_mlp: b2 F32 (3, 2) cpu must be (3, 5)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_mlp(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor(),
                                       Tensor::zeros({3, 2, 5}), Tensor(), Tensor::from_i64({4, 5, 0}, {3})),
                       doctest::Contains("expert_mlp: rows[1] = 5 is outside [0, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_matmul(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 6, 2})),
                       doctest::Contains("expert_matmul: w F32 (3, 6, 2) cpu must be (3, 5, h)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_matmul(Tensor::zeros({3, 4, 5}), Tensor::zeros({2, 5, 2})),
                       doctest::Contains("expert_matmul: w F32 (2, 5, 2) cpu must be (3, 5, h)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_matmul(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor::zeros({2})),
                       doctest::Contains("expert_matmul: bias F32 (2) cpu must be (3, 2)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_matmul(Tensor::zeros({4, 5}), Tensor::zeros({3, 5, 2})),
                       doctest::Contains("expert_matmul: expected x (E, M, d) and w (E, d, h)"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_matmul(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor(),
                                          Tensor::from_i64({4, 5, 0}, {3})),
                       doctest::Contains("expert_matmul: rows[1] = 5 is outside [0, 4]"), Error);
  CHECK_THROWS_WITH_AS(ops::expert_matmul(Tensor::zeros({3, 4, 5}), Tensor::zeros({3, 5, 2}), Tensor(),
                                          Tensor::zeros({3})),
                       doctest::Contains("expert_matmul: rows F32 (3) cpu must be I64 (3)"), Error);

  Tensor z = Tensor::zeros({1, 4, 3});
  CHECK_THROWS_WITH_AS(ops::topk_load_probs(z, Tensor::zeros({1, 4, 2}), r.expert, 1.f),
                       doctest::Contains("topk_load_probs: expected z and zn (G, N, E) of one shape"), Error);
  CHECK_THROWS_WITH_AS(ops::topk_load_probs(z, z, Tensor::zeros({1, 4, 2}), 1.f),
                       doctest::Contains("topk_load_probs: expert F32 (1, 4, 2) cpu must be I64 (1, 4, k)"), Error);
  CHECK_THROWS_WITH_AS(ops::topk_load_probs(z, z, r.expert, 0.f),
                       doctest::Contains("topk_load_probs: noise std 0 must be > 0"), Error);
  CHECK_THROWS_WITH_AS(ops::topk_load_probs(z, z, Tensor::from_i64({0, 3, 0, 1, 0, 1, 0, 1}, {1, 4, 2}), 1.f),
                       doctest::Contains("topk_load_probs: token 0 chose expert 3, outside [0, 3)"), Error);

  CHECK_THROWS_WITH_AS(ops::soft_dispatch(Tensor::zeros({2, 5, 3}), Tensor::zeros({2, 5, 7}), 3),
                       doctest::Contains("soft_dispatch: 7 slots in logits"), Error);
  CHECK_THROWS_WITH_AS(ops::soft_dispatch(Tensor::zeros({2, 5, 3}), Tensor::zeros({2, 4, 6}), 3),
                       doctest::Contains("must have the (G, N) of x"), Error);
  CHECK_THROWS_WITH_AS(ops::soft_combine(Tensor::zeros({3, 2, 2, 4}), Tensor::zeros({2, 5, 5})),
                       doctest::Contains("soft_combine: logits F32 (2, 5, 5) cpu must be (2, N, 6)"), Error);
}
