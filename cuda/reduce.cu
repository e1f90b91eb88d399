// Reductions on the GPU, the twins of ops/reduce.cpp: sums over any axes (and their backward,
// the broadcast back), the sum of all elements, column sums (the bias gradient), sum_to (the
// backward of a broadcasting op) and max / argmax along any axis.
//
// None of these is on a hot path of the ViT step by itself (GEMMs and attention are), so they
// are written for clarity: plain loops, one thread per output element. Sums are deterministic
// (a fixed reduction order, no atomics), so CPU/GPU parity checks are stable.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace mv::cuda {
namespace {

using detail::expect_cuda_f32;
using detail::grid_for;
using detail::Indexer;
using detail::kMaxDims;

constexpr int kThreads = 256;

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

// x seen as (outer, n, inner), a thread per column (o, i): the first largest x[o, :, i] and its
// index (NaN counts as largest, as on the CPU).
__global__ void max_kernel(const float* x, float* vals, int64_t* idx, int64_t outer, int64_t n, int64_t inner) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < outer * inner; col += stride) {
    const float* base = x + (col / inner) * n * inner + col % inner;
    int64_t best = 0;
    float b = base[0];
    for (int64_t r = 1; r < n && b == b; ++r) {
      const float v = base[r * inner];
      if (v > b || v != v) b = v, best = r;
    }
    vals[col] = b;
    idx[col] = best;
  }
}

// A thread per column: g[col] at its maximal element of the zeroed gx (one writer per element).
__global__ void max_backward_kernel(const float* g, const int64_t* idx, float* gx, int64_t outer, int64_t n,
                                    int64_t inner) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < outer * inner; col += stride)
    gx[((col / inner) * n + idx[col]) * inner + col % inner] = g[col];
}

// outer, n, inner of x around axis.
struct AxisSplit {
  int64_t outer = 1, n = 1, inner = 1;
  AxisSplit(const Shape& s, int axis) {
    for (int d = 0; d < axis; ++d) outer *= s[size_t(d)];
    n = s[size_t(axis)];
    for (size_t d = size_t(axis) + 1; d < s.size(); ++d) inner *= s[d];
  }
};

}  // namespace

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

Tensor sum_keep(const Tensor& x, const Shape& keep, double scale_) {
  const float scale = float(scale_);
  if (x.defined() && shape_numel(keep) == 1 && keep.size() == x.shape().size())  // every axis: one block's tree
    return sum_all(x.contiguous(), float(scale_)).reshaped(keep);
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

Tensor sum_to(const Tensor& g, const Shape& shape) {
  const int64_t C = detail::bias_width(shape, g.shape());
  if (C >= 0) {  // a bias gradient: column sums over the leading rows
    const int64_t R = C == 0 ? 0 : g.numel() / C;
    return column_sum(g.reshaped({R, C})).reshaped(shape);
  }
  Shape keep(g.shape().size() - shape.size(), 1);  // shape, left-padded with 1s to g's rank
  keep.insert(keep.end(), shape.begin(), shape.end());
  return sum_keep(g, keep, 1.0).reshaped(shape);
}

// g + 0 through the broadcasting add, then the scale.
Tensor expand(const Tensor& g, const Shape& x_shape, float scale) {
  const Tensor e = binary(Tensor::zeros(x_shape, DType::F32, Device::CUDA), g, Binary::Add);
  return scale == 1.f ? e : axpby(e, Tensor(), scale, 0.f);
}

ops::MaxOut max_forward(const Tensor& x_, int axis) {
  MV_CHECK(x_.defined() && axis >= 0 && axis < x_.ndim(), "cuda::max_forward: axis ", axis, " of ", x_.str());
  const Tensor x = x_.contiguous();
  expect_cuda_f32("max", "x", x);
  const AxisSplit a(x.shape(), axis);
  MV_CHECK(a.n > 0, "max: axis ", axis, " of ", x.str(), " is empty");
  Shape s = x.shape();
  s[size_t(axis)] = 1;
  ops::MaxOut o{Tensor::empty(s, DType::F32, Device::CUDA), Tensor::empty(s, DType::I64, Device::CUDA)};
  if (a.outer * a.inner == 0) return o;
  max_kernel<<<grid_for(a.outer * a.inner, kThreads), kThreads, 0, stream()>>>(
      x.data<float>(), o.values.data<float>(), o.index.data<int64_t>(), a.outer, a.n, a.inner);
  MV_CUDA_LAUNCH_CHECK();
  return o;
}

Tensor max_backward(const Tensor& g_, const Tensor& index, const Shape& xs, int axis) {
  const Tensor g = g_.contiguous();
  expect_cuda_f32("max backward", "g", g);
  const AxisSplit a(xs, axis);
  Tensor gx = Tensor::zeros(xs, DType::F32, Device::CUDA);
  if (a.outer * a.inner == 0) return gx;
  max_backward_kernel<<<grid_for(a.outer * a.inner, kThreads), kThreads, 0, stream()>>>(
      g.data<float>(), index.data<int64_t>(), gx.data<float>(), a.outer, a.n, a.inner);
  MV_CUDA_LAUNCH_CHECK();
  return gx;
}

Tensor argmax(const Tensor& x, int axis) { return max_forward(x, axis).index; }

}  // namespace mv::cuda
