// expert_matmul, one batched product over all experts' packed buffers (CUDA twin:
// cuda/experts.cu). On the CPU only the rows in use are multiplied (ops/moe.h explains the packed buffers); all experts' pieces are spread over
// the threads in one fork-join (ops/moe_cpu.h). The fused expert MLP is in ops/expert_mlp.cpp.
// Its products are always FP32 (no model uses it in training; ops::set_matmul_bf16).
#include <algorithm>
#include <cstring>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/dispatch.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/moe_cpu.h"
#include "ops/shape.h"

namespace mv::cpu {

using ops::detail::gemm_on_thread;

Tensor transposed_weights(const Tensor& w) { return ops::transpose(w, 1, 2).contiguous(); }

std::vector<int64_t> expert_rows(const char* op, const Tensor& rows_, int64_t E, int64_t M, const Tensor& x) {
  std::vector<int64_t> rows(size_t(E), M);
  if (!rows_.defined()) return rows;
  rows = rows_.to_vector<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    MV_CHECK(rows[size_t(e)] >= 0 && rows[size_t(e)] <= M, op, ": rows[", e, "] = ", rows[size_t(e)],
             " is outside [0, ", M, "] for x ", x.str());
  return rows;
}

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
        if (pdw) gemm_on_thread(d, h, n, x, d, true, g, h, false, dw, h, false, false);
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

// x: (E, M, d), w: (E, d, h), b: (E, h) or undefined, rows: (E,) I64 or undefined
//   -> out[e, :n_e] = x[e, :n_e] w[e] + b[e], n_e = rows[e];  out[e, n_e:] = 0
Tensor expert_matmul_forward(const Tensor& x_, const Tensor& w_, const Tensor& b_, const Tensor& rows_) {
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2), h = w_.size(2);
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
        gemm_on_thread(r1 - r0, h, d, px + (e * M + r0) * d, d, false, pw + e * d * h, h, false, o, h, pb != nullptr,
                       false);
      },
      [&](int64_t e) { std::fill(po + (e * M + rows[size_t(e)]) * h, po + (e + 1) * M * h, 0.f); });
  return out;
}

// dy: (E, M, h) -> dx[e, :n_e] = dy[e, :n_e] w[e]^T (0 past n_e);  dw[e] = x[e, :n_e]^T dy[e, :n_e];
//   db[e] = sum over the first n_e rows of dy[e]; each only when asked for
ops::LinearGrads expert_matmul_backward(const Tensor& dy, const Tensor& x_, const Tensor& w, const Tensor& rows_,
                                        bool need_x, bool need_w, bool need_b) {
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2), h = w.size(2);
  const std::vector<int64_t> rows = expert_rows("expert_matmul", rows_, E, M, x_);
  const Tensor g = dy.contiguous(), x = x_.contiguous();
  const float* pg = g.data<float>();
  const float* px = x.data<float>();
  ops::LinearGrads o;
  if (need_x) {
    o.dx = Tensor::empty({E, M, d});
    float* pdx = o.dx.data<float>();
    const Tensor wt = transposed_weights(w);
    const float* pwt = wt.data<float>();
    for_expert_rows(
        rows, 2 * d * h,
        [&](int64_t, int64_t e, int64_t r0, int64_t r1) {
          gemm_on_thread(r1 - r0, d, h, pg + (e * M + r0) * h, h, false, pwt + e * h * d, d, false,
                         pdx + (e * M + r0) * d, d, false, false);
        },
        [&](int64_t e) { std::fill(pdx + (e * M + rows[size_t(e)]) * d, pdx + (e + 1) * M * d, 0.f); });
  }
  if (need_w) o.dw = Tensor::empty({E, d, h});
  if (need_b) o.db = Tensor::empty({E, h});
  if (need_w || need_b)
    expert_weight_grads(px, pg, rows, M, d, h, need_w ? o.dw.data<float>() : nullptr,
                        need_b ? o.db.data<float>() : nullptr);
  return o;
}

}  // namespace mv::cpu

namespace mv::ops {

Tensor expert_matmul(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rows) {
  const OpDevice dev = device_of("expert_matmul", {&x, &w, &b, &rows});
  expect_f32("expert_matmul", {&x, &w});
  if (b.defined()) expect_f32("expert_matmul", {&b});
  MV_CHECK(x.ndim() == 3 && w.ndim() == 3, "expert_matmul: expected x (E, M, d) and w (E, d, h), got x ",
           x.str(), " and w ", w.str());
  const int64_t E = x.size(0), d = x.size(2), h = w.size(2);
  MV_CHECK(w.size(0) == E && w.size(1) == d, "expert_matmul: w ", w.str(), " must be (", E, ", ", d,
           ", h) for x ", x.str());
  MV_CHECK(!b.defined() || b.shape() == Shape({E, h}), "expert_matmul: bias ", b.str(), " must be (",
           E, ", ", h, ") for w ", w.str());
  MV_CHECK(!rows.defined() || (is_i64(rows, 1) && rows.size(0) == E), "expert_matmul: rows ", rows.str(),
           " must be I64 (", E, ") for x ", x.str());
  Tensor out = MV_KERNEL(expert_matmul_forward)(dev, x, w, b, rows);
  const bool gx = x.requires_grad(), gw = w.requires_grad(), gb = b.defined() && b.requires_grad();
  return autograd::record("expert_matmul", out, {x, w, b},
                          [dev, xd = x.detach(), wd = w.detach(), rows, gx, gw, gb](const Tensor& g) {
                            LinearGrads d = MV_KERNEL(expert_matmul_backward)(dev, g, xd, wd, rows, gx, gw, gb);
                            return std::vector<Tensor>{d.dx, d.dw, d.db};
                          });
}

}  // namespace mv::ops
