// Internal to the MoE ops' CPU kernels (ops/moe.cpp, ops/experts.cpp, ops/expert_mlp.cpp): the
// checks of an Assignment's values, the gather that sums each token's rows, how all experts' rows
// in use are cut over the threads, and the weight copies the expert kernels share.
#pragma once
#include <algorithm>
#include <vector>

#include "engine/parallel.h"
#include "engine/tensor.h"
#include "ops/moe.h"

namespace mv::cpu {

// Throws unless the tokens of `a` are in range, each expert's used rows come first and every
// token_rows entry names a row that holds that token (ops::detail::check_assignment checked the
// shapes). O(E R + G N K) integer reads, small next to the d-wide rows the ops move; it keeps a
// hand-made Assignment from sending a kernel out of bounds.
void check_assignment_values(const char* op, const ops::Assignment& a);

// token_rows: (G, N, K) rows of each token (-1: none), src: (E*R, d), w: (E*R,) or null
// -> dst: (G*N, d), dst[t] = sum over t's rows of w[row] * src[row] (w = 1 when null); zeros for a
// token with none. Each thread writes only its own tokens.
void sum_token_rows(const Tensor& token_rows, const float* src, const float* w, int64_t d, float* dst);

// The rows in use of all experts laid end to end, cut into num_threads() equal shares: share i
// runs f(i, e, r0, r1) for every piece [r0, r1) of expert e's rows inside it, and tail(e) for
// its part of the experts (E/T of them). One fork-join for all experts, balanced however unevenly
// the routing spread the tokens. A share's pieces after its first each start an expert's rows
// (r0 = 0), so at most one piece per share continues an expert begun in an earlier share.
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
        if (r0 < r1) f(i, x, r0, r1);
      }
    }
  });
}

// w (E, d, h) -> (E, h, d), contiguous: the right operand of dx = g w^T, read by rows. Copied once
// per backward rather than once per block of rows.
Tensor transposed_weights(const Tensor& w);

// Rows in use per expert from an optional rows tensor (every one of the M rows when undefined),
// checked against [0, M]; x only names the input in the message.
std::vector<int64_t> expert_rows(const char* op, const Tensor& rows, int64_t E, int64_t M, const Tensor& x);

}  // namespace mv::cpu
