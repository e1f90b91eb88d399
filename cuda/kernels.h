// The CUDA kernels of moevit, as functions on Tensors. A plain C++ header (no CUDA headers), so
// ops/ can include it under `#ifdef MOEVIT_CUDA` and dispatch on the tensor's device.
//
// Conventions: every input is a contiguous F32 CUDA tensor unless stated (labels are I64);
// a wrong device, dtype, layout or shape throws mv::Error naming the function and the tensor.
// Outputs are new CUDA tensors from the caching allocator. Everything runs on one stream
// (the legacy default stream), so results are ready for any later kernel or copy; functions do
// not synchronise the host. The CPU twins of these kernels live in ops/ (see tests/test_cuda.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace mv::cuda {

// Waits for all queued GPU work and reports an asynchronous kernel error, if any.
void synchronize();

// ---- GEMM (cuda/blas.cu): cuBLAS, row-major through the operand swap -------------------------
// a: (M, K) or (B, M, K), b: (K, N) or (B, K, N) -> (M, N) or (B, M, N). A 2-D operand is shared
// by every batch. tf32: let cuBLAS use TF32 tensor cores (about 1e-3 relative error) instead of
// full FP32.
Tensor matmul(const Tensor& a, const Tensor& b, bool tf32 = false);
// op(a) @ op(b) with op(x) = x^T (the last two dims) where the flag is set: a stored (M, K),
// (K, M) if trans_a, optionally with a batch dim (B, ., .); b stored (K, N), (N, K) if trans_b,
// likewise -> (M, N) or (B, M, N). For backward passes: no transposed copy is made.
Tensor matmul_t(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool tf32 = false);
// x: (R, in), w: (in, out), bias: (out,) or undefined -> (R, in) @ w + bias: (R, out).
// One cuBLASLt call with the bias fused as its epilogue (sgemm + bias kernel if Lt declines).
Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor& bias, bool tf32 = false);

// ---- softmax over the last axis (cuda/softmax.cu) --------------------------------------------
// x: (..., C) -> y: (..., C)
Tensor softmax_forward(const Tensor& x);
// y, dy: (..., C) -> dx = y * (dy - sum_c(dy * y)): (..., C)
Tensor softmax_backward(const Tensor& y, const Tensor& dy);

// ---- layer norm over the last axis (cuda/layernorm.cu) ---------------------------------------
struct LayerNormOut {
  Tensor y;     // (..., D)
  Tensor mean;  // (...): one per row
  Tensor rstd;  // (...): 1 / sqrt(var + eps), biased variance
};
// x: (..., D), gamma, beta: (D,) (undefined: 1 and 0). D <= 8192.
LayerNormOut layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps);
struct LayerNormGrads {
  Tensor dx;      // (..., D)
  Tensor dgamma;  // (D,)
  Tensor dbeta;   // (D,)
};
// dy, x: (..., D), gamma: (D,) or undefined, mean, rstd: (...) from the forward.
// dgamma / dbeta are deterministic: per-block partial sums, then a fixed-order second pass.
LayerNormGrads layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& gamma,
                                  const Tensor& mean, const Tensor& rstd);

// ---- cross-entropy with label smoothing (cuda/cross_entropy.cu) ------------------------------
struct CrossEntropyOut {
  Tensor loss;  // (N,): per-row loss; the mean over rows is the usual training loss
  Tensor lse;   // (N,): log-sum-exp of each row, kept for the backward
};
// logits: (N, C), labels: I64 (N,) in [0, C) (a row with a label outside gets a NaN loss).
// loss_i = lse_i - (1 - s) x_{i,y_i} - (s / C) sum_c x_{i,c}, s = label_smoothing.
CrossEntropyOut cross_entropy_forward(const Tensor& logits, const Tensor& labels,
                                      float label_smoothing = 0.f);
// d(mean_i loss_i)/dlogits = dloss / N * (softmax(x) - ((1 - s) onehot(y) + s / C)): (N, C).
// dloss: undefined (1) or a one-element F32 CUDA tensor (the incoming gradient of the mean loss;
// read on the device, no host sync).
Tensor cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse,
                              float label_smoothing = 0.f, const Tensor& dloss = Tensor());

// ---- elementwise (cuda/elementwise.cu) -------------------------------------------------------
// GELU, tanh form: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). x: any shape.
Tensor gelu_forward(const Tensor& x);
// x, dy: same shape -> dx = dy * gelu'(x)
Tensor gelu_backward(const Tensor& x, const Tensor& dy);
// x: (..., C), b: (C,) -> x + b
Tensor add_bias(const Tensor& x, const Tensor& b);
// a, b: F32 CUDA tensors of any strides whose shapes broadcast (NumPy rules, rank <= 8) ->
// a (op) b, contiguous, in the broadcast shape. Equal contiguous shapes take a float4 map.
enum class Binary { Add, Sub, Mul, Div };
Tensor binary(const Tensor& a, const Tensor& b, Binary op);
// The unary maps of ops/elementwise.h: y = f(x), and dx = dy * f'(x) written with x and y
// (exp' = y, tanh' = 1 - y^2, ...). p is the exponent of Pow. x, y, dy: same shape.
//   GeluErf: x Phi(x);  NormalCdf: Phi(x) = (1 + erf(x / sqrt 2)) / 2.
enum class Unary { Exp, Log, Sqrt, Rsqrt, Tanh, Pow, Relu, GeluErf, NormalCdf };
Tensor unary_forward(const Tensor& x, Unary f, float p = 0.f);
Tensor unary_backward(const Tensor& x, const Tensor& y, const Tensor& dy, Unary f, float p = 0.f);

