// expert_matmul on the CPU: one batched product over all experts' packed buffers. Only the rows in
// use are multiplied (ops/moe.h explains the packed buffers); all experts' pieces are spread over
// the threads in one fork-join (ops/expert_rows.h). The fused expert MLP is in ops/expert_mlp.cpp.
#include <algorithm>
#include <cstring>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/expert_rows.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/shape.h"

namespace mv::ops {

namespace detail {

Tensor transposed_weights(const Tensor& w) { return transpose(w, 1, 2).contiguous(); }

std::vector<int64_t> expert_rows(const char* op, const Tensor& rows_, int64_t E, int64_t M, const Tensor& x) {
  std::vector<int64_t> rows(size_t(E), M);
  if (!rows_.defined()) return rows;
  MV_CHECK(is_cpu_i64(rows_, 1) && rows_.size(0) == E, op, ": rows ", rows_.str(), " must be I64 (", E,
           ") for x ", x.str());
  rows = rows_.to_vector<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    MV_CHECK(rows[size_t(e)] >= 0 && rows[size_t(e)] <= M, op, ": rows[", e, "] = ", rows[size_t(e)],
             " is outside [0, ", M, "] for x ", x.str());
  return rows;
}

}  // namespace detail

using autograd::record;
using detail::expert_rows;
using detail::for_expert_rows;
using detail::transposed_weights;

namespace {

// dw[e] = x[e, :n_e]^T g[e, :n_e] (d x h) and db[e] = column sums of g[e, :n_e], for x (E, M, d) and
// g (E, M, h); either output may be null. Split by depth, the rows cut as for_expert_rows cuts
// them, so that each thread packs and reads only its own rows (cutting the columns of dw instead
// made every thread pack all of x). The piece that starts expert e's rows writes dw[e] and db[e];
// a piece that goes on with an expert begun in an earlier share (a share's first piece, so at
// most one per share) writes that share's side buffer, added in after the join.
void expert_weight_grads(const float* px, const float* pg, const std::vector<int64_t>& rows, int64_t M, int64_t d,
                         int64_t h, float* pdw, float* pdb) {
  const int64_t T = num_threads(), S = d * h + h;  // a side buffer: dw, then db
  std::vector<float> side(size_t(T * S));
  std::vector<int64_t> side_of(size_t(T), -1);  // the expert whose piece each share's buffer holds
  for_expert_rows(
      rows, 2 * d * h + h,
      [&](int64_t i, int64_t e, int64_t r0, int64_t r1) {
        float* dw = pdw ? pdw + e * d * h : nullptr;
        float* db = pdb ? pdb + e * h : nullptr;
        if (r0 > 0) {
          side_of[size_t(i)] = e;
          dw = side.data() + i * S, db = dw + d * h;
        }
        const float* x = px + (e * M + r0) * d;
        const float* g = pg + (e * M + r0) * h;
        const int64_t n = r1 - r0;
        if (pdw) detail::gemm_on_thread(d, h, n, x, d, true, g, h, false, dw, h, false);
        if (pdb) {  // float sums over blocks of 64 rows, the blocks summed in double
          std::vector<double> acc(size_t(h), 0.0);
          std::vector<float> part(static_cast<size_t>(h));
          for (int64_t m0 = 0; m0 < n; m0 += 64) {
            std::fill(part.begin(), part.end(), 0.f);
            for (int64_t m = m0; m < std::min(n, m0 + 64); ++m)
              for (int64_t j = 0; j < h; ++j) part[size_t(j)] += g[m * h + j];
            for (int64_t j = 0; j < h; ++j) acc[size_t(j)] += part[size_t(j)];
          }
          for (int64_t j = 0; j < h; ++j) db[j] = float(acc[size_t(j)]);
        }
      },
      [&](int64_t e) {  // an expert with no rows has zero gradients
        if (rows[size_t(e)] > 0) return;
        if (pdw) std::fill(pdw + e * d * h, pdw + (e + 1) * d * h, 0.f);
        if (pdb) std::fill(pdb + e * h, pdb + (e + 1) * h, 0.f);
      });
  for (int64_t i = 0; i < T; ++i) {
    const int64_t e = side_of[size_t(i)];
    if (e < 0) continue;
    const float* sw = side.data() + i * S;
    if (pdw)
      for (int64_t j = 0; j < d * h; ++j) pdw[e * d * h + j] += sw[j];
    if (pdb)
      for (int64_t j = 0; j < h; ++j) pdb[e * h + j] += sw[d * h + j];
  }
}

}  // namespace

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
      [&](int64_t, int64_t e, int64_t r0, int64_t r1) {
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
                  Tensor dx, dw, db;
                  if (gx) {
                    dx = Tensor::empty({E, M, d});
                    float* pdx = dx.data<float>();
                    const Tensor wt = transposed_weights(w);
                    const float* pwt = wt.data<float>();
                    for_expert_rows(
                        rows, 2 * d * h,
                        [&](int64_t, int64_t e, int64_t r0, int64_t r1) {
                          detail::gemm_on_thread(r1 - r0, d, h, pg + (e * M + r0) * h, h, false, pwt + e * h * d, d,
                                                 false, pdx + (e * M + r0) * d, d, false);
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

}  // namespace mv::ops
