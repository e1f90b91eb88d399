// MoE routing on the CPU (methods.md sections 2 and 3): top-k token choice with capacity and
// Batch Prioritized Routing, the probabilities of V-MoE's load loss, and expert choice. Each
// returns an Assignment (ops/moe.h) that dispatch and combine read.
//
// Routing is integer bookkeeping over O(G N k) choices; values are ranked through packed
// integer keys (below), so selection and sorting never branch on floats.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/fast_math.h"
#include "ops/moe.h"

namespace mv::ops {

using autograd::record;

namespace {


// Routing ranks values "larger first, ties to the lower index" (NaN as largest, like ops::topk).
// rank_key packs (value, index) into one integer whose descending order is exactly that order,
// so selection and sorting are integer max / compare: no branches on floats, which mispredict
// on random gates. order_bits maps floats to unsigned ints monotonically (-0 as +0, NaN as +inf)
// and is never 0, so a zeroed key sorts below every real one. Indices must be < 2^32.
inline uint32_t order_bits(float v) {
  v = v != v ? INFINITY : v + 0.0f;  // + 0.0f turns -0 into +0
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u ^ ((0u - (u >> 31)) | 0x80000000u);  // negatives: flip all bits; positives: the sign
}
inline uint64_t rank_key(float v, int64_t i) { return (uint64_t(order_bits(v)) << 32) | uint32_t(~uint32_t(i)); }
inline int64_t key_index(uint64_t key) { return int64_t(~uint32_t(key)); }

int64_t capacity_for(const char* op, int64_t tokens, int k, float c, int64_t experts, bool round_to_4) {
  MV_CHECK(experts >= 1, op, ": needs at least one expert, got ", experts);
  MV_CHECK(k >= 1, op, ": k = ", k, " must be at least 1");
  MV_CHECK(k <= experts, op, ": k = ", k, " is larger than the ", experts, " experts");
  MV_CHECK(c > 0 && std::isfinite(c), op, ": capacity factor ", c, " must be > 0");
  MV_CHECK(tokens >= 0, op, ": token count ", tokens, " must be >= 0");
  // c arrives as a float (1.1f = 1.10000002): a product within 1e-6 relative of an integer is
  // that integer, so that C is the ceiling of the decimal factor the user wrote.
  const double x = double(tokens) * k * double(c) / double(experts);
  int64_t C = int64_t(std::ceil(x - 1e-6 * x));
  if (round_to_4) C = (C + 3) / 4 * 4;
  return std::max<int64_t>(1, std::min(C, tokens));
}

}  // namespace

int64_t topk_capacity(int64_t tokens, int k, float capacity_factor, int64_t experts, bool round_to_4) {
  return capacity_for("topk_capacity", tokens, k, capacity_factor, experts, round_to_4);
}

// ---- top-k token choice ------------------------------------------------------------------------

TopKRouting topk_route(const Tensor& gates_, const TopKOptions& opt) {
  expect_cpu_f32("topk_route", {&gates_});
  MV_CHECK(gates_.ndim() == 3, "topk_route: gates must be (G, N, E), got ", gates_.str());
  const int64_t G = gates_.size(0), N = gates_.size(1), E = gates_.size(2);
  MV_CHECK(N < (int64_t(1) << 32) && E < (int64_t(1) << 32), "topk_route: gates ", gates_.str(),
           " has more than 2^32 tokens or experts");
  const int k = opt.k;
  const int64_t C = capacity_for("topk_route", N, k, opt.capacity_factor, E, opt.round_to_4);
  const int64_t R = G * C;
  Tensor gates = gates_.contiguous();
  const float* pg = gates.data<float>();

  TopKRouting out;
  out.capacity = C;
  out.expert = Tensor::empty({G, N, k}, DType::I64);
  out.slot = Tensor::empty({G, N, k}, DType::I64);
  Tensor token = Tensor::empty({E, R}, DType::I64);
  Tensor weight = Tensor::empty({E, R});
  Tensor rows = Tensor::empty({E}, DType::I64);
  Tensor token_rows = Tensor::empty({G, N, k}, DType::I64);
  Tensor chosen = Tensor::empty({G, N, k});  // the chosen gates, best first
  std::vector<int64_t> count(size_t(G * E));  // kept choices per (group, expert), then offsets
  int64_t* pe = out.expert.data<int64_t>();
  int64_t* ps = out.slot.data<int64_t>();
  int64_t* pt = token.data<int64_t>();
  float* pw = weight.data<float>();
  int64_t* pr = rows.data<int64_t>();
  int64_t* ptr = token_rows.data<int64_t>();
  int64_t* pc = count.data();
  float* pv = chosen.data<float>();

  // 1. Each token's k best experts: k rounds of a branchless integer argmax over the row's
  // rank keys, O(E k); a chosen key is then zeroed, below every other. Tokens go kLanes at a
  // time, their keys laid out expert-major, so that each max runs across the tokens (vectorised;
  // one token's E keys are too few for that).
  parallel_for(G * N, E * k * 2, [&](int64_t s, int64_t e) {
    constexpr int64_t kLanes = 16;
    std::vector<uint64_t> key(static_cast<size_t>(E * kLanes));
    for (int64_t t0 = s; t0 < e; t0 += kLanes) {
      const int64_t m = std::min(kLanes, e - t0);
      for (int64_t x = 0; x < E; ++x)
        for (int64_t j = 0; j < m; ++j) key[size_t(x * kLanes + j)] = rank_key(pg[(t0 + j) * E + x], x);
      for (int r = 0; r < k; ++r) {
        uint64_t best[kLanes] = {};  // lanes past m read stale keys and are never used
        for (int64_t x = 0; x < E; ++x)
          for (int64_t j = 0; j < kLanes; ++j) best[j] = std::max(best[j], key[size_t(x * kLanes + j)]);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t bi = key_index(best[j]), t = t0 + j;
          key[size_t(bi * kLanes + j)] = 0;
          pe[t * k + r] = bi;
          pv[t * k + r] = pg[t * E + bi];
        }
      }
    }
  });

