// The CUDA kernels of moevit, as functions on Tensors. A plain C++ header (no CUDA headers);
// ops/dispatch.h includes it, in builds with CUDA, to pair each kernel with its CPU twin.
//
// A kernel that an op dispatches to has a CPU twin of the same name and signature, cpu::NAME in
// the op's file in ops/, and sits in the .cu file named like that op file (cuda/softmax.cu and
// ops/softmax.cpp). The others here (cuBLAS calls with transposed operands, column sums, Philox
// draws, the copies behind Tensor) are the building blocks of those and of the engine.
//
// Conventions: every input is a contiguous F32 CUDA tensor unless stated (labels and indices
// are I64); a wrong device, dtype, layout or shape throws mv::Error naming the function and the
// tensor. Outputs are new CUDA tensors from the caching allocator. Everything runs on one stream
// (the legacy default stream), so results are ready for any later kernel or copy; functions do
// not synchronise the host. tests/test_cuda.cpp checks each against double-precision loops and
// tests/test_cuda_ops.cpp each op against its CPU twin.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/tensor.h"
#include "ops/kernel_types.h"
#include "ops/moe.h"
#include "ops/prc.h"

namespace mv::cuda {

using ops::AttentionOut;
using ops::Binary;
using ops::CrossEntropyOut;
using ops::LayerNormGrads;
using ops::LayerNormOut;
using ops::LinearGrads;
using ops::JaccardOut;
using ops::MatmulGrads;
using ops::PairGrads;
using ops::PrcOut;
using ops::Unary;

// Waits for all queued GPU work and reports an asynchronous kernel error, if any.
void synchronize();

// ---- products (cuda/matmul.cu): cuBLAS, row-major through the operand swap --------------------
// a: (M, K) or (B, M, K), b: (K, N) or (B, K, N) -> (M, N) or (B, M, N). A 2-D operand is shared
// by every batch. tf32: let cuBLAS use TF32 tensor cores (about 1e-3 relative error) instead of
// full FP32.
Tensor matmul(const Tensor& a, const Tensor& b, bool tf32 = false);
// op(a) @ op(b) with op(x) = x^T (the last two dims) where the flag is set: a stored (M, K),
// (K, M) if trans_a, optionally with a batch dim (B, ., .); b stored (K, N), (N, K) if trans_b,
// likewise -> (M, N) or (B, M, N). For backward passes: no transposed copy is made.
Tensor matmul_t(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool tf32 = false);
// x: (..., in), w: (in, out), bias: (out,) or undefined, any layout -> x @ w + bias: (..., out).
// One cuBLASLt call with the bias fused as its epilogue (sgemm + bias kernel if Lt declines).
Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor& bias, bool tf32 = false);
// x, w as in linear_forward, dy: (..., out) -> dx = dy w^T, dw = x^T dy, db = column sums of dy,
// each only where asked for.
LinearGrads linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, bool need_x, bool need_w,
                                 bool need_b, bool tf32);
// ops::matmul's kernels. a: (..., M, K), b: (K, N) (shared) or (..., K, N) -> (..., M, N); any
// layout (made contiguous here).
Tensor matmul_forward(const Tensor& a, const Tensor& b, bool tf32);
// dy: (..., M, N) -> da = dy b^T, db = a^T dy (summed over the batch when b is shared), each only
// where asked for.
MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dy, bool need_a, bool need_b,
                                 bool tf32);

// ---- softmax over the last axis (cuda/softmax.cu) --------------------------------------------
// x: (..., C) -> y: (..., C)
Tensor softmax_forward(const Tensor& x);
// y, dy: (..., C) -> dx = y * (dy - sum_c(dy * y)): (..., C)
Tensor softmax_backward(const Tensor& y, const Tensor& dy);

// ---- layer norm over the last axis (cuda/norm.cu) --------------------------------------------
// x: (..., D), gamma, beta: (D,) (undefined: 1 and 0). D <= 8192.
LayerNormOut layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps);
// dy, x: (..., D), gamma: (D,) or undefined, mean, rstd: (...) from the forward.
// dgamma / dbeta are deterministic: per-block partial sums, then a fixed-order second pass.
LayerNormGrads layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& gamma,
                                       const Tensor& mean, const Tensor& rstd);

