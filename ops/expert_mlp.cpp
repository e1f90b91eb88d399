// The expert MLP, fused: expert_mlp (both expert layers and the GELU between them, on packed
// expert buffers) and moe_mlp (the same with dispatch and combine folded in); the CUDA twins are
// in cuda/expert_mlp.cu. On the CPU one driver runs both: the rows in use of all experts, cut over the threads as ops/moe_cpu.h cuts them,
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
// expert begun in an earlier share (at most one per share, ops/moe_cpu.h) writes that share's
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
#include "ops/dispatch.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/moe_cpu.h"

namespace mv::cpu {

using ops::Assignment;
using ops::ExpertMlpGrads;
using ops::ExpertMlpNeeds;
using ops::ExpertMlpOut;
using ops::ExpertWeights;
using ops::gelu_tanh;
using ops::gelu_tanh_both;
using ops::lane_sum;
using ops::detail::gemm_on_thread;

namespace {

constexpr int64_t kMlpBlock = 256;

// The MLP's weights and sizes: w1 (E, d, H), b1 (E, H) or null, w2 (E, H, O), b2 (E, O) or null;
// buffers of M rows per expert. w1t (E, H, d) and w2t (E, O, H), the transposes, for backward.
struct Mlp {
  const float *w1, *b1, *w2, *b2;
  const float *w1t = nullptr, *w2t = nullptr;
  int64_t M, d, H, O;
  bool bf16;
};

// One block of n rows of expert e: x (n, d) -> hid, dgelu (n, H; dgelu may be null), out (n, O).
void block_forward(const Mlp& m, int64_t e, int64_t n, const float* x, float* hid, float* dgelu, float* out) {
  const int64_t d = m.d, H = m.H, O = m.O;
  // The biases are added in the passes that follow each product (no per-row copies).
  gemm_on_thread(n, H, d, x, d, false, m.w1 + e * d * H, H, false, hid, H, false, m.bf16);
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
  gemm_on_thread(n, O, H, hid, H, false, m.w2 + e * H * O, O, false, out, O, false, m.bf16);
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
  gemm_on_thread(n, H, O, dy, O, false, m.w2t + e * O * H, H, false, da, H, false, m.bf16);
  for (int64_t i = 0; i < n * H; ++i) da[i] *= dgelu[i];
  if (dx) gemm_on_thread(n, d, H, da, H, false, m.w1t + e * H * d, d, false, dx, d, false, m.bf16);
  if (g.dw2) gemm_on_thread(H, O, n, hid, H, true, dy, O, false, g.dw2, O, acc, m.bf16);
  if (g.dw1) gemm_on_thread(d, H, n, x, d, true, da, H, false, g.dw1, H, acc, m.bf16);
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

// The gradient tensors for the weights that need one.
struct WeightGradTensors {
  Tensor dw1, db1, dw2, db2;
  WeightGradTensors(const ExpertMlpNeeds& need, int64_t E, int64_t d, int64_t H, int64_t O)
      : dw1(need.w1 ? Tensor::empty({E, d, H}) : Tensor()), db1(need.b1 ? Tensor::empty({E, H}) : Tensor()),
        dw2(need.w2 ? Tensor::empty({E, H, O}) : Tensor()), db2(need.b2 ? Tensor::empty({E, O}) : Tensor()) {}
  Grads pointers() {
    auto p = [](Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
    return Grads{p(dw1), p(db1), p(dw2), p(db2)};
  }
};

const float* data_or_null(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

// The weights' pointers and sizes for buffers of M rows per expert; with the transposes for the
// backward.
Mlp mlp_of(const ExpertWeights& w, int64_t M, bool backward, Tensor* w1t, Tensor* w2t) {
  Mlp m{w.w1.data<float>(), data_or_null(w.b1), w.w2.data<float>(), data_or_null(w.b2), nullptr, nullptr,
        M, w.w1.size(1), w.w1.size(2), w.w2.size(2), w.bf16};
  if (backward) {
    *w1t = transposed_weights(w.w1), *w2t = transposed_weights(w.w2);
    m.w1t = w1t->data<float>(), m.w2t = w2t->data<float>();
  }
  return m;
}

}  // namespace

// x: (E, M, d), weights (ops/moe.h), rows: (E,) I64 or undefined -> out (E, M, O) and, with
// for_backward, hid and dgelu. Reads x in place.
ExpertMlpOut expert_mlp_forward(const Tensor& x_, const ExpertWeights& w, const Tensor& rows_, bool for_backward) {
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2);
  const std::vector<int64_t> rows = expert_rows("expert_mlp", rows_, E, M, x_);
  const Tensor x = x_.contiguous();
  const Mlp m = mlp_of(w, M, false, nullptr, nullptr);
  // Rows past rows[e] of hid and dgelu are never written nor read.
  ExpertMlpOut o{Tensor::empty({E, M, m.O}), Tensor::empty({E, M, m.H}),
                 for_backward ? Tensor::empty({E, M, m.H}) : Tensor(), Tensor()};
  const float* px = x.data<float>();
  mlp_forward(
      m, rows, [px, d](int64_t, int64_t i0, int64_t, float*) { return px + i0 * d; }, o.hid.data<float>(),
      for_backward ? o.dgelu.data<float>() : nullptr, o.out.data<float>(), true);
  return o;
}

// dy: (E, M, O), x and weights as in the forward, saved: its hid and dgelu -> the gradients
// asked for; x and dy are read in place.
ExpertMlpGrads expert_mlp_backward(const Tensor& dy, const Tensor& x_, const ExpertWeights& w, const Tensor& rows_,
                                   const ExpertMlpOut& saved, const ExpertMlpNeeds& need) {
  const int64_t E = x_.size(0), M = x_.size(1), d = x_.size(2);
  const std::vector<int64_t> rows = expert_rows("expert_mlp", rows_, E, M, x_);
  const Tensor g = dy.contiguous(), x = x_.contiguous();
  Tensor w1t, w2t;
  const Mlp m = mlp_of(w, M, true, &w1t, &w2t);
  const float* px = x.data<float>();
  const float* pg = g.data<float>();
  const int64_t O = m.O;
  ExpertMlpGrads o;
  if (need.x) o.dx = Tensor::empty({E, M, d});
  WeightGradTensors wg(need, E, d, m.H, O);
  mlp_backward(
      m, rows,
      [px, pg, d, O](int64_t, int64_t i0, int64_t, float*, float*, const float*& xr, const float*& dyr) {
        xr = px + i0 * d, dyr = pg + i0 * O;
      },
      saved.hid.data<float>(), saved.dgelu.data<float>(), need.x ? o.dx.data<float>() : nullptr, wg.pointers(), true);
  o.dw1 = wg.dw1, o.db1 = wg.db1, o.dw2 = wg.dw2, o.db2 = wg.db2;
  return o;
}

// x: (G, N, d), a, weights -> out (G, N, O); keeps y (E, R, O), the expert outputs combine sums,
// and with for_backward hid and dgelu. Each block's x rows are gathered from the tokens.
ExpertMlpOut moe_mlp_forward(const Tensor& x_, const Assignment& a, const ExpertWeights& w, bool for_backward) {
  check_assignment_values("moe_mlp", a);
  const int64_t G = x_.size(0), N = x_.size(1), d = x_.size(2), E = a.token.size(0), R = a.token.size(1);
  const std::vector<int64_t> rows = a.rows.to_vector<int64_t>();
  const Tensor x = x_.contiguous();
  const Tensor token = a.token.contiguous(), weight = a.weight.contiguous();
  const Mlp m = mlp_of(w, R, false, nullptr, nullptr);
  ExpertMlpOut o{Tensor::empty({G, N, m.O}), Tensor::empty({E, R, m.H}),
                 for_backward ? Tensor::empty({E, R, m.H}) : Tensor(),
                 Tensor::empty({E, R, m.O})};  // rows past rows[e] never written nor read
  const float* px = x.data<float>();
  const int64_t* pt = token.data<int64_t>();
  mlp_forward(
      m, rows,
      [px, pt, d](int64_t, int64_t i0, int64_t n, float* xs) {
        for (int64_t r = 0; r < n; ++r) std::memcpy(xs + r * d, px + pt[i0 + r] * d, size_t(d) * sizeof(float));
        return static_cast<const float*>(xs);
      },
      o.hid.data<float>(), for_backward ? o.dgelu.data<float>() : nullptr, o.y.data<float>(), false);
  sum_token_rows(a.token_rows.contiguous(), o.y.data<float>(), weight.data<float>(), m.O, o.out.data<float>());
  return o;
}

// dout: (G, N, O) -> the gradients asked for. Each block's dy = weight * dout[token] is gathered
// the same way, the weight's gradient dout[token] . y taken alongside (combine's backward); the
// tokens' gradient is the sum of their rows of dx (dispatch's backward).
ExpertMlpGrads moe_mlp_backward(const Tensor& dout, const Tensor& x_, const Assignment& a, const ExpertWeights& w,
                                const ExpertMlpOut& saved, const ExpertMlpNeeds& need) {
  const int64_t G = x_.size(0), N = x_.size(1), d = x_.size(2), E = a.token.size(0), R = a.token.size(1);
  const std::vector<int64_t> rows = a.rows.to_vector<int64_t>();
  const Tensor g = dout.contiguous(), x = x_.contiguous();
  const Tensor token = a.token.contiguous(), weight = a.weight.contiguous();
  Tensor w1t, w2t;
  const Mlp m = mlp_of(w, R, true, &w1t, &w2t);
  const float* px = x.data<float>();
  const float* pg = g.data<float>();
  const float* py = saved.y.data<float>();
  const float* pw = weight.data<float>();
  const int64_t* pt = token.data<int64_t>();
  const int64_t O = m.O;
  ExpertMlpGrads o;
  if (need.weight) o.dweight = Tensor::zeros({E, R});
  float* pdw = need.weight ? o.dweight.data<float>() : nullptr;
  Tensor dxr = need.x ? Tensor::empty({E, R, d}) : Tensor();  // rows past rows[e] never written nor read
  WeightGradTensors wg(need, E, d, m.H, O);
  mlp_backward(
      m, rows,
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
      saved.hid.data<float>(), saved.dgelu.data<float>(), need.x ? dxr.data<float>() : nullptr, wg.pointers(), false);
  if (need.x) {
    o.dx = Tensor::empty({G, N, d});
    sum_token_rows(a.token_rows.contiguous(), dxr.data<float>(), nullptr, d, o.dx.data<float>());
  }
  o.dw1 = wg.dw1, o.db1 = wg.db1, o.dw2 = wg.dw2, o.db2 = wg.db2;
  return o;
}

}  // namespace mv::cpu

namespace mv::ops {

namespace {

// Checks the weights against E experts of width d and returns (H, O).
std::pair<int64_t, int64_t> check_weights(const char* op, int64_t E, int64_t d, const Tensor& x, const Tensor& w1,
                                          const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  expect_f32(op, {&w1, &w2});
  if (b1.defined()) expect_f32(op, {&b1});
  if (b2.defined()) expect_f32(op, {&b2});
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

// The weights as the kernels take them (contiguous), detached for the backward's closure, with
// the product precision of the forward, which the backward keeps.
ExpertWeights kernel_weights(const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  auto k = [](const Tensor& t) { return t.defined() ? t.contiguous().detach() : Tensor(); };
  return {k(w1), k(b1), k(w2), k(b2), matmul_bf16()};
}

}  // namespace

Tensor expert_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                  const Tensor& rows) {
  const OpDevice dev = device_of("expert_mlp", {&x, &w1, &b1, &w2, &b2, &rows});
  expect_f32("expert_mlp", {&x});
  MV_CHECK(x.ndim() == 3, "expert_mlp: expected x (E, M, d), got x ", x.str());
  const int64_t E = x.size(0), d = x.size(2);
  check_weights("expert_mlp", E, d, x, w1, b1, w2, b2);
  MV_CHECK(!rows.defined() || (is_i64(rows, 1) && rows.size(0) == E), "expert_mlp: rows ", rows.str(),
           " must be I64 (", E, ") for x ", x.str());
  const ExpertWeights w = kernel_weights(w1, b1, w2, b2);
  const bool graph = autograd::needs_graph({x, w1, b1, w2, b2});
  ExpertMlpOut f = MV_KERNEL(expert_mlp_forward)(dev, x, w, rows, graph);
  const ExpertMlpNeeds need{x.requires_grad(), false, w1.requires_grad(), b1.defined() && b1.requires_grad(),
                            w2.requires_grad(), b2.defined() && b2.requires_grad()};
  const Tensor out = f.out;
  f.out = Tensor();  // the closure keeps hid and dgelu, never its own output (a reference cycle)
  return autograd::record("expert_mlp", out, {x, w1, b1, w2, b2},
                          [dev, xd = x.detach(), w, rows, f, need](const Tensor& g) {
                            ExpertMlpGrads d = MV_KERNEL(expert_mlp_backward)(dev, g, xd, w, rows, f, need);
                            return std::vector<Tensor>{d.dx, d.dw1, d.db1, d.dw2, d.db2};
                          });
}

Tensor moe_mlp(const Tensor& x, const Assignment& a, const Tensor& w1, const Tensor& b1, const Tensor& w2,
               const Tensor& b2) {
  const OpDevice dev = device_of("moe_mlp", {&x, &a.token, &a.weight, &a.rows, &a.token_rows, &w1, &b1, &w2, &b2});
  expect_f32("moe_mlp", {&x});
  MV_CHECK(x.ndim() == 3, "moe_mlp: x must be (G, N, d), got ", x.str());
  detail::check_assignment("moe_mlp", a, true);
  MV_CHECK(x.size(0) == a.G && x.size(1) == a.N, "moe_mlp: x ", x.str(), " does not match the assignment's (G, N) = (",
           a.G, ", ", a.N, ")");
  check_weights("moe_mlp", a.token.size(0), x.size(2), x, w1, b1, w2, b2);
  const ExpertWeights w = kernel_weights(w1, b1, w2, b2);
  const bool graph = autograd::needs_graph({x, a.weight, w1, b1, w2, b2});
  ExpertMlpOut f = MV_KERNEL(moe_mlp_forward)(dev, x, a, w, graph);
  const ExpertMlpNeeds need{x.requires_grad(), a.weight.requires_grad(), w1.requires_grad(),
                            b1.defined() && b1.requires_grad(), w2.requires_grad(), b2.defined() && b2.requires_grad()};
  const Tensor out = f.out;
  f.out = Tensor();
  Assignment saved = a;
  saved.weight = a.weight.detach();
  return autograd::record("moe_mlp", out, {x, a.weight, w1, b1, w2, b2},
                          [dev, xd = x.detach(), saved, w, f, need](const Tensor& g) {
                            ExpertMlpGrads d = MV_KERNEL(moe_mlp_backward)(dev, g, xd, saved, w, f, need);
                            return std::vector<Tensor>{d.dx, d.dweight, d.dw1, d.db1, d.dw2, d.db2};
                          });
}

}  // namespace mv::ops
