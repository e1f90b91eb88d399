// Softmax over the last axis, forward and backward, for rows of any length C.
//
//   forward:  y = exp(x - max) / sum(exp(x - max))
//   backward: dx = y * (dy - sum(dy * y))
//
// Rows up to 8192 (kMaxRegRow) are held in registers (RowRegs in common.cuh): one warp per row
// when C <= 1024 (4 rows per 128-thread block), 256 threads per row above that. Each thread loads
// its VPT values once (float4 when C % 4 == 0 and the rows are 16-byte aligned), the row max and
// the row sum are shuffle reductions (plus one trip through shared memory with 256 threads), and
// the results are written from the same registers: the input is read exactly once, which is the
// floor for a memory-bound kernel. Reading once also makes the "online" (running max / rescaled
// sum) formulation unnecessary here.
//
// Longer rows use one 1024-thread block per row and the online softmax: a first pass keeps a
// running (max m, sum s) per thread, rescaling s by exp(m_old - m_new) when the max grows, the
// (m, s) pairs are merged across the block, and a second pass writes exp(x - m) / s; the second
// read usually hits L2. The backward's long-row path is a dot-product pass and a write pass.
//
// Padding lanes load -inf (forward: exp(-inf) = 0 adds nothing) or 0 (backward).
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

// Row index and thread-in-row for the register kernels.
template <int TPR>
__device__ __forceinline__ void row_and_lane(int& row, int& t) {
  if constexpr (TPR == 32) {
    row = blockIdx.x * 4 + (threadIdx.x >> 5);
    t = threadIdx.x & 31;
  } else {
    row = blockIdx.x;
    t = threadIdx.x;
  }
}

template <int VPT, bool VEC, int TPR>
__global__ void __launch_bounds__(row_block_threads<TPR>())
    softmax_fwd_reg(const float* __restrict__ x, float* __restrict__ y, int R, int C) {
  int row, t;
  row_and_lane<TPR>(row, t);
  if (row >= R) return;  // only in warp-per-row mode, where no block-wide barrier follows
  using L = RowRegs<VPT, VEC, TPR>;
  float v[VPT];
  L::load(x + int64_t(row) * C, C, t, v, -INFINITY);
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < VPT; ++k) m = fmaxf(m, v[k]);
  m = row_max<TPR>(m);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    v[k] = expf(v[k] - m);
    s += v[k];
  }
  const float inv = 1.f / row_sum<TPR>(s);
#pragma unroll
  for (int k = 0; k < VPT; ++k) v[k] *= inv;
  L::store(y + int64_t(row) * C, C, t, v);
}

template <int VPT, bool VEC, int TPR>
__global__ void __launch_bounds__(row_block_threads<TPR>())
    softmax_bwd_reg(const float* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx,
                    int R, int C) {
  int row, t;
  row_and_lane<TPR>(row, t);
  if (row >= R) return;
  using L = RowRegs<VPT, VEC, TPR>;
  float a[VPT], g[VPT];
  L::load(y + int64_t(row) * C, C, t, a, 0.f);
  L::load(dy + int64_t(row) * C, C, t, g, 0.f);
  float d = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) d += a[k] * g[k];
  d = row_sum<TPR>(d);
#pragma unroll
  for (int k = 0; k < VPT; ++k) a[k] *= g[k] - d;
  L::store(dx + int64_t(row) * C, C, t, a);
}

// ---- long rows: one 1024-thread block per row, online max / sum -------------------------------

constexpr int kLongThreads = 1024;

template <bool VEC>
__global__ void __launch_bounds__(kLongThreads)
    softmax_fwd_long(const float* __restrict__ x, float* __restrict__ y, int C) {
  const float* xr = x + int64_t(blockIdx.x) * C;
  float* yr = y + int64_t(blockIdx.x) * C;
  float m = -INFINITY, s = 0.f;
  if constexpr (VEC) {
    for (int c = 4 * threadIdx.x; c < C; c += 4 * kLongThreads) {
      const float4 v = *reinterpret_cast<const float4*>(xr + c);
      ms_push(m, s, v.x), ms_push(m, s, v.y), ms_push(m, s, v.z), ms_push(m, s, v.w);
    }
  } else {
    for (int c = threadIdx.x; c < C; c += kLongThreads) ms_push(m, s, xr[c]);
  }
  row_ms<kLongThreads>(m, s);
  const float inv = 1.f / s;
  if constexpr (VEC) {
    for (int c = 4 * threadIdx.x; c < C; c += 4 * kLongThreads) {
      const float4 v = *reinterpret_cast<const float4*>(xr + c);
      *reinterpret_cast<float4*>(yr + c) = make_float4(expf(v.x - m) * inv, expf(v.y - m) * inv,
                                                       expf(v.z - m) * inv, expf(v.w - m) * inv);
    }
  } else {
    for (int c = threadIdx.x; c < C; c += kLongThreads) yr[c] = expf(xr[c] - m) * inv;
  }
}

