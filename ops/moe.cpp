// Sparse MoE ops on the CPU (methods.md sections 2 and 3).
//
// Routing is integer bookkeeping over O(G N k) choices; dispatch and combine are gathers and
// scatters of d-wide rows over the E*G*C slots, so every op here costs O(size), with no one-hot
// (N x E x C) tensors. Writes are partitioned so that no two threads touch the same row: slots
// for gathers, (group, column block) for scatters into token rows.
#include "ops/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/matmul.h"
#include "ops/shape.h"
#include "ops/softmax.h"

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

inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: vectorisable, shorter chains
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) s[t] += a[j + t] * b[j + t];
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; j < n; ++j) r += a[j] * b[j];
  return r;
}

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

// Checks an Assignment's token table: I64 (E, G, C) on the CPU, weight (when asked) F32 of the
// same shape.
void check_assignment(const char* op, const Assignment& a, bool need_weight) {
  MV_CHECK(a.token.defined(), op, ": the assignment has no token table");
  MV_CHECK(a.token.dtype() == DType::I64 && a.token.device() == Device::CPU && a.token.ndim() == 3, op,
           ": assignment tokens must be an I64 (E, G, C) CPU tensor, got ", a.token.str());
  if (!need_weight) return;
  MV_CHECK(a.weight.defined(), op, ": the assignment has no weights");
  expect_cpu_f32(op, {&a.weight});
  MV_CHECK(a.weight.shape() == a.token.shape(), op, ": assignment weights ", a.weight.str(),
           " do not match its tokens ", a.token.str());
}

// Throws unless every entry of tok (n values) is -1 or a token index in [0, N).
void check_tokens(const char* op, const int64_t* tok, int64_t n, int64_t N) {
  for (int64_t i = 0; i < n; ++i)
    MV_CHECK(tok[i] >= -1 && tok[i] < N, op, ": slot ", i, " holds token ", tok[i], ", outside [-1, ", N, ")");
}

