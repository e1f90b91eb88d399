// Small kernels that let the generic ops (ops/) run on CUDA tensors: strided copy (behind
// Tensor::contiguous, slice and concat), fill, scaled add, column sums (the bias gradient), sums
// over any axes, the sum of all elements, and argmax over the last axis.
//
// None of these is on a hot path of the ViT step by itself (GEMMs and attention are), so they
// are written for clarity: plain grid-stride loops, one thread per output element. Sums are
// deterministic (a fixed reduction order, no atomics) so CPU/GPU parity checks are stable.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using detail::expect_cuda_f32;
using detail::grid_for;

constexpr int kThreads = 256;
using detail::Indexer;
using detail::kMaxDims;

// dst[idx . dst_stride] = src[idx . src_stride] for every multi-index idx (row-major order of i).
template <class T>
__global__ void strided_copy_kernel(T* dst, const T* src, int64_t n, Indexer<2> ix) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t off[2];
    ix.offsets(i, off);
    dst[off[0]] = src[off[1]];
  }
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = v;
}

// out[o] = scale * sum of x over the reduced index space, one thread per output element: `kept`
// walks the outputs (x's strides, 0 along reduced axes), `reduced` the reduced axes (x's strides
// there, size 1 elsewhere), always in the same order, so the sum is deterministic.
__global__ void sum_axes_kernel(const float* x, float* out, int64_t nout, int64_t count,
                                Indexer<1> kept, Indexer<1> reduced, float scale) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < nout; o += stride) {
    int64_t base[1], off[1];
    kept.offsets(o, base);
    float s = 0.f;
    for (int64_t r = 0; r < count; ++r) {
      reduced.offsets(r, off);
      s += x[base[0] + off[0]];
    }
    out[o] = s * scale;
  }
}

__global__ void axpby_kernel(const float* a, const float* b, float* out, int64_t n, float alpha,
                             float beta) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = b ? alpha * a[i] + beta * b[i] : alpha * a[i] + beta;
}

// out[c] = sum_r x[r, c]: one thread per column walks the rows in order (coalesced across the
// threads of a warp, which read neighbouring columns of the same row).
__global__ void column_sum_kernel(const float* x, float* out, int64_t R, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.f;
  for (int64_t r = 0; r < R; ++r) s += x[r * C + c];
  out[c] = s;
}

// One block: each thread sums a strided subset, then a fixed-order tree in shared memory.
__global__ void sum_all_kernel(const float* x, float* out, int64_t n, float scale) {
  __shared__ float part[kThreads];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = part[0] * scale;
}

// out[r] = index of the first largest x[r, :] (NaN counts as largest, as on the CPU).
__global__ void argmax_kernel(const float* x, int64_t* out, int64_t R, int64_t C) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const float* row = x + r * C;
  int64_t best = 0;
  for (int64_t c = 1; c < C; ++c) {
    const float v = row[c], b = row[best];
    if (isnan(b)) break;
    if (isnan(v) || v > b) best = c;
  }
  out[r] = best;
}

}  // namespace

void copy_strided(const Tensor& dst, const Tensor& src) {
  MV_CHECK(dst.defined() && src.defined() && dst.device() == Device::CUDA &&
               src.device() == Device::CUDA,
           "cuda::copy_strided: both tensors must be CUDA tensors, got ", dst.str(), " and ",
           src.str());
  MV_CHECK(dst.shape() == src.shape() && dst.dtype() == src.dtype(), "cuda::copy_strided: dst ",
           dst.str(), " and src ", src.str(), " must have the same shape and dtype");
  MV_CHECK(dst.ndim() <= kMaxDims, "cuda::copy_strided: rank ", dst.ndim(), " > ", kMaxDims);
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Indexer<2> L = Indexer<2>::make(dst.shape(), {&dst.strides(), &src.strides()});
  const unsigned g = grid_for(n, kThreads);
  switch (dtype_size(dst.dtype())) {
    case 4:
      strided_copy_kernel<uint32_t><<<g, kThreads, 0, stream()>>>(
          static_cast<uint32_t*>(dst.raw()), static_cast<const uint32_t*>(src.raw()), n, L);
      break;
    case 8:
      strided_copy_kernel<uint64_t><<<g, kThreads, 0, stream()>>>(
          static_cast<uint64_t*>(dst.raw()), static_cast<const uint64_t*>(src.raw()), n, L);
      break;
    case 2:
      strided_copy_kernel<uint16_t><<<g, kThreads, 0, stream()>>>(
          static_cast<uint16_t*>(dst.raw()), static_cast<const uint16_t*>(src.raw()), n, L);
      break;
    default: MV_FAIL("cuda::copy_strided: unsupported element size for ", dst.str());
  }
  MV_CUDA_LAUNCH_CHECK();
}