  // 2. Per group, fill the experts rank by rank, tokens in sequence order or (BPR) by their best
  // gate, descending and stable: slot holds a choice's place among its expert's choices from the
  // group (-1 past C). Groups are independent.
  const bool bpr = opt.bpr, renorm = opt.renormalize;
  const int64_t sort_cost = bpr ? 8 * (64 - __builtin_clzll(uint64_t(N) | 1)) : 0;
  // Captures by value: sizes in registers, not re-read after every store through ps.
  parallel_for(G, N * (k * 4 + sort_cost), [=](int64_t s, int64_t e) {
    std::vector<int64_t> order(static_cast<size_t>(N));
    std::vector<uint64_t> key(static_cast<size_t>(bpr ? N : 0));
    std::vector<int64_t> used(static_cast<size_t>(E));
    for (int64_t g = s; g < e; ++g) {
      if (bpr) {  // by best gate, descending, ties in sequence order
        const float* vg = pv + g * N * k;
        for (int64_t n = 0; n < N; ++n) key[size_t(n)] = rank_key(vg[n * k], n);
        std::sort(key.begin(), key.end(), std::greater<uint64_t>());
        for (int64_t n = 0; n < N; ++n) order[size_t(n)] = key_index(key[size_t(n)]);
      } else {
        std::iota(order.begin(), order.end(), int64_t(0));
      }
      std::fill(used.begin(), used.end(), int64_t(0));
      for (int r = 0; r < k; ++r) {
        for (int64_t n : order) {
          const int64_t t = (g * N + n) * k;
          int64_t& u = used[size_t(pe[t + r])];
          ps[t + r] = u < C ? u++ : -1;
        }
      }
      std::copy(used.begin(), used.end(), pc + g * E);
    }
  });

  // 3. Expert e's rows: group g's choices start after those of the groups before it.
  {
    std::vector<int64_t> acc(size_t(E), 0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t x = 0; x < E; ++x) {
        const int64_t v = pc[g * E + x];
        pc[g * E + x] = acc[size_t(x)];
        acc[size_t(x)] += v;
      }
    std::copy(acc.begin(), acc.end(), pr);
  }