// ---- AdamW (cuda/adamw.cu) -------------------------------------------------------------------
// One multi-tensor launch updates every parameter in place, as torch.optim.AdamW does:
//   p *= 1 - lr * wd;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;
//   p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps).
// params, grads, m, v: equal-length lists of same-shape tensors; weight_decays: one per tensor;
// step: 1 for the first update. Every gradient is read times grad_scale (the clip scale: the
// gradient tensors are not written, as they may be shared between parameters).
void adamw_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                const std::vector<Tensor>& m, const std::vector<Tensor>& v, float lr, float beta1,
                float beta2, float eps, const std::vector<float>& weight_decays, int64_t step,
                float grad_scale = 1.f);

// ---- SGD (cuda/sgd.cu) ------------------------------------------------------------------------
// One tensor in place, as torch.optim.SGD with momentum and coupled weight decay:
//   g = grad * grad_scale + wd * p;  buf = momentum * buf + g;  p -= lr * buf.
// p, grad, buf: contiguous F32 CUDA tensors of one shape.
void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum,
              float wd, float grad_scale = 1.f);

// ---- Philox random numbers (cuda/random.cu) --------------------------------------------------
// Element i is mv::philox::normal(seed, offset, i) / uniform(seed, offset, i): the same draws as
// the CPU's randn / rand for the same (seed, offset). Uniform draws are bitwise equal to the CPU;
// normal draws go through the device's logf/cosf/sinf and agree to a few ulp.
Tensor philox_normal(const Shape& shape, uint64_t seed, uint64_t offset);
Tensor philox_uniform(const Shape& shape, uint64_t seed, uint64_t offset);

// ---- attention (cuda/attention.cu) -----------------------------------------------------------
struct AttentionOut {
  Tensor out;  // (B, T, D): heads concatenated along the last axis
  Tensor lse;  // (B, heads, T): natural log-sum-exp of each row of scaled scores
};
// qkv: (B, T, 3D) packed [q | k | v], head h at columns h*Dh .. h*Dh + Dh - 1 of each part,
// Dh = D / heads <= 64. softmax(q k^T / sqrt(Dh)) v per (batch, head), flash-style.
AttentionOut attention_forward(const Tensor& qkv, int heads);
// qkv, out, lse from the forward, dout: (B, T, D) -> dqkv: (B, T, 3D). Deterministic (no atomics).
Tensor attention_backward(const Tensor& qkv, const Tensor& out, const Tensor& lse,
                          const Tensor& dout, int heads);

// ---- generic tensor kernels for ops/ (cuda/tensor_ops.cu) ------------------------------------
// dst, src: CUDA tensors of the same shape and dtype, any strides (views) -> writes src into dst.
void copy_strided(const Tensor& dst, const Tensor& src);
// x: any layout -> x itself if contiguous, else a contiguous copy (what Tensor::contiguous uses).
Tensor contiguous(const Tensor& x);
// t: contiguous F32 CUDA tensor; every element set to value, on the device.
void fill(const Tensor& t, float value);
// a, b: same shape -> alpha * a + beta * b; b undefined: alpha * a + beta (a scalar shift).
Tensor axpby(const Tensor& a, const Tensor& b, float alpha, float beta);
// x: F32, any strides, rank <= 8; keep: x's shape with 1 at each reduced axis -> (keep): scale *
// the sum over the reduced axes, one thread per output in a fixed order. Deterministic.
Tensor sum_keep(const Tensor& x, const Shape& keep, float scale = 1.f);
// x: (R, C) -> (C,): sum over the rows (the bias gradient). Deterministic.
Tensor column_sum(const Tensor& x);
// x: any shape -> (): scale * sum of all elements. Deterministic.
Tensor sum_all(const Tensor& x, float scale = 1.f);
// x: (..., C) -> I64 (...): index of the first largest element of each row (NaN counts as largest).
Tensor argmax_last(const Tensor& x);

// ---- patches (cuda/patchify.cu) --------------------------------------------------------------
// images: (B, C, H, W), any strides -> (B, (H/p)(W/p), C p p): patch (gy, gx) is row gy*(W/p)+gx,
// its features ordered (c, i, j), the layout ViT's patch embedding multiplies.
Tensor patchify(const Tensor& images, int p);
// The inverse: patches (B, N, C p p) contiguous -> (B, C, H, W) (patchify's backward).
Tensor unpatchify(const Tensor& patches, const Shape& image_shape, int p);

}  // namespace mv::cuda