Tensor contiguous(const Tensor& x) {
  if (x.is_contiguous()) return x;
  Tensor out = Tensor::empty(x.shape(), x.dtype(), Device::CUDA);
  copy_strided(out, x);
  return out;
}

void fill(const Tensor& t, float value) {
  expect_cuda_f32("fill", "t", t);
  const int64_t n = t.numel();
  if (n == 0) return;
  fill_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(t.data<float>(), n, value);
  MV_CUDA_LAUNCH_CHECK();
}

Tensor axpby(const Tensor& a, const Tensor& b, float alpha, float beta) {
  expect_cuda_f32("axpby", "a", a);
  if (b.defined()) {
    expect_cuda_f32("axpby", "b", b);
    MV_CHECK(a.shape() == b.shape(), "cuda::axpby: shapes differ: ", a.str(), " and ", b.str());
  }
  Tensor out = Tensor::empty(a.shape(), DType::F32, Device::CUDA);
  const int64_t n = a.numel();
  if (n == 0) return out;
  axpby_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
      a.data<float>(), b.defined() ? b.data<float>() : nullptr, out.data<float>(), n, alpha, beta);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor column_sum(const Tensor& x) {
  expect_cuda_f32("column_sum", "x", x);
  MV_CHECK(x.ndim() == 2, "cuda::column_sum: x ", x.str(), " must be (R, C)");
  const int64_t R = x.size(0), C = x.size(1);
  Tensor out = Tensor::empty({C}, DType::F32, Device::CUDA);
  if (C == 0) return out;
  column_sum_kernel<<<unsigned(detail::ceil_div(C, kThreads)), kThreads, 0, stream()>>>(
      x.data<float>(), out.data<float>(), R, C);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor sum_keep(const Tensor& x, const Shape& keep, float scale) {
  MV_CHECK(x.defined() && x.device() == Device::CUDA && x.dtype() == DType::F32,
           "cuda::sum_keep: x must be an F32 CUDA tensor, got ", x.str());
  MV_CHECK(keep.size() == x.shape().size() && x.ndim() <= kMaxDims, "cuda::sum_keep: x ", x.str(),
           " and the kept shape ", shape_str(keep), " must have the same rank (<= ", kMaxDims, ")");
  Shape kept_stride(keep.size()), red_shape(keep.size()), red_stride(keep.size());
  for (size_t d = 0; d < keep.size(); ++d) {
    const int64_t n = x.shape()[d];
    MV_CHECK(keep[d] == n || keep[d] == 1, "cuda::sum_keep: axis ", d, " of ", x.str(),
             " cannot be kept as ", keep[d], " (", shape_str(keep), "): expected ", n, " or 1");
    const bool reduced = keep[d] == 1 && n != 1;
    kept_stride[d] = reduced ? 0 : x.strides()[d];
    red_shape[d] = reduced ? n : 1;
    red_stride[d] = reduced ? x.strides()[d] : 0;
  }
  Tensor out = Tensor::empty(keep, DType::F32, Device::CUDA);
  const int64_t nout = out.numel(), count = shape_numel(red_shape);
  if (nout == 0) return out;
  sum_axes_kernel<<<grid_for(nout, kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), out.data<float>(), nout, count, Indexer<1>::make(keep, {&kept_stride}),
      Indexer<1>::make(red_shape, {&red_stride}), scale);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor sum_all(const Tensor& x, float scale) {
  expect_cuda_f32("sum_all", "x", x);
  Tensor out = Tensor::empty({}, DType::F32, Device::CUDA);
  sum_all_kernel<<<1, kThreads, 0, stream()>>>(x.data<float>(), out.data<float>(), x.numel(), scale);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor argmax_last(const Tensor& x) {
  expect_cuda_f32("argmax_last", "x", x);
  MV_CHECK(x.ndim() >= 1 && x.size(-1) > 0, "cuda::argmax_last: x ", x.str(),
           " needs a non-empty last axis");
  const int64_t C = x.size(-1), R = x.numel() / C;
  Shape s = x.shape();
  s.pop_back();
  Tensor out = Tensor::empty(s, DType::I64, Device::CUDA);
  if (R == 0) return out;
  argmax_kernel<<<unsigned(detail::ceil_div(R, kThreads)), kThreads, 0, stream()>>>(
      x.data<float>(), out.data<int64_t>(), R, C);
  MV_CUDA_LAUNCH_CHECK();
  return out;
}

}  // namespace mv::cuda