  // 4. Place every kept choice at its row; each row is written by the one token that owns it.
  parallel_for(G, N * k * 8, [=](int64_t s, int64_t e) {
    for (int64_t g = s; g < e; ++g)
      for (int64_t t = g * N; t < (g + 1) * N; ++t) {
        float sum = 0;
        if (renorm)
          for (int j = 0; j < k; ++j) sum += pv[t * k + j];
        for (int r = 0; r < k; ++r) {
          const int64_t i = t * k + r, x = pe[i];
          if (ps[i] < 0) {
            ptr[i] = -1;
            continue;
          }
          const int64_t row = pc[g * E + x] + ps[i];
          ps[i] = row;
          ptr[i] = x * R + row;
          pt[x * R + row] = t;
          pw[x * R + row] = !renorm ? pv[i] : sum != 0 ? pv[i] / sum : 0.f;
        }
      }
  });
  // 5. The unused tail of every expert.
  for (int64_t x = 0; x < E; ++x) {
    std::fill(pt + x * R + pr[x], pt + (x + 1) * R, int64_t(-1));
    std::fill(pw + x * R + pr[x], pw + (x + 1) * R, 0.f);
  }

  // weight_r = gate_r, or gate_r / S with S = sum_j gate_j over the token's k choices:
  //   dL/dgate_j = gw_j / S - sum_r gw_r gate_r / S^2 = (gw_j - sum_r gw_r w_r) / S,
  // gw_r = dL/dweight_r, 0 for a dropped choice (which still receives the second term).
  weight = record("topk_route", weight, {gates_},
                  [expert = out.expert, slot = out.slot, chosen, G, N, E, R, k, renorm](const Tensor& g_) {
                    Tensor gw = g_.contiguous();
                    Tensor gx = Tensor::zeros({G, N, E});
                    const float* pgw = gw.data<float>();
                    const int64_t* pe = expert.data<int64_t>();
                    const int64_t* ps = slot.data<int64_t>();
                    const float* pv = chosen.data<float>();
                    float* po = gx.data<float>();
                    parallel_for(G * N, 4 * k, [&](int64_t s, int64_t e) {
                      std::vector<float> gr(static_cast<size_t>(k));
                      for (int64_t t = s; t < e; ++t) {
                        for (int r = 0; r < k; ++r) {
                          const int64_t row = ps[t * k + r];
                          gr[size_t(r)] = row < 0 ? 0.f : pgw[pe[t * k + r] * R + row];
                        }
                        float* grow = po + t * E;
                        if (!renorm) {
                          for (int r = 0; r < k; ++r) grow[pe[t * k + r]] = gr[size_t(r)];
                          continue;
                        }
                        float sum = 0, dot_gw = 0;
                        for (int r = 0; r < k; ++r) sum += pv[t * k + r];
                        if (sum == 0) continue;
                        for (int r = 0; r < k; ++r) dot_gw += gr[size_t(r)] * pv[t * k + r] / sum;
                        for (int r = 0; r < k; ++r) grow[pe[t * k + r]] = (gr[size_t(r)] - dot_gw) / sum;
                      }
                    });
                    return std::vector<Tensor>{gx};
                  });
  out.assign = Assignment{token, weight, rows, token_rows, G, N, C};
  return out;
}

// ---- the load loss's probabilities --------------------------------------------------------------

// v[t, e] = (z[t, e] - th[t]) * inv for the tokens t in [s, e) (E experts each)
static void load_scores(const float* z, const float* th, int64_t E, float inv, int64_t s, int64_t e, float* v) {
  for (int64_t t = s; t < e; ++t)
    for (int64_t x = 0; x < E; ++x) v[t * E + x] = (z[t * E + x] - th[t]) * inv;
}

