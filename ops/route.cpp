// MoE routing (methods.md sections 2 and 3): top-k token choice with capacity and Batch
// Prioritized Routing, the probabilities of V-MoE's load loss and expert choice (their CUDA
// twins: cuda/route.cu). Each returns an Assignment (ops/moe.h) that dispatch and combine read.
//
// topk_route runs in five named stages, each a kernel a CUDA twin can mirror one for one:
//   1. topk_choices   each token's k best experts and their gates;
//   2. capacity_for   C = ceil(N k c / E) (host arithmetic);
//   3. fill_order     per group, the order in which tokens claim slots: sequence order, or with
//                     BPR by best gate, descending;
//   4. assign_slots   per group, every choice's slot in its expert's buffer, rank by rank in that
//                     order; a choice past C is dropped (slot -1);
//   5. place_choices  each expert's rows packed group after group: the Assignment's tables, the
//                     dropped choices left out.
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
#include "ops/dispatch.h"
#include "ops/fast_math.h"
#include "ops/moe.h"

namespace mv::cpu {

using ops::Assignment;

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

}  // namespace

// ---- top-k token choice, stage by stage -------------------------------------------------------

// gates: (G, N, E) contiguous -> expert (G, N, k) I64, best first (ties: lower expert; NaN as
// largest), and gate (G, N, k) F32, the chosen gates. k rounds of a branchless integer argmax
// over each row's rank keys, O(E k); a chosen key is then zeroed, below every other. Tokens go
// kLanes at a time, their keys laid out expert-major, so that each max runs across the tokens
// (vectorised; one token's E keys are too few for that).
ops::TopKChoices topk_choices(const Tensor& gates, int k) {
  const int64_t G = gates.size(0), N = gates.size(1), E = gates.size(2);
  ops::TopKChoices o{Tensor::empty({G, N, k}, DType::I64), Tensor::empty({G, N, k})};
  const float* pg = gates.data<float>();
  int64_t* pe = o.expert.data<int64_t>();
  float* pv = o.gate.data<float>();
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
  return o;
}

// gate: (G, N, k) -> (G, N) I64: per group, the tokens in the order they claim slots: sequence
// order, or with BPR by their best gate, descending (ties in sequence order).
Tensor fill_order(const Tensor& gate, bool bpr) {
  const int64_t G = gate.size(0), N = gate.size(1), k = gate.size(2);
  Tensor order = Tensor::empty({G, N}, DType::I64);
  int64_t* po = order.data<int64_t>();
  const float* pv = gate.data<float>();
  const int64_t sort_cost = bpr ? 8 * (64 - __builtin_clzll(uint64_t(N) | 1)) : 1;
  parallel_for(G, N * sort_cost, [=](int64_t s, int64_t e) {
    std::vector<uint64_t> key(static_cast<size_t>(bpr ? N : 0));
    for (int64_t g = s; g < e; ++g) {
      int64_t* og = po + g * N;
      if (!bpr) {
        std::iota(og, og + N, int64_t(0));
        continue;
      }
      const float* vg = pv + g * N * k;
      for (int64_t n = 0; n < N; ++n) key[size_t(n)] = rank_key(vg[n * k], n);
      std::sort(key.begin(), key.end(), std::greater<uint64_t>());
      for (int64_t n = 0; n < N; ++n) og[n] = key_index(key[size_t(n)]);
    }
  });
  return order;
}

// expert: (G, N, k), order: (G, N) from fill_order -> slot (G, N, k) I64, each choice's place
// among its expert's choices from the group (-1 past C: dropped), and count (G, E) I64, the kept
// choices per group and expert. Per group the experts fill rank by rank: every rank-0 choice
// before any rank-1 choice, each rank in the fill order. Groups are independent.
ops::Slots assign_slots(const Tensor& expert, const Tensor& order, int64_t E, int64_t C) {
  const int64_t G = expert.size(0), N = expert.size(1), k = expert.size(2);
  ops::Slots o{Tensor::empty({G, N, k}, DType::I64), Tensor::empty({G, E}, DType::I64)};
  const int64_t* pe = expert.data<int64_t>();
  const int64_t* po = order.data<int64_t>();
  int64_t* ps = o.slot.data<int64_t>();
  int64_t* pc = o.count.data<int64_t>();
  // Captures by value: sizes in registers, not re-read after every store through ps.
  parallel_for(G, N * k * 4, [=](int64_t s, int64_t e) {
    for (int64_t g = s; g < e; ++g) {
      int64_t* used = pc + g * E;
      std::fill(used, used + E, int64_t(0));
      for (int64_t r = 0; r < k; ++r)
        for (int64_t j = 0; j < N; ++j) {
          const int64_t t = (g * N + po[g * N + j]) * k;
          int64_t& u = used[pe[t + r]];
          ps[t + r] = u < C ? u++ : -1;
        }
    }
  });
  return o;
}

