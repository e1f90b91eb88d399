// SGD with momentum and coupled weight decay (torch.optim.SGD's update), one tensor per launch:
//   g = grad * grad_scale + wd * p;  buf = momentum * buf + g;  p -= lr * buf.
// A plain grid-stride map; the optimizer calls it once per parameter tensor. (AdamW, the
// default optimizer, packs every tensor into one launch instead: cuda/adamw.cu.)
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void sgd_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                           int64_t n, float lr, float momentum, float wd, float gs) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float b = momentum * buf[i] + g[i] * gs + wd * p[i];
    buf[i] = b;
    p[i] -= lr * b;
  }
}

}  // namespace

void sgd_step(const Tensor& p, const Tensor& grad, const Tensor& buf, float lr, float momentum,
              float wd, float grad_scale) {
  detail::expect_cuda_f32("sgd_step", "p", p);
  detail::expect_cuda_f32("sgd_step", "grad", grad);
  detail::expect_cuda_f32("sgd_step", "buf", buf);
  MV_CHECK(grad.shape() == p.shape() && buf.shape() == p.shape(), "cuda::sgd_step: p ", p.str(),
           ", grad ", grad.str(), ", buf ", buf.str(), " differ in shape");
  const int64_t n = p.numel();
  if (n == 0) return;
  sgd_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, stream()>>>(
      p.data<float>(), grad.data<float>(), buf.data<float>(), n, lr, momentum, wd, grad_scale);
  MV_CUDA_LAUNCH_CHECK();
}

}  // namespace mv::cuda