// P = Phi(v), v = (z - t) / std, t = zn[expert_{k-1}]  (the same float steps as
// normal_cdf(mul(sub(z, t), 1 / std))):
//   dz = g phi(v) / std;  dzn[expert_{k-1}] = dt = -sum_e dz_e, the rest of dzn 0
// Each thread first writes v for its tokens, then maps Phi or phi over them in one flat loop,
// which vectorises (a loop over one token's E experts is too short for that). phi is taken as 0
// beyond |v| = 9 (phi(9) = 1e-18): the far tail's g phi / std would be subnormal floats, which
// cost x86 a microcode assist each (~100 cycles) and change nothing a float sum can hold.
Tensor topk_load_probs(const Tensor& z_, const Tensor& zn_, const Tensor& expert_, float noise_std) {
  expect_cpu_f32("topk_load_probs", {&z_, &zn_});
  MV_CHECK(z_.ndim() == 3 && zn_.shape() == z_.shape(), "topk_load_probs: expected z and zn (G, N, E) of one shape, got z ",
           z_.str(), " and zn ", zn_.str());
  const int64_t G = z_.size(0), N = z_.size(1), E = z_.size(2);
  MV_CHECK(is_cpu_i64(expert_, 3) && expert_.size(0) == G && expert_.size(1) == N && expert_.size(2) >= 1 &&
               expert_.size(2) <= E,
           "topk_load_probs: expert ", str_of(expert_), " must be I64 (", G, ", ", N, ", k), 1 <= k <= ", E,
           ", for z ", z_.str());
  MV_CHECK(noise_std > 0.f && std::isfinite(noise_std), "topk_load_probs: noise std ", noise_std, " must be > 0");
  const int64_t k = expert_.size(2);
  const Tensor z = z_.contiguous(), zn = zn_.contiguous(), expert = expert_.contiguous();
  const int64_t* pe = expert.data<int64_t>();
  const float* pzn = zn.data<float>();
  // t of every token, its k-th choice checked here so that no read goes out of bounds.
  std::vector<float> th(size_t(G * N));
  for (int64_t t = 0; t < G * N; ++t) {
    const int64_t x = pe[t * k + k - 1];
    MV_CHECK(x >= 0 && x < E, "topk_load_probs: token ", t, " chose expert ", x, ", outside [0, ", E, ")");
    th[size_t(t)] = pzn[t * E + x];
  }
  const float inv = 1.f / noise_std;
  const float* pz = z.data<float>();
  Tensor out = Tensor::empty({G, N, E});
  float* po = out.data<float>();
  parallel_for(G * N, E * 32, [&](int64_t s, int64_t e) {
    load_scores(pz, th.data(), E, inv, s, e, po);
    for (int64_t i = s * E; i < e * E; ++i) po[i] = fast_normal_cdf(po[i]);
  });
  const bool gz = z_.requires_grad(), gzn = zn_.requires_grad();
  return record("topk_load_probs", out, {z_, zn_},
                [z = z.detach(), th = std::move(th), expert, inv, gz, gzn, G, N, E, k](const Tensor& g_) {
                  const Tensor g = g_.contiguous();
                  const float* pg = g.data<float>();
                  const float* pz = z.data<float>();
                  const int64_t* pe = expert.data<int64_t>();
                  Tensor dz = Tensor::empty({G, N, E});
                  Tensor dzn = gzn ? Tensor::zeros({G, N, E}) : Tensor();
                  float* pdz = dz.data<float>();
                  float* pdzn = gzn ? dzn.data<float>() : nullptr;
                  parallel_for(G * N, E * 16, [&](int64_t s, int64_t e) {
                    load_scores(pz, th.data(), E, inv, s, e, pdz);
                    for (int64_t i = s * E; i < e * E; ++i) {
                      const float v = pdz[i], phi = std::fabs(v) > 9.f ? 0.f : fast_normal_pdf(v);
                      pdz[i] = pg[i] * phi * inv;
                    }
                    if (pdzn)
                      for (int64_t t = s; t < e; ++t) {
                        float dt = 0;
                        for (int64_t x = 0; x < E; ++x) dt -= pdz[t * E + x];
                        pdzn[t * E + pe[t * k + k - 1]] = dt;
                      }
                  });
                  return std::vector<Tensor>{gz ? dz : Tensor(), dzn};
                });
}

