// Sparse Mixture-of-Experts ops: routing decisions, dispatch of tokens into per-expert buffers,
// the batched expert matmul, and combine (methods.md sections 2 and 3).
//
// Tokens are routed in G groups of N tokens (one image's tokens, or the whole batch). Expert
// buffers are laid out (E, G, C, d): viewed as (E, G*C, d), one batched matmul runs every expert
// on the tokens of every group at once.
//
// A routing is stored slot-major, as an Assignment: for every buffer slot (e, g, c) the token that
// fills it (or -1) and the weight its expert output gets when it is combined back. Token choice
// (top-k) and expert choice both produce this form, and dispatch and combine only read it, so a
// CUDA kernel can later replace any of these bodies behind the same interface.
#pragma once
#include "engine/tensor.h"

namespace mv::ops {

struct Assignment {
  Tensor token;   // (E, G, C) I64: index in [0, N) of the token in slot (e, g, c); -1 if empty
  Tensor weight;  // (E, G, C) F32: combine weight of the slot (0 if empty); differentiable
};

struct TopKOptions {
  int k = 1;
  float capacity_factor = 1.05f;  // c in C = ceil(N k c / E)
  bool round_to_4 = false;        // round C up to a multiple of 4
  bool bpr = false;               // Batch Prioritized Routing: within a rank, largest gate first
  bool renormalize = false;       // a token's k combine weights sum to 1 (V-MoE: off)
};

struct TopKRouting {
  Assignment assign;  // C = capacity slots per expert
  Tensor expert;      // (G, N, k) I64: expert of each token's r-th choice (r = 0 is the best)
  Tensor slot;        // (G, N, k) I64: its slot in that expert's buffer, -1 if it was dropped
  int64_t capacity = 0;
};

// C = ceil(N * k * c / E), rounded up to a multiple of 4 when asked, then capped at N (an expert
// cannot receive more than the N tokens of a group), and at least 1. Throws unless c > 0 and
// 1 <= k <= E. c is a float (1.1f = 1.10000002): N k c / E within 1e-6 (relative) of an integer
// counts as that integer, so C is the ceiling for the decimal factor that was meant.
int64_t topk_capacity(int64_t tokens, int k, float capacity_factor, int64_t experts,
                      bool round_to_4);

// gates: (G, N, E) F32 (each row a softmax over experts) -> TopKRouting.
// Each token picks its k largest gates (ties: lower expert first; NaN counts as largest, as in
// ops::topk). Buffers fill rank by rank: every rank-0 choice before any rank-1 choice; within a
// rank tokens go in sequence order, or with BPR in descending order of their largest gate (ties
// in sequence order). A choice whose buffer is full is dropped (slot -1, no weight); filled slots
// are a prefix of each (e, g) buffer. The combine weight of a kept choice is its gate (divided by
// the sum of the token's k gates, dropped ones included, with renormalize); its gradient flows
// back to the gates.
TopKRouting topk_route(const Tensor& gates, const TopKOptions& opt);

// scores: (G, N, E) F32 -> Assignment with `capacity` slots per expert: expert e takes the
// `capacity` tokens with the largest scores[g, :, e] (ties: lower token first; NaN as largest),
// slot c holding its c-th best. A token may be taken by 0 to E experts. The combine
// weight is weights[g, n, e] (default: the scores); its gradient flows to that tensor.
// Requires 1 <= capacity <= N.
Assignment expert_choice_route(const Tensor& scores, int64_t capacity,
                               const Tensor& weights = Tensor());

// x: (G, N, d), a: (E, G, C) -> (E, G, C, d): slot (e, g, c) holds x[g, a.token[e, g, c]], or
// zeros when empty. Backward adds each slot's gradient to its token's. Throws on a token outside
// [-1, N) (dispatch and combine).
Tensor dispatch(const Tensor& x, const Assignment& a);

// y: (E, G, C, d), a: (E, G, C) -> (G, tokens, d):
//   out[g, n] = sum over slots (e, c) holding n of a.weight[e, g, c] * y[e, g, c].
// A token in no slot gets zeros. Gradients: to y (weight * g_out[g, n]) and to a.weight (the
// dot product of g_out[g, n] with y[e, g, c]).
Tensor combine(const Tensor& y, const Assignment& a, int64_t tokens);

// x: (E, M, d), w: (E, d, h), b: (E, h) or undefined -> (E, M, h), out[e] = x[e] w[e] + b[e].
// Gradients to x, w and b.
Tensor expert_matmul(const Tensor& x, const Tensor& w, const Tensor& b = Tensor());

// Soft MoE (Puigcerver et al.). logits: (G, N, E*p), slot s = e*p + j is expert e's j-th slot.
// x: (G, N, d) -> slot inputs (E, G, p, d): each slot is a convex combination of the group's
// tokens, weights softmax(logits[g, :, s]) over the N tokens. Returned as a permuted view.
Tensor soft_dispatch(const Tensor& x, const Tensor& logits, int64_t experts);
// y: (E, G, p, d) -> (G, N, d): each token is a convex combination of all E*p slot outputs,
// weights softmax(logits[g, n, :]) over the slots.
Tensor soft_combine(const Tensor& y, const Tensor& logits);

}  // namespace mv::ops