// ---- cross-entropy with label smoothing (cuda/loss.cu) ---------------------------------------
// logits: (N, C), labels: I64 (N,) in [0, C) (a row with a label outside gets a NaN loss: labels
// are not read on the host). row_loss_i = lse_i - (1 - s) x_{i,y_i} - (s / C) sum_c x_{i,c},
// s = label_smoothing; loss = their mean.
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
// a (op) b, contiguous, in the broadcast shape. Equal contiguous shapes take a float4 map; an
// Add of a bias-shaped operand (its shape a suffix of the other's) takes add_bias.
Tensor binary(const Tensor& a, const Tensor& b, Binary op);
// The unary maps of ops/elementwise.h: y = f(x), and dx = dy * f'(x) written with x and y
// (exp' = y, tanh' = 1 - y^2, ...). p is the exponent of Pow. x, y, dy: same shape.
Tensor unary_forward(const Tensor& x, Unary f, float p = 0.f);
Tensor unary_backward(const Tensor& x, const Tensor& y, const Tensor& dy, Unary f, float p = 0.f);
// a, b: same shape -> alpha * a + beta * b; b undefined: alpha * a + beta (a scalar shift).
Tensor axpby(const Tensor& a, const Tensor& b, float alpha, float beta);

// ---- reductions (cuda/reduce.cu) -------------------------------------------------------------
// x: F32, any strides, rank <= 8; keep: x's shape with 1 at each reduced axis -> (keep): scale *
// the sum over the reduced axes, one thread per output in a fixed order (one block's tree when
// every axis is reduced). Deterministic.
Tensor sum_keep(const Tensor& x, const Shape& keep, double scale = 1.0);
// g: any layout; shape broadcasts to g's shape -> (shape): g summed over the axes broadcasting
// added or stretched (a bias gradient takes column_sum).
Tensor sum_to(const Tensor& g, const Shape& shape);
// g: any layout, of x_shape with 1 at the reduced axes -> (x_shape): g repeated along them, times
// scale (the backward of sum and mean).
Tensor expand(const Tensor& g, const Shape& x_shape, float scale);
// x: (R, C) -> (C,): sum over the rows (the bias gradient). Deterministic.
Tensor column_sum(const Tensor& x);
// x: any shape -> (): scale * sum of all elements. Deterministic.
Tensor sum_all(const Tensor& x, float scale = 1.f);
// x: any layout, axis in [0, rank) -> the first largest element along axis (NaN counts as
// largest) and its I64 index, each of x's shape with 1 at axis.
ops::MaxOut max_forward(const Tensor& x, int axis);
// g: x's shape with 1 at axis, index from max_forward -> (xs): g at each maximal element, 0
// elsewhere.
Tensor max_backward(const Tensor& g, const Tensor& index, const Shape& xs, int axis);
// max_forward's index alone.
Tensor argmax(const Tensor& x, int axis);

// ---- shape ops (cuda/shape.cu) ---------------------------------------------------------------
// x: any layout and dtype -> x itself if contiguous, else a contiguous copy.
Tensor contiguous(const Tensor& x);
// dst: contiguous; src: dst's shape but length len along axis, any layout -> writes src into
// dst[.., pos : pos + len, ..] (concat's pieces, slice's backward).
void place_along(const Tensor& dst, int axis, int64_t pos, const Tensor& src);
// src: any layout -> a contiguous copy of src[.., pos : pos + len, ..] (concat's backward).
Tensor take_along(const Tensor& src, int axis, int64_t pos, int64_t len);
// images: (B, C, H, W), any strides -> (B, (H/p)(W/p), C p p): patch (gy, gx) is row gy*(W/p)+gx,
// its features ordered (c, i, j), the layout ViT's patch embedding multiplies.
Tensor patchify(const Tensor& images, int p);
// The inverse: patches (B, N, C p p) contiguous -> (B, C, H, W) (patchify's backward).
Tensor unpatchify(const Tensor& patches, const Shape& image_shape, int p);