// ---- expert choice -----------------------------------------------------------------------------

Assignment expert_choice_route(const Tensor& scores_, int64_t C, const Tensor& weights_) {
  expect_cpu_f32("expert_choice_route", {&scores_});
  MV_CHECK(scores_.ndim() == 3, "expert_choice_route: scores must be (G, N, E), got ", scores_.str());
  const Tensor& wsrc = weights_.defined() ? weights_ : scores_;
  expect_cpu_f32("expert_choice_route", {&wsrc});
  MV_CHECK(wsrc.shape() == scores_.shape(), "expert_choice_route: weights ", wsrc.str(),
           " must match scores ", scores_.str());
  const int64_t G = scores_.size(0), N = scores_.size(1), E = scores_.size(2);
  MV_CHECK(C >= 1 && C <= N, "expert_choice_route: capacity ", C, " is outside [1, ", N,
           "] (the tokens of a group) for scores ", scores_.str());
  MV_CHECK(N < (int64_t(1) << 32), "expert_choice_route: scores ", scores_.str(), " has more than 2^32 tokens");
  const int64_t R = G * C;
  Tensor scores = scores_.contiguous(), w = wsrc.contiguous();
  const float* psc = scores.data<float>();
  const float* pwi = w.data<float>();
  Tensor token = Tensor::empty({E, R}, DType::I64), weight = Tensor::empty({E, R});
  Tensor rows = Tensor::empty({E}, DType::I64);  // every row is used
  std::fill(rows.data<int64_t>(), rows.data<int64_t>() + E, R);
  // token_rows[t, e]: the row of expert e that token t fills, if any.
  Tensor token_rows = Tensor::empty({G, N, E}, DType::I64);
  int64_t* pt = token.data<int64_t>();
  float* pw = weight.data<float>();
  int64_t* ptr = token_rows.data<int64_t>();
  std::fill(ptr, ptr + token_rows.numel(), int64_t(-1));
  // Per (g, e): select the top C of the score column, then order them: O(N + C log C). Sorted
  // as packed keys (rank_key): integer compares, ties to the lower token. Every (t, e) entry of
  // token_rows is written by the one (g, e) that owns it.
  const int64_t log_c = 64 - __builtin_clzll(uint64_t(C) | 1);
  parallel_for(G * E, N * (4 + log_c), [=](int64_t s, int64_t e) {
    std::vector<uint64_t> key(static_cast<size_t>(N));
    for (int64_t ge = s; ge < e; ++ge) {
      const int64_t g = ge / E, x = ge % E;
      for (int64_t n = 0; n < N; ++n) key[size_t(n)] = rank_key(psc[(g * N + n) * E + x], n);
      const auto top = key.begin() + C;
      if (C < N) std::nth_element(key.begin(), top - 1, key.end(), std::greater<uint64_t>());
      std::sort(key.begin(), top, std::greater<uint64_t>());
      for (int64_t c = 0; c < C; ++c) {
        const int64_t n = key_index(key[size_t(c)]), i = x * R + g * C + c;
        pt[i] = g * N + n;
        pw[i] = pwi[(g * N + n) * E + x];
        ptr[(g * N + n) * E + x] = i;
      }
    }
  });
  // d weight[e, r] / d w[token, e] = 1: a scatter; each (t, e) is in at most one row.
  weight = record("expert_choice_route", weight, {wsrc}, [token, G, N, E, R](const Tensor& g_) {
    Tensor gw = g_.contiguous();
    Tensor gx = Tensor::zeros({G, N, E});
    const float* pgw = gw.data<float>();
    const int64_t* pt = token.data<int64_t>();
    float* po = gx.data<float>();
    parallel_for(E * R, 4, [&](int64_t s, int64_t e) {
      for_rows(s, e, R, [&](int64_t i, int64_t x, int64_t) { po[pt[i] * E + x] = pgw[i]; });
    });
    return std::vector<Tensor>{gx};
  });
  return Assignment{token, weight, rows, token_rows, G, N, C};
}

}  // namespace mv::ops
