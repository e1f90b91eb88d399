// Sparse MoE ops on the CPU (methods.md sections 2 and 3).
//
// Routing is integer bookkeeping over O(G N k) choices; dispatch and combine move d-wide rows
// between token rows and packed buffer rows through the Assignment's two index tables (row ->
// token, token -> rows), so every op costs O(size), with no one-hot (N x E x C) tensors, and
// every one is a gather: each thread writes only its own rows. expert_matmul multiplies only the
// rows in use, all experts' pieces spread over the threads in one fork-join.
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
#include "ops/fast_math.h"
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

std::string str_of(const Tensor& t) { return t.defined() ? t.str() : std::string("undefined"); }
bool is_cpu_i64(const Tensor& t, int ndim) {
  return t.defined() && t.dtype() == DType::I64 && t.device() == Device::CPU && t.ndim() == ndim;
}

// Throws unless `a` is a consistent Assignment: shapes, index ranges, used rows first, and every
// token_rows entry naming a row that holds that token. That is O(E R + G N K) integer reads,
// small next to the d-wide rows the ops move, and it keeps a hand-made Assignment from sending
// an op out of bounds.
void check_assignment(const char* op, const Assignment& a, bool need_weight) {
  MV_CHECK(is_cpu_i64(a.token, 2), op, ": assignment tokens must be an I64 (E, R) CPU tensor, got ",
           str_of(a.token));
  const int64_t E = a.token.size(0), R = a.token.size(1), G = a.G, N = a.N;
  MV_CHECK(G >= 0 && N >= 0 && a.C >= 0 && R == G * a.C, op, ": assignment tokens ", a.token.str(),
           " do not have R = G*C = ", G, "*", a.C, " rows per expert");
  MV_CHECK(is_cpu_i64(a.rows, 1) && a.rows.size(0) == E, op, ": assignment rows must be I64 (", E,
           ") for tokens ", a.token.str(), ", got ", str_of(a.rows));
  MV_CHECK(is_cpu_i64(a.token_rows, 3) && a.token_rows.size(0) == G && a.token_rows.size(1) == N, op,
           ": assignment token_rows must be I64 (", G, ", ", N, ", K), got ", str_of(a.token_rows));
  if (need_weight) {
    MV_CHECK(a.weight.defined(), op, ": the assignment has no weights");
    expect_cpu_f32(op, {&a.weight});
    MV_CHECK(a.weight.shape() == a.token.shape(), op, ": assignment weights ", a.weight.str(),
             " do not match its tokens ", a.token.str());
  }
  const Tensor tok = a.token.contiguous(), rows = a.rows.contiguous(), trows = a.token_rows.contiguous();
  const int64_t* pt = tok.data<int64_t>();
  const int64_t* pr = rows.data<int64_t>();
  const int64_t* ptr = trows.data<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    MV_CHECK(pr[e] >= 0 && pr[e] <= R, op, ": assignment rows[", e, "] = ", pr[e], " is outside [0, ", R, "]");
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = pt[e * R + r];
      if (r < pr[e])
        MV_CHECK(t >= 0 && t < G * N, op, ": row (", e, ", ", r, ") holds token ", t, ", outside [0, ", G * N,
                 ") = [0, G*N)");
      else
        MV_CHECK(t == -1, op, ": row (", e, ", ", r, ") holds token ", t, " but expert ", e, " uses only ",
                 pr[e], " rows (expected -1)");
    }
  }
  const int64_t K = trows.size(2);
  for (int64_t t = 0; t < G * N; ++t)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = ptr[t * K + j];
      MV_CHECK(row == -1 || (row >= 0 && row < E * R && pt[row] == t), op, ": token_rows of token ", t,
               " lists row ", row, ", which does not hold that token");
    }
}

std::vector<int64_t> to_rows_vector(const Tensor& rows) {
  const Tensor r = rows.contiguous();
  return std::vector<int64_t>(r.data<int64_t>(), r.data<int64_t>() + r.numel());
}