// Scatter work over the token rows of G groups, d columns wide: f(g, c0, c1) for every group
// and column block, each (g, block) on one thread, so writes to out[g, n, c0:c1] never race.
// With few groups (G = 1: the whole batch routed at once) the columns are split instead.
template <class F>
void for_groups_and_columns(int64_t G, int64_t d, int64_t cost_per_group, F f) {
  const int64_t T = num_threads();
  int64_t blocks = 1;
  if (G < T && d >= 64) blocks = std::min<int64_t>((T + G - 1) / G, d / 32);
  const int64_t bw = (d + blocks - 1) / std::max<int64_t>(blocks, 1);
  parallel_for(G * blocks, cost_per_group / blocks + 1, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      const int64_t g = i / blocks, c0 = (i % blocks) * bw, c1 = std::min(d, c0 + bw);
      if (c0 < c1) f(g, c0, c1);
    }
  });
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
  Tensor gates = gates_.contiguous();
  const float* pg = gates.data<float>();

  TopKRouting R;
  R.capacity = C;
  R.expert = Tensor::empty({G, N, k}, DType::I64);
  R.slot = Tensor::empty({G, N, k}, DType::I64);
  Tensor token = Tensor::empty({E, G, C}, DType::I64);
  Tensor weight = Tensor::zeros({E, G, C});
  Tensor chosen = Tensor::empty({G, N, k});  // the chosen gates, best first
  int64_t* pe = R.expert.data<int64_t>();
  int64_t* ps = R.slot.data<int64_t>();
  int64_t* pt = token.data<int64_t>();
  float* pw = weight.data<float>();
  float* pv = chosen.data<float>();
  std::fill(pt, pt + token.numel(), int64_t(-1));

  // 1. Each token's k best experts: k rounds of a branchless integer argmax over the row's
  // rank keys, O(E k); a chosen key is then zeroed, below every other.
  parallel_for(G * N, E * k * 2, [&](int64_t s, int64_t e) {
    std::vector<uint64_t> key(static_cast<size_t>(E));
    for (int64_t t = s; t < e; ++t) {
      const float* row = pg + t * E;
      for (int64_t x = 0; x < E; ++x) key[size_t(x)] = rank_key(row[x], x);
      for (int r = 0; r < k; ++r) {
        uint64_t best = 0;
        for (int64_t x = 0; x < E; ++x) best = std::max(best, key[size_t(x)]);
        const int64_t bi = key_index(best);
        key[size_t(bi)] = 0;
        pe[t * k + r] = bi;
        pv[t * k + r] = row[bi];
      }
    }
  });

  // 2. Per group, fill the buffers rank by rank, tokens in sequence order or (BPR) by their best
  // gate, descending and stable. Groups are independent and write disjoint (e, g, :) rows.
  const bool bpr = opt.bpr, renorm = opt.renormalize;
  const int64_t sort_cost = bpr ? 8 * (64 - __builtin_clzll(uint64_t(N) | 1)) : 0;
  // Captures by value: sizes in registers, not re-read after every store through pt / pw.
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
          const int64_t x = pe[t + r];
          if (used[size_t(x)] >= C) {
            ps[t + r] = -1;
            continue;
          }
          const int64_t c = used[size_t(x)]++;
          ps[t + r] = c;
          float w = pv[t + r];
          if (renorm) {
            float sum = 0;
            for (int j = 0; j < k; ++j) sum += pv[t + j];
            w = sum != 0 ? w / sum : 0.f;
          }
          pt[(x * G + g) * C + c] = n;
          pw[(x * G + g) * C + c] = w;
        }
      }
    }
  });

  // weight_r = gate_r, or gate_r / S with S = sum_j gate_j over the token's k choices:
  //   dL/dgate_j = gw_j / S - sum_r gw_r gate_r / S^2 = (gw_j - sum_r gw_r w_r) / S,
  // gw_r = dL/dweight_r, 0 for a dropped choice (which still receives the second term).
  weight = record("topk_route", weight, {gates_},
                  [expert = R.expert, slot = R.slot, chosen, G, N, E, C, k, renorm](const Tensor& g_) {
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
                        const int64_t g = t / N;
                        for (int r = 0; r < k; ++r) {
                          const int64_t c = ps[t * k + r];
                          gr[size_t(r)] = c < 0 ? 0.f : pgw[(pe[t * k + r] * G + g) * C + c];
                        }
                        float* row = po + t * E;
                        if (!renorm) {
                          for (int r = 0; r < k; ++r) row[pe[t * k + r]] = gr[size_t(r)];
                          continue;
                        }
                        float sum = 0, dot_gw = 0;
                        for (int r = 0; r < k; ++r) sum += pv[t * k + r];
                        if (sum == 0) continue;
                        for (int r = 0; r < k; ++r) dot_gw += gr[size_t(r)] * pv[t * k + r] / sum;
                        for (int r = 0; r < k; ++r) row[pe[t * k + r]] = (gr[size_t(r)] - dot_gw) / sum;
                      }
                    });
                    return std::vector<Tensor>{gx};
                  });
  R.assign = Assignment{token, weight};
  return R;
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
  Tensor scores = scores_.contiguous(), w = wsrc.contiguous();
  const float* psc = scores.data<float>();
  const float* pwi = w.data<float>();
  Tensor token = Tensor::empty({E, G, C}, DType::I64), weight = Tensor::empty({E, G, C});
  int64_t* pt = token.data<int64_t>();
  float* pw = weight.data<float>();
  // Per (g, e): select the top C of the score column, then order them: O(N + C log C). Sorted
  // as packed keys (rank_key): integer compares, ties to the lower token.
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
        const int64_t n = key_index(key[size_t(c)]);
        pt[(x * G + g) * C + c] = n;
        pw[(x * G + g) * C + c] = pwi[(g * N + n) * E + x];
      }
    }
  });
  // d weight[e, g, c] / d w[g, token, e] = 1: a scatter; each (g, n, e) is in at most one slot.
  weight = record("expert_choice_route", weight, {wsrc}, [token, G, N, E, C](const Tensor& g_) {
    Tensor gw = g_.contiguous();
    Tensor gx = Tensor::zeros({G, N, E});
    const float* pgw = gw.data<float>();
    const int64_t* pt = token.data<int64_t>();
    float* po = gx.data<float>();
    parallel_for(E * G, C, [&](int64_t s, int64_t e) {
      for (int64_t eg = s; eg < e; ++eg) {
        const int64_t x = eg / G, g = eg % G;
        for (int64_t c = 0; c < C; ++c) po[(g * N + pt[eg * C + c]) * E + x] = pgw[eg * C + c];
      }
    });
    return std::vector<Tensor>{gx};
  });
  return Assignment{token, weight};
}