// expert, gate: (G, N, k), slots from assign_slots -> the Assignment (weights not yet recorded)
// and slot (G, N, k), each kept choice's row in its expert's packed buffer (-1: dropped). Expert
// e's rows hold group g's choices after those of the groups before it; the combine weight of a
// kept choice is its gate, or its gate over the token's k gates with renormalize; every row past
// an expert's kept choices is unused (token -1, weight 0).
ops::Placement place_choices(const Tensor& expert, const Tensor& gate, const ops::Slots& slots, int64_t E, int64_t C,
                             bool renorm) {
  const int64_t G = expert.size(0), N = expert.size(1), k = expert.size(2), R = G * C;
  ops::Placement o;
  o.slot = Tensor::empty({G, N, k}, DType::I64);
  Tensor token = Tensor::empty({E, R}, DType::I64), weight = Tensor::empty({E, R});
  Tensor rows = Tensor::empty({E}, DType::I64), token_rows = Tensor::empty({G, N, k}, DType::I64);
  const int64_t* pe = expert.data<int64_t>();
  const float* pv = gate.data<float>();
  const int64_t* pls = slots.slot.data<int64_t>();
  int64_t* ps = o.slot.data<int64_t>();
  int64_t* pt = token.data<int64_t>();
  float* pw = weight.data<float>();
  int64_t* pr = rows.data<int64_t>();
  int64_t* ptr = token_rows.data<int64_t>();
  // Where group g's choices start in expert e's rows: the counts of the groups before it.
  std::vector<int64_t> start(size_t(G * E));
  {
    const int64_t* pc = slots.count.data<int64_t>();
    std::vector<int64_t> acc(size_t(E), 0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t x = 0; x < E; ++x) {
        start[size_t(g * E + x)] = acc[size_t(x)];
        acc[size_t(x)] += pc[g * E + x];
      }
    std::copy(acc.begin(), acc.end(), pr);
  }
  const int64_t* pst = start.data();
  // Every kept choice at its row; each row is written by the one token that owns it.
  parallel_for(G, N * k * 8, [=](int64_t s, int64_t e) {
    for (int64_t g = s; g < e; ++g)
      for (int64_t t = g * N; t < (g + 1) * N; ++t) {
        float sum = 0;
        if (renorm)
          for (int j = 0; j < k; ++j) sum += pv[t * k + j];
        for (int r = 0; r < k; ++r) {
          const int64_t i = t * k + r, x = pe[i];
          if (pls[i] < 0) {
            ps[i] = ptr[i] = -1;
            continue;
          }
          const int64_t row = pst[g * E + x] + pls[i];
          ps[i] = row;
          ptr[i] = x * R + row;
          pt[x * R + row] = t;
          pw[x * R + row] = !renorm ? pv[i] : sum != 0 ? pv[i] / sum : 0.f;
        }
      }
  });
  for (int64_t x = 0; x < E; ++x) {  // the unused tail of every expert
    std::fill(pt + x * R + pr[x], pt + (x + 1) * R, int64_t(-1));
    std::fill(pw + x * R + pr[x], pw + (x + 1) * R, 0.f);
  }
  o.assign = Assignment{token, weight, rows, token_rows, G, N, C};
  return o;
}

