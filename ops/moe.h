// Sparse Mixture-of-Experts ops: routing decisions, dispatch of tokens into per-expert buffers,
// the batched expert matmul, and combine (methods.md sections 2 and 3). Routing in ops/route.cpp,
// Assignment/dispatch/combine/Soft MoE in ops/moe.cpp, experts in ops/experts.cpp and
// ops/expert_mlp.cpp (the fused MLP, and moe_mlp: dispatch, experts and combine in one op);
// ops/moe_cpu.h holds what their CPU kernels share. The routings (top-k, expert choice),
// dispatch, combine and the experts have CUDA twins (cuda/route.cu, moe.cu, experts.cu,
// expert_mlp.cu); make_assignment runs on the CPU only so far, and the Soft MoE ops are made of
// other ops.
//
// Tokens are routed in G groups of N tokens (one image's tokens, or the whole batch); token n of
// group g is named by its flat index t = g*N + n. An expert takes at most C tokens of a group,
// so at most R = G*C in all, and its buffer has R rows: expert buffers are (E, R, d).
//
// The buffers are packed: the rows[e] rows that expert e uses come first, group after group
// (within a group in the order the routing fills them), and the rest is zero padding. Capacity
// leaves much of the buffer empty (c = 1.25 and a few dropped choices: about 1/4 of it at k = 2),
// and in a slot-major (E, G, C) layout those holes sit inside every group, so the experts had to
// multiply them. Packed, the holes are one tail per expert, and expert_matmul, given rows,
// multiplies only the rows in use: padding costs memory but no FLOPs. The capacity per group,
// and so which choices are dropped, is the same as with (E, G, C) buffers.
//
// An Assignment holds a routing both ways: for every buffer row its token and combine weight,
// and for every token the rows it fills. So each op is a gather, never a scatter: dispatch reads
// the token of each row, its backward sums each token's rows; combine sums each token's rows,
// its backward reads the token of each row. No two threads write the same row. Token choice
// (top-k) and expert choice both produce this form and dispatch and combine only read it, so a
// CUDA kernel can later replace any of these bodies behind the same interface.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

struct Assignment {
  Tensor token;       // (E, R) I64: flat token g*N + n of row r of expert e's buffer; -1 unused
  Tensor weight;      // (E, R) F32: that row's combine weight (0 if unused); differentiable
  Tensor rows;        // (E,) I64: rows in use; they come first (row r used iff r < rows[e])
  Tensor token_rows;  // (G, N, K) I64: the flat buffer rows e*R + r that token g*N + n fills;
                      // -1 entries are unused (K: top-k k, expert choice E)
  int64_t G = 0, N = 0, C = 0;  // groups, tokens per group, capacity per group (R = G*C)
};

// Builds an Assignment from its token table (E, G*C) (and weights (E, G*C) F32, or undefined):
// counts rows and fills token_rows (each token's rows in ascending order). Throws unless the
// tokens are in [-1, G*N) and each expert's used rows come first. For hand-made routings; the
// routing ops below build theirs directly.
Assignment make_assignment(const Tensor& token, const Tensor& weight, int64_t G, int64_t N, int64_t C);

struct TopKOptions {
  int k = 1;
  float capacity_factor = 1.05f;  // c in C = ceil(N k c / E); 0: dropless, C = N
  bool round_to_4 = false;        // round C up to a multiple of 4
  bool bpr = false;               // Batch Prioritized Routing: within a rank, largest gate first
  bool renormalize = false;       // a token's k combine weights sum to 1 (V-MoE: off)
};

struct TopKRouting {
  Assignment assign;  // token_rows[g, n, r] is choice r's row (e*R + slot), -1 if dropped
  Tensor expert;      // (G, N, k) I64: expert of each token's r-th choice (r = 0 is the best)
  Tensor slot;        // (G, N, k) I64: its row in that expert's packed buffer, -1 if dropped
  int64_t capacity = 0;
};