// ---- dispatch and combine ----------------------------------------------------------------------

// out[e, g, c] = x[g, token[e, g, c]]; dx[g, n] = sum of the gradients of the slots holding n
Tensor dispatch(const Tensor& x_, const Assignment& a) {
  expect_cpu_f32("dispatch", {&x_});
  check_assignment("dispatch", a, false);
  MV_CHECK(x_.ndim() == 3, "dispatch: x must be (G, N, d), got ", x_.str());
  const int64_t G = x_.size(0), N = x_.size(1), d = x_.size(2);
  const int64_t E = a.token.size(0), C = a.token.size(2);
  MV_CHECK(a.token.size(1) == G, "dispatch: assignment ", a.token.str(), " has ", a.token.size(1),
           " groups, x ", x_.str(), " has ", G);
  Tensor token = a.token.contiguous();
  const int64_t* pt = token.data<int64_t>();
  check_tokens("dispatch", pt, token.numel(), N);
  Tensor x = x_.contiguous();
  const float* px = x.data<float>();
  Tensor out = Tensor::empty({E, G, C, d});
  float* po = out.data<float>();
  parallel_for(E * G * C, d, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      const int64_t g = (i / C) % G, n = pt[i];
      float* dst = po + i * d;
      if (n < 0)
        std::fill(dst, dst + d, 0.f);
      else
        std::copy(px + (g * N + n) * d, px + (g * N + n + 1) * d, dst);
    }
  });
  return record("dispatch", out, {x_}, [token, G, N, d, E, C](const Tensor& g_) {
    Tensor gy = g_.contiguous();
    const float* pgy = gy.data<float>();
    const int64_t* pt = token.data<int64_t>();
    Tensor gx = Tensor::zeros({G, N, d});
    float* po = gx.data<float>();
    for_groups_and_columns(G, d, E * C * d, [&](int64_t g, int64_t c0, int64_t c1) {
      for (int64_t x = 0; x < E; ++x)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = (x * G + g) * C + c, n = pt[i];
          if (n < 0) continue;
          float* dst = po + (g * N + n) * d;
          const float* src = pgy + i * d;
          for (int64_t j = c0; j < c1; ++j) dst[j] += src[j];
        }
    });
    return std::vector<Tensor>{gx};
  });
}