// dweight: (E, R), the routing's expert, slot (global rows) and gate -> dgates (G, N, E):
// weight_r = gate_r, or gate_r / S with S = sum_j gate_j over the token's k choices:
//   dL/dgate_j = gw_j / S - sum_r gw_r gate_r / S^2 = (gw_j - sum_r gw_r w_r) / S,
// gw_r = dL/dweight_r, 0 for a dropped choice (which still receives the second term).
Tensor topk_route_backward(const Tensor& dweight, const Tensor& expert, const Tensor& slot, const Tensor& gate,
                           int64_t E, bool renorm) {
  const int64_t G = expert.size(0), N = expert.size(1), k = expert.size(2), R = dweight.size(1);
  const Tensor gw = dweight.contiguous();
  Tensor gx = Tensor::zeros({G, N, E});
  const float* pgw = gw.data<float>();
  const int64_t* pe = expert.data<int64_t>();
  const int64_t* ps = slot.data<int64_t>();
  const float* pv = gate.data<float>();
  float* po = gx.data<float>();
  parallel_for(G * N, 4 * k, [&](int64_t s, int64_t e) {
    std::vector<float> gr(static_cast<size_t>(k));
    for (int64_t t = s; t < e; ++t) {
      for (int64_t r = 0; r < k; ++r) {
        const int64_t row = ps[t * k + r];
        gr[size_t(r)] = row < 0 ? 0.f : pgw[pe[t * k + r] * R + row];
      }
      float* grow = po + t * E;
      if (!renorm) {
        for (int64_t r = 0; r < k; ++r) grow[pe[t * k + r]] = gr[size_t(r)];
        continue;
      }
      float sum = 0, dot_gw = 0;
      for (int64_t r = 0; r < k; ++r) sum += pv[t * k + r];
      if (sum == 0) continue;
      for (int64_t r = 0; r < k; ++r) dot_gw += gr[size_t(r)] * pv[t * k + r] / sum;
      for (int64_t r = 0; r < k; ++r) grow[pe[t * k + r]] = (gr[size_t(r)] - dot_gw) / sum;
    }
  });
  return gx;
}

// ---- the load loss's probabilities --------------------------------------------------------------

namespace {

// v[t, e] = (z[t, e] - th[t]) * inv for the tokens t in [s, e) (E experts each)
void load_scores(const float* z, const float* th, int64_t E, float inv, int64_t s, int64_t e, float* v) {
  for (int64_t t = s; t < e; ++t)
    for (int64_t x = 0; x < E; ++x) v[t * E + x] = (z[t * E + x] - th[t]) * inv;
}

}  // namespace

// z, zn: (G, N, E), expert: (G, N, k) I64, contiguous -> P = Phi(v), v = (z - t) / std, and the
// thresholds t = zn[expert_{k-1}] (G, N) (the same float steps as
// normal_cdf(mul(sub(z, t), 1 / std))); throws naming a k-th choice outside [0, E). Each thread
// first writes v for its tokens, then maps Phi over them in one flat loop, which vectorises (a
// loop over one token's E experts is too short for that).
ops::LoadProbs topk_load_probs_forward(const Tensor& z, const Tensor& zn, const Tensor& expert, float noise_std) {
  const int64_t G = z.size(0), N = z.size(1), E = z.size(2), k = expert.size(2);
  const int64_t* pe = expert.data<int64_t>();
  const float* pzn = zn.data<float>();
  ops::LoadProbs o{Tensor::empty({G, N, E}), Tensor::empty({G, N})};
  float* th = o.threshold.data<float>();
  for (int64_t t = 0; t < G * N; ++t) {  // t of every token, its k-th choice checked first
    const int64_t x = pe[t * k + k - 1];
    MV_CHECK(x >= 0 && x < E, "topk_load_probs: token ", t, " chose expert ", x, ", outside [0, ", E, ")");
    th[t] = pzn[t * E + x];
  }
  const float inv = 1.f / noise_std;
  const float* pz = z.data<float>();
  float* po = o.probs.data<float>();
  parallel_for(G * N, E * 32, [&](int64_t s, int64_t e) {
    load_scores(pz, th, E, inv, s, e, po);
    for (int64_t i = s * E; i < e * E; ++i) po[i] = ops::fast_normal_cdf(po[i]);
  });
  return o;
}

