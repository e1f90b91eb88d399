// Dispatch and combine on the GPU, the twins of ops/moe.cpp: moving d-wide rows between the
// tokens (G, N, d) and the packed expert buffers (E, R, d) through the Assignment's two index
// tables. Every kernel is a gather, so no two threads write one element and no float atomics are
// needed (the result does not depend on scheduling):
//   dispatch    a thread per buffer element: row (e, r) reads its token's element, or writes 0
//               past rows[e];
//   combine     a thread per token element: the sum, in the order of the token's list, of its
//               rows' elements times their weights (dispatch's backward is the same sum with
//               weight 1);
//   combine's backward: a thread per buffer element for dy = weight * g[token], and a warp per
//               row for the weight's gradient g[token] . y[row] (lanes in a fixed order, then a
//               butterfly).
// rows[e] is read on the device: nothing waits for the host.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

__global__ void gather_rows_kernel(const float* x, const int64_t* token, const int64_t* rows, float* out, int64_t R,
                                   int64_t d, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / d, c = i % d, e = row / R, r = row % R;
    out[i] = r < rows[e] ? x[token[row] * d + c] : 0.f;
  }
}

// dst[t, c] = sum over t's rows of w[row] * src[row, c] (w = 1 when null).
__global__ void sum_token_rows_kernel(const int64_t* token_rows, const float* src, const float* w, float* dst,
                                      int64_t K, int64_t d, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t t = i / d, c = i % d;
    float s = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t row = token_rows[t * K + j];
      if (row >= 0) s += (w ? w[row] : 1.f) * src[row * d + c];
    }
    dst[i] = s;
  }
}

__global__ void scale_rows_kernel(const float* g, const int64_t* token, const int64_t* rows, const float* w,
                                  float* dy, int64_t R, int64_t d, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / d, c = i % d, e = row / R, r = row % R;
    dy[i] = r < rows[e] ? w[row] * g[token[row] * d + c] : 0.f;
  }
}

// A warp per buffer row: dw[row] = g[token[row]] . y[row], 0 past rows[e].
__global__ void row_dots_kernel(const float* g, const float* y, const int64_t* token, const int64_t* rows, float* dw,
                                int64_t R, int64_t d, int64_t n_rows) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x & 31;
  for (int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); row < n_rows; row += warps) {
    const int64_t e = row / R, r = row % R;
    float s = 0.f;
    if (r < rows[e])
      for (int64_t c = lane; c < d; c += 32) s += g[token[row] * d + c] * y[row * d + c];
    s = detail::warp_sum(s);
    if (lane == 0) dw[row] = s;
  }
}


Tensor sum_rows(const Tensor& src, const Tensor* weight, const ops::Assignment& a, int64_t d) {
  Tensor out = device_empty({a.G, a.N, d});
  const Tensor tr = a.token_rows.contiguous();
  const int64_t n = out.numel();
  if (n == 0) return out;
  sum_token_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
      tr.data<int64_t>(), src.data<float>(), weight ? weight->data<float>() : nullptr, out.data<float>(), tr.size(2),
      d, n);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

}  // namespace

Tensor dispatch_forward(const Tensor& x_, const ops::Assignment& a) {
  const Tensor x = x_.contiguous(), token = a.token.contiguous(), rows = a.rows.contiguous();
  expect_cuda_f32("dispatch", "x", x);
  const int64_t E = token.size(0), R = token.size(1), d = x.size(2), n = E * R * d;
  Tensor out = device_empty({E, R, d});
  if (n == 0) return out;
  gather_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), token.data<int64_t>(), rows.data<int64_t>(), out.data<float>(), R, d, n);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor dispatch_backward(const Tensor& g, const ops::Assignment& a) {
  const Tensor gc = g.contiguous();
  return sum_rows(gc, nullptr, a, gc.size(2));
}

Tensor combine_forward(const Tensor& y_, const ops::Assignment& a) {
  const Tensor y = y_.contiguous(), w = a.weight.contiguous();
  expect_cuda_f32("combine", "y", y);
  return sum_rows(y, &w, a, y.size(2));
}

ops::CombineGrads combine_backward(const Tensor& g_, const Tensor& y_, const ops::Assignment& a, bool need_y,
                                   bool need_w) {
  const Tensor g = g_.contiguous(), y = y_.contiguous(), w = a.weight.contiguous();
  const Tensor token = a.token.contiguous(), rows = a.rows.contiguous();
  const int64_t E = token.size(0), R = token.size(1), d = y.size(2), n = E * R * d;
  ops::CombineGrads o{need_y ? device_empty({E, R, d}) : Tensor(), need_w ? device_empty({E, R}) : Tensor()};
  if (need_y && n > 0)
    scale_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
        g.data<float>(), token.data<int64_t>(), rows.data<int64_t>(), w.data<float>(), o.dy.data<float>(), R, d, n);
  if (need_w && E * R > 0)
    row_dots_kernel<<<grid_for(E * R * 32, kThreads), kThreads, 0, stream()>>>(
        g.data<float>(), y.data<float>(), token.data<int64_t>(), rows.data<int64_t>(), o.dweight.data<float>(), R, d,
        E * R);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

}  // namespace mv::cuda