// out[g, n] = sum over slots (e, c) holding n of w[e, g, c] y[e, g, c]
//   dy[e, g, c] = w[e, g, c] g_out[g, n];  dw[e, g, c] = g_out[g, n] . y[e, g, c]  (0 if empty)
Tensor combine(const Tensor& y_, const Assignment& a, int64_t N) {
  expect_cpu_f32("combine", {&y_});
  check_assignment("combine", a, true);
  MV_CHECK(y_.ndim() == 4, "combine: y must be (E, G, C, d), got ", y_.str());
  const int64_t E = y_.size(0), G = y_.size(1), C = y_.size(2), d = y_.size(3);
  MV_CHECK(a.token.shape() == Shape({E, G, C}), "combine: y ", y_.str(), " does not match the assignment ",
           a.token.str(), ": expected (E, G, C) to agree");
  MV_CHECK(N >= 0, "combine: token count ", N, " must be >= 0");
  Tensor token = a.token.contiguous();
  const int64_t* pt = token.data<int64_t>();
  check_tokens("combine", pt, token.numel(), N);
  Tensor y = y_.contiguous(), w = a.weight.contiguous();
  const float* py = y.data<float>();
  const float* pw = w.data<float>();
  Tensor out = Tensor::zeros({G, N, d});
  float* po = out.data<float>();
  for_groups_and_columns(G, d, 2 * E * C * d, [&](int64_t g, int64_t c0, int64_t c1) {
    for (int64_t x = 0; x < E; ++x)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = (x * G + g) * C + c, n = pt[i];
        if (n < 0) continue;
        const float wi = pw[i];
        float* dst = po + (g * N + n) * d;
        const float* src = py + i * d;
        for (int64_t j = c0; j < c1; ++j) dst[j] += wi * src[j];
      }
  });
  const bool gy = y_.requires_grad(), gw = a.weight.requires_grad();
  return record("combine", out, {y_, a.weight},
                [token, y = y.detach(), w = w.detach(), gy, gw, G, N, d, E, C](const Tensor& g_) {
                  Tensor go = g_.contiguous();
                  const float* pgo = go.data<float>();
                  const int64_t* pt = token.data<int64_t>();
                  const float* py = y.data<float>();
                  const float* pw = w.data<float>();
                  Tensor dy = gy ? Tensor::empty({E, G, C, d}) : Tensor();
                  Tensor dw = gw ? Tensor::empty({E, G, C}) : Tensor();
                  float* pdy = gy ? dy.data<float>() : nullptr;
                  float* pdw = gw ? dw.data<float>() : nullptr;
                  parallel_for(E * G * C, 2 * d, [&](int64_t s, int64_t e) {
                    for (int64_t i = s; i < e; ++i) {
                      const int64_t g = (i / C) % G, n = pt[i];
                      const float* gr = n < 0 ? nullptr : pgo + (g * N + n) * d;
                      if (pdy) {
                        float* dst = pdy + i * d;
                        if (!gr)
                          std::fill(dst, dst + d, 0.f);
                        else
                          for (int64_t j = 0; j < d; ++j) dst[j] = pw[i] * gr[j];
                      }
                      if (pdw) pdw[i] = gr ? dot(gr, py + i * d, d) : 0.f;
                    }
                  });
                  return std::vector<Tensor>{dy, dw};
                });
}

// ---- experts -----------------------------------------------------------------------------------

