// Cross-entropy over logits (N, C) with integer labels and label smoothing s.
//
//   forward:  lse_i  = log sum_c exp(x_ic)
//             loss_i = lse_i - (1 - s) x_{i,y_i} - (s / C) sum_c x_ic
//             (= (1 - s) * -log p_{i,y_i} + (s / C) * sum_c -log p_ic, PyTorch's definition)
//   backward: dx_ic = dloss / N * (exp(x_ic - lse_i) - (1 - s) [c == y_i] - s / C)
//
// Forward: one warp per row for C <= 1024 (4 rows per block), else a 256-thread block per row.
// A single pass over the row keeps the online softmax statistics per thread (running max and
// rescaled sum, see ms_push) plus the plain sum of the logits; the pairs are merged across the
// row at the end, so each logit is read once whatever C is (float4 loads when C % 4 == 0 and the
// rows are aligned). The label's logit is one extra load by the row's first thread.
//
// Backward: the softmax is recomputed from the saved lse and fused with the subtraction of the
// target and the 1/N scale, so it is one elementwise pass (read x, write dx) with no reduction:
// a grid-stride loop over N*C, float4 when C % 4 == 0. The incoming gradient is read from device
// memory, so no host synchronisation is needed.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

template <int TPR, bool VEC>
__global__ void __launch_bounds__(row_block_threads<TPR>())
    ce_fwd(const float* __restrict__ x, const int64_t* __restrict__ labels, float* __restrict__ loss,
           float* __restrict__ lse, int N, int C, float smooth) {
  int row, t;
  if constexpr (TPR == 32) {
    row = blockIdx.x * 4 + (threadIdx.x >> 5);
    t = threadIdx.x & 31;
    if (row >= N) return;  // whole warp; no block barrier in warp mode
  } else {
    row = blockIdx.x;
    t = threadIdx.x;
  }
  const float* xr = x + int64_t(row) * C;
  float m = -INFINITY, s = 0.f, sx = 0.f;
  if constexpr (VEC) {
    for (int c = 4 * t; c < C; c += 4 * TPR) {
      const float4 v = *reinterpret_cast<const float4*>(xr + c);
      ms_push(m, s, v.x), ms_push(m, s, v.y), ms_push(m, s, v.z), ms_push(m, s, v.w);
      sx += (v.x + v.y) + (v.z + v.w);
    }
  } else {
    for (int c = t; c < C; c += TPR) {
      const float v = xr[c];
      ms_push(m, s, v);
      sx += v;
    }
  }
  row_ms<TPR>(m, s);
  sx = row_sum<TPR>(sx);
  if (t == 0) {
    const float l = m + logf(s);
    const int64_t y = labels[row];
    lse[row] = l;
    loss[row] = (y >= 0 && y < C) ? l - (1.f - smooth) * xr[y] - smooth / float(C) * sx : NAN;
  }
}

template <bool VEC>
__global__ void __launch_bounds__(256)
    ce_bwd(const float* __restrict__ x, const int64_t* __restrict__ labels, const float* __restrict__ lse,
           const float* __restrict__ dloss, float* __restrict__ dx, int64_t n, int C, float smooth,
           float inv_n) {
  const float scale = (dloss ? dloss[0] : 1.f) * inv_n;
  const float off = smooth / float(C), on = 1.f - smooth;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if constexpr (VEC) {  // C % 4 == 0: a float4 never straddles two rows
    for (int64_t i = tid; i < n / 4; i += stride) {
      const int64_t e = 4 * i, row = e / C;
      const int c = int(e - row * C);
      const float l = lse[row];
      const int64_t y = labels[row];
      const float4 v = reinterpret_cast<const float4*>(x)[i];
      float4 o;
      o.x = scale * (expf(v.x - l) - off - (y == c ? on : 0.f));
      o.y = scale * (expf(v.y - l) - off - (y == c + 1 ? on : 0.f));
      o.z = scale * (expf(v.z - l) - off - (y == c + 2 ? on : 0.f));
      o.w = scale * (expf(v.w - l) - off - (y == c + 3 ? on : 0.f));
      reinterpret_cast<float4*>(dx)[i] = o;
    }
  } else {
    for (int64_t e = tid; e < n; e += stride) {
      const int64_t row = e / C;
      const int c = int(e - row * C);
      dx[e] = scale * (expf(x[e] - lse[row]) - off - (labels[row] == c ? on : 0.f));
    }
  }
}

