// Multi-head self-attention, fused, with a hand-written backward; and the same math as a
// composite of other ops (the reference for tests and the baseline for benchmarks).
//
// What the fused op computes, per batch b and head h (scale = 1/sqrt(Dh)):
//   S = scale * Q K^T                        (T, T)
//   P = softmax(S) row by row, stably: P = exp(S - m) / l with m = rowmax(S), l = rowsum(exp(S - m))
//   O = P V                                  (T, Dh)
//
// Layout: qkv is (B, T, 3D) row-major and is never split into separate tensors: Q, K and V of
// head h are (T, Dh) blocks of it with a row stride of 3D (columns h*Dh, D + h*Dh, 2D + h*Dh); O
// is written into out (B, T, D) with row stride D, and the gradient into (B, T, 3D) the same way
// as qkv is read. Every (b, h) touches its own columns only, so the (b, h) loop runs in parallel
// without races. The per-head products are small (T ~ 50, Dh ~ 16) and run through tile_gemm
// (ops/tile_gemm.h), register tiles with no operand packing that read the (T, Dh) blocks in place
// and write their results in place: forward + backward measured 1.3-1.4x faster than with
// Eigen's GEMM per product at the benchmark's shape. Right operands are read by rows: K^T and V^T
// are transposed into a per-thread buffer.
//
// What is saved for backward: P itself, (B*heads, T, T) padded to (.., T, Tp). At ViT sizes
// (T ~ 50, Dh ~ 16) that is 3x the output and a few MB per layer; keeping it spares the backward
// a Q K^T product and T*T exps per head (bench_attention: docs/benchmarks.md). With bfloat16
// products P is kept rounded, as the pairs of rows (P(2j, n), P(2j+1, n)) that the product
// dV = P^T dO reads (ops::pack_bf16_pairs): half the memory traffic, and no packing in the
// backward. The CUDA kernels make the other choice, saving the row log-sum-exp and rebuilding P
// on chip (flash attention), because on the GPU memory traffic, not arithmetic, is what costs.
//
// Backward, with dO the output gradient:
//   dV = P^T dO,  dP = dO V^T,
//   dS = P * (dP - rowsum(dO * O))     (softmax backward; rowsum(dO * O) = rowsum(P * dP))
//   dQ = scale dS K,  dK = scale dS^T Q
#include "ops/attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"
#include "ops/elementwise.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"
#include "ops/shape.h"
#include "ops/tile_gemm.h"
#include "ops/softmax.h"