// out = x w + b per expert;  dx = g w^T, dw = x^T g, db = sum over rows of g
Tensor expert_matmul(const Tensor& x_, const Tensor& w_, const Tensor& b_) {
  expect_cpu_f32("expert_matmul", {&x_, &w_});
  if (b_.defined()) expect_cpu_f32("expert_matmul", {&b_});
  MV_CHECK(x_.ndim() == 3 && w_.ndim() == 3, "expert_matmul: expected x (E, M, d) and w (E, d, h), got x ",
           x_.str(), " and w ", w_.str());
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2), h = w_.size(2);
  MV_CHECK(w_.size(0) == E && w_.size(1) == d, "expert_matmul: w ", w_.str(), " must be (", E, ", ", d,
           ", h) for x ", x_.str());
  MV_CHECK(!b_.defined() || b_.shape() == Shape({E, h}), "expert_matmul: bias ", b_.str(), " must be (",
           E, ", ", h, ") for w ", w_.str());
  Tensor out = bmm(x_.detach(), w_.detach());  // no graph: the backward below is hand-written
  if (b_.defined()) {
    Tensor b = b_.contiguous();
    const float* pb = b.data<float>();
    float* po = out.data<float>();
    parallel_for(E * M, h, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        const float* br = pb + (r / M) * h;
        float* o = po + r * h;
        for (int64_t j = 0; j < h; ++j) o[j] += br[j];
      }
    });
  }
  const bool gx = x_.requires_grad(), gw = w_.requires_grad(), gb = b_.defined() && b_.requires_grad();
  return record("expert_matmul", out, {x_, w_, b_},
                [x = x_.detach(), w = w_.detach(), gx, gw, gb, E, M, h](const Tensor& g_) {
                  Tensor g = g_.contiguous();
                  Tensor dx, dw, db;
                  if (gx) dx = bmm(g, transpose(w, 1, 2));
                  if (gw) dw = bmm(transpose(x, 1, 2), g);
                  if (gb) {
                    db = Tensor::empty({E, h});
                    const float* pg = g.data<float>();
                    float* pdb = db.data<float>();
                    parallel_for(E, M * h, [&](int64_t s, int64_t e) {
                      std::vector<double> acc(static_cast<size_t>(h));
                      for (int64_t x = s; x < e; ++x) {
                        std::fill(acc.begin(), acc.end(), 0.0);
                        for (int64_t m = 0; m < M; ++m) {
                          const float* r = pg + (x * M + m) * h;
                          for (int64_t j = 0; j < h; ++j) acc[size_t(j)] += r[j];
                        }
                        for (int64_t j = 0; j < h; ++j) pdb[x * h + j] = float(acc[size_t(j)]);
                      }
                    });
                  }
                  return std::vector<Tensor>{dx, dw, db};
                });
}

// ---- Soft MoE: composed of differentiable ops, so autograd derives the backward ------------------

Tensor soft_dispatch(const Tensor& x, const Tensor& logits, int64_t experts) {
  expect_cpu_f32("soft_dispatch", {&x, &logits});
  MV_CHECK(x.ndim() == 3 && logits.ndim() == 3, "soft_dispatch: expected x (G, N, d) and logits (G, N, E*p), got x ",
           x.str(), " and logits ", logits.str());
  const int64_t G = x.size(0), N = x.size(1), d = x.size(2), S = logits.size(2);
  MV_CHECK(logits.size(0) == G && logits.size(1) == N, "soft_dispatch: logits ", logits.str(),
           " must have the (G, N) of x ", x.str());
  MV_CHECK(experts >= 1 && S % experts == 0 && S > 0, "soft_dispatch: ", S, " slots in logits ", logits.str(),
           " are not a positive multiple of ", experts, " experts");
  const int64_t p = S / experts;
  Tensor D = softmax(transpose(logits, 1, 2));  // (G, S, N): each slot's weights over tokens
  Tensor slots = bmm(D, x);                      // (G, S, d)
  return permute(reshape(slots, {G, experts, p, d}), {1, 0, 2, 3});
}

Tensor soft_combine(const Tensor& y, const Tensor& logits) {
  expect_cpu_f32("soft_combine", {&y, &logits});
  MV_CHECK(y.ndim() == 4 && logits.ndim() == 3, "soft_combine: expected y (E, G, p, d) and logits (G, N, E*p), got y ",
           y.str(), " and logits ", logits.str());
  const int64_t E = y.size(0), G = y.size(1), p = y.size(2), d = y.size(3), S = logits.size(2);
  MV_CHECK(logits.size(0) == G && S == E * p, "soft_combine: logits ", logits.str(), " must be (", G,
           ", N, ", E * p, ") for y ", y.str());
  Tensor Cw = softmax(logits);                                      // (G, N, S): over all slots
  Tensor Y = reshape(permute(y, {1, 0, 2, 3}), {G, E * p, d});      // (G, S, d), slot s = e*p + j
  return bmm(Cw, Y);
}

}  // namespace mv::ops