// C = ceil(N * k * c / E), rounded up to a multiple of 4 when asked, then capped at N (an expert
// cannot receive more than the N tokens of a group), and at least 1. c = 0 means dropless: C = N,
// so no choice is ever dropped (a token's k choices go to k different experts). Throws unless
// c >= 0 and 1 <= k <= E. c is a float (1.1f = 1.10000002): N k c / E within 1e-6 (relative) of an integer
// counts as that integer, so C is the ceiling for the decimal factor that was meant.
int64_t topk_capacity(int64_t tokens, int k, float capacity_factor, int64_t experts,
                      bool round_to_4);

// gates: (G, N, E) F32 (each row a softmax over experts) -> TopKRouting, R = G*C rows per expert.
// Each token picks its k largest gates (ties: lower expert first; NaN counts as largest, as in
// ops::topk). Per group, buffers fill rank by rank: every rank-0 choice before any rank-1 choice;
// within a rank tokens go in sequence order, or with BPR in descending order of their largest
// gate (ties in sequence order). A choice that finds its expert already holding C tokens of the
// group is dropped (slot -1, no weight). Each expert's rows then hold its kept choices, group by
// group, each group's in that fill order. The combine weight of a kept choice is its gate
// (divided by the sum of the token's k gates, dropped ones included, with renormalize); its
// gradient flows back to the gates.
TopKRouting topk_route(const Tensor& gates, const TopKOptions& opt);

// V-MoE's load-loss probabilities (methods.md 2.1). z: (G, N, E) clean logits, zn: (G, N, E)
// the noisy logits the routing used, expert: (G, N, k) I64 each token's chosen experts, best
// first (TopKRouting.expert) -> P: (G, N, E),
//   P[g, n, e] = Phi((z[g, n, e] - t[g, n]) / noise_std),  t[g, n] = zn[g, n, expert[g, n, k-1]],
// t being the token's k-th largest noisy logit: P is the chance that z plus fresh noise would
// still reach it. Gradients reach z directly and zn through t. One pass instead of a second
// top-k and four elementwise ops, with normal_cdf's Phi and phi (ops/fast_math.h), the same bits.
Tensor topk_load_probs(const Tensor& z, const Tensor& zn, const Tensor& expert, float noise_std);

// scores: (G, N, E) F32 -> Assignment with `capacity` = C rows per group and expert, all used:
// expert e takes the C tokens with the largest scores[g, :, e] (ties: lower token first; NaN as
// largest), row g*C + c holding group g's c-th best. A token may be taken by 0 to E experts. The
// combine weight is weights[g, n, e] (default: the scores); its gradient flows to that tensor.
// Requires 1 <= capacity <= N.
Assignment expert_choice_route(const Tensor& scores, int64_t capacity,
                               const Tensor& weights = Tensor());

// x: (G, N, d), a -> (E, R, d): row (e, r) holds x[token[e, r]] (flat), zeros when unused.
// Backward: each token's gradient is the sum of its rows' gradients.
Tensor dispatch(const Tensor& x, const Assignment& a);

// y: (E, R, d), a -> (G, N, d): out[t] = sum over the rows (e, r) that token t fills of
// weight[e, r] * y[e, r]; zeros for a token in no row. Unused rows of y are never read.
// Gradients: to y (weight * g_out[token], zero on unused rows) and to a.weight (the dot product
// of g_out[token] with y[e, r]; 0 on unused rows).
Tensor combine(const Tensor& y, const Assignment& a);

// x: (E, M, d), w: (E, d, h), b: (E, h) or undefined, rows: (E,) I64 in [0, M] or undefined
// -> (E, M, h), out[e] = x[e] w[e] + b[e] on expert e's first rows[e] rows (every row when rows
// is undefined) and zero on the rest. Rows past rows[e] are never read: not in the product, not
// in any gradient (bias included), and their input gradient is zero. Gradients to x, w and b.
Tensor expert_matmul(const Tensor& x, const Tensor& w, const Tensor& b = Tensor(),
                     const Tensor& rows = Tensor());

