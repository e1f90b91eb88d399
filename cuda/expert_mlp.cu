// The expert MLP on the GPU, the twin of ops/expert_mlp.cpp: expert_mlp on packed (E, M, d)
// buffers and moe_mlp, the same with dispatch and combine around it.
//
// Forward: a = x w1 (one cuBLAS strided-batched GEMM for all experts); one kernel adds b1 and
// takes GELU (tanh form, ops/fast_math.h: the CPU's float steps) and its derivative from one
// tanh, keeping both for the backward; out = hid w2 (+ b2). Backward:
//   dhid = dy w2^T;  da = dhid * GELU'(a);  dx = da w1^T;
//   dw2 = hid^T dy, db2 = sum dy;  dw1 = x^T da, db1 = sum da      (per expert)
// moe_mlp gathers x's rows from the tokens (cuda/moe.cu's dispatch, zeros past rows[e]) and
// combines the expert outputs y; its backward takes dy = weight * g[token] and the weights'
// gradient from combine's backward, and sums dx's rows back into the tokens. The padding rows
// of the buffer go through the GEMMs as zeros (cuda/experts.cu explains why that is exact).
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/fast_math.h"
#include "ops/matmul.h"

namespace mv::cuda {
namespace {

using detail::grid_for;

constexpr int kThreads = 256;

// a: (E, M, H) in place of nothing: hid = GELU(a + b1[e]), dgelu = GELU'(a + b1[e]) (if not null).
__global__ void bias_gelu_kernel(const float* a, const float* b1, float* hid, float* dgelu, int64_t M, int64_t H,
                                 int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = a[i] + (b1 ? b1[(i / (M * H)) * H + i % H] : 0.f);
    float y, dy;
    ops::gelu_tanh_both(v, y, dy);
    hid[i] = y;
    if (dgelu) dgelu[i] = dy;
  }
}

// x: (E, M, d) with zeros past the rows in use -> out, hid, dgelu.
ops::ExpertMlpOut mlp_forward(const Tensor& x, const ops::ExpertWeights& w, bool for_backward) {
  const bool tf32 = ops::allow_tf32();
  const Tensor a = matmul(x, w.w1, tf32);  // (E, M, H)
  ops::ExpertMlpOut o;
  o.hid = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
  if (for_backward) o.dgelu = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
  const int64_t n = a.numel();
  if (n > 0) {
    bias_gelu_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
        a.data<float>(), w.b1.defined() ? w.b1.data<float>() : nullptr, o.hid.data<float>(),
        for_backward ? o.dgelu.data<float>() : nullptr, a.size(1), a.size(2), n);
    MV_CUDA_LAUNCH_CHECK();
  }
  o.out = matmul(o.hid, w.w2, tf32);  // (E, M, O)
  if (w.b2.defined()) detail::add_expert_bias(o.out, w.b2);
  return o;
}

// dy: (E, M, O) with zeros past the rows in use, x: the forward's buffer -> the gradients asked
// for (dx still per buffer row).
ops::ExpertMlpGrads mlp_backward(const Tensor& dy, const Tensor& x, const ops::ExpertWeights& w,
                                 const ops::ExpertMlpOut& saved, const ops::ExpertMlpNeeds& need) {
  const bool tf32 = ops::allow_tf32();
  const Tensor da = binary(matmul_t(dy, w.w2, false, true, tf32), saved.dgelu, Binary::Mul);  // (E, M, H)
  ops::ExpertMlpGrads g;
  if (need.x) g.dx = matmul_t(da, w.w1, false, true, tf32);        // (E, M, d)
  if (need.w1) g.dw1 = matmul_t(x, da, true, false, tf32);         // (E, d, H)
  if (need.b1) g.db1 = detail::expert_sums(da);                    // (E, H)
  if (need.w2) g.dw2 = matmul_t(saved.hid, dy, true, false, tf32);  // (E, H, O)
  if (need.b2) g.db2 = detail::expert_sums(dy);                    // (E, O)
  return g;
}

}  // namespace

ops::ExpertMlpOut expert_mlp_forward(const Tensor& x, const ops::ExpertWeights& w, const Tensor& rows,
                                     bool for_backward) {
  ops::ExpertMlpOut o = mlp_forward(detail::mask_rows(x, rows), w, for_backward);
  if (rows.defined()) o.out = detail::mask_rows(o.out, rows);
  return o;
}

ops::ExpertMlpGrads expert_mlp_backward(const Tensor& dy, const Tensor& x, const ops::ExpertWeights& w,
                                        const Tensor& rows, const ops::ExpertMlpOut& saved,
                                        const ops::ExpertMlpNeeds& need) {
  return mlp_backward(detail::mask_rows(dy, rows), detail::mask_rows(x, rows), w, saved, need);
}

ops::ExpertMlpOut moe_mlp_forward(const Tensor& x, const ops::Assignment& a, const ops::ExpertWeights& w,
                                  bool for_backward) {
  ops::ExpertMlpOut o = mlp_forward(dispatch_forward(x, a), w, for_backward);
  o.y = o.out;  // (E, R, O): combine reads only the rows in use
  o.out = combine_forward(o.y, a);
  return o;
}

ops::ExpertMlpGrads moe_mlp_backward(const Tensor& dout, const Tensor& x, const ops::Assignment& a,
                                     const ops::ExpertWeights& w, const ops::ExpertMlpOut& saved,
                                     const ops::ExpertMlpNeeds& need) {
  const ops::CombineGrads c = combine_backward(dout, saved.y, a, true, need.weight);
  ops::ExpertMlpGrads g = mlp_backward(c.dy, dispatch_forward(x, a), w, saved, need);
  if (need.x) g.dx = dispatch_backward(g.dx, a);
  g.dweight = c.dweight;
  return g;
}

}  // namespace mv::cuda
