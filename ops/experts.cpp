// The experts on the CPU: expert_matmul (one batched product over all experts' packed buffers)
// and expert_mlp (both expert layers and the GELU between them, fused). Only the rows in use
// are multiplied (ops/moe.h explains the packed buffers); all experts' pieces are spread over the
// threads in one fork-join.
#include <algorithm>
#include <cstring>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/shape.h"

namespace mv::ops {

using autograd::record;

namespace {

// The rows in use of all experts laid end to end, cut into num_threads() equal shares: share i
// runs f(i, e, r0, r1) for every piece [r0, r1) of expert e's rows inside it, and tail(e) for
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
        if (r0 < r1) f(i, x, r0, r1);
      }
    }
  });
}

// w (E, d, h) -> (E, h, d), contiguous: the right operand of dx = g w^T, read by rows. Copied once
// per backward rather than once per block of rows.
Tensor transposed_weights(const Tensor& w) { return transpose(w, 1, 2).contiguous(); }

// Rows in use per expert from an optional rows tensor (every row when undefined), checked.
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
      [&](int64_t, int64_t e, int64_t r0, int64_t r1) {
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
        const float* ph = hid.data<float>();
        const float* pdg = dgelu.data<float>();
        Tensor dx, dw1, db1, dw2, db2, da;
        if (gx || gw1 || gb1) {
          da = Tensor::empty({E, M, H});  // rows past rows[e] never written nor read
          if (gx) dx = Tensor::empty({E, M, d});
          float* pda = da.data<float>();
          float* pdx = gx ? dx.data<float>() : nullptr;
          const Tensor w2t = transposed_weights(w2), w1t = gx ? transposed_weights(w1) : Tensor();
          const float* pw2t = w2t.data<float>();
          const float* pw1t = gx ? w1t.data<float>() : nullptr;
          for_expert_rows(
              rows, 2 * H * (O + (gx ? d : 0)) + H,
              [&](int64_t, int64_t e, int64_t r0, int64_t r1) {
                for (int64_t m0 = r0; m0 < r1; m0 += kMlpBlock) {
                  const int64_t n = std::min(kMlpBlock, r1 - m0), i0 = e * M + m0;
                  float* a = pda + i0 * H;
                  detail::gemm_on_thread(n, H, O, pg + i0 * O, O, false, pw2t + e * O * H, H, false, a, H, false);
                  const float* dg = pdg + i0 * H;
                  for (int64_t i = 0; i < n * H; ++i) a[i] *= dg[i];
                  if (pdx)
                    detail::gemm_on_thread(n, d, H, a, H, false, pw1t + e * H * d, d, false, pdx + i0 * d, d, false);
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


}  // namespace mv::ops
