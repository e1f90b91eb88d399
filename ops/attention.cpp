// Multi-head self-attention, fused, with a hand-written backward; and the same math as a
// composite of other ops (the reference for tests and the baseline for benchmarks).
//
// What the fused op computes, per batch b and head h (scale = 1/sqrt(Dh)):
//   S = scale * Q K^T                        (T, T)
//   P = softmax(S) row by row, stably: P = exp(S - m) / l with m = rowmax(S), l = rowsum(exp(S - m))
//   O = P V                                  (T, Dh)
//   lse = m + log(l)                         (T,)  the row's log-sum-exp, so P = exp(S - lse)
//
// Layout: qkv is (B, T, 3D) row-major and never copied: Q, K and V of head h are (T, Dh) blocks
// read in place with a row stride of 3D (columns h*Dh, D + h*Dh, 2D + h*Dh); O is written in
// place into out (B, T, D) with row stride D, and the gradient into (B, T, 3D) the same way as
// qkv is read. Every (b, h) touches its own columns only, so the (b, h) loop runs in parallel
// without races. The small per-head matrix products use Eigen over strided Maps: measured on
// this machine at the benchmark's ViT shapes, they beat hand-written vectorisable loops by 2-3x
// (forward) and 3-5x (forward + backward).
//
// Why save lse and not P: P is (B, heads, T, T), T/Dh times larger than the output; lse is one
// float per row. Backward rebuilds P = exp(scale Q K^T - lse) exactly (one extra Q K^T product),
// which is what the CUDA flash kernel does too, where the T x T matrix never leaves on-chip memory.
//
// Backward, with dO the output gradient:
//   dV = P^T dO,  dP = dO V^T,
//   dS = P * (dP - rowsum(dO * O))     (softmax backward; rowsum(dO * O) = rowsum(P * dP))
//   dQ = scale dS K,  dK = scale dS^T Q
#include "ops/attention.h"

// Eigen 3.4's AVX code trips -Wunused-variable where its templates are instantiated (here).
#pragma GCC diagnostic ignored "-Wunused-variable"
#include <Eigen/Core>
#include <cmath>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/common.h"

#ifdef MOEVIT_CUDA
#include "cuda/kernels.h"
#endif
#include "ops/elementwise.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"
#include "ops/shape.h"
#include "ops/softmax.h"

namespace mv::ops {

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using CMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;  // strided (T, Dh) block, read
using MMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;        // strided (T, Dh) block, written

struct Dims {
  int64_t B, T, D, H, Dh;
};

// Shape checks shared by both versions; returns the sizes.
Dims check_qkv(const char* op, const Tensor& qkv, int heads) {
  MV_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  MV_CHECK(qkv.ndim() == 3, op, ": qkv ", qkv.str(), " must be rank 3, expected (B, T, 3*D)");
  const int64_t C = qkv.size(2);
  MV_CHECK(C % (3 * int64_t(heads)) == 0, op, ": qkv ", qkv.str(), ": last dim ", C,
           " is not divisible by 3 * heads = ", 3 * heads, ", expected (B, T, 3 * heads * Dh)");
  MV_CHECK(C > 0, op, ": qkv ", qkv.str(), " has an empty last dim, expected (B, T, 3 * heads * Dh)");
  const int64_t D = C / 3;
  return {qkv.size(0), qkv.size(1), D, heads, D / heads};
}

// Forward for the (b, h) pairs [begin, end). lse may be null (no backward will run).
void forward_kernel(const float* qkv, float* out, float* lse, const Dims& d, int64_t begin,
                    int64_t end) {
  const int64_t T = d.T, D = d.D, Dh = d.Dh, H = d.H;
  const float scale = 1.0f / std::sqrt(float(Dh));
  RowMat S(T, T);
  Eigen::VectorXf inv_l(T);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* base = qkv + b * T * 3 * D + h * Dh;
    CMap Q(base, T, Dh, Eigen::OuterStride<>(3 * D));
    CMap K(base + D, T, Dh, Eigen::OuterStride<>(3 * D));
    CMap V(base + 2 * D, T, Dh, Eigen::OuterStride<>(3 * D));
    MMap O(out + b * T * D + h * Dh, T, Dh, Eigen::OuterStride<>(D));
    S.noalias() = Q * K.transpose();
    for (int64_t i = 0; i < T; ++i) {
      // Stable softmax: subtract the row max before exp; S keeps the unnormalised exp.
      float* row = S.data() + i * T;
      const float m = S.row(i).maxCoeff() * scale;
      for (int64_t j = 0; j < T; ++j) row[j] = fast_exp(row[j] * scale - m);
      const float l = lane_sum(T, [&](int64_t j) { return row[j]; });
      inv_l[i] = 1.0f / l;
      if (lse) lse[bh * T + i] = m + std::log(l);
    }
    O.noalias() = S * V;
    O = inv_l.asDiagonal() * O;  // normalise after the product: T*Dh multiplies instead of T*T
  }
}

