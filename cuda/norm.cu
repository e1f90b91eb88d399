// Layer norm over the last axis (D <= 8192), forward and backward.
//
//   forward:  mean = sum(x) / D,  var = sum((x - mean)^2) / D,  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * gamma + beta
//   backward: xhat = (x - mean) * rstd,  g = dy * gamma
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             dgamma = sum_rows(dy * xhat),  dbeta = sum_rows(dy)
//
// Rows are held in registers with the layout of RowRegs (common.cuh): one warp per row for
// D <= 1024, 256 threads per row above. The forward reads x once and computes the variance from
// the registers in a second, exact pass (no E[x^2] - E[x]^2 cancellation).
//
// The backward is deterministic without atomics. Kernel 1 gives each block a fixed, strided set
// of rows; every thread keeps the dgamma/dbeta contributions of its own columns in registers
// across those rows, and at the end the block writes one row of partial sums to a (G, D)
// buffer (the 4 warps of a warp-per-row block first add their registers in shared memory in a
// fixed warp order). Kernel 2 reduces the G partial rows per column in a fixed order: each
// block takes 32 columns; its 8 warps sum strided partial rows, then one warp adds the 8 results.
// The grid size G depends only on the device and the shape, so results are bitwise repeatable.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using namespace detail;

template <int TPR>
__device__ __forceinline__ void group_and_lane(int& group, int& t) {
  group = TPR == 32 ? int(threadIdx.x >> 5) : 0;
  t = TPR == 32 ? int(threadIdx.x & 31) : int(threadIdx.x);
}

template <int VPT, bool VEC, int TPR>
__global__ void __launch_bounds__(row_block_threads<TPR>())
    ln_fwd(const float* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
           float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int R, int D, float eps) {
  int group, t;
  group_and_lane<TPR>(group, t);
  const int row = blockIdx.x * rows_per_block<TPR>() + group;
  if (row >= R) return;  // warp-per-row mode only: no block barrier follows
  using L = RowRegs<VPT, VEC, TPR>;
  float v[VPT];
  L::load(x + int64_t(row) * D, D, t, v, 0.f);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) s += v[k];
  const float mu = row_sum<TPR>(s) / float(D);
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const float d = L::col(t, k) < D ? v[k] - mu : 0.f;
    q += d * d;
  }
  const float rs = 1.f / sqrtf(row_sum<TPR>(q) / float(D) + eps);
  float g[VPT], b[VPT];
  if (gamma) L::load(gamma, D, t, g, 0.f);
  if (beta) L::load(beta, D, t, b, 0.f);
#pragma unroll
  for (int k = 0; k < VPT; ++k) v[k] = (v[k] - mu) * rs * (gamma ? g[k] : 1.f) + (beta ? b[k] : 0.f);
  L::store(y + int64_t(row) * D, D, t, v);
  if (t == 0) mean[row] = mu, rstd[row] = rs;
}

