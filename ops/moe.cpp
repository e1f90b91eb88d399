// Sparse MoE ops (methods.md sections 2 and 3): the Assignment, dispatch and combine (CUDA twins:
// cuda/moe.cu), and Soft MoE's dispatch and combine. Routing is in ops/route.cpp, the experts in
// ops/experts.cpp (expert_matmul) and ops/expert_mlp.cpp (expert_mlp, and moe_mlp, which folds
// dispatch and combine into the experts).
//
// Dispatch and combine move d-wide rows between token rows and packed buffer rows through the
// Assignment's two index tables (row -> token, token -> rows), so every op costs O(size), with
// no one-hot (N x E x C) tensors, and every one is a gather: each thread writes only its own
// rows.
#include "ops/moe.h"

#include <algorithm>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"
#include "ops/moe_cpu.h"
#include "ops/shape.h"
#include "ops/softmax.h"

namespace mv::ops::detail {

void check_assignment(const char* op, const Assignment& a, bool need_weight) {
  MV_CHECK(is_i64(a.token, 2), op, ": assignment tokens must be an I64 (E, R) tensor, got ", str_of(a.token));
  const int64_t E = a.token.size(0), R = a.token.size(1), G = a.G, N = a.N;
  MV_CHECK(G >= 0 && N >= 0 && a.C >= 0 && R == G * a.C, op, ": assignment tokens ", a.token.str(),
           " do not have R = G*C = ", G, "*", a.C, " rows per expert");
  MV_CHECK(is_i64(a.rows, 1) && a.rows.size(0) == E, op, ": assignment rows must be I64 (", E,
           ") for tokens ", a.token.str(), ", got ", str_of(a.rows));
  MV_CHECK(is_i64(a.token_rows, 3) && a.token_rows.size(0) == G && a.token_rows.size(1) == N, op,
           ": assignment token_rows must be I64 (", G, ", ", N, ", K), got ", str_of(a.token_rows));
  if (!need_weight) return;
  MV_CHECK(a.weight.defined(), op, ": the assignment has no weights");
  expect_f32(op, {&a.weight});
  MV_CHECK(a.weight.shape() == a.token.shape(), op, ": assignment weights ", a.weight.str(),
           " do not match its tokens ", a.token.str());
}

}  // namespace mv::ops::detail

namespace mv::cpu {

using ops::Assignment;
using ops::lane_sum;

void check_assignment_values(const char* op, const Assignment& a) {
  const int64_t E = a.token.size(0), R = a.token.size(1), G = a.G, N = a.N;
  const Tensor tok = a.token.contiguous(), rows = a.rows.contiguous(), trows = a.token_rows.contiguous();
  const int64_t* pt = tok.data<int64_t>();
  const int64_t* pr = rows.data<int64_t>();
  const int64_t* ptr = trows.data<int64_t>();
  const int64_t K = trows.size(2);
  for (int64_t e = 0; e < E; ++e)
    MV_CHECK(pr[e] >= 0 && pr[e] <= R, op, ": assignment rows[", e, "] = ", pr[e], " is outside [0, ", R, "]");
  // A branch-free count of bad entries first, which vectorises; only a bad assignment goes on to
  // the loops below that name its first bad entry.
  int64_t bad = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = pt[e * R + r];
      bad += r < pr[e] ? (t < 0) | (t >= G * N) : t != -1;
    }
  for (int64_t t = 0; t < G * N; ++t)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = ptr[t * K + j], in = row >= 0 && row < E * R ? row : -1;
      bad += row != -1 && (in != row || pt[in] != t);
    }
  if (bad == 0) return;
  for (int64_t e = 0; e < E; ++e) {
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
  for (int64_t t = 0; t < G * N; ++t)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = ptr[t * K + j];
      MV_CHECK(row == -1 || (row >= 0 && row < E * R && pt[row] == t), op, ": token_rows of token ", t,
               " lists row ", row, ", which does not hold that token");
    }
}