// f(i, e, r) for the flat rows i in [s, end) of (E, R) buffers, i = e*R + r, without a division
// per row.
template <class F>
inline void for_rows(int64_t s, int64_t end, int64_t R, F f) {
  if (s >= end) return;
  int64_t x = s / R, r = s % R;
  for (int64_t i = s; i < end; ++i) {
    f(i, x, r);
    if (++r == R) r = 0, ++x;
  }
}

// The rows in use of all experts laid end to end, cut into num_threads() equal shares: each
// share runs f(e, r0, r1) for every piece [r0, r1) of expert e's rows inside it, and tail(e) for
// its part of the experts (E/T of them), which zeroes their unused rows. One fork-join for all
// experts, balanced however unevenly the routing spread the tokens.
template <class F, class Tail>
void for_expert_rows(const std::vector<int64_t>& rows, int64_t cost_per_row, F f, Tail tail) {
  const int64_t E = int64_t(rows.size());
  std::vector<int64_t> start(size_t(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) start[size_t(e + 1)] = start[size_t(e)] + rows[size_t(e)];
  const int64_t total = start[size_t(E)], T = num_threads();
  parallel_for(T, (total * cost_per_row + E * 1024) / T + 1, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      for (int64_t x = E * i / T; x < E * (i + 1) / T; ++x) tail(x);
      if (total == 0) continue;
      const int64_t lo = total * i / T, hi = total * (i + 1) / T;
      int64_t x = int64_t(std::upper_bound(start.begin(), start.end(), lo) - start.begin()) - 1;
      for (; x < E && start[size_t(x)] < hi; ++x) {
        const int64_t r0 = std::max(lo, start[size_t(x)]) - start[size_t(x)];
        const int64_t r1 = std::min(hi, start[size_t(x + 1)]) - start[size_t(x)];
        if (r0 < r1) f(x, r0, r1);
      }
    }
  });
}

// Columns [0, n) in one block per thread (widths a multiple of 8 where possible): f(c0, c1).
template <class F>
void for_column_blocks(int64_t n, int64_t cost_per_column, F f) {
  const int64_t T = num_threads();
  const int64_t bw = ((n + T - 1) / T + 7) / 8 * 8;
  const int64_t blocks = (n + bw - 1) / std::max<int64_t>(bw, 1);
  parallel_for(blocks, bw * cost_per_column, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) f(i * bw, std::min(n, (i + 1) * bw));
  });
}

// Rows in use per expert from an optional rows tensor (every row when undefined), checked.
std::vector<int64_t> expert_rows(const char* op, const Tensor& rows_, int64_t E, int64_t M, const Tensor& x) {
  std::vector<int64_t> rows(size_t(E), M);
  if (!rows_.defined()) return rows;
  MV_CHECK(is_cpu_i64(rows_, 1) && rows_.size(0) == E, op, ": rows ", rows_.str(), " must be I64 (", E,
           ") for x ", x.str());
  rows = to_rows_vector(rows_);
  for (int64_t e = 0; e < E; ++e)
    MV_CHECK(rows[size_t(e)] >= 0 && rows[size_t(e)] <= M, op, ": rows[", e, "] = ", rows[size_t(e)],
             " is outside [0, ", M, "] for x ", x.str());
  return rows;
}

// dw[e] = x[e, :n_e]^T g[e, :n_e] (d x h) and db[e] = column sums of g[e, :n_e], for x (E, M, d) and
// g (E, M, h); either output may be null. Split by output columns, so that no two threads sum
// into the same entry.
void expert_weight_grads(const float* px, const float* pg, const std::vector<int64_t>& rows, int64_t M, int64_t d,
                         int64_t h, float* pdw, float* pdb) {
  const int64_t E = int64_t(rows.size());
  int64_t total = 0;
  for (int64_t n : rows) total += n;
  for_column_blocks(h, total * (2 * d + 1), [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(size_t(c1 - c0));
    std::vector<float> part(size_t(c1 - c0));
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = rows[size_t(e)];
      const float* ge = pg + e * M * h;
      if (pdw)
        detail::gemm_on_thread(d, c1 - c0, n, px + e * M * d, d, true, ge + c0, h, false, pdw + e * d * h + c0, h,
                               false);
      if (pdb) {  // float sums over blocks of 64 rows, the blocks summed in double
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t m0 = 0; m0 < n; m0 += 64) {
          std::fill(part.begin(), part.end(), 0.f);
          for (int64_t m = m0; m < std::min(n, m0 + 64); ++m)
            for (int64_t j = c0; j < c1; ++j) part[size_t(j - c0)] += ge[m * h + j];
          for (int64_t j = 0; j < c1 - c0; ++j) acc[size_t(j)] += part[size_t(j)];
        }
        for (int64_t j = c0; j < c1; ++j) pdb[e * h + j] = float(acc[size_t(j - c0)]);
      }
    }
  });
}

}  // namespace