// Kernel 1 of the backward: dx, and one row of dgamma / dbeta partials per block.
template <int VPT, bool VEC, int TPR>
__global__ void __launch_bounds__(row_block_threads<TPR>())
    ln_bwd_dx(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ gamma,
              const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ dx,
              float* __restrict__ part_g, float* __restrict__ part_b, int R, int D) {
  constexpr int RPB = rows_per_block<TPR>();
  int group, t;
  group_and_lane<TPR>(group, t);
  using L = RowRegs<VPT, VEC, TPR>;
  float gm[VPT], acc_g[VPT], acc_b[VPT];
  if (gamma) L::load(gamma, D, t, gm, 0.f);
#pragma unroll
  for (int k = 0; k < VPT; ++k) acc_g[k] = 0.f, acc_b[k] = 0.f;
  const float inv_d = 1.f / float(D);
  // Every thread of a row group runs the same iterations; in 256-thread mode the whole block does.
  for (int row = blockIdx.x * RPB + group; row < R; row += gridDim.x * RPB) {
    float xv[VPT], g[VPT];
    L::load(x + int64_t(row) * D, D, t, xv, 0.f);
    L::load(dy + int64_t(row) * D, D, t, g, 0.f);  // padding: dy = 0 adds nothing below
    const float mu = mean[row], rs = rstd[row];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      xv[k] = (xv[k] - mu) * rs;  // xhat
      acc_g[k] += g[k] * xv[k];
      acc_b[k] += g[k];
      if (gamma) g[k] *= gm[k];
      s1 += g[k];
      s2 += g[k] * xv[k];
    }
    const float a = row_sum<TPR>(s1) * inv_d, b = row_sum<TPR>(s2) * inv_d;
#pragma unroll
    for (int k = 0; k < VPT; ++k) g[k] = rs * (g[k] - a - xv[k] * b);
    L::store(dx + int64_t(row) * D, D, t, g);
  }
  float* pg = part_g + int64_t(blockIdx.x) * D;
  float* pb = part_b + int64_t(blockIdx.x) * D;
  if constexpr (RPB == 1) {
    L::store(pg, D, t, acc_g);  // each column belongs to exactly one thread of the block
    L::store(pb, D, t, acc_b);
  } else {
    // 4 warps hold partials for the same columns: add them in shared memory, warp 0 first.
    extern __shared__ float sh[];  // 2 * D floats
    for (int w = 0; w < RPB; ++w) {
      if (group == w) {
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
          const int c = L::col(t, k);
          if (c < D) {
            sh[c] = w == 0 ? acc_g[k] : sh[c] + acc_g[k];
            sh[D + c] = w == 0 ? acc_b[k] : sh[D + c] + acc_b[k];
          }
        }
      }
      __syncthreads();
    }
    for (int c = threadIdx.x; c < D; c += blockDim.x) pg[c] = sh[c], pb[c] = sh[D + c];
  }
}

// Kernel 2: out[c] = sum over G partial rows, fixed order. Block (32, 8): 32 columns, 8 strided
// slices of the G rows, then warp 0 adds the 8 slice sums in order.
__global__ void __launch_bounds__(256)
    ln_bwd_reduce(const float* __restrict__ part_g, const float* __restrict__ part_b,
                  float* __restrict__ dgamma, float* __restrict__ dbeta, int G, int D) {
  __shared__ float sg[8][33], sb[8][33];
  const int cx = threadIdx.x & 31, gy = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + cx;
  float a = 0.f, b = 0.f;
  if (c < D)
    for (int g = gy; g < G; g += 8) a += part_g[int64_t(g) * D + c], b += part_b[int64_t(g) * D + c];
  sg[gy][cx] = a, sb[gy][cx] = b;
  __syncthreads();
  if (gy == 0 && c < D) {
    float ta = 0.f, tb = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ta += sg[k][cx], tb += sb[k][cx];
    dgamma[c] = ta, dbeta[c] = tb;
  }
}

void check_affine(const char* fn, const char* name, const Tensor& p, int D) {
  if (!p.defined()) return;
  expect_cuda_f32(fn, name, p);
  MV_CHECK(p.ndim() == 1 && p.size(0) == D, "cuda::", fn, ": ", name, " ", p.str(),
           " does not match the normalised size ", D);
}

// Rows R and width D of x: (..., D), with the kernels' limits checked.
void ln_rows(const char* fn, const Tensor& x, int& R, int& D) {
  MV_CHECK(x.ndim() >= 1, "cuda::", fn, ": expected x (..., D), got ", x.str());
  const int64_t d = x.size(-1), r = d ? x.numel() / d : 0;
  MV_CHECK(d >= 1 && d <= kMaxRegRow, "cuda::", fn, ": x ", x.str(), ": the normalised size must be 1..",
           kMaxRegRow);
  MV_CHECK(r < (int64_t(1) << 31), "cuda::", fn, ": x ", x.str(), " has too many rows");
  R = int(r);
  D = int(d);
}

Shape row_shape(const Tensor& x) { return Shape(x.shape().begin(), x.shape().end() - 1); }

}  // namespace