namespace mv::cpu {

using ops::fast_exp;
using ops::lane_sum;
using ops::tile_gemm;
using ops::transpose8;

namespace {

struct Dims {
  int64_t B, T, D, H, Dh;
};

// The sizes of a checked qkv.
Dims dims_of(const Tensor& qkv, int heads) {
  const int64_t D = qkv.size(2) / 3;
  return {qkv.size(0), qkv.size(1), D, heads, D / heads};
}

// Shape checks shared by both versions; returns the sizes.
Dims check_qkv(const char* op, const Tensor& qkv, int heads) {
  MV_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  MV_CHECK(qkv.ndim() == 3, op, ": qkv ", qkv.str(), " must be rank 3, expected (B, T, 3*D)");
  const int64_t C = qkv.size(2);
  MV_CHECK(C % (3 * int64_t(heads)) == 0, op, ": qkv ", qkv.str(), ": last dim ", C,
           " is not divisible by 3 * heads = ", 3 * heads, ", expected (B, T, 3 * heads * Dh)");
  MV_CHECK(C > 0, op, ": qkv ", qkv.str(), " has an empty last dim, expected (B, T, 3 * heads * Dh)");
  return dims_of(qkv, heads);
}

int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// Largest of x[0, n).
float row_max(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int l = 1; l < 8; ++l) r = std::max(r, lanes[l]);
  for (; j < n; ++j) r = std::max(r, x[j]);
  return r;
}

// Per-thread buffers for one (b, h), rows padded to Tp = T rounded up to 8 floats (32 bytes).
struct Work {
  int64_t T, Dh, Tp;
  std::vector<float> rt;  // (Dh, Tp): K^T (forward) or V^T (backward), right operand of Q K^T / dO V^T
  std::vector<float> s;   // (T, Tp): P unless the forward saves it as floats, then dP and dS (backward)
  std::vector<float> row;  // (T): the forward softmax's 1 / row sum
  std::vector<uint32_t> pairs;  // (ceil(T / 2), Dh): dO's rows in bfloat16 pairs (backward)
  explicit Work(const Dims& d)
      : T(d.T), Dh(d.Dh), Tp(round8(d.T)), rt(size_t(Dh * Tp)), s(size_t(T * Tp)), row(size_t(T)),
        pairs(size_t((T + 1) / 2 * Dh)) {}
  // (T, Dh) block at src (row stride ld) -> its transpose in rt (Dh, Tp): 8 x 8 blocks in
  // registers, the edges one element at a time.
  void transpose(const float* src, int64_t ld) {
    const int64_t T8 = T / 8 * 8, D8 = Dh / 8 * 8;
    for (int64_t i = 0; i < T8; i += 8)
      for (int64_t k = 0; k < D8; k += 8) transpose8(src + i * ld + k, ld, rt.data() + k * Tp + i, Tp);
    for (int64_t i = 0; i < T; ++i)
      for (int64_t k = i < T8 ? D8 : 0; k < Dh; ++k) rt[size_t(k * Tp + i)] = src[i * ld + k];
  }
};

// Forward for the (b, h) pairs [begin, end). saved receives P for the backward, (B*H, T, Tp) floats,
// or with bf16 (the products on bfloat16 inputs) (B*H, ceil(T / 2), Tp) pairs of rows; null when
// no backward will run.
void forward_kernel(const float* qkv, float* out, void* saved, const Dims& d, int64_t begin, int64_t end,
                    bool bf16) {
  const int64_t T = d.T, D = d.D, Dh = d.Dh, H = d.H, T2 = (T + 1) / 2;
  const float scale = 1.0f / std::sqrt(float(Dh));
  Work w(d);
  const int64_t Tp = w.Tp;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* q = qkv + b * T * 3 * D + h * Dh;
    float* o = out + b * T * D + h * Dh;
    float* p = saved && !bf16 ? static_cast<float*>(saved) + bh * T * Tp : w.s.data();
    w.transpose(q + D, 3 * D);
    tile_gemm(T, T, Dh, q, 3 * D, 1, w.rt.data(), Tp, p, Tp, false, bf16);  // Q K^T
    // Stable softmax (the row max subtracted before exp), pass by pass over all rows, the exps in
    // one flat loop over the (T, Tp) block: a row's chain of max, exps, sum and divide, done row by
    // row, waits on itself and leaves a scalar tail per row (the forward measured about 1.1x
    // faster at T = 50). The padding columns get exp(-87) and are never read.
    float* inv_l = w.row.data();
    for (int64_t i = 0; i < T; ++i) {
      float* row = p + i * Tp;
      const float m = row_max(row, T) * scale;
      for (int64_t j = 0; j < T; ++j) row[j] = row[j] * scale - m;
      std::fill(row + T, row + Tp, -87.f);
    }
    for (int64_t e = 0; e < T * Tp; ++e) p[e] = fast_exp(p[e]);
    for (int64_t i = 0; i < T; ++i) inv_l[i] = lane_sum(T, [&](int64_t j) { return p[i * Tp + j]; });
    for (int64_t i = 0; i < T; ++i) inv_l[i] = 1.0f / inv_l[i];
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) p[i * Tp + j] *= inv_l[i];
    tile_gemm(T, Dh, T, p, Tp, 1, q + 2 * D, 3 * D, o, D, false, bf16);  // P V
    if (saved && bf16) ops::pack_bf16_pairs(T, T, p, Tp, static_cast<uint32_t*>(saved) + bh * T2 * Tp, Tp);
  }
}

// P(i, n) from the bfloat16 pairs of rows that the forward saved (row stride Tp).
float unpack_p(const uint32_t* pairs, int64_t Tp, int64_t i, int64_t n) {
  const uint32_t word = pairs[i / 2 * Tp + n], bits = i % 2 ? word & 0xffff0000u : word << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// Backward for the (b, h) pairs [begin, end): writes dQ, dK, dV into dqkv (B, T, 3D). saved is
// what the forward saved for P (floats, or with bf16 pairs of rows).
void backward_kernel(const float* qkv, const float* out, const void* saved, const float* dout, float* dqkv,
                     const Dims& d, int64_t begin, int64_t end, bool bf16) {
  const int64_t T = d.T, D = d.D, Dh = d.Dh, H = d.H, T2 = (T + 1) / 2;
  const float scale = 1.0f / std::sqrt(float(Dh));
  Work w(d);
  const int64_t Tp = w.Tp;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t off = b * T * 3 * D + h * Dh, ooff = b * T * D + h * Dh;
    const float *q = qkv + off, *k = q + D, *v = q + 2 * D, *o = out + ooff, *dO = dout + ooff;
    float *dq = dqkv + off, *dk = dq + D, *dv = dq + 2 * D;
    const float* p = bf16 ? nullptr : static_cast<const float*>(saved) + bh * T * Tp;
    const uint32_t* pp = bf16 ? static_cast<const uint32_t*>(saved) + bh * T2 * Tp : nullptr;
    w.transpose(v, 3 * D);
    // dV = P^T dO (A = P^T, read by columns; in bfloat16 its depth pairs are the saved words)
    if (bf16) {
      ops::pack_bf16_pairs(T, Dh, dO, D, w.pairs.data(), Dh);
      ops::tile_gemm_pairs(T, Dh, T2, pp, 1, Tp, w.pairs.data(), Dh, dv, 3 * D);
    } else {
      tile_gemm(T, Dh, T, p, 1, Tp, dO, D, dv, 3 * D);
    }
    // dP = dO V^T, then dS = P * (dP - delta) with delta_i = dO_i . O_i = sum_j P_ij dP_ij, and
    // the scale of S folded in.
    tile_gemm(T, T, Dh, dO, D, 1, w.rt.data(), Tp, w.s.data(), Tp, false, bf16);
    for (int64_t i = 0; i < T; ++i) {
      const float delta = lane_sum(Dh, [&](int64_t c) { return dO[i * D + c] * o[i * D + c]; });
      float* sr = w.s.data() + i * Tp;
      if (bf16)
        for (int64_t j = 0; j < T; ++j) sr[j] = unpack_p(pp, Tp, i, j) * (sr[j] - delta) * scale;
      else
        for (int64_t j = 0; j < T; ++j) sr[j] = p[i * Tp + j] * (sr[j] - delta) * scale;
    }
    // dQ = dS K, dK = dS^T Q
    tile_gemm(T, Dh, T, w.s.data(), Tp, 1, k, 3 * D, dq, 3 * D, false, bf16);
    tile_gemm(T, Dh, T, w.s.data(), 1, Tp, q, 3 * D, dk, 3 * D, false, bf16);
  }
}

