// Router-consistency losses (methods.md sections 4 and 5), each one fused op with a hand-written
// backward:
// - Pairwise Router Consistency (PRC): the cross-correlation C of the clean router probabilities
//   of paired tokens of two augmented views is pushed towards the identity.
// - The noise-injection consistency loss: 1 - soft Jaccard of the router probabilities of a clean
//   and a perturbed input.
#pragma once
#include <utility>

#include "engine/tensor.h"

namespace mv::ops {

struct PrcOptions {
  // false: paper form L_diag = mean_i (C_ii - 1)^2.
  // true: the reference code's per-position form L_diag = mean_{t,e} (D[t,e] - 1)^2 with
  // D[t,e] = (E / M) sum_b p[b,t,e] q[b,pairs[b,t],e] (details and normaliser in prc.cpp).
  bool reference_diagonal = false;
  float diag_weight = 0.005f, off_weight = 0.05f;
};

// p: (B, T, E) view-1 clean router probabilities, q: (B, T, E) view-2, pairs: (B, T) I64 with
// pairs[b, t] = index in [0, T) of the view-2 token paired with view-1 token t, or -1 (unpaired).
// Over the M valid pairs of the whole batch, C = (E / M) sum_n p_n q_n^T (E x E),
// L_off = mean_{i != j} C_ij^2 (0 when E = 1) ->
// () diag_weight * L_diag + off_weight * L_off. Gradients flow to p and q.
// M = 0 gives a zero loss and zero gradients.
Tensor prc_loss(const Tensor& p, const Tensor& q, const Tensor& pairs, const PrcOptions& opt = {});

// Same inputs -> the unweighted terms {L_diag, L_off} in double, for logs (no graph).
std::pair<double, double> prc_terms(const Tensor& p, const Tensor& q, const Tensor& pairs,
                                    const PrcOptions& opt = {});

// Same inputs -> C: (E, E) F32, the PRC cross-correlation (no graph; for logs and plots).
// All zeros when M = 0.
Tensor prc_matrix(const Tensor& p, const Tensor& q, const Tensor& pairs);

// PRC over more than this batch (data-parallel ranks, train/parallel.h), paper form only. The
// caller adds up, over all the batches, each one's prc_matrix times its pair count
// (prc_pair_count) and the counts: C_total = that sum / M_total. The loss is L of C_total; the
// backward sends grad_scale * (E / M_total) dL/dC_total through this batch's own pairs, its
// share of the total's gradient (grad_scale: the factor the caller's averaging over batches
// takes back). C_total: (E, E) F32 on the CPU.
Tensor prc_loss_of_total(const Tensor& p, const Tensor& q, const Tensor& pairs, const Tensor& C_total,
                         int64_t M_total, const PrcOptions& opt, float grad_scale);
// pairs: (B, T) I64 -> M, the count of valid pairs (entries >= 0).
int64_t prc_pair_count(const Tensor& pairs);

// s, s2: (..., E) router probabilities of the clean and the perturbed input, same shape ->
// () mean over tokens of 1 - sum_i min(s_i, s2_i) / sum_i max(s_i, s2_i) (soft Jaccard loss).
// Gradients flow to s and s2; at ties s_i == s2_i each side gets half of the derivative (see
// prc.cpp). A token whose max-sum is 0 counts as identical (loss 0, gradient 0).
Tensor soft_jaccard_loss(const Tensor& s, const Tensor& s2);

// The results of these ops' kernels (ops/dispatch.h).
struct PrcOut {
  Tensor loss;   // ()
  Tensor terms;  // (2,): the unweighted L_diag and L_off
  Tensor C;      // (E, E)
  Tensor G;      // (E, E): (E / M) dL/dC, what the backward needs (zero when M = 0)
  Tensor H;      // (T, E): (E / M) dL/dD, the reference diagonal only; else undefined
};
struct JaccardOut {
  Tensor loss;  // ()
  Tensor A, U;  // (N,): each token's sum of the minima and of the maxima
};
struct PairGrads {
  Tensor da, db;  // the gradients of the two inputs, each undefined unless asked for
};

}  // namespace mv::ops