LayerNormOut layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
  expect_cuda_f32("layernorm_forward", "x", x);
  int R, D;
  ln_rows("layernorm_forward", x, R, D);
  check_affine("layernorm_forward", "gamma", gamma, D);
  check_affine("layernorm_forward", "beta", beta, D);
  LayerNormOut o{Tensor::empty(x.shape(), DType::F32, Device::CUDA),
                 Tensor::empty(row_shape(x), DType::F32, Device::CUDA),
                 Tensor::empty(row_shape(x), DType::F32, Device::CUDA)};
  if (R == 0) return o;
  const float* px = x.data<float>();
  const float* pg = gamma.defined() ? gamma.data<float>() : nullptr;
  const float* pb = beta.defined() ? beta.data<float>() : nullptr;
  float* py = o.y.data<float>();
  const bool vec = D % 4 == 0 && aligned16(px) && aligned16(py) && (!pg || aligned16(pg)) &&
                   (!pb || aligned16(pb));
  dispatch_row_layout(D, vec, [&]<int VPT, bool VEC, int TPR>() {
    const unsigned grid = unsigned(ceil_div(R, rows_per_block<TPR>()));
    ln_fwd<VPT, VEC, TPR><<<grid, row_block_threads<TPR>(), 0, stream()>>>(
        px, pg, pb, py, o.mean.data<float>(), o.rstd.data<float>(), R, D, eps);
  });
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

LayerNormGrads layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& gamma,
                                  const Tensor& mean, const Tensor& rstd) {
  const char* fn = "layernorm_backward";
  expect_cuda_f32(fn, "dy", dy);
  expect_cuda_f32(fn, "x", x);
  expect_cuda_f32(fn, "mean", mean);
  expect_cuda_f32(fn, "rstd", rstd);
  int R, D;
  ln_rows(fn, x, R, D);
  MV_CHECK(dy.shape() == x.shape(), "cuda::layernorm_backward: dy ", dy.str(), " and x ", x.str(),
           " differ in shape");
  MV_CHECK(mean.numel() == R && rstd.numel() == R, "cuda::layernorm_backward: mean ", mean.str(),
           " / rstd ", rstd.str(), " must hold one value per row of x ", x.str());
  check_affine(fn, "gamma", gamma, D);
  LayerNormGrads g{Tensor::empty(x.shape(), DType::F32, Device::CUDA),
                   Tensor::empty({D}, DType::F32, Device::CUDA),
                   Tensor::empty({D}, DType::F32, Device::CUDA)};
  if (R == 0) {
    MV_CUDA_CHECK(cudaMemsetAsync(g.dgamma.raw(), 0, g.dgamma.nbytes(), stream()));
    MV_CUDA_CHECK(cudaMemsetAsync(g.dbeta.raw(), 0, g.dbeta.nbytes(), stream()));
    return g;
  }
  const float* pdy = dy.data<float>();
  const float* px = x.data<float>();
  const float* pgm = gamma.defined() ? gamma.data<float>() : nullptr;
  float* pdx = g.dx.data<float>();
  const bool vec = D % 4 == 0 && aligned16(pdy) && aligned16(px) && aligned16(pdx) &&
                   (!pgm || aligned16(pgm));
  dispatch_row_layout(D, vec, [&]<int VPT, bool VEC, int TPR>() {
    constexpr int RPB = rows_per_block<TPR>();
    // A few blocks per SM: enough rows in flight, while the partials stay a small fraction of
    // the traffic (G * D * 2 floats written and read vs 3 * R * D).
    const int G = int(std::min<int64_t>(ceil_div(R, RPB), int64_t(sm_count()) * (TPR == 32 ? 8 : 4)));
    Tensor part = Tensor::empty({2, G, D}, DType::F32, Device::CUDA);
    float* pp = part.data<float>();
    const size_t shmem = RPB > 1 ? size_t(2) * D * sizeof(float) : 0;
    ln_bwd_dx<VPT, VEC, TPR><<<G, row_block_threads<TPR>(), shmem, stream()>>>(
        pdy, px, pgm, mean.data<float>(), rstd.data<float>(), pdx, pp, pp + int64_t(G) * D, R, D);
    MV_CUDA_LAUNCH_CHECK();
    ln_bwd_reduce<<<unsigned(ceil_div(D, 32)), 256, 0, stream()>>>(
        pp, pp + int64_t(G) * D, g.dgamma.data<float>(), g.dbeta.data<float>(), G, D);
    MV_CUDA_LAUNCH_CHECK();
  });
  return g;
}

}  // namespace mv::cuda
