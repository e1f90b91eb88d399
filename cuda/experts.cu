// The batched expert product on the GPU, the twin of ops/experts.cpp, and the row helpers the
// expert kernels share (cuda/expert_mlp.cu uses them too).
//
// All experts run in one cuBLAS strided-batched GEMM over their (M, d) buffers. The rows past
// rows[e] (capacity padding) are multiplied too, so the work is bounded by the buffer, M = G*C
// rows, and never waits for a host copy of the rows in use; for that they are zeroed first
// (mask_rows), so the padding adds exactly nothing to the weight gradients and gets a zero input
// gradient, and the output's padding rows are zeroed again after the bias, as on the CPU.
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/matmul.h"

namespace mv::cuda {
namespace {

using detail::grid_for;

constexpr int kThreads = 256;

__global__ void mask_rows_kernel(const float* x, const int64_t* rows, float* out, int64_t M, int64_t c, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / c;
    out[i] = row % M < rows[row / M] ? x[i] : 0.f;
  }
}

__global__ void expert_bias_kernel(float* y, const float* b, int64_t M, int64_t c, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] += b[(i / (M * c)) * c + i % c];
}

}  // namespace

namespace detail {

Tensor mask_rows(const Tensor& x_, const Tensor& rows_) {
  const Tensor x = x_.contiguous();
  if (!rows_.defined()) return x;
  const Tensor rows = rows_.contiguous();
  Tensor out = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  const int64_t n = x.numel();
  if (n == 0) return out;
  mask_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(x.data<float>(), rows.data<int64_t>(),
                                                                     out.data<float>(), x.size(1), x.size(2), n);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

void add_expert_bias(const Tensor& y, const Tensor& b) {
  const int64_t n = y.numel();
  if (n == 0) return;
  expert_bias_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(y.data<float>(), b.contiguous().data<float>(),
                                                                       y.size(1), y.size(2), n);
  MV_CUDA_LAUNCH_CHECK();
}

Tensor expert_sums(const Tensor& g) {
  return sum_keep(g, {g.size(0), 1, g.size(2)}, 1.0).reshaped({g.size(0), g.size(2)});
}

}  // namespace detail

Tensor expert_matmul_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rows) {
  Tensor out = matmul(detail::mask_rows(x, rows), w.contiguous(), ops::allow_tf32());  // (E, M, h)
  if (b.defined()) detail::add_expert_bias(out, b);
  return rows.defined() ? detail::mask_rows(out, rows) : out;
}

LinearGrads expert_matmul_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rows, bool need_x,
                                   bool need_w, bool need_b) {
  const bool tf32 = ops::allow_tf32();
  const Tensor g = detail::mask_rows(dy, rows);
  LinearGrads o;
  if (need_x) o.dx = matmul_t(g, w.contiguous(), false, true, tf32);                    // dx = dy w^T
  if (need_w) o.dw = matmul_t(detail::mask_rows(x, rows), g, true, false, tf32);  // dw = x^T dy
  if (need_b) o.db = detail::expert_sums(g);                                        // db = sum of the rows
  return o;
}

}  // namespace mv::cuda