void sum_token_rows(const Tensor& token_rows, const float* src, const float* w, int64_t d, float* dst) {
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

// token: (E, G*C) I64, weight: (E, G*C) or undefined -> the Assignment, rows counted and
// token_rows filled; throws naming a token outside [-1, G*N) or a used row after an unused one
Assignment assignment_from_tokens(const Tensor& token_, const Tensor& weight, int64_t G, int64_t N, int64_t C) {
  const int64_t E = token_.size(0), R = token_.size(1);
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

// x: (G, N, d) -> (E, R, d): row (e, r) holds x[token[e, r]], zeros when unused
Tensor dispatch_forward(const Tensor& x_, const Assignment& a) {
  check_assignment_values("dispatch", a);
  const int64_t d = x_.size(2), E = a.token.size(0), R = a.token.size(1);
  const Tensor token = a.token.contiguous();
  const int64_t* pt = token.data<int64_t>();
  const std::vector<int64_t> rows = a.rows.to_vector<int64_t>();
  const Tensor x = x_.contiguous();
  const float* px = x.data<float>();
  Tensor out = Tensor::empty({E, R, d});
  float* po = out.data<float>();
  parallel_for(E * R, d, [&](int64_t s, int64_t e) {
    ops::for_rows(s, e, R, [&](int64_t i, int64_t x, int64_t r) {
      float* dst = po + i * d;
      if (r < rows[size_t(x)])
        std::copy(px + pt[i] * d, px + (pt[i] + 1) * d, dst);
      else
        std::fill(dst, dst + d, 0.f);
    });
  });
  return out;
}

// g: (E, R, d) -> (G, N, d): each token's gradient is the sum of its rows' gradients
Tensor dispatch_backward(const Tensor& g, const Assignment& a) {
  const int64_t d = g.size(2);
  Tensor gx = Tensor::empty({a.G, a.N, d});
  sum_token_rows(a.token_rows.contiguous(), g.contiguous().data<float>(), nullptr, d, gx.data<float>());
  return gx;
}

// y: (E, R, d) -> (G, N, d): out[t] = sum over t's rows (e, r) of weight[e, r] y[e, r]
Tensor combine_forward(const Tensor& y_, const Assignment& a) {
  check_assignment_values("combine", a);
  const int64_t d = y_.size(2);
  const Tensor y = y_.contiguous(), w = a.weight.contiguous();
  Tensor out = Tensor::empty({a.G, a.N, d});
  sum_token_rows(a.token_rows.contiguous(), y.data<float>(), w.data<float>(), d, out.data<float>());
  return out;
}

// g: (G, N, d) ->  dy[e, r] = w[e, r] g[token[e, r]],  dw[e, r] = g[token[e, r]] . y[e, r]
// (0 on unused rows), each only when asked for
ops::CombineGrads combine_backward(const Tensor& g, const Tensor& y_, const Assignment& a, bool need_y, bool need_w) {
  const int64_t E = a.token.size(0), R = a.token.size(1), d = y_.size(2);
  const Tensor go = g.contiguous(), y = y_.contiguous(), w = a.weight.contiguous(), token = a.token.contiguous();
  const std::vector<int64_t> rows = a.rows.to_vector<int64_t>();
  const float* pgo = go.data<float>();
  const int64_t* pt = token.data<int64_t>();
  const float* py = y.data<float>();
  const float* pw = w.data<float>();
  ops::CombineGrads o{need_y ? Tensor::empty({E, R, d}) : Tensor(), need_w ? Tensor::empty({E, R}) : Tensor()};
  float* pdy = need_y ? o.dy.data<float>() : nullptr;
  float* pdw = need_w ? o.dweight.data<float>() : nullptr;
  parallel_for(E * R, 2 * d, [&](int64_t s, int64_t e) {
    ops::for_rows(s, e, R, [&](int64_t i, int64_t x, int64_t r) {
      const float* gr = r < rows[size_t(x)] ? pgo + pt[i] * d : nullptr;
      if (pdy) {
        float* dst = pdy + i * d;
        const float wi = pw[i];
        if (!gr)
          std::fill(dst, dst + d, 0.f);
        else
          for (int64_t j = 0; j < d; ++j) dst[j] = wi * gr[j];
      }
      if (pdw) pdw[i] = gr ? lane_sum(d, [&](int64_t j) { return gr[j] * py[i * d + j]; }) : 0.f;
    });
  });
  return o;
}

}  // namespace mv::cpu

namespace mv::ops {

using autograd::record;
using detail::check_assignment;

Assignment make_assignment(const Tensor& token, const Tensor& weight, int64_t G, int64_t N, int64_t C) {
  MV_CHECK(G >= 0 && N >= 0 && C >= 0, "make_assignment: G = ", G, ", N = ", N, ", C = ", C,
           " must be >= 0");
  MV_CHECK(is_i64(token, 2), "make_assignment: tokens must be an I64 (E, G*C) tensor, got ", str_of(token));
  const OpDevice dev = device_of("make_assignment", {&token, &weight});
  MV_CHECK(token.size(1) == G * C, "make_assignment: tokens ", token.str(), " must have G*C = ", G * C,
           " rows per expert");
  if (weight.defined()) {
    expect_f32("make_assignment", {&weight});
    MV_CHECK(weight.shape() == token.shape(), "make_assignment: weights ", weight.str(),
             " do not match the tokens ", token.str());
  }
  return MV_CPU_KERNEL(assignment_from_tokens)(dev, token, weight, G, N, C);
}

// ---- dispatch and combine ----------------------------------------------------------------------

// out[e, r] = x[token[e, r]] (zeros when unused); dx[t] = sum of the gradients of t's rows
Tensor dispatch(const Tensor& x, const Assignment& a) {
  const OpDevice dev = device_of("dispatch", {&x, &a.token, &a.rows, &a.token_rows});
  expect_f32("dispatch", {&x});
  MV_CHECK(x.ndim() == 3, "dispatch: x must be (G, N, d), got ", x.str());
  check_assignment("dispatch", a, false);
  MV_CHECK(x.size(0) == a.G && x.size(1) == a.N, "dispatch: x ", x.str(),
           " does not match the assignment's (G, N) = (", a.G, ", ", a.N, ")");
  Tensor out = MV_KERNEL(dispatch_forward)(dev, x, a);
  Assignment saved = a;
  saved.weight = Tensor();  // the backward reads only the index tables
  return record("dispatch", out, {x}, [dev, saved](const Tensor& g) {
    return std::vector<Tensor>{MV_KERNEL(dispatch_backward)(dev, g, saved)};
  });
}

// out[t] = sum over t's rows (e, r) of w[e, r] y[e, r]
//   dy[e, r] = w[e, r] g_out[token[e, r]];  dw[e, r] = g_out[token[e, r]] . y[e, r]  (0 if unused)
Tensor combine(const Tensor& y, const Assignment& a) {
  const OpDevice dev = device_of("combine", {&y, &a.token, &a.weight, &a.rows, &a.token_rows});
  expect_f32("combine", {&y});
  check_assignment("combine", a, true);
  const int64_t E = a.token.size(0), R = a.token.size(1);
  MV_CHECK(y.ndim() == 3 && y.size(0) == E && y.size(1) == R, "combine: y ", y.str(),
           " does not match the assignment ", a.token.str(), ": expected (", E, ", ", R, ", d)");
  Tensor out = MV_KERNEL(combine_forward)(dev, y, a);
  const bool gy = y.requires_grad(), gw = a.weight.requires_grad();
  Assignment saved = a;
  saved.weight = a.weight.detach();
  return record("combine", out, {y, a.weight}, [dev, yd = y.detach(), saved, gy, gw](const Tensor& g) {
    CombineGrads d = MV_KERNEL(combine_backward)(dev, g, yd, saved, gy, gw);
    return std::vector<Tensor>{d.dy, d.dweight};
  });
}

// ---- Soft MoE: composed of differentiable ops, so autograd derives the backward ------------------

Tensor soft_dispatch(const Tensor& x, const Tensor& logits, int64_t experts) {
  device_of("soft_dispatch", {&x, &logits});
  expect_f32("soft_dispatch", {&x, &logits});
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
  device_of("soft_combine", {&y, &logits});
  expect_f32("soft_combine", {&y, &logits});
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