void check_ce(const char* fn, const Tensor& logits, const Tensor& labels) {
  expect_cuda_f32(fn, "logits", logits);
  MV_CHECK(logits.ndim() == 2 && logits.size(1) >= 1, "cuda::", fn, ": logits ", logits.str(),
           ": expected (N, C) with C >= 1");
  MV_CHECK(logits.size(0) < (int64_t(1) << 31) && logits.size(1) < (int64_t(1) << 31), "cuda::", fn,
           ": logits ", logits.str(), " too large");
  MV_CHECK(labels.defined() && labels.device() == Device::CUDA && labels.dtype() == DType::I64 &&
               labels.is_contiguous(),
           "cuda::", fn, ": labels must be a contiguous I64 CUDA tensor, got ", labels.str());
  MV_CHECK(labels.ndim() == 1 && labels.size(0) == logits.size(0), "cuda::", fn, ": labels ",
           labels.str(), " do not match logits ", logits.str(), ": expected (N)");
}

}  // namespace

CrossEntropyOut cross_entropy_forward(const Tensor& logits, const Tensor& labels, float label_smoothing) {
  check_ce("cross_entropy_forward", logits, labels);
  const int N = int(logits.size(0)), C = int(logits.size(1));
  CrossEntropyOut o{Tensor(), Tensor::empty({N}, DType::F32, Device::CUDA), Tensor::empty({N}, DType::F32, Device::CUDA)};
  if (N == 0) {
    o.loss = sum_all(o.row_loss, 1.f / float(N));  // the mean of nothing: NaN, as in PyTorch
    return o;
  }
  const float* px = logits.data<float>();
  const int64_t* py = labels.data<int64_t>();
  float* pl = o.row_loss.data<float>();
  float* pe = o.lse.data<float>();
  const bool vec = C % 4 == 0 && aligned16(px);
  if (C <= 1024) {
    const unsigned grid = unsigned(ceil_div(N, 4));
    if (vec) ce_fwd<32, true><<<grid, 128, 0, stream()>>>(px, py, pl, pe, N, C, label_smoothing);
    else ce_fwd<32, false><<<grid, 128, 0, stream()>>>(px, py, pl, pe, N, C, label_smoothing);
  } else {
    if (vec) ce_fwd<256, true><<<N, 256, 0, stream()>>>(px, py, pl, pe, N, C, label_smoothing);
    else ce_fwd<256, false><<<N, 256, 0, stream()>>>(px, py, pl, pe, N, C, label_smoothing);
  }
  MV_CUDA_LAUNCH_CHECK();
  o.loss = sum_all(o.row_loss, 1.f / float(N));
  return o;
}

Tensor cross_entropy_backward(const Tensor& logits, const Tensor& labels, const Tensor& lse,
                              float label_smoothing, const Tensor& dloss) {
  const char* fn = "cross_entropy_backward";
  check_ce(fn, logits, labels);
  expect_cuda_f32(fn, "lse", lse);
  MV_CHECK(lse.numel() == logits.size(0), "cuda::cross_entropy_backward: lse ", lse.str(),
           " must hold one value per row of logits ", logits.str());
  if (dloss.defined()) {
    expect_cuda_f32(fn, "dloss", dloss);
    MV_CHECK(dloss.numel() == 1, "cuda::cross_entropy_backward: dloss ", dloss.str(),
             " must have one element (the gradient of the mean loss)");
  }
  const int64_t N = logits.size(0), C = logits.size(1), n = N * C;
  Tensor dx = Tensor::empty(logits.shape(), DType::F32, Device::CUDA);
  if (n == 0) return dx;
  const float* px = logits.data<float>();
  float* pd = dx.data<float>();
  const float* pdl = dloss.defined() ? dloss.data<float>() : nullptr;
  const bool vec = C % 4 == 0 && aligned16(px) && aligned16(pd);
  const unsigned grid = grid_for(vec ? n / 4 : n, 256);
  if (vec)
    ce_bwd<true><<<grid, 256, 0, stream()>>>(px, labels.data<int64_t>(), lse.data<float>(), pdl, pd, n,
                                             int(C), label_smoothing, 1.f / float(N));
  else
    ce_bwd<false><<<grid, 256, 0, stream()>>>(px, labels.data<int64_t>(), lse.data<float>(), pdl, pd, n,
                                              int(C), label_smoothing, 1.f / float(N));
  MV_CUDA_LAUNCH_CHECK();
  return dx;
}

}  // namespace mv::cuda