// Work per (b, h) in flops, for parallel_for's serial/parallel decision.
int64_t cost(const Dims& d) { return 4 * d.T * d.T * d.Dh + 8 * d.T * d.T; }

}  // namespace

// qkv: (B, T, 3D) contiguous -> out (B, T, D) and, for the backward, P (B*heads, T, Tp)
ops::AttentionOut attention_forward(const Tensor& qkv, int heads, bool for_backward, bool bf16) {
  const Dims d = dims_of(qkv, heads);
  ops::AttentionOut o{Tensor::empty({d.B, d.T, d.D}), Tensor()};
  // P for the backward, rows padded like the per-thread buffers: (B*H, T, Tp) floats, or with bf16
  // (B*H, ceil(T / 2), Tp) pairs of bfloat16s in 32-bit words.
  if (for_backward)
    o.saved = bf16 ? Tensor::empty({d.B * d.H, (d.T + 1) / 2, round8(d.T)}, DType::I32)
                   : Tensor::empty({d.B * d.H, d.T, round8(d.T)});
  const float* pq = qkv.data<float>();
  float* po = o.out.data<float>();
  void* pp = !for_backward ? nullptr : bf16 ? static_cast<void*>(o.saved.data<int32_t>()) : o.saved.data<float>();
  parallel_for(d.B * d.H, cost(d), [&](int64_t s, int64_t e) { forward_kernel(pq, po, pp, d, s, e, bf16); });
  return o;
}

// qkv, out, saved (P) from the forward, dout: (B, T, D) -> dqkv: (B, T, 3D)
Tensor attention_backward(const Tensor& qkv, const Tensor& out, const Tensor& saved, const Tensor& dout, int heads,
                          bool bf16) {
  const Dims d = dims_of(qkv, heads);
  const Tensor gc = dout.contiguous();
  Tensor dqkv = Tensor::empty(qkv.shape());
  const float *pq = qkv.data<float>(), *po = out.data<float>(), *pg = gc.data<float>();
  const void* pp = bf16 ? static_cast<const void*>(saved.data<int32_t>()) : saved.data<float>();
  float* pd = dqkv.data<float>();
  parallel_for(d.B * d.H, 2 * cost(d), [&](int64_t s, int64_t e) { backward_kernel(pq, po, pp, pg, pd, d, s, e, bf16); });
  return dqkv;
}

}  // namespace mv::cpu

namespace mv::ops {

Tensor self_attention(const Tensor& qkv_, int heads) {
  const OpDevice dev = device_of("self_attention", {&qkv_});
  expect_f32("self_attention", {&qkv_});
  cpu::check_qkv("self_attention", qkv_, heads);
  const Tensor qkv = qkv_.contiguous();
  const bool bf16 = matmul_bf16();  // the backward keeps the forward's precision
  AttentionOut f = MV_KERNEL(attention_forward)(dev, qkv, heads, autograd::needs_graph({qkv_}), bf16);
  return autograd::record("self_attention", f.out, {qkv_},
                          [dev, qd = qkv.detach(), od = f.out.detach(), saved = f.saved, heads, bf16](const Tensor& g) {
                            return std::vector<Tensor>{MV_KERNEL(attention_backward)(dev, qd, od, saved, g, heads, bf16)};
                          });
}

// Composite: every step an op with its own backward; autograd chains them. Stores the
// (B, heads, T, T) scores and probabilities for backward, which the fused op avoids.
Tensor self_attention_composite(const Tensor& qkv, int heads) {
  device_of("self_attention_composite", {&qkv});
  expect_f32("self_attention_composite", {&qkv});
  const cpu::Dims d = cpu::check_qkv("self_attention_composite", qkv, heads);
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