// Backward for the (b, h) pairs [begin, end): writes dQ, dK, dV into dqkv (B, T, 3D).
void backward_kernel(const float* qkv, const float* out, const float* lse, const float* dout,
                     float* dqkv, const Dims& d, int64_t begin, int64_t end) {
  const int64_t T = d.T, D = d.D, Dh = d.Dh, H = d.H;
  const float scale = 1.0f / std::sqrt(float(Dh));
  RowMat P(T, T), dS(T, T);
  Eigen::VectorXf delta(T);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t off = b * T * 3 * D + h * Dh, ooff = b * T * D + h * Dh;
    const Eigen::OuterStride<> s3(3 * D), s1(D);
    CMap Q(qkv + off, T, Dh, s3), K(qkv + off + D, T, Dh, s3), V(qkv + off + 2 * D, T, Dh, s3);
    CMap O(out + ooff, T, Dh, s1), dO(dout + ooff, T, Dh, s1);
    MMap dQ(dqkv + off, T, Dh, s3), dK(dqkv + off + D, T, Dh, s3), dV(dqkv + off + 2 * D, T, Dh, s3);
    const float* l = lse + bh * T;
    // P = exp(scale Q K^T - lse), recomputed rather than stored.
    P.noalias() = Q * K.transpose();
    for (int64_t i = 0; i < T; ++i) {
      float* row = P.data() + i * T;
      for (int64_t j = 0; j < T; ++j) row[j] = fast_exp(row[j] * scale - l[i]);
    }
    // dV = P^T dO
    dV.noalias() = P.transpose() * dO;
    // dP = dO V^T; delta_i = sum_j P_ij dP_ij = dO_i . O_i
    dS.noalias() = dO * V.transpose();
    delta = (dO.array() * O.array()).rowwise().sum();
    // dS = P * (dP - delta), with the scale of S folded in
    for (int64_t i = 0; i < T; ++i)
      dS.row(i) = P.row(i).array() * (dS.row(i).array() - delta[i]) * scale;
    // dQ = dS K, dK = dS^T Q
    dQ.noalias() = dS * K;
    dK.noalias() = dS.transpose() * Q;
  }
}

// Work per (b, h) in flops, for parallel_for's serial/parallel decision.
int64_t cost(const Dims& d) { return 4 * d.T * d.T * d.Dh + 8 * d.T * d.T; }

}  // namespace

Tensor self_attention(const Tensor& qkv_, int heads) {
  const bool gpu = on_cuda("self_attention", {&qkv_});
  if (!gpu) expect_cpu_f32("self_attention", {&qkv_});
  const Dims d = check_qkv("self_attention", qkv_, heads);
#ifdef MOEVIT_CUDA
  if (gpu) {  // flash-style kernels; the forward saves lse, the backward recomputes from it
    const Tensor qkv = qkv_.contiguous();
    cuda::AttentionOut f = cuda::attention_forward(qkv, heads);
    if (!autograd::needs_graph({qkv_})) return f.out;
    return autograd::record("self_attention", f.out, {qkv_},
                            [qd = qkv.detach(), od = f.out.detach(), lse = f.lse, heads](const Tensor& g) {
                              return std::vector<Tensor>{
                                  cuda::attention_backward(qd, od, lse, g.contiguous(), heads)};
                            });
  }
#endif
  Tensor qkv = qkv_.contiguous();
  Tensor out = Tensor::empty({d.B, d.T, d.D});
  const bool grad = autograd::needs_graph({qkv_});
  Tensor lse = grad ? Tensor::empty({d.B, d.H, d.T}) : Tensor();
  const float* pq = qkv.data<float>();
  float* po = out.data<float>();
  float* pl = grad ? lse.data<float>() : nullptr;
  parallel_for(d.B * d.H, cost(d), [&](int64_t s, int64_t e) { forward_kernel(pq, po, pl, d, s, e); });
  if (!grad) return out;
  // Saves qkv, the output and lse; never the (B, heads, T, T) probabilities.
  return autograd::record("self_attention", out, {qkv_},
                          [qd = qkv.detach(), od = out.detach(), lse, d](const Tensor& g) {
                            Tensor gc = g.contiguous();
                            Tensor dqkv = Tensor::empty(qd.shape());
                            const float *pq = qd.data<float>(), *po = od.data<float>(),
                                        *pl = lse.data<float>(), *pg = gc.data<float>();
                            float* pd = dqkv.data<float>();
                            parallel_for(d.B * d.H, 2 * cost(d), [&](int64_t s, int64_t e) {
                              backward_kernel(pq, po, pl, pg, pd, d, s, e);
                            });
                            return std::vector<Tensor>{dqkv};
                          });
}

// Composite: every step an op with its own backward; autograd chains them. Stores the
// (B, heads, T, T) scores and probabilities for backward, which the fused op avoids.
Tensor self_attention_composite(const Tensor& qkv, int heads) {
  expect_cpu_f32("self_attention_composite", {&qkv});
  const Dims d = check_qkv("self_attention_composite", qkv, heads);
  // part i of [q | k | v]: (B, T, D) -> (B, T, H, Dh) -> (B, H, T, Dh)
  auto part = [&](int64_t i) {
    return permute(reshape(slice(qkv, 2, i * d.D, (i + 1) * d.D), {d.B, d.T, d.H, d.Dh}), {0, 2, 1, 3});
  };
  Tensor q = part(0), k = part(1), v = part(2);
  Tensor s = mul(matmul(q, transpose(k, -1, -2)), 1.0f / std::sqrt(float(d.Dh)));  // (B, H, T, T)
  Tensor o = matmul(softmax(s), v);                                                 // (B, H, T, Dh)
  return reshape(permute(o, {0, 2, 1, 3}), {d.B, d.T, d.D});
}

}  // namespace mv::ops
