// The expert MLP, fused, on the CPU: expert_mlp (both expert layers and the GELU between them, on
// packed expert buffers) and moe_mlp (the same with dispatch and combine folded in). One driver
// runs both: the rows in use of all experts, cut over the threads as ops/expert_rows.h cuts them,
// go through in blocks of kMlpBlock rows of one expert, and every product of a block runs while
// the block is in cache.
//
// Forward, per block:   a = x w1 + b1;  hid = GELU(a), dgelu = gelu'(a) (one tanh for both);
//                       out = hid w2 + b2
// Backward, per block:  da = (dy w2^T) * dgelu;  dx = da w1^T;
//                       dw2 += hid^T dy, db2 += sum dy;  dw1 += x^T da, db1 += sum da
// Saved for backward: hid and dgelu (the rows in use only). The weight gradients are summed block
// by block while dy and da are at hand, so neither is written out as an (E, M, .) tensor. The
// piece of rows that starts expert e's rows writes e's gradients; a piece that goes on with an
// expert begun in an earlier share (at most one per share, ops/expert_rows.h) writes that share's
// side buffer, added in after the join.
//
// The two ops differ only in where a block's rows come from and go to. expert_mlp reads x and dy
// from its (E, M, .) buffers. moe_mlp gathers x's rows from the tokens (dispatch) and dy's from
// g_out, each scaled by its combine weight (combine's backward), into per-thread scratch, so the
// (E, R, d) dispatch buffer and its gradient are never written.
//
// 256 rows: the hidden block (128 KB at h = 128) stays in L2; 64, 128 and whole pieces measured
// within noise of it (bench_moe_layer, 2 threads).
#include <algorithm>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"
#include "ops/expert_rows.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"
#include "ops/moe.h"