// ---- convolution windows (cuda/conv.cu) --------------------------------------------------------
// x: (B, H, W, C) contiguous -> (B, Ho Wo, k k C), ops::unfold's im2col (zeros on the padding).
Tensor unfold(const Tensor& x, const ops::ConvGeometry& g);
// rows: (B, Ho Wo, k k C) contiguous -> (B, H, W, C) = xs: each pixel the sum of its copies.
Tensor fold(const Tensor& rows, const Shape& xs, const ops::ConvGeometry& g);

// ---- attention (cuda/attention.cu) -----------------------------------------------------------
// qkv: (B, T, 3D) packed [q | k | v], head h at columns h*Dh .. h*Dh + Dh - 1 of each part,
// Dh = D / heads <= 64. softmax(q k^T / sqrt(Dh)) v per (batch, head), flash-style. saved: the
// row log-sum-exp (B, heads, T) of the scaled scores, kept whatever for_backward says (it is
// the cheap part). bf16 is the CPU twin's (bfloat16 products); ignored here.
AttentionOut attention_forward(const Tensor& qkv, int heads, bool for_backward = true, bool bf16 = false);
// qkv, out, saved (lse) from the forward, dout: (B, T, D) -> dqkv: (B, T, 3D). Deterministic (no
// atomics).
Tensor attention_backward(const Tensor& qkv, const Tensor& out, const Tensor& saved, const Tensor& dout,
                          int heads, bool bf16 = false);

// ---- MoE routing (cuda/route.cu): topk_route's stages, expert choice, the load loss ------------
// gates: (G, N, E) -> each token's k best experts and gates (k <= 8).
ops::TopKChoices topk_choices(const Tensor& gates, int k);
// gate: (G, N, k) -> (G, N) I64: per group, the tokens in claim order (BPR: best gate first).
Tensor fill_order(const Tensor& gate, bool bpr);
// expert: (G, N, k), order: (G, N) -> each choice's slot in its expert's buffer (-1 past C).
ops::Slots assign_slots(const Tensor& expert, const Tensor& order, int64_t E, int64_t C);
// -> the packed Assignment and each choice's row (-1 dropped).
ops::Placement place_choices(const Tensor& expert, const Tensor& gate, const ops::Slots& slots, int64_t E, int64_t C,
                             bool renorm);
// dweight: (E, R) -> dgates (G, N, E).
Tensor topk_route_backward(const Tensor& dweight, const Tensor& expert, const Tensor& slot, const Tensor& gate,
                           int64_t E, bool renorm);
// Expert choice. scores, weights: (G, N, E) -> per group and expert its C best tokens by score
// (ties to the lower token), in descending order: all R = G*C rows used, token_rows (G, N, E).
ops::Assignment expert_choice_route_forward(const Tensor& scores, int64_t C, const Tensor& weights);
// dweight: (E, R), token: (E, R) of the routing -> (G, N, E).
Tensor expert_choice_route_backward(const Tensor& dweight, const Tensor& token, int64_t G, int64_t N);
// z, zn: (G, N, E), expert: (G, N, k) -> Phi((z - t) / std), t = zn at the k-th choice.
ops::LoadProbs topk_load_probs_forward(const Tensor& z, const Tensor& zn, const Tensor& expert, float noise_std);
ops::LoadProbsGrads topk_load_probs_backward(const Tensor& g, const Tensor& z, const Tensor& threshold,
                                            const Tensor& expert, float noise_std, bool need_zn);

// ---- MoE data movement and experts (cuda/moe.cu, cuda/experts.cu, cuda/expert_mlp.cu) -------
// The twins of ops/moe.cpp, ops/experts.cpp and ops/expert_mlp.cpp (shapes in ops/moe.h). They
// trust the Assignment (it comes from the routing kernels) and bound their work by R = G*C, the
// buffer's rows, not by a host copy of the rows in use: rows past rows[e] are zeroed or skipped.
Tensor dispatch_forward(const Tensor& x, const ops::Assignment& a);
Tensor dispatch_backward(const Tensor& g, const ops::Assignment& a);
Tensor combine_forward(const Tensor& y, const ops::Assignment& a);
ops::CombineGrads combine_backward(const Tensor& g, const Tensor& y, const ops::Assignment& a, bool need_y,
                                   bool need_w);
Tensor expert_matmul_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rows);
LinearGrads expert_matmul_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rows, bool need_x,
                                   bool need_w, bool need_b);