int64_t topk_capacity(int64_t tokens, int k, float capacity_factor, int64_t experts, bool round_to_4) {
  return capacity_for("topk_capacity", tokens, k, capacity_factor, experts, round_to_4);
}

Assignment make_assignment(const Tensor& token_, const Tensor& weight, int64_t G, int64_t N, int64_t C) {
  MV_CHECK(G >= 0 && N >= 0 && C >= 0, "make_assignment: G = ", G, ", N = ", N, ", C = ", C,
           " must be >= 0");
  MV_CHECK(is_cpu_i64(token_, 2), "make_assignment: tokens must be an I64 (E, G*C) CPU tensor, got ",
           str_of(token_));
  const int64_t E = token_.size(0), R = token_.size(1);
  MV_CHECK(R == G * C, "make_assignment: tokens ", token_.str(), " must have G*C = ", G * C, " rows per expert");
  if (weight.defined()) {
    expect_cpu_f32("make_assignment", {&weight});
    MV_CHECK(weight.shape() == token_.shape(), "make_assignment: weights ", weight.str(),
             " do not match the tokens ", token_.str());
  }
  const Tensor token = token_.contiguous();
  const int64_t* pt = token.data<int64_t>();
  Tensor rows = Tensor::empty({E}, DType::I64);
  int64_t* pr = rows.data<int64_t>();
  std::vector<int64_t> count(size_t(G * N), 0);
  for (int64_t e = 0; e < E; ++e) {
    int64_t used = 0;
    while (used < R && pt[e * R + used] >= 0) ++used;
    pr[e] = used;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = pt[e * R + r];
      MV_CHECK(t >= -1 && t < G * N, "make_assignment: row (", e, ", ", r, ") holds token ", t,
               ", outside [-1, ", G * N, ")");
      MV_CHECK(t == -1 || r < used, "make_assignment: expert ", e, " uses row ", r, " after its unused row ",
               used, ": the rows in use must come first");
      if (t >= 0) ++count[size_t(t)];
    }
  }
  const int64_t K = std::max<int64_t>(1, count.empty() ? 1 : *std::max_element(count.begin(), count.end()));
  Tensor token_rows = Tensor::empty({G, N, K}, DType::I64);
  int64_t* ptr = token_rows.data<int64_t>();
  std::fill(ptr, ptr + token_rows.numel(), int64_t(-1));
  std::fill(count.begin(), count.end(), 0);
  for (int64_t i = 0; i < E * R; ++i)  // rows ascending, so each token's list is too
    if (const int64_t t = pt[i]; t >= 0) ptr[t * K + count[size_t(t)]++] = i;
  return Assignment{token, weight, rows, token_rows, G, N, C};
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

