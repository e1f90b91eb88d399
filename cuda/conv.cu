// Unfold (im2col, channels-last) on the GPU, the twin of ops/conv.cpp.
//
// Forward: one thread per element of the window rows (B, Ho Wo, k k C), walked in row-major
// order so that the writes are coalesced and consecutive threads read consecutive channels of a
// pixel; a tap on the padding writes 0.
//
// Backward (fold): overlapping windows read a pixel several times, so rather than scattering
// each row entry with atomics, one thread per pixel channel gathers the entries that copied it:
// pixel y is tap i of output row oy when oy s + i - pad = y, so oy runs over the stride-s
// values in [(y + pad - k + 1) / s, (y + pad) / s] inside [0, Ho), likewise x. A fixed order
// of addition, so the result does not vary from run to run.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int64_t H, W, C, k, s, pad, ho, wo;
};

__global__ void unfold_kernel(const float* x, float* rows, int64_t total, Dims d) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t F = d.k * d.k * d.C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t f = e % F, r = e / F;  // r = (b Ho + oy) Wo + ox
    const int64_t c = f % d.C, tap = f / d.C, i = tap / d.k, j = tap % d.k;
    const int64_t ox = r % d.wo, oy = (r / d.wo) % d.ho, b = r / (d.wo * d.ho);
    const int64_t y = oy * d.s + i - d.pad, xx = ox * d.s + j - d.pad;
    rows[e] = (y < 0 || y >= d.H || xx < 0 || xx >= d.W) ? 0.f : x[((b * d.H + y) * d.W + xx) * d.C + c];
  }
}

// The first output index whose window reaches pixel p, and the last plus one, clipped to [0, n).
__device__ __forceinline__ int64_t first_window(int64_t p, const Dims& d) {
  const int64_t lo = p + d.pad - d.k + 1;
  return lo <= 0 ? 0 : (lo + d.s - 1) / d.s;
}
__device__ __forceinline__ int64_t end_window(int64_t p, int64_t n, const Dims& d) {
  return min(n, (p + d.pad) / d.s + 1);
}

__global__ void fold_kernel(const float* rows, float* dx, int64_t total, Dims d) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t F = d.k * d.k * d.C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t c = e % d.C, xx = (e / d.C) % d.W, y = (e / (d.C * d.W)) % d.H, b = e / (d.C * d.W * d.H);
    float sum = 0.f;
    for (int64_t oy = first_window(y, d); oy < end_window(y, d.ho, d); ++oy)
      for (int64_t ox = first_window(xx, d); ox < end_window(xx, d.wo, d); ++ox) {
        const int64_t i = y + d.pad - oy * d.s, j = xx + d.pad - ox * d.s;
        sum += rows[((b * d.ho + oy) * d.wo + ox) * F + (i * d.k + j) * d.C + c];
      }
    dx[e] = sum;
  }
}

Dims dims(const Shape& xs, const ops::ConvGeometry& g) {
  return {xs[1], xs[2], xs[3], g.k, g.stride, g.pad, g.ho, g.wo};
}

}  // namespace

Tensor unfold(const Tensor& x, const ops::ConvGeometry& g) {
  detail::expect_cuda_f32("unfold", "x", x);
  MV_CHECK(x.ndim() == 4 && x.is_contiguous(), "cuda::unfold: x ", x.str(), " must be contiguous (B, H, W, C)");
  const Dims d = dims(x.shape(), g);
  Tensor rows = Tensor::empty({x.size(0), g.ho * g.wo, g.k * g.k * d.C}, DType::F32, Device::CUDA);
  const int64_t total = rows.numel();
  if (total == 0) return rows;
  unfold_kernel<<<detail::grid_for(total, kThreads), kThreads, 0, stream()>>>(x.data<float>(), rows.data<float>(), total, d);
  MV_CUDA_LAUNCH_CHECK();
  return rows;
}

Tensor fold(const Tensor& rows, const Shape& xs, const ops::ConvGeometry& g) {
  detail::expect_cuda_f32("fold", "rows", rows);
  MV_CHECK(xs.size() == 4 && rows.shape() == Shape({xs[0], g.ho * g.wo, g.k * g.k * xs[3]}) && rows.is_contiguous(),
           "cuda::fold: rows ", rows.str(), " do not match images ", shape_str(xs), " with ", g.k, " x ", g.k,
           " windows");
  const Dims d = dims(xs, g);
  Tensor dx = Tensor::empty(xs, DType::F32, Device::CUDA);
  const int64_t total = dx.numel();
  if (total == 0) return dx;
  fold_kernel<<<detail::grid_for(total, kThreads), kThreads, 0, stream()>>>(rows.data<float>(), dx.data<float>(), total, d);
  MV_CUDA_LAUNCH_CHECK();
  return dx;
}

}  // namespace mv::cuda