// g: (G, N, E) -> dz = g phi(v) / std; dzn[expert_{k-1}] = dt = -sum_e dz_e, the rest of dzn 0
// (dzn only when asked for). phi is taken as 0 beyond |v| = 9 (phi(9) = 1e-18): the far tail's
// g phi / std would be subnormal floats, which cost x86 a microcode assist each (~100 cycles) and
// change nothing a float sum can hold.
ops::LoadProbsGrads topk_load_probs_backward(const Tensor& g_, const Tensor& z, const Tensor& threshold,
                                            const Tensor& expert, float noise_std, bool need_zn) {
  const int64_t G = z.size(0), N = z.size(1), E = z.size(2), k = expert.size(2);
  const Tensor g = g_.contiguous();
  const float inv = 1.f / noise_std;
  const float* pg = g.data<float>();
  const float* pz = z.data<float>();
  const float* th = threshold.data<float>();
  const int64_t* pe = expert.data<int64_t>();
  ops::LoadProbsGrads o{Tensor::empty({G, N, E}), need_zn ? Tensor::zeros({G, N, E}) : Tensor()};
  float* pdz = o.dz.data<float>();
  float* pdzn = need_zn ? o.dzn.data<float>() : nullptr;
  parallel_for(G * N, E * 16, [&](int64_t s, int64_t e) {
    load_scores(pz, th, E, inv, s, e, pdz);
    for (int64_t i = s * E; i < e * E; ++i) {
      const float v = pdz[i], phi = std::fabs(v) > 9.f ? 0.f : ops::fast_normal_pdf(v);
      pdz[i] = pg[i] * phi * inv;
    }
    if (pdzn)
      for (int64_t t = s; t < e; ++t) {
        float dt = 0;
        for (int64_t x = 0; x < E; ++x) dt -= pdz[t * E + x];
        pdzn[t * E + pe[t * k + k - 1]] = dt;
      }
  });
  return o;
}

// ---- expert choice -----------------------------------------------------------------------------

// scores, weights: (G, N, E) -> Assignment with C rows per group and expert, all used (weights not
// yet recorded). Per (g, e): select the top C of the score column, then order them:
// O(N + C log C). Sorted as packed keys (rank_key): integer compares, ties to the lower token.
// Every (t, e) entry of token_rows is written by the one (g, e) that owns it.
Assignment expert_choice_route_forward(const Tensor& scores_, int64_t C, const Tensor& weights) {
  const int64_t G = scores_.size(0), N = scores_.size(1), E = scores_.size(2), R = G * C;
  const Tensor scores = scores_.contiguous(), w = weights.contiguous();
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
  return Assignment{token, weight, rows, token_rows, G, N, C};
}

// dweight: (E, R), token: (E, R) of the routing -> (G, N, E): d weight[e, r] / d w[token, e] = 1,
// a scatter; each (t, e) is in at most one row.
Tensor expert_choice_route_backward(const Tensor& dweight, const Tensor& token, int64_t G, int64_t N) {
  const int64_t E = token.size(0), R = token.size(1);
  const Tensor gw = dweight.contiguous();
  Tensor gx = Tensor::zeros({G, N, E});
  const float* pgw = gw.data<float>();
  const int64_t* pt = token.data<int64_t>();
  float* po = gx.data<float>();
  parallel_for(E * R, 4, [&](int64_t s, int64_t e) {
    ops::for_rows(s, e, R, [&](int64_t i, int64_t x, int64_t) { po[pt[i] * E + x] = pgw[i]; });
  });
  return gx;
}

}  // namespace mv::cpu