// P = Phi(v), v = (z - t) / std, t = zn[expert_{k-1}]  (the same float steps as
// normal_cdf(mul(sub(z, t), 1 / std))):
//   dz = g phi(v) / std;  dzn[expert_{k-1}] = dt = -sum_e dz_e, the rest of dzn 0
// (phi's exp is fast_exp, a few ulp from libm's, so that the backward loop vectorises)
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
  // The k-th choice of every token, checked here so that no kernel reads out of bounds.
  std::vector<int64_t> last(size_t(G * N));
  for (int64_t t = 0; t < G * N; ++t) {
    last[size_t(t)] = pe[t * k + k - 1];
    MV_CHECK(last[size_t(t)] >= 0 && last[size_t(t)] < E, "topk_load_probs: token ", t, " chose expert ",
             last[size_t(t)], ", outside [0, ", E, ")");
  }
  constexpr float inv_sqrt2 = 0.7071067811865476f, inv_sqrt2pi = 0.3989422804014327f;
  // |v| >= 15: Phi(v) rounds to exactly 0 or 1 and phi(v) to 0 (e^-112 < 2^-149): libm's slow
  // underflow paths skipped, same results.
  constexpr float kSaturated = 15.f;
  const float inv = 1.f / noise_std;
  const float* pz = z.data<float>();
  const float* pzn = zn.data<float>();
  Tensor out = Tensor::empty({G, N, E});
  float* po = out.data<float>();
  parallel_for(G * N, E * 24, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const float th = pzn[t * E + last[size_t(t)]];
      for (int64_t x = 0; x < E; ++x) {
        const float v = (pz[t * E + x] - th) * inv;
        po[t * E + x] = std::fabs(v) >= kSaturated ? (v > 0 ? 1.f : 0.f) : 0.5f * std::erfc(-v * inv_sqrt2);
      }
    }
  });
  const bool gz = z_.requires_grad(), gzn = zn_.requires_grad();
  return record("topk_load_probs", out, {z_, zn_},
                [z = z.detach(), zn = zn.detach(), last = std::move(last), inv, gz, gzn, G, N, E](const Tensor& g_) {
                  const Tensor g = g_.contiguous();
                  const float* pg = g.data<float>();
                  const float* pz = z.data<float>();
                  const float* pzn = zn.data<float>();
                  Tensor dz = Tensor::empty({G, N, E});  // also the scratch for dzn
                  Tensor dzn = gzn ? Tensor::empty({G, N, E}) : Tensor();
                  float* pdz = dz.data<float>();
                  float* pdzn = gzn ? dzn.data<float>() : nullptr;
                  parallel_for(G * N, E * 16, [&](int64_t s, int64_t e) {
                    for (int64_t t = s; t < e; ++t) {
                      const float th = pzn[t * E + last[size_t(t)]];
                      float dt = 0;
                      for (int64_t x = 0; x < E; ++x) {
                        const int64_t i = t * E + x;
                        const float v = (pz[i] - th) * inv;
                        pdz[i] = std::fabs(v) >= kSaturated ? 0.f : pg[i] * (inv_sqrt2pi * fast_exp(-0.5f * v * v)) * inv;
                        dt -= pdz[i];
                      }
                      if (pdzn) {
                        std::fill(pdzn + t * E, pdzn + (t + 1) * E, 0.f);
                        pdzn[t * E + last[size_t(t)]] = dt;
                      }
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

// ---- dispatch and combine ----------------------------------------------------------------------

// token_rows: (G, N, K) rows of each token (-1: none), src: (E*R, d), w: (E*R,) or null
// -> dst[t] = sum over t's rows of w[row] * src[row] (w = 1 when null); zeros for a token with
// none. Combine forward and dispatch backward: each thread writes only its own tokens.
static void sum_token_rows(const Tensor& token_rows, const float* src, const float* w, int64_t d,
                           float* dst) {
  const int64_t* ptr = token_rows.data<int64_t>();
  const int64_t K = token_rows.size(2);
  parallel_for(token_rows.size(0) * token_rows.size(1), 2 * K * d, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      float* out = dst + t * d;
      std::fill(out, out + d, 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t row = ptr[t * K + j];
        if (row < 0) continue;
        const float wi = w ? w[row] : 1.f;
        const float* in = src + row * d;
        for (int64_t c = 0; c < d; ++c) out[c] += wi * in[c];
      }
    }
  });
}

// out[e, r] = x[token[e, r]] (zeros when unused); dx[t] = sum of the gradients of t's rows
Tensor dispatch(const Tensor& x_, const Assignment& a) {
  expect_cpu_f32("dispatch", {&x_});
  MV_CHECK(x_.ndim() == 3, "dispatch: x must be (G, N, d), got ", x_.str());
  check_assignment("dispatch", a, false);
  const int64_t G = x_.size(0), N = x_.size(1), d = x_.size(2);
  MV_CHECK(G == a.G && N == a.N, "dispatch: x ", x_.str(), " does not match the assignment's (G, N) = (",
           a.G, ", ", a.N, ")");
  const int64_t E = a.token.size(0), R = a.token.size(1);
  const Tensor token = a.token.contiguous();
  const int64_t* pt = token.data<int64_t>();
  const std::vector<int64_t> rows = to_rows_vector(a.rows);
  Tensor x = x_.contiguous();
  const float* px = x.data<float>();
  Tensor out = Tensor::empty({E, R, d});
  float* po = out.data<float>();
  parallel_for(E * R, d, [&](int64_t s, int64_t e) {
    for_rows(s, e, R, [&](int64_t i, int64_t x, int64_t r) {
      float* dst = po + i * d;
      if (r < rows[size_t(x)])
        std::copy(px + pt[i] * d, px + (pt[i] + 1) * d, dst);
      else
        std::fill(dst, dst + d, 0.f);
    });
  });
  return record("dispatch", out, {x_}, [token_rows = a.token_rows.contiguous(), G, N, d](const Tensor& g_) {
    Tensor gx = Tensor::empty({G, N, d});
    sum_token_rows(token_rows, g_.contiguous().data<float>(), nullptr, d, gx.data<float>());
    return std::vector<Tensor>{gx};
  });
}

// out[t] = sum over t's rows (e, r) of w[e, r] y[e, r]
//   dy[e, r] = w[e, r] g_out[token[e, r]];  dw[e, r] = g_out[token[e, r]] . y[e, r]  (0 if unused)
Tensor combine(const Tensor& y_, const Assignment& a) {
  expect_cpu_f32("combine", {&y_});
  check_assignment("combine", a, true);
  const int64_t E = a.token.size(0), R = a.token.size(1), G = a.G, N = a.N;
  MV_CHECK(y_.ndim() == 3 && y_.size(0) == E && y_.size(1) == R, "combine: y ", y_.str(),
           " does not match the assignment ", a.token.str(), ": expected (", E, ", ", R, ", d)");
  const int64_t d = y_.size(2);
  Tensor y = y_.contiguous(), w = a.weight.contiguous();
  Tensor out = Tensor::empty({G, N, d});
  sum_token_rows(a.token_rows.contiguous(), y.data<float>(), w.data<float>(), d, out.data<float>());
  const bool gy = y_.requires_grad(), gw = a.weight.requires_grad();
  return record("combine", out, {y_, a.weight},
                [token = a.token.contiguous(), rows = to_rows_vector(a.rows), y = y.detach(), w = w.detach(), gy, gw,
                 E, R, d](const Tensor& g_) {
                  Tensor go = g_.contiguous();
                  const float* pgo = go.data<float>();
                  const int64_t* pt = token.data<int64_t>();
                  const float* py = y.data<float>();
                  const float* pw = w.data<float>();
                  Tensor dy = gy ? Tensor::empty({E, R, d}) : Tensor();
                  Tensor dw = gw ? Tensor::empty({E, R}) : Tensor();
                  float* pdy = gy ? dy.data<float>() : nullptr;
                  float* pdw = gw ? dw.data<float>() : nullptr;
                  parallel_for(E * R, 2 * d, [&](int64_t s, int64_t e) {
                    for_rows(s, e, R, [&](int64_t i, int64_t x, int64_t r) {
                      const float* gr = r < rows[size_t(x)] ? pgo + pt[i] * d : nullptr;
                      if (pdy) {
                        float* dst = pdy + i * d;
                        const float wi = pw[i];
                        if (!gr)
                          std::fill(dst, dst + d, 0.f);
                        else
                          for (int64_t j = 0; j < d; ++j) dst[j] = wi * gr[j];
                      }
                      if (pdw) pdw[i] = gr ? dot(gr, py + i * d, d) : 0.f;
                    });
                  });
                  return std::vector<Tensor>{dy, dw};
                });
}

// ---- experts -----------------------------------------------------------------------------------

// out[e, :n_e] = x[e, :n_e] w[e] + b[e], n_e = rows[e];  out[e, n_e:] = 0
//   dx[e, :n_e] = g[e, :n_e] w[e]^T (0 past n_e);  dw[e] = x[e, :n_e]^T g[e, :n_e];
//   db[e] = sum over the first n_e rows of g[e]
Tensor expert_matmul(const Tensor& x_, const Tensor& w_, const Tensor& b_, const Tensor& rows_) {
  expect_cpu_f32("expert_matmul", {&x_, &w_});
  if (b_.defined()) expect_cpu_f32("expert_matmul", {&b_});
  MV_CHECK(x_.ndim() == 3 && w_.ndim() == 3, "expert_matmul: expected x (E, M, d) and w (E, d, h), got x ",
           x_.str(), " and w ", w_.str());
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2), h = w_.size(2);
  MV_CHECK(w_.size(0) == E && w_.size(1) == d, "expert_matmul: w ", w_.str(), " must be (", E, ", ", d,
           ", h) for x ", x_.str());
  MV_CHECK(!b_.defined() || b_.shape() == Shape({E, h}), "expert_matmul: bias ", b_.str(), " must be (",
           E, ", ", h, ") for w ", w_.str());
  const std::vector<int64_t> rows = expert_rows("expert_matmul", rows_, E, M, x_);
  const Tensor x = x_.contiguous(), w = w_.contiguous(), b = b_.defined() ? b_.contiguous() : Tensor();
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  const float* pb = b.defined() ? b.data<float>() : nullptr;
  Tensor out = Tensor::empty({E, M, h});
  float* po = out.data<float>();
  // The bias is written first and the product accumulates onto it: no extra pass.
  for_expert_rows(
      rows, 2 * d * h,
      [&](int64_t e, int64_t r0, int64_t r1) {
        float* o = po + (e * M + r0) * h;
        if (pb)
          for (int64_t r = 0; r < r1 - r0; ++r) std::memcpy(o + r * h, pb + e * h, size_t(h) * sizeof(float));
        detail::gemm_on_thread(r1 - r0, h, d, px + (e * M + r0) * d, d, false, pw + e * d * h, h, false, o, h,
                               pb != nullptr);
      },
      [&](int64_t e) { std::fill(po + (e * M + rows[size_t(e)]) * h, po + (e + 1) * M * h, 0.f); });
  const bool gx = x_.requires_grad(), gw = w_.requires_grad(), gb = b_.defined() && b_.requires_grad();
  return record("expert_matmul", out, {x_, w_, b_},
                [x = x.detach(), w = w.detach(), rows, gx, gw, gb, E, M, d, h](const Tensor& g_) {
                  const Tensor g = g_.contiguous();
                  const float* pg = g.data<float>();
                  const float* px = x.data<float>();
                  const float* pw = w.data<float>();
                  Tensor dx, dw, db;
                  if (gx) {
                    dx = Tensor::empty({E, M, d});
                    float* pdx = dx.data<float>();
                    for_expert_rows(
                        rows, 2 * d * h,
                        [&](int64_t e, int64_t r0, int64_t r1) {
                          detail::gemm_on_thread(r1 - r0, d, h, pg + (e * M + r0) * h, h, false, pw + e * d * h, h,
                                                 true, pdx + (e * M + r0) * d, d, false);
                        },
                        [&](int64_t e) { std::fill(pdx + (e * M + rows[size_t(e)]) * d, pdx + (e + 1) * M * d, 0.f); });
                  }
                  if (gw) dw = Tensor::empty({E, d, h});
                  if (gb) db = Tensor::empty({E, h});
                  if (gw || gb)
                    expert_weight_grads(px, pg, rows, M, d, h, gw ? dw.data<float>() : nullptr,
                                        gb ? db.data<float>() : nullptr);
                  return std::vector<Tensor>{dx, dw, db};
                });
}

// The two expert layers and the GELU between them as one op. Per thread, blocks of kMlpBlock
// rows of one expert go through x w1 + b1, GELU and h w2 + b2 while the hidden block is still in
// cache; the GELU touches only the rows in use, and its derivative is kept from the forward (one
// tanh per element in all). Saved for backward: h = GELU(a) and gelu'(a), a = x w1 + b1.
// 256 rows: the hidden block (128 KB at h = 128) stays in L2; 64, 128 and whole pieces measured
// within noise of it, the unfused ops 10-15% slower in backward (bench_moe_layer, 2 threads).
//   out = h w2 + b2;  dh = g w2^T;  da = dh * gelu'(a);  dx = da w1^T (0 past n_e)
//   dw2 = h^T g, db2 = sum g;  dw1 = x^T da, db1 = sum da (over the first n_e rows)
namespace {
constexpr int64_t kMlpBlock = 256;
}

Tensor expert_mlp(const Tensor& x_, const Tensor& w1_, const Tensor& b1_, const Tensor& w2_, const Tensor& b2_,
                  const Tensor& rows_) {
  expect_cpu_f32("expert_mlp", {&x_, &w1_, &w2_});
  if (b1_.defined()) expect_cpu_f32("expert_mlp", {&b1_});
  if (b2_.defined()) expect_cpu_f32("expert_mlp", {&b2_});
  MV_CHECK(x_.ndim() == 3 && w1_.ndim() == 3 && w2_.ndim() == 3,
           "expert_mlp: expected x (E, M, d), w1 (E, d, h) and w2 (E, h, o), got x ", x_.str(), ", w1 ", w1_.str(),
           " and w2 ", w2_.str());
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2), H = w1_.size(2), O = w2_.size(2);
  MV_CHECK(w1_.size(0) == E && w1_.size(1) == d, "expert_mlp: w1 ", w1_.str(), " must be (", E, ", ", d,
           ", h) for x ", x_.str());
  MV_CHECK(w2_.size(0) == E && w2_.size(1) == H, "expert_mlp: w2 ", w2_.str(), " must be (", E, ", ", H,
           ", o) for w1 ", w1_.str());
  MV_CHECK(!b1_.defined() || b1_.shape() == Shape({E, H}), "expert_mlp: b1 ", b1_.str(), " must be (", E, ", ",
           H, ") for w1 ", w1_.str());
  MV_CHECK(!b2_.defined() || b2_.shape() == Shape({E, O}), "expert_mlp: b2 ", b2_.str(), " must be (", E, ", ",
           O, ") for w2 ", w2_.str());
  const std::vector<int64_t> rows = expert_rows("expert_mlp", rows_, E, M, x_);
  const Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const Tensor b1 = b1_.defined() ? b1_.contiguous() : Tensor(), b2 = b2_.defined() ? b2_.contiguous() : Tensor();
  const float* px = x.data<float>();
  const float* pw1 = w1.data<float>();
  const float* pw2 = w2.data<float>();
  const float* pb1 = b1.defined() ? b1.data<float>() : nullptr;
  const float* pb2 = b2.defined() ? b2.data<float>() : nullptr;
  const bool graph = autograd::needs_graph({x_, w1_, b1_, w2_, b2_});
  // Rows past rows[e] of hid and dgelu are never written nor read.
  Tensor hid = Tensor::empty({E, M, H}), dgelu = graph ? Tensor::empty({E, M, H}) : Tensor();
  Tensor out = Tensor::empty({E, M, O});
  float* ph = hid.data<float>();
  float* pdg = graph ? dgelu.data<float>() : nullptr;
  float* po = out.data<float>();
  const std::vector<float> zeros(size_t(pb1 ? 0 : H), 0.f);
  for_expert_rows(
      rows, 2 * H * (d + O) + 24 * H,
      [&](int64_t e, int64_t r0, int64_t r1) {
        for (int64_t m0 = r0; m0 < r1; m0 += kMlpBlock) {
          const int64_t n = std::min(kMlpBlock, r1 - m0), i0 = e * M + m0;
          // The biases are added in the passes that follow each product (no per-row copies).
          float* a = ph + i0 * H;
          detail::gemm_on_thread(n, H, d, px + i0 * d, d, false, pw1 + e * d * H, H, false, a, H, false);
          const float* bias1 = pb1 ? pb1 + e * H : zeros.data();
          float* dg = pdg ? pdg + i0 * H : nullptr;
          for (int64_t r = 0; r < n; ++r) {
            float* ar = a + r * H;
            if (dg) {
              float* dr = dg + r * H;
              for (int64_t j = 0; j < H; ++j) {
                float y, dy;
                gelu_tanh_both(ar[j] + bias1[j], y, dy);
                ar[j] = y, dr[j] = dy;
              }
            } else {
              for (int64_t j = 0; j < H; ++j) ar[j] = gelu_tanh(ar[j] + bias1[j]);
            }
          }
          float* o = po + i0 * O;
          detail::gemm_on_thread(n, O, H, a, H, false, pw2 + e * H * O, O, false, o, O, false);
          if (pb2)
            for (int64_t r = 0; r < n; ++r)
              for (int64_t j = 0; j < O; ++j) o[r * O + j] += pb2[e * O + j];
        }
      },
      [&](int64_t e) { std::fill(po + (e * M + rows[size_t(e)]) * O, po + (e + 1) * M * O, 0.f); });
  if (!graph) return out;
  const bool gx = x_.requires_grad(), gw1 = w1_.requires_grad(), gb1 = b1_.defined() && b1_.requires_grad();
  const bool gw2 = w2_.requires_grad(), gb2 = b2_.defined() && b2_.requires_grad();
  return record(
      "expert_mlp", out, {x_, w1_, b1_, w2_, b2_},
      [x = x.detach(), w1 = w1.detach(), w2 = w2.detach(), hid, dgelu, rows, gx, gw1, gb1, gw2, gb2, E, M, d, H,
       O](const Tensor& g_) {
        const Tensor g = g_.contiguous();
        const float* pg = g.data<float>();
        const float* px = x.data<float>();
        const float* pw1 = w1.data<float>();
        const float* pw2 = w2.data<float>();
        const float* ph = hid.data<float>();
        const float* pdg = dgelu.data<float>();
        Tensor dx, dw1, db1, dw2, db2, da;
        if (gx || gw1 || gb1) {
          da = Tensor::empty({E, M, H});  // rows past rows[e] never written nor read
          if (gx) dx = Tensor::empty({E, M, d});
          float* pda = da.data<float>();
          float* pdx = gx ? dx.data<float>() : nullptr;
          for_expert_rows(
              rows, 2 * H * (O + (gx ? d : 0)) + H,
              [&](int64_t e, int64_t r0, int64_t r1) {
                for (int64_t m0 = r0; m0 < r1; m0 += kMlpBlock) {
                  const int64_t n = std::min(kMlpBlock, r1 - m0), i0 = e * M + m0;
                  float* a = pda + i0 * H;
                  detail::gemm_on_thread(n, H, O, pg + i0 * O, O, false, pw2 + e * H * O, O, true, a, H, false);
                  const float* dg = pdg + i0 * H;
                  for (int64_t i = 0; i < n * H; ++i) a[i] *= dg[i];
                  if (pdx)
                    detail::gemm_on_thread(n, d, H, a, H, false, pw1 + e * d * H, H, true, pdx + i0 * d, d, false);
                }
              },
              [&](int64_t e) {
                if (pdx) std::fill(pdx + (e * M + rows[size_t(e)]) * d, pdx + (e + 1) * M * d, 0.f);
              });
        }
        if (gw2) dw2 = Tensor::empty({E, H, O});
        if (gb2) db2 = Tensor::empty({E, O});
        if (gw2 || gb2)
          expert_weight_grads(ph, pg, rows, M, H, O, gw2 ? dw2.data<float>() : nullptr,
                              gb2 ? db2.data<float>() : nullptr);
        if (gw1) dw1 = Tensor::empty({E, d, H});
        if (gb1) db1 = Tensor::empty({E, H});
        if (gw1 || gb1)
          expert_weight_grads(px, da.data<float>(), rows, M, d, H, gw1 ? dw1.data<float>() : nullptr,
                              gb1 ? db1.data<float>() : nullptr);
        return std::vector<Tensor>{dx, dw1, db1, dw2, db2};
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