// The expert MLP in one op: x: (E, M, d), w1: (E, d, h), b1: (E, h) or undefined, w2: (E, h, o),
// b2: (E, o) or undefined, rows: (E,) I64 in [0, M] or undefined -> (E, M, o),
// out[e] = gelu(x[e] w1[e] + b1[e]) w2[e] + b2[e] (tanh GELU, as ops::gelu) on expert e's first
// rows[e] rows, zero on the rest: expert_matmul(gelu(expert_matmul(x, w1, b1, rows)), w2, b2, rows)
// without the GELU pass over the padding rows and two full (E, M, h) passes over memory. Rows past
// rows[e] are never read and get a zero input gradient. Gradients to x, w1, b1, w2 and b2.
Tensor expert_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                  const Tensor& rows = Tensor());

// The sparse MoE feed-forward layer in one op: x: (G, N, d), a token-choice or expert-choice
// Assignment, the expert MLP's weights as in expert_mlp -> (G, N, o), exactly
// combine(expert_mlp(dispatch(x, a), w1, b1, w2, b2, a.rows), a), bit for bit. Each block of an
// expert's rows is gathered from x straight into the first product, and in backward each block's
// output gradient is gathered from g_out (scaled by the combine weight) straight into the second:
// the (E, R, d) dispatch buffer and its gradient are never written, and the weight gradients are
// taken block by block while the block is in cache. Gradients to x, a.weight and the weights.
Tensor moe_mlp(const Tensor& x, const Assignment& a, const Tensor& w1, const Tensor& b1, const Tensor& w2,
               const Tensor& b2);

// Soft MoE (Puigcerver et al.). logits: (G, N, E*p), slot s = e*p + j is expert e's j-th slot.
// x: (G, N, d) -> slot inputs (E, G, p, d): each slot is a convex combination of the group's
// tokens, weights softmax(logits[g, :, s]) over the N tokens. Returned as a permuted view.
Tensor soft_dispatch(const Tensor& x, const Tensor& logits, int64_t experts);
// y: (E, G, p, d) -> (G, N, d): each token is a convex combination of all E*p slot outputs,
// weights softmax(logits[g, n, :]) over the slots.
Tensor soft_combine(const Tensor& y, const Tensor& logits);

// The results of the kernels behind these ops (ops/dispatch.h), where more than one tensor.
// topk_route's stages (ops/route.cpp): each token's choices; their slots in the expert buffers of
// their group; the packed rows.
struct TopKChoices {
  Tensor expert;  // (G, N, k) I64, best first
  Tensor gate;    // (G, N, k) F32, the chosen gates
};
struct Slots {
  Tensor slot;   // (G, N, k) I64: the choice's place among its expert's choices from the group, -1 dropped
  Tensor count;  // (G, E) I64: the kept choices per group and expert
};
struct Placement {
  Assignment assign;
  Tensor slot;  // (G, N, k) I64: the choice's row in its expert's packed buffer, -1 dropped
};
struct LoadProbs {
  Tensor probs;      // (G, N, E)
  Tensor threshold;  // (G, N): each token's k-th largest noisy logit
};
struct LoadProbsGrads {
  Tensor dz, dzn;  // (G, N, E); dzn undefined unless asked for
};
struct CombineGrads {
  Tensor dy;       // (E, R, d)
  Tensor dweight;  // (E, R)
};
// The expert weights as the expert kernels take them: contiguous, biases undefined when absent.
struct ExpertWeights {
  Tensor w1, b1, w2, b2;
  bool bf16 = false;  // CPU products on bfloat16 inputs (ops::matmul_bf16() when the op ran)
};
// What an expert MLP's forward gives and keeps for its backward: hid = GELU(a) and
// dgelu = GELU'(a) (E, M, H) on the rows in use, and for moe_mlp the expert outputs y (E, R, O).
struct ExpertMlpOut {
  Tensor out, hid, dgelu, y;
};
// Which gradients an expert MLP's backward computes, and the gradients.
struct ExpertMlpNeeds {
  bool x, weight, w1, b1, w2, b2;  // weight: the Assignment's combine weights (moe_mlp)
};
struct ExpertMlpGrads {
  Tensor dx, dweight, dw1, db1, dw2, db2;
};

namespace detail {
// Throws unless `a` is a consistent Assignment in shape and dtype (with weights: their shape
// too). The values (index ranges, used rows first, token_rows) are checked by the CPU kernels.
void check_assignment(const char* op, const Assignment& a, bool need_weight);
}  // namespace detail

}  // namespace mv::ops
