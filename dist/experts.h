// Expert parallel: the experts of each MoE layer split across the n ranks of an expert group
// (dist::Group::Experts: the whole world, or groups of consecutive ranks), rank r of the group
// holding the E / n experts [r E / n, (r + 1) E / n) (their weights are the rows of the stacked
// (E, ...) expert tensors), while every rank routes its own share of the batch. Between dispatch and
// combine the token rows travel to the rank of their expert and back (all-to-all):
//
//   dispatch(x, a)      (E, R, d)     this rank's tokens, packed per expert (ops/moe.h)
//   send_to_experts     (El, n R, d)  each local expert's rows from rank 0, then rank 1, ...
//   expert_mlp          (El, n R, d)  on the rows in use only
//   return_to_tokens    (E, R, d)     each row back on the rank of its token
//   combine(y, a)       (G, N, d)
//
// Only the rows in use travel (MPI_Alltoallv), so capacity padding costs no communication. Each
// expert's received rows come rank after rank, which is group after group of the global batch:
// the same rows in the same order as one process routing the whole batch would give it, so the
// capacity, priority and drop semantics are those of one process. Each op's backward is the
// other's movement applied to the gradient.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "engine/tensor.h"

namespace mv::dist {

// How the rows of one forward travel, filled by send_to_experts and read by return_to_tokens
// (and both backwards).
struct RowRoute {
  int64_t E = 0, R = 0, D = 0;  // experts in all, rows per expert here, row width
  std::vector<int64_t> sent;    // (E,) rows this rank sent to each expert
  std::vector<int64_t> got;     // (n, El): rows rank s sent to local expert l, at s * El + l
};

// What send_to_experts gives: the rows each local expert received and how they travelled.
struct AtExperts {
  Tensor buf;   // (El, n R, D): each local expert's rows, packed (rank 0's first), zero padding
  Tensor rows;  // (El,) I64: rows in use
  std::shared_ptr<const RowRoute> route;
};

// buf: (E, R, D) F32 packed expert buffers, rows: (E,) I64 rows in use. Differentiable in buf.
AtExperts send_to_experts(const Tensor& buf, const Tensor& rows);
// y: (El, n R, D), rows laid out as send_to_experts gave them -> (E, R, D): every row back on
// its token's rank, at the place it left; zeros on unused rows. Differentiable in y.
Tensor return_to_tokens(const Tensor& y, const std::shared_ptr<const RowRoute>& route);

// Seconds spent moving rows (packing, the all-to-alls, unpacking; forward and backward) since
// the last call: what expert parallelism adds to an MoE layer (bench/distributed).
double take_exchange_seconds();

// local: (El, ...) this rank's rows of a tensor split by expert -> (E, ...), the expert group's
// rows in rank order, on every rank (checkpoints, evaluation).
Tensor gather_experts(const Tensor& local);
// full: (E, ...) CPU -> (El, ...) this rank's rows.
Tensor own_experts(const Tensor& full);

}  // namespace mv::dist