namespace mv::ops {

using autograd::record;

namespace {

int64_t capacity_for(const char* op, int64_t tokens, int k, float c, int64_t experts, bool round_to_4) {
  MV_CHECK(experts >= 1, op, ": needs at least one expert, got ", experts);
  MV_CHECK(k >= 1, op, ": k = ", k, " must be at least 1");
  MV_CHECK(k <= experts, op, ": k = ", k, " is larger than the ", experts, " experts");
  MV_CHECK(c >= 0 && std::isfinite(c), op, ": capacity factor ", c, " must be > 0 (or 0: dropless)");
  MV_CHECK(tokens >= 0, op, ": token count ", tokens, " must be >= 0");
  if (c == 0) return std::max<int64_t>(1, tokens);  // dropless: room for every token of the group
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

// The five stages (top of the file), then the gates' gradient through the combine weights.
TopKRouting topk_route(const Tensor& gates_, const TopKOptions& opt) {
  const OpDevice dev = device_of("topk_route", {&gates_});
  expect_f32("topk_route", {&gates_});
  MV_CHECK(gates_.ndim() == 3, "topk_route: gates must be (G, N, E), got ", gates_.str());
  const int64_t N = gates_.size(1), E = gates_.size(2);
  MV_CHECK(N < (int64_t(1) << 32) && E < (int64_t(1) << 32), "topk_route: gates ", gates_.str(),
           " has more than 2^32 tokens or experts");
  const int64_t C = capacity_for("topk_route", N, opt.k, opt.capacity_factor, E, opt.round_to_4);
  const TopKChoices choice = MV_KERNEL(topk_choices)(dev, gates_.contiguous(), opt.k);
  const Tensor order = MV_KERNEL(fill_order)(dev, choice.gate, opt.bpr);
  const Slots slots = MV_KERNEL(assign_slots)(dev, choice.expert, order, E, C);
  Placement placed = MV_KERNEL(place_choices)(dev, choice.expert, choice.gate, slots, E, C, opt.renormalize);
  placed.assign.weight = record(
      "topk_route", placed.assign.weight, {gates_},
      [dev, choice, slot = placed.slot, E, renorm = opt.renormalize](const Tensor& g) {
        return std::vector<Tensor>{
            MV_KERNEL(topk_route_backward)(dev, g, choice.expert, slot, choice.gate, E, renorm)};
      });
  return TopKRouting{placed.assign, choice.expert, placed.slot, C};
}

Tensor topk_load_probs(const Tensor& z, const Tensor& zn, const Tensor& expert, float noise_std) {
  const OpDevice dev = device_of("topk_load_probs", {&z, &zn, &expert});
  expect_f32("topk_load_probs", {&z, &zn});
  MV_CHECK(z.ndim() == 3 && zn.shape() == z.shape(), "topk_load_probs: expected z and zn (G, N, E) of one shape, got z ",
           z.str(), " and zn ", zn.str());
  const int64_t G = z.size(0), N = z.size(1), E = z.size(2);
  MV_CHECK(is_i64(expert, 3) && expert.size(0) == G && expert.size(1) == N && expert.size(2) >= 1 &&
               expert.size(2) <= E,
           "topk_load_probs: expert ", str_of(expert), " must be I64 (", G, ", ", N, ", k), 1 <= k <= ", E,
           ", for z ", z.str());
  MV_CHECK(noise_std > 0.f && std::isfinite(noise_std), "topk_load_probs: noise std ", noise_std, " must be > 0");
  const Tensor zc = z.contiguous(), ec = expert.contiguous();
  LoadProbs f = MV_KERNEL(topk_load_probs_forward)(dev, zc, zn.contiguous(), ec, noise_std);
  const bool gz = z.requires_grad(), gzn = zn.requires_grad();
  return record("topk_load_probs", f.probs, {z, zn},
                [dev, zd = zc.detach(), th = f.threshold, ec, noise_std, gz, gzn](const Tensor& g) {
                  LoadProbsGrads d = MV_KERNEL(topk_load_probs_backward)(dev, g, zd, th, ec, noise_std, gzn);
                  return std::vector<Tensor>{gz ? d.dz : Tensor(), d.dzn};
                });
}

Assignment expert_choice_route(const Tensor& scores, int64_t C, const Tensor& weights) {
  const Tensor& wsrc = weights.defined() ? weights : scores;
  const OpDevice dev = device_of("expert_choice_route", {&scores, &wsrc});
  expect_f32("expert_choice_route", {&scores, &wsrc});
  MV_CHECK(scores.ndim() == 3, "expert_choice_route: scores must be (G, N, E), got ", scores.str());
  MV_CHECK(wsrc.shape() == scores.shape(), "expert_choice_route: weights ", wsrc.str(),
           " must match scores ", scores.str());
  const int64_t G = scores.size(0), N = scores.size(1);
  MV_CHECK(C >= 1 && C <= N, "expert_choice_route: capacity ", C, " is outside [1, ", N,
           "] (the tokens of a group) for scores ", scores.str());
  MV_CHECK(N < (int64_t(1) << 32), "expert_choice_route: scores ", scores.str(), " has more than 2^32 tokens");
  Assignment a = MV_KERNEL(expert_choice_route_forward)(dev, scores, C, wsrc);
  a.weight = record("expert_choice_route", a.weight, {wsrc}, [dev, token = a.token, G, N](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(expert_choice_route_backward)(dev, g, token, G, N)};
  });
  return a;
}

}  // namespace mv::ops