__global__ void __launch_bounds__(kLongThreads)
    softmax_bwd_long(const float* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx, int C) {
  const int64_t off = int64_t(blockIdx.x) * C;
  float d = 0.f;
  for (int c = threadIdx.x; c < C; c += kLongThreads) d += y[off + c] * dy[off + c];
  d = row_sum<kLongThreads>(d);
  for (int c = threadIdx.x; c < C; c += kLongThreads) dx[off + c] = y[off + c] * (dy[off + c] - d);
}

// Rows and row length of a last-axis op; checks the sizes fit the kernels' int indexing.
void rows_of(const char* fn, const Tensor& x, int& R, int& C) {
  MV_CHECK(x.ndim() >= 1, "cuda::", fn, ": expected at least one axis, got ", x.str());
  const int64_t c = x.size(-1), r = c ? x.numel() / c : 0;
  MV_CHECK(c < (int64_t(1) << 31) && r < (int64_t(1) << 31), "cuda::", fn, ": ", x.str(),
           " is too large for the row kernels");
  R = int(r);
  C = int(c);
}

}  // namespace

Tensor softmax_forward(const Tensor& x) {
  expect_cuda_f32("softmax_forward", "x", x);
  int R, C;
  rows_of("softmax_forward", x, R, C);
  Tensor y = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  if (R == 0 || C == 0) return y;
  const float* px = x.data<float>();
  float* py = y.data<float>();
  const bool vec = C % 4 == 0 && aligned16(px) && aligned16(py);
  if (C <= kMaxRegRow) {
    dispatch_row_layout(C, vec, [&]<int VPT, bool VEC, int TPR>() {
      const unsigned grid = unsigned(ceil_div(R, rows_per_block<TPR>()));
      softmax_fwd_reg<VPT, VEC, TPR><<<grid, row_block_threads<TPR>(), 0, stream()>>>(px, py, R, C);
    });
  } else if (vec) {
    softmax_fwd_long<true><<<R, kLongThreads, 0, stream()>>>(px, py, C);
  } else {
    softmax_fwd_long<false><<<R, kLongThreads, 0, stream()>>>(px, py, C);
  }
  MV_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor softmax_backward(const Tensor& y, const Tensor& dy) {
  expect_cuda_f32("softmax_backward", "y", y);
  expect_cuda_f32("softmax_backward", "dy", dy);
  MV_CHECK(y.shape() == dy.shape(), "cuda::softmax_backward: y ", y.str(), " and dy ", dy.str(),
           " differ in shape");
  int R, C;
  rows_of("softmax_backward", y, R, C);
  Tensor dx = Tensor::empty(y.shape(), DType::F32, Device::CUDA);
  if (R == 0 || C == 0) return dx;
  const float* py = y.data<float>();
  const float* pg = dy.data<float>();
  float* pd = dx.data<float>();
  const bool vec = C % 4 == 0 && aligned16(py) && aligned16(pg) && aligned16(pd);
  if (C <= kMaxRegRow) {
    dispatch_row_layout(C, vec, [&]<int VPT, bool VEC, int TPR>() {
      const unsigned grid = unsigned(ceil_div(R, rows_per_block<TPR>()));
      softmax_bwd_reg<VPT, VEC, TPR><<<grid, row_block_threads<TPR>(), 0, stream()>>>(py, pg, pd, R, C);
    });
  } else {
    softmax_bwd_long<<<R, kLongThreads, 0, stream()>>>(py, pg, pd, C);
  }
  MV_CUDA_LAUNCH_CHECK();
  return dx;
}

}  // namespace mv::cuda