ops::ExpertMlpOut expert_mlp_forward(const Tensor& x, const ops::ExpertWeights& w, const Tensor& rows,
                                     bool for_backward);
ops::ExpertMlpGrads expert_mlp_backward(const Tensor& dy, const Tensor& x, const ops::ExpertWeights& w,
                                        const Tensor& rows, const ops::ExpertMlpOut& saved,
                                        const ops::ExpertMlpNeeds& need);
ops::ExpertMlpOut moe_mlp_forward(const Tensor& x, const ops::Assignment& a, const ops::ExpertWeights& w,
                                  bool for_backward);
ops::ExpertMlpGrads moe_mlp_backward(const Tensor& dout, const Tensor& x, const ops::Assignment& a,
                                     const ops::ExpertWeights& w, const ops::ExpertMlpOut& saved,
                                     const ops::ExpertMlpNeeds& need);

// ---- router-consistency losses (cuda/prc.cu) -------------------------------------------------
// p, q: (B, T, E), pairs: (B, T) I64 in [-1, T) (not checked on the device) -> PRC's loss, its
// two terms, C, and G, H for the backward (ops/prc.h). op names the caller in errors.
PrcOut prc_forward(const char* op, const Tensor& p, const Tensor& q, const Tensor& pairs, const ops::PrcOptions& opt);
// dloss: () -> the gradients to p and q, each when asked for.
PairGrads prc_backward(const Tensor& dloss, const Tensor& p, const Tensor& q, const Tensor& pairs, const Tensor& G,
                       const Tensor& H, bool need_p, bool need_q);
// s, s2: (..., E) -> mean over tokens of 1 - sum min / sum max, and each token's A and U.
JaccardOut soft_jaccard_forward(const Tensor& s, const Tensor& s2);
// dloss: () -> the gradients to s and s2, each when asked for.
PairGrads soft_jaccard_backward(const Tensor& dloss, const Tensor& s, const Tensor& s2, const Tensor& A,
                                const Tensor& U, bool need_a, bool need_b);

// ---- optimizer updates (cuda/optim.cu) -------------------------------------------------------
// AdamW: one multi-tensor launch updates every parameter in place, as torch.optim.AdamW does:
//   p *= 1 - lr * wd;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;
//   p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps).
// params, grads, m, v: equal-length lists of same-shape tensors; weight_decays: one per tensor;
// step: 1 for the first update. Every gradient is read times grad_scale (the clip scale: the
// gradient tensors are not written, as they may be shared between parameters).
void adamw_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                const std::vector<Tensor>& m, const std::vector<Tensor>& v, float lr, float beta1,
                float beta2, float eps, const std::vector<float>& weight_decays, int64_t step,
                float grad_scale = 1.f);
// SGD, one tensor in place, as torch.optim.SGD with momentum and coupled weight decay:
//   g = grad * grad_scale + wd * p;  buf = momentum * buf + g;  p -= lr * buf.
// p, grad, buf: contiguous F32 CUDA tensors of one shape.
void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum,
              float wd, float grad_scale = 1.f);
// xs: CUDA tensors -> the sum of the squares of all their elements, summed on the device and
// read once (the global gradient norm's square).
double sum_of_squares(const std::vector<Tensor>& xs);

// ---- Philox random numbers (cuda/random.cu) --------------------------------------------------
// Element i is mv::philox::normal(seed, offset, i) / uniform(seed, offset, i): the same draws as
// the CPU's randn / rand for the same (seed, offset). Uniform draws are bitwise equal to the CPU;
// normal draws go through the same float steps (philox::normal_pair) and agree to a few ulp.
Tensor philox_normal(const Shape& shape, uint64_t seed, uint64_t offset);
Tensor philox_uniform(const Shape& shape, uint64_t seed, uint64_t offset);

// ---- copies behind Tensor (cuda/tensor.cu, through engine/memory.h's CudaHooks) --------------
// dst, src: CUDA tensors of the same shape and dtype, any strides (views) -> writes src into dst.
void copy_strided(const Tensor& dst, const Tensor& src);
// t: contiguous F32 CUDA tensor; every element set to value, on the device.
void fill(const Tensor& t, float value);

}  // namespace mv::cuda