namespace mv::ops {

using autograd::record;
using detail::for_expert_rows;
using detail::gemm_on_thread;

namespace {

constexpr int64_t kMlpBlock = 256;

// The MLP's weights and sizes: w1 (E, d, H), b1 (E, H) or null, w2 (E, H, O), b2 (E, O) or null;
// buffers of M rows per expert. w1t (E, H, d) and w2t (E, O, H), the transposes, for backward.
struct Mlp {
  const float *w1, *b1, *w2, *b2;
  const float *w1t = nullptr, *w2t = nullptr;
  int64_t M, d, H, O;
};

// Checks the weights against E experts of width d and returns (H, O).
std::pair<int64_t, int64_t> check_weights(const char* op, int64_t E, int64_t d, const Tensor& x, const Tensor& w1,
                                          const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  expect_cpu_f32(op, {&w1, &w2});
  if (b1.defined()) expect_cpu_f32(op, {&b1});
  if (b2.defined()) expect_cpu_f32(op, {&b2});
  MV_CHECK(w1.ndim() == 3 && w2.ndim() == 3, op, ": expected w1 (E, d, h) and w2 (E, h, o), got w1 ", w1.str(),
           " and w2 ", w2.str());
  const int64_t H = w1.size(2), O = w2.size(2);
  MV_CHECK(w1.size(0) == E && w1.size(1) == d, op, ": w1 ", w1.str(), " must be (", E, ", ", d, ", h) for x ",
           x.str());
  MV_CHECK(w2.size(0) == E && w2.size(1) == H, op, ": w2 ", w2.str(), " must be (", E, ", ", H, ", o) for w1 ",
           w1.str());
  MV_CHECK(!b1.defined() || b1.shape() == Shape({E, H}), op, ": b1 ", b1.str(), " must be (", E, ", ", H,
           ") for w1 ", w1.str());
  MV_CHECK(!b2.defined() || b2.shape() == Shape({E, O}), op, ": b2 ", b2.str(), " must be (", E, ", ", O,
           ") for w2 ", w2.str());
  return {H, O};
}

// One block of n rows of expert e: x (n, d) -> hid, dgelu (n, H; dgelu may be null), out (n, O).
void block_forward(const Mlp& m, int64_t e, int64_t n, const float* x, float* hid, float* dgelu, float* out) {
  const int64_t d = m.d, H = m.H, O = m.O;
  // The biases are added in the passes that follow each product (no per-row copies).
  gemm_on_thread(n, H, d, x, d, false, m.w1 + e * d * H, H, false, hid, H, false);
  for (int64_t r = 0; r < n; ++r) {
    float* a = hid + r * H;
    const float* b = m.b1 ? m.b1 + e * H : nullptr;
    if (dgelu) {
      float* dg = dgelu + r * H;
      for (int64_t j = 0; j < H; ++j) gelu_tanh_both(a[j] + (b ? b[j] : 0.f), a[j], dg[j]);
    } else {
      for (int64_t j = 0; j < H; ++j) a[j] = gelu_tanh(a[j] + (b ? b[j] : 0.f));
    }
  }
  gemm_on_thread(n, O, H, hid, H, false, m.w2 + e * H * O, O, false, out, O, false);
  if (m.b2)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < O; ++j) out[r * O + j] += m.b2[e * O + j];
}

// Where one piece of rows writes its weight gradients (any may be null).
struct Grads {
  float *dw1, *db1, *dw2, *db2;
};

// One block's backward (see the top of the file). x (n, d), hid and dgelu (n, H), dy (n, O) ->
// da (n, H, scratch), dx (n, d) when not null; dw1 and dw2 overwritten (acc false) or added to;
// the column sums of da and dy added to sb1 (H) and sb2 (O), in double.
void block_backward(const Mlp& m, int64_t e, int64_t n, const float* x, const float* hid, const float* dgelu,
                    const float* dy, float* da, float* dx, const Grads& g, bool acc, double* sb1, double* sb2) {
  const int64_t d = m.d, H = m.H, O = m.O;
  gemm_on_thread(n, H, O, dy, O, false, m.w2t + e * O * H, H, false, da, H, false);
  for (int64_t i = 0; i < n * H; ++i) da[i] *= dgelu[i];
  if (dx) gemm_on_thread(n, d, H, da, H, false, m.w1t + e * H * d, d, false, dx, d, false);
  if (g.dw2) gemm_on_thread(H, O, n, hid, H, true, dy, O, false, g.dw2, O, acc);
  if (g.dw1) gemm_on_thread(d, H, n, x, d, true, da, H, false, g.dw1, H, acc);
  for (int64_t r = 0; r < n; ++r) {
    if (g.db2)
      for (int64_t j = 0; j < O; ++j) sb2[j] += dy[r * O + j];
    if (g.db1)
      for (int64_t j = 0; j < H; ++j) sb1[j] += da[r * H + j];
  }
}

// Forward over all experts' rows in use. x_rows(e, i0, n, scratch) returns block rows i0 .. i0+n
// of the input (flat rows of (E, M, d)): a pointer into the caller's buffer, or the rows gathered
// into scratch (kMlpBlock x d). hid, dgelu (may be null) and out are (E, M, .): rows past rows[e]
// are left unwritten, or zeroed in out when `pad`.
template <class XRows>
void mlp_forward(const Mlp& m, const std::vector<int64_t>& rows, XRows x_rows, float* hid, float* dgelu, float* out,
                 bool pad) {
  const int64_t M = m.M, d = m.d, H = m.H, O = m.O;
  // Scratch is written before it is read: left uninitialised (a zero-filled vector would cost a
  // pass over it per call).
  const auto scratch = std::make_unique_for_overwrite<float[]>(size_t(num_threads() * kMlpBlock * d));
  for_expert_rows(
      rows, 2 * H * (d + O) + 24 * H,
      [&](int64_t i, int64_t e, int64_t r0, int64_t r1) {
        for (int64_t m0 = r0; m0 < r1; m0 += kMlpBlock) {
          const int64_t n = std::min(kMlpBlock, r1 - m0), i0 = e * M + m0;
          const float* x = x_rows(e, i0, n, scratch.get() + i * kMlpBlock * d);
          block_forward(m, e, n, x, hid + i0 * H, dgelu ? dgelu + i0 * H : nullptr, out + i0 * O);
        }
      },
      [&](int64_t e) {
        if (pad) std::fill(out + (e * M + rows[size_t(e)]) * O, out + (e + 1) * M * O, 0.f);
      });
}

// Backward over all experts' rows in use. rows_of(e, i0, n, xs, dys, x, dy) points x and dy at
// block rows i0 .. i0+n of the input (n, d) and the output gradient (n, O): into the caller's
// buffers, or gathered into the scratch xs and dys. Writes dx (E, M, d; rows past rows[e] zeroed
// when `pad`, else unwritten) and the weight gradients `out` (all experts; any may be null).
template <class Rows>
void mlp_backward(const Mlp& m, const std::vector<int64_t>& rows, Rows rows_of, const float* hid, const float* dgelu,
                  float* dx, const Grads& out, bool pad) {
  const int64_t M = m.M, d = m.d, H = m.H, O = m.O, T = num_threads();
  const int64_t S = d * H + H + H * O + O;  // a side buffer: dw1, db1, dw2, db2
  const int64_t X = kMlpBlock * (d + O + H);  // a share's scratch: x rows, dy rows, da
  // Side buffers and scratch are written before they are read (a side buffer's first block
  // overwrites it): left uninitialised.
  const auto side = std::make_unique_for_overwrite<float[]>(size_t(T * S));
  const auto scratch = std::make_unique_for_overwrite<float[]>(size_t(T * X));
  std::vector<double> sums(size_t(T * (H + O)));
  std::vector<int64_t> side_of(size_t(T), -1);  // the expert whose piece each share's buffer holds
  auto at = [](float* p, int64_t off) { return p ? p + off : nullptr; };
  auto own = [&](int64_t e) {  // expert e's slices of the outputs
    return Grads{at(out.dw1, e * d * H), at(out.db1, e * H), at(out.dw2, e * H * O), at(out.db2, e * O)};
  };
  auto side_grads = [&](int64_t i) {  // share i's side buffer, laid out as the outputs it stands for
    float* sb = side.get() + i * S;
    return Grads{out.dw1 ? sb : nullptr, out.db1 ? sb + d * H : nullptr, out.dw2 ? sb + d * H + H : nullptr,
                 out.db2 ? sb + d * H + H + H * O : nullptr};
  };
  for_expert_rows(
      rows, 2 * H * (2 * O + 2 * d) + 2 * H,
      [&](int64_t i, int64_t e, int64_t r0, int64_t r1) {
        if (r0 > 0) side_of[size_t(i)] = e;
        const Grads g = r0 > 0 ? side_grads(i) : own(e);
        float* xs = scratch.get() + i * X;
        float* dys = xs + kMlpBlock * d;
        float* da = dys + kMlpBlock * O;
        double* sb1 = sums.data() + i * (H + O);
        double* sb2 = sb1 + H;
        std::fill(sb1, sb1 + H + O, 0.0);
        for (int64_t m0 = r0; m0 < r1; m0 += kMlpBlock) {
          const int64_t n = std::min(kMlpBlock, r1 - m0), i0 = e * M + m0;
          const float *x, *dy;
          rows_of(e, i0, n, xs, dys, x, dy);
          block_backward(m, e, n, x, hid + i0 * H, dgelu + i0 * H, dy, da, at(dx, i0 * d), g, m0 > r0, sb1, sb2);
        }
        for (int64_t j = 0; j < H; ++j)
          if (g.db1) g.db1[j] = float(sb1[j]);
        for (int64_t j = 0; j < O; ++j)
          if (g.db2) g.db2[j] = float(sb2[j]);
      },
      [&](int64_t e) {
        if (pad && dx) std::fill(dx + (e * M + rows[size_t(e)]) * d, dx + (e + 1) * M * d, 0.f);
        if (rows[size_t(e)] > 0) return;  // an expert with no rows has zero gradients
        const Grads g = own(e);
        for (auto [p, n] : {std::pair{g.dw1, d * H}, {g.db1, H}, {g.dw2, H * O}, {g.db2, O}})
          if (p) std::fill(p, p + n, 0.f);
      });
  for (int64_t i = 0; i < T; ++i) {
    const int64_t e = side_of[size_t(i)];
    if (e < 0) continue;
    const Grads dst = own(e), src = side_grads(i);
    for (auto [p, q, n] : {std::tuple{dst.dw1, src.dw1, d * H}, {dst.db1, src.db1, H}, {dst.dw2, src.dw2, H * O},
                           {dst.db2, src.db2, O}})
      if (p)
        for (int64_t j = 0; j < n; ++j) p[j] += q[j];
  }
}

// The graph's gradient tensors for the weights that need one.
struct WeightGradTensors {
  Tensor dw1, db1, dw2, db2;
  WeightGradTensors(bool g1, bool gb1, bool g2, bool gb2, int64_t E, int64_t d, int64_t H, int64_t O)
      : dw1(g1 ? Tensor::empty({E, d, H}) : Tensor()), db1(gb1 ? Tensor::empty({E, H}) : Tensor()),
        dw2(g2 ? Tensor::empty({E, H, O}) : Tensor()), db2(gb2 ? Tensor::empty({E, O}) : Tensor()) {}
  Grads pointers() {
    auto p = [](Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
    return Grads{p(dw1), p(db1), p(dw2), p(db2)};
  }
};

const float* data_or_null(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

}  // namespace

// expert_mlp: the driver on (E, M, .) buffers, reading x and dy in place.
Tensor expert_mlp(const Tensor& x_, const Tensor& w1_, const Tensor& b1_, const Tensor& w2_, const Tensor& b2_,
                  const Tensor& rows_) {
  expect_cpu_f32("expert_mlp", {&x_});
  MV_CHECK(x_.ndim() == 3, "expert_mlp: expected x (E, M, d), got x ", x_.str());
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2);
  const auto [H, O] = check_weights("expert_mlp", E, d, x_, w1_, b1_, w2_, b2_);
  const std::vector<int64_t> rows = detail::expert_rows("expert_mlp", rows_, E, M, x_);
  const Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const Tensor b1 = b1_.defined() ? b1_.contiguous() : Tensor(), b2 = b2_.defined() ? b2_.contiguous() : Tensor();
  const Mlp m{w1.data<float>(), data_or_null(b1), w2.data<float>(), data_or_null(b2), nullptr, nullptr, M, d, H, O};
  const bool graph = autograd::needs_graph({x_, w1_, b1_, w2_, b2_});
  // Rows past rows[e] of hid and dgelu are never written nor read.
  Tensor hid = Tensor::empty({E, M, H}), dgelu = graph ? Tensor::empty({E, M, H}) : Tensor();
  Tensor out = Tensor::empty({E, M, O});
  const float* px = x.data<float>();
  mlp_forward(
      m, rows, [px, d](int64_t, int64_t i0, int64_t, float*) { return px + i0 * d; }, hid.data<float>(),
      graph ? dgelu.data<float>() : nullptr, out.data<float>(), true);
  if (!graph) return out;
  const bool gx = x_.requires_grad();
  const bool g1 = w1_.requires_grad(), gb1 = b1_.defined() && b1_.requires_grad();
  const bool g2 = w2_.requires_grad(), gb2 = b2_.defined() && b2_.requires_grad();
  return record("expert_mlp", out, {x_, w1_, b1_, w2_, b2_},
                [x = x.detach(), w1 = w1.detach(), w2 = w2.detach(), hid, dgelu, rows, m, gx, g1, gb1, g2, gb2, E](
                    const Tensor& g_) {
                  const Tensor g = g_.contiguous(), w1t = detail::transposed_weights(w1),
                               w2t = detail::transposed_weights(w2);
                  Mlp mb = m;
                  mb.w1t = w1t.data<float>(), mb.w2t = w2t.data<float>();
                  const float* px = x.data<float>();
                  const float* pg = g.data<float>();
                  const int64_t d = m.d, O = m.O;
                  Tensor dx = gx ? Tensor::empty({E, m.M, d}) : Tensor();
                  WeightGradTensors wg(g1, gb1, g2, gb2, E, d, m.H, O);
                  mlp_backward(
                      mb, rows,
                      [px, pg, d, O](int64_t, int64_t i0, int64_t, float*, float*, const float*& xr, const float*& dy) {
                        xr = px + i0 * d, dy = pg + i0 * O;
                      },
                      hid.data<float>(), dgelu.data<float>(), gx ? dx.data<float>() : nullptr, wg.pointers(), true);
                  return std::vector<Tensor>{dx, wg.dw1, wg.db1, wg.dw2, wg.db2};
                });
}

// moe_mlp: the driver with dispatch and combine folded in. Forward: each block's x rows gathered
// from the tokens; the expert outputs y (E, R, O) are kept, and combine sums each token's rows of
// them. Backward: each block's dy = weight * g_out[token] gathered the same way, the weight's
// gradient g_out[token] . y taken alongside (combine's backward); the tokens' gradient is the sum
// of their rows of dx (dispatch's backward).
Tensor moe_mlp(const Tensor& x_, const Assignment& a, const Tensor& w1_, const Tensor& b1_, const Tensor& w2_,
               const Tensor& b2_) {
  expect_cpu_f32("moe_mlp", {&x_});
  MV_CHECK(x_.ndim() == 3, "moe_mlp: x must be (G, N, d), got ", x_.str());
  detail::check_assignment("moe_mlp", a, true);
  const int64_t G = x_.size(0), N = x_.size(1), d = x_.size(2), E = a.token.size(0), R = a.token.size(1);
  MV_CHECK(G == a.G && N == a.N, "moe_mlp: x ", x_.str(), " does not match the assignment's (G, N) = (", a.G, ", ",
           a.N, ")");
  const auto [H, O] = check_weights("moe_mlp", E, d, x_, w1_, b1_, w2_, b2_);
  const std::vector<int64_t> rows = a.rows.to_vector<int64_t>();
  const Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const Tensor b1 = b1_.defined() ? b1_.contiguous() : Tensor(), b2 = b2_.defined() ? b2_.contiguous() : Tensor();
  const Tensor token = a.token.contiguous(), weight = a.weight.contiguous(), token_rows = a.token_rows.contiguous();
  const Mlp m{w1.data<float>(), data_or_null(b1), w2.data<float>(), data_or_null(b2), nullptr, nullptr, R, d, H, O};
  const bool graph = autograd::needs_graph({x_, a.weight, w1_, b1_, w2_, b2_});
  Tensor hid = Tensor::empty({E, R, H}), dgelu = graph ? Tensor::empty({E, R, H}) : Tensor();
  Tensor y = Tensor::empty({E, R, O});  // rows past rows[e] never written nor read
  const float* px = x.data<float>();
  const int64_t* pt = token.data<int64_t>();
  mlp_forward(
      m, rows,
      [px, pt, d](int64_t, int64_t i0, int64_t n, float* xs) {
        for (int64_t r = 0; r < n; ++r) std::memcpy(xs + r * d, px + pt[i0 + r] * d, size_t(d) * sizeof(float));
        return static_cast<const float*>(xs);
      },
      hid.data<float>(), graph ? dgelu.data<float>() : nullptr, y.data<float>(), false);
  Tensor out = Tensor::empty({G, N, O});
  detail::sum_token_rows(token_rows, y.data<float>(), weight.data<float>(), O, out.data<float>());
  if (!graph) return out;
  const bool gx = x_.requires_grad(), gw = a.weight.requires_grad();
  const bool g1 = w1_.requires_grad(), gb1 = b1_.defined() && b1_.requires_grad();
  const bool g2 = w2_.requires_grad(), gb2 = b2_.defined() && b2_.requires_grad();
  return record(
      "moe_mlp", out, {x_, a.weight, w1_, b1_, w2_, b2_},
      [x = x.detach(), w1 = w1.detach(), w2 = w2.detach(), token, weight = weight.detach(), token_rows, hid, dgelu, y,
       rows, m, gx, gw, g1, gb1, g2, gb2, G, N, E, R](const Tensor& g_) {
        const Tensor g = g_.contiguous(), w1t = detail::transposed_weights(w1), w2t = detail::transposed_weights(w2);
        Mlp mb = m;
        mb.w1t = w1t.data<float>(), mb.w2t = w2t.data<float>();
        const float* px = x.data<float>();
        const float* pg = g.data<float>();
        const float* py = y.data<float>();
        const float* pw = weight.data<float>();
        const int64_t* pt = token.data<int64_t>();
        const int64_t d = m.d, O = m.O;
        Tensor dweight = gw ? Tensor::zeros({E, R}) : Tensor();
        float* pdw = gw ? dweight.data<float>() : nullptr;
        Tensor dxr = gx ? Tensor::empty({E, R, d}) : Tensor();  // rows past rows[e] never written nor read
        WeightGradTensors wg(g1, gb1, g2, gb2, E, d, m.H, O);
        mlp_backward(
            mb, rows,
            [=](int64_t, int64_t i0, int64_t n, float* xs, float* dys, const float*& xr, const float*& dy) {
              for (int64_t r = 0; r < n; ++r) {
                const int64_t i = i0 + r;
                const float* gr = pg + pt[i] * O;
                std::memcpy(xs + r * d, px + pt[i] * d, size_t(d) * sizeof(float));
                for (int64_t j = 0; j < O; ++j) dys[r * O + j] = pw[i] * gr[j];
                if (pdw) pdw[i] = lane_sum(O, [&](int64_t j) { return gr[j] * py[i * O + j]; });
              }
              xr = xs, dy = dys;
            },
            hid.data<float>(), dgelu.data<float>(), gx ? dxr.data<float>() : nullptr, wg.pointers(), false);
        Tensor dx;
        if (gx) {
          dx = Tensor::empty({G, N, d});
          detail::sum_token_rows(token_rows, dxr.data<float>(), nullptr, d, dx.data<float>());
        }
        return std::vector<Tensor>{dx, dweight, wg.dw1, wg.db1, wg.dw2, wg.db2};
      });
}

}  // namespace mv::ops
